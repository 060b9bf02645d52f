"""GRPO-Guard: the normalised per-step ratio against an independent reading of the paper (and against the batch-
reduction bug of the official code, flow_grpo issue 244), the 1/(-dt) gradient reweighting, the rollout's recorded
step means, on-policy ratios, learning, and the doctor on a grpo_guard recipe."""

from types import SimpleNamespace

import pytest
import torch

from tests.factories import prompt_color_before_and_after_training, tiny_trainer
from trl_flow.algorithms import ALGORITHMS, GRPOGuard
from trl_flow.algorithms.grpo_guard import normalized_log_ratio
from trl_flow.cli import main
from trl_flow.sde import SDEStepOutput, sde_step_with_logprob


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def gaussian_step(seed=0, batch=6, shape=(3, 4, 4), shared_sigma=False):
    """A recorded Flow-SDE step (old policy) and a moved policy's rescore of it, per-sample sigmas, and moves of very
    different sizes per sample (so that a batch-global reduction shows)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=generator)
    v_old = torch.randn(batch, *shape, generator=generator)
    scale = torch.logspace(-3, -1, batch).reshape(-1, 1, 1, 1)
    v_new = v_old + scale * torch.randn(batch, *shape, generator=generator)
    sigma = torch.full((batch,), 0.7) if shared_sigma else torch.linspace(0.9, 0.3, batch)
    sigma_next = sigma - 0.15
    old = sde_step_with_logprob(v_old, sigma, sigma_next, x, 0.7, generator=generator)
    new = sde_step_with_logprob(v_new, sigma, sigma_next, x, 0.7, prev_sample=old.prev_sample)
    return old, new, sigma, sigma_next


def paper_log_ratio(old, new, batch_global_bias=False):
    """The paper's formula, literally and in float64: (log pi_new - log pi_old + b) * std with Gaussian log-probs
    averaged over elements and b = mean_D(d^2) / (2 std^2) per sample (or, with the official code's bug, one b for
    the whole batch)."""
    sample, old_mean, mean, std = (t.double() for t in (old.prev_sample, old.mean, new.mean, new.std))

    def log_prob(m):
        return torch.distributions.Normal(m, std).log_prob(sample).mean(dim=(1, 2, 3))

    bias = (mean - old_mean) ** 2 / (2 * std**2)
    bias = bias.mean() if batch_global_bias else bias.mean(dim=(1, 2, 3))
    return (log_prob(mean) - log_prob(old_mean) + bias) * std.reshape(-1)


def test_normalised_log_ratio_matches_the_paper_formula():
    old, new, _, _ = gaussian_step()
    ours = normalized_log_ratio(old.prev_sample, new.mean, old.mean, new.std.reshape(-1))
    expected = paper_log_ratio(old, new)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-10)
    # In exact arithmetic it is mean_D(z (mean_new - mean_old)) with x_next = mean_old + std z ...
    z = (old.prev_sample - old.mean) / old.std
    torch.testing.assert_close(ours, (z * (new.mean - old.mean)).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-10)
    # ... not the plain log-ratio, which carries the negative bias -mean_D(d^2) / (2 std^2) and a 1/std scale.
    assert not torch.allclose(new.log_prob - old.log_prob, ours, rtol=1e-2, atol=0)


def test_the_bias_is_reduced_per_sample_not_over_the_batch():
    """flow_grpo issue 244: the official code averages b over an empty tuple of dims of a (B,) tensor, i.e. over the
    whole batch. That version must differ here, where samples move by very different amounts."""
    old, new, _, _ = gaussian_step()
    ours = normalized_log_ratio(old.prev_sample, new.mean, old.mean, new.std.reshape(-1)).double()
    right, buggy = paper_log_ratio(old, new), paper_log_ratio(old, new, batch_global_bias=True)
    assert (buggy - right).abs().max() > 1000 * (ours - right).abs().max()


def test_on_policy_normalised_ratio_is_exactly_one():
    old, _, _, _ = gaussian_step()
    log_ratio = normalized_log_ratio(old.prev_sample, old.mean, old.mean, old.std.reshape(-1))
    assert torch.all(torch.exp(log_ratio) == 1)


def guard(epsilon=1e-4):
    args = SimpleNamespace(beta=0.0, epsilon=epsilon, epsilon_high=None, guidance_scale=1.0, noise_level=0.7)
    return GRPOGuard(args, adapter=None)


def guard_batch(old, sigma, sigma_next, advantages):
    return {
        "advantages": advantages,
        "old_log_probs": old.log_prob[:, None],
        "old_means": old.mean[:, None],
        "sigmas": sigma[:, None],
        "sigmas_next": sigma_next[:, None],
    }


def test_loss_and_gradient_follow_the_reweighted_equations():
    old, _, sigma, sigma_next = gaussian_step(shared_sigma=True)
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.0, 0.3, -2.0])
    mean = old.mean.clone().requires_grad_()  # on-policy: the rescored mean equals the rollout's
    # The rescore's Gaussian log-prob of the recorded sample, carrying the mean's gradient.
    log_prob = torch.distributions.Normal(mean, old.std).log_prob(old.prev_sample).mean(dim=(1, 2, 3))
    step = SDEStepOutput(old.prev_sample, log_prob, mean, old.std)
    stats = {"unnormalized_ratio": []}
    loss = guard().step_policy_loss(step, guard_batch(old, sigma, sigma_next, advantages), 0, stats).loss
    dt = sigma_next - sigma
    torch.testing.assert_close(loss, -advantages / (-dt))  # ratio 1: -A, divided by -dt
    loss.sum().backward()

    # Official form with the step's batch means (rows share the step): rho = exp(mean_D(z d)) and
    # loss = -A rho / mean(sqrt(-dt))^2, so d loss / d mean = -A z / (D mean(sqrt(-dt))^2) at d = 0.
    z = (old.prev_sample - old.mean) / old.std
    expected = -advantages.reshape(-1, 1, 1, 1) * z / z[0].numel() / torch.sqrt(-dt).mean() ** 2
    torch.testing.assert_close(mean.grad, expected, rtol=1e-4, atol=1e-9)


def test_the_step_weight_is_one_over_minus_dt_per_sample():
    old, new, sigma, sigma_next = gaussian_step()
    advantages = torch.linspace(-1, 1, 6)
    batch = guard_batch(old, sigma, sigma_next, advantages)
    weighted = guard(epsilon=1.0).step_policy_loss(new, batch, 0, {"unnormalized_ratio": []}).loss
    log_ratio = normalized_log_ratio(old.prev_sample, new.mean, old.mean, new.std.reshape(-1))
    torch.testing.assert_close(weighted, -advantages * torch.exp(log_ratio) / (sigma - sigma_next))


def test_is_registered_and_records_the_step_means():
    assert ALGORITHMS["grpo_guard"] is GRPOGuard
    assert GRPOGuard.rollout_record == "trajectory_with_means"


def test_rollout_records_old_means_and_first_iteration_is_on_policy(tiny_sd3_path, tmp_path):
    trainer = tiny_trainer(
        tiny_sd3_path,
        tmp_path / "out",
        algorithm="grpo_guard",
        max_steps=1,
        steps_per_generation=1,
        per_device_train_batch_size=16,
        beta=0.5,
    )
    batch = trainer._generate_and_score_completions([{"prompt": "a red image"}] * 16)
    assert batch["old_means"].shape == batch["next_latents"].shape
    k = 2
    step = trainer.rescore_step(trainer.model, batch, k)
    torch.testing.assert_close(step.mean, batch["old_means"][:, k], rtol=1e-5, atol=1e-5)
    trainer.train()
    assert logged(trainer, "ratio/max_abs_deviation")[0] < 1e-6  # the normalised ratio
    assert logged(trainer, "ratio/unnormalized_mean")[0] == pytest.approx(1.0, abs=1e-5)
    assert logged(trainer, "kl") == [0.0]
    assert logged(trainer, "clip_ratio/region_mean") == [0.0]


def test_learns_a_prompt_conditional_reward(tiny_sd3_path, tmp_path):
    """As Flow-GRPO's learning test (tests/test_trainer.py): `prompt_color` averages exactly 0 over the balanced
    prompts for any image, so the mean reward rises only if the policy follows the prompt.

    Measured on the one-thread tiny SD3 build (2 CPU cores, ~2 min): 0.0006 -> 0.4187, SE 0.0157 (+26.6 SE); training
    seeds 1 and 2: +54.0 and +42.8 SE. On an earlier cached build with other VAE weights (made before builds ran on
    one thread) it rose 0.5 SE."""
    trainer = tiny_trainer(tiny_sd3_path, tmp_path / "out", algorithm="grpo_guard", max_steps=200, learning_rate=1e-2)
    before, after, standard_error = prompt_color_before_and_after_training(trainer, 6)
    assert after - before > 4 * standard_error, (before, after, standard_error)


@pytest.mark.parametrize("sde_type", ["cps", "dance_sde"])
def test_each_sde_type_is_on_policy_in_the_trainer(tiny_sd3_path, tmp_path, sde_type):
    """Rollout and training rescore choose the step in the same place: the first pass's ratio is 1 for every type."""
    trainer = tiny_trainer(
        tiny_sd3_path,
        tmp_path / "out",
        sde_type=sde_type,
        noise_level=0.8 if sde_type == "cps" else 0.3,
        max_steps=1,
        steps_per_generation=1,
        per_device_train_batch_size=16,
    )
    trainer.train()
    assert logged(trainer, "ratio/max_abs_deviation")[0] < 1e-5


def test_doctor_passes_on_a_grpo_guard_recipe(capsys):
    code = main(["doctor", "--recipe", "recipes/tiny.yaml", "--num_inference_steps", "4", "--algorithm", "grpo_guard"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert next(line for line in out.splitlines() if line.startswith("on-policy ratio")).endswith("PASS")
    assert "all checks passed" in out
