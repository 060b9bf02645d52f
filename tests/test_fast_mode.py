import torch
from trl.models.utils import unwrap_model_for_generation

from tests.test_trainer import make_trainer


def test_window_slides_within_its_range_and_sets_the_trained_steps(tiny_sd3_path, tmp_path):
    trainer = make_trainer(tiny_sd3_path, tmp_path, num_inference_steps=8, sde_window_size=2)
    assert trainer.args.num_trained_steps == 2
    windows = set()
    for step in range(12):
        trainer.state.global_step = step
        window = trainer.rollouts.trained_steps()
        assert len(window) == 2 and 0 <= window.start < 8 // 2  # default range: the first half
        windows.add(window.start)
    assert len(windows) > 1  # it slides
    trainer.args.sde_window_range = [3, 4]
    assert trainer.rollouts.trained_steps() == range(3, 5)


def test_steps_outside_the_window_are_deterministic(tiny_sd3_path, tmp_path):
    trainer = make_trainer(tiny_sd3_path, tmp_path, num_inference_steps=6, sde_window_size=2)
    conditioning = trainer.rollouts.conditioning(["a red image", "something blue"])

    def latents_at_window_start(noise_level, window_mode):
        trainer.args.sde_window_size = 2 if window_mode else 0
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as denoiser:
            _, trajectory = trainer.rollouts.denoise(
                denoiser, conditioning, 6, noise_level, range(2, 4), torch.Generator().manual_seed(0)
            )
        return trajectory["latents"][:, 0], trajectory["old_log_probs"]

    ode, _ = latents_at_window_start(0.0, window_mode=True)
    fast, fast_log_probs = latents_at_window_start(0.7, window_mode=True)
    full, _ = latents_at_window_start(0.7, window_mode=False)
    assert torch.equal(fast, ode)  # steps 0-1 ran the ODE
    assert not torch.allclose(full, ode)  # in full mode they were SDE steps
    assert torch.all(fast_log_probs != 0)  # the window steps are stochastic, with log-probs


def test_fast_mode_trains(tiny_sd3_path, tmp_path):
    trainer = make_trainer(tiny_sd3_path, tmp_path, max_steps=2, num_inference_steps=8, sde_window_size=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and logged[1]["ratio/max_abs_deviation"] > 0


def progressive_sampler(global_step, **overrides):
    """A RolloutSampler whose trainer has done ``global_step`` optimizer updates (the window needs nothing else)."""
    from types import SimpleNamespace

    from trl_flow.rollout import RolloutSampler

    settings = dict(
        num_inference_steps=10,
        sde_window_size=2,
        sde_window_range=[0, 9],
        sde_window_schedule="progressive",
        sde_window_move_every=3,
        sde_window_stride=2,
        seed=0,
        gradient_accumulation_steps=1,
        num_trained_steps=2,
    )
    args = SimpleNamespace(**{**settings, **overrides})
    return RolloutSampler(None, args, None, 0, clock=lambda: (global_step, 7 * global_step))


def test_progressive_window_moves_every_n_updates_and_wraps():
    """MixGRPO's schedule: start at the range's low end, move by the stride every N updates, wrap back."""
    starts = [progressive_sampler(step).trained_steps().start for step in range(16)]
    assert starts == [0, 0, 0, 2, 2, 2, 4, 4, 4, 6, 6, 6, 8, 8, 8, 0]
    assert progressive_sampler(4).trained_steps() == range(2, 4)
    # A function of the update count alone: a run resumed at update 7 continues the same schedule.
    assert progressive_sampler(7).trained_steps() == progressive_sampler(7, seed=123).trained_steps()
    # The random window differs from batch to batch instead.
    random_starts = {progressive_sampler(s, sde_window_schedule="random").trained_steps().start for s in range(16)}
    assert len(random_starts) > 2
