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
