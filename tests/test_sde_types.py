"""The sde_type variants (CPS, Dance-SDE) against the papers' equations written out independently, their noise-0
limit, and that a rescored step scores the rollout's own sample exactly as the rollout did."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trl_flow.config import FlowGRPOConfig
from trl_flow.errors import UserInputError
from trl_flow.sde import SDE_TYPES, cps_step, flow_sde_step, sde_step_with_logprob


def random_step(shape=(3, 4, 5, 5), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_cps_step_matches_the_paper():
    x, v = random_step()
    sigma, sigma_next, a = 0.6, 0.45, 0.8
    out = sde_step_with_logprob(v, sigma, sigma_next, x, a, generator=torch.Generator().manual_seed(1), sde_type="cps")

    # CPS as written: predicted clean sample and noise, std sigma' sin(a pi/2), the rest of sigma'^2 on eps_hat.
    x0_hat, eps_hat = x - sigma * v, x + (1 - sigma) * v
    std = sigma_next * math.sin(a * math.pi / 2)
    mean = (1 - sigma_next) * x0_hat + math.sqrt(sigma_next**2 - std**2) * eps_hat
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.tensor(std), check_dtype=False)
    # The reference code's score: minus the mean squared distance to the mean, no Gaussian normalisation.
    torch.testing.assert_close(out.log_prob, -((out.prev_sample - mean) ** 2).mean(dim=(1, 2, 3)))
    assert abs((out.prev_sample - mean).std().item() - std) < 0.05 * std


def test_cps_preserves_the_coefficients_of_the_marginal():
    """With the exact velocity (v = eps - x0 of a known pair), a CPS step lands on (1 - s') x0 + s' * unit noise."""
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 20000, generator=generator), torch.randn(4, 20000, generator=generator)
    sigma, sigma_next = 0.7, 0.4
    x = (1 - sigma) * x0 + sigma * eps
    out = sde_step_with_logprob(eps - x0, sigma, sigma_next, x, 0.8, generator=generator, sde_type="cps")
    noise_part = (out.prev_sample - (1 - sigma_next) * x0) / sigma_next
    assert noise_part.mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise_part.std().item() == pytest.approx(1.0, abs=0.01)


def test_dance_sde_step_matches_dance_grpo():
    x, v = random_step()
    sigma, sigma_next, eta = 0.6, 0.45, 0.3
    out = sde_step_with_logprob(
        v, sigma, sigma_next, x, eta, generator=torch.Generator().manual_seed(1), sde_type="dance_sde"
    )

    # DanceGRPO's flux_step form: the score term through x0_hat, a constant diffusion coefficient eta.
    dt = sigma_next - sigma
    x0_hat = x - sigma * v
    mean = x + dt * (v + eta**2 * (x - (1 - sigma) * x0_hat) / (2 * sigma**2))
    std = eta * math.sqrt(-dt)
    expected = torch.distributions.Normal(mean, std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.tensor(std), check_dtype=False)
    torch.testing.assert_close(out.log_prob, expected)
    assert abs((out.prev_sample - mean).std().item() - std) < 0.05 * std


def test_dance_and_flow_sde_differ_only_in_the_diffusion_coefficient():
    x, v = random_step()
    sigma, sigma_next, a = 0.6, 0.45, 0.5
    flow = sde_step_with_logprob(v, sigma, sigma_next, x, a, prev_sample=x)
    s = a * math.sqrt(sigma / (1 - sigma))
    dance = sde_step_with_logprob(v, sigma, sigma_next, x, s, prev_sample=x, sde_type="dance_sde")
    torch.testing.assert_close(dance.mean, flow.mean)
    torch.testing.assert_close(dance.log_prob, flow.log_prob)


def test_every_type_at_noise_zero_is_diffusers_euler_step_and_cps_tends_to_it():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i in range(10):
        v = torch.randn_like(x)
        sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        expected = scheduler.step(v, scheduler.timesteps[i], x, return_dict=False)[0]
        for sde_type in SDE_TYPES:
            ours = sde_step_with_logprob(v, sigma, sigma_next, x, noise_level=0.0, sde_type=sde_type)
            torch.testing.assert_close(ours.prev_sample, expected, rtol=0, atol=0)
        # The CPS formula itself at a = 0 (not the shared Euler branch): Euler up to float32 round-off.
        cps = cps_step(v, sigma.float(), sigma_next.float(), x, 0.0, generator=torch.Generator())
        torch.testing.assert_close(cps.prev_sample, expected, rtol=1e-5, atol=1e-5)
        assert cps.std.item() == 0 and torch.all(cps.log_prob == 0)
        x = expected


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_rescoring_a_rollout_sample_gives_the_rollout_log_prob(sde_type):
    x, v = random_step((4, 3, 4, 4))
    v = v.requires_grad_()
    sigmas, sigmas_next = torch.tensor([1.0, 0.7, 0.4, 0.2]), torch.tensor([0.9, 0.5, 0.3, 0.1])
    drawn = sde_step_with_logprob(
        v.detach(), sigmas, sigmas_next, x, 0.7, generator=torch.Generator().manual_seed(3), sde_type=sde_type
    )
    rescored = sde_step_with_logprob(v, sigmas, sigmas_next, x, 0.7, prev_sample=drawn.prev_sample, sde_type=sde_type)
    torch.testing.assert_close(rescored.log_prob, drawn.log_prob, rtol=0, atol=0)  # ratio exactly 1
    assert torch.all(torch.exp(rescored.log_prob - drawn.log_prob) == 1)
    rescored.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_flow_sde_is_the_default_and_the_dispatch_adds_nothing():
    x, v = random_step()
    generator = torch.Generator().manual_seed(5)
    default = sde_step_with_logprob(v, 0.8, 0.6, x, 0.7, generator=torch.Generator().manual_seed(5))
    direct = flow_sde_step(v, torch.tensor(0.8), torch.tensor(0.6), x, 0.7, generator=generator)
    for a, b in ((default.prev_sample, direct.prev_sample), (default.log_prob, direct.log_prob)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sde_type"):
        sde_step_with_logprob(v, 0.8, 0.6, x, 0.7, sde_type="ddim")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sde_type": "ddim"}, "sde_type 'ddim' is not one of flow_sde, cps, dance_sde"),
        ({"sde_type": "cps", "noise_level": 1.5}, "noise_level must be in"),
        ({"sde_type": "cps", "algorithm": "grpo_guard"}, "grpo_guard is derived for sde_type flow_sde or dance_sde"),
    ],
)
def test_config_refuses_unknown_or_unsound_sde_settings(tmp_path, settings, message):
    with pytest.raises(UserInputError, match=message):
        FlowGRPOConfig(output_dir=str(tmp_path), report_to=[], **settings)
