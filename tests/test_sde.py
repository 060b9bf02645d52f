import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trl_flow.algorithms.advantages import group_relative_advantages
from trl_flow.algorithms.flow_grpo import clipped_policy_loss
from trl_flow.sde import kl_between_steps, sde_noise_scale, sde_step_with_logprob


def test_step_log_prob_matches_torch_normal_density():
    torch.manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    sigma, sigma_next, a = 0.6, 0.45, 0.7
    out = sde_step_with_logprob(v, sigma, sigma_next, x, noise_level=a, generator=torch.Generator().manual_seed(1))

    # The paper's equations written out independently.
    s = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    mean = x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = s * math.sqrt(-dt)
    expected = torch.distributions.Normal(mean, std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))

    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.tensor(std), check_dtype=False)
    torch.testing.assert_close(out.log_prob, expected)
    assert out.log_prob.shape == (3,)
    # The drawn sample really has that std around the mean.
    assert abs((out.prev_sample - mean).std().item() - std) < 0.05 * std


def test_given_prev_sample_is_scored_and_gradients_flow_through_velocity():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    v = torch.randn(2, 3, 4, 4, requires_grad=True)
    drawn = sde_step_with_logprob(v.detach(), 0.8, 0.6, x, generator=torch.Generator().manual_seed(0))
    rescored = sde_step_with_logprob(v, 0.8, 0.6, x, prev_sample=drawn.prev_sample)
    torch.testing.assert_close(rescored.log_prob, drawn.log_prob, rtol=0, atol=0)
    rescored.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_per_sample_sigmas_equal_scalar_sigmas():
    torch.manual_seed(0)
    x, v = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    sigmas, sigmas_next = torch.tensor([0.9, 0.5, 0.3, 0.1]), torch.tensor([0.8, 0.4, 0.2, 0.0])
    batched = sde_step_with_logprob(v, sigmas, sigmas_next, x, prev_sample=x)
    for i in range(4):
        single = sde_step_with_logprob(
            v[i : i + 1], sigmas[i].item(), sigmas_next[i].item(), x[i : i + 1], prev_sample=x[i : i + 1]
        )
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)
        torch.testing.assert_close(batched.mean[i : i + 1], single.mean)


def test_noise_level_zero_is_diffusers_euler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    for i in range(10):
        v = torch.randn_like(x)
        expected = scheduler.step(v, scheduler.timesteps[i], x, return_dict=False)[0]
        ours = sde_step_with_logprob(v, scheduler.sigmas[i], scheduler.sigmas[i + 1], x, noise_level=0.0)
        torch.testing.assert_close(ours.prev_sample, expected, rtol=0, atol=0)
        x = expected


def test_sigma_one_uses_next_sigma_in_denominator():
    s = sde_noise_scale(1.0, 0.9, 0.7)
    assert torch.isfinite(s)
    assert s.item() == pytest.approx(0.7 * math.sqrt(1.0 / (1 - 0.9)))
    out = sde_step_with_logprob(torch.zeros(1, 4), 1.0, 0.9, torch.randn(1, 4), generator=torch.Generator())
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.prev_sample).all()


def test_kl_closed_form_matches_torch_distributions():
    torch.manual_seed(0)
    mean, ref_mean, std = torch.randn(3, 10), torch.randn(3, 10), torch.tensor(0.3)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std), torch.distributions.Normal(ref_mean, std)
    ).mean(dim=1)
    torch.testing.assert_close(kl_between_steps(mean, ref_mean, std), expected)
    assert torch.all(kl_between_steps(mean, mean, std) == 0)


def test_clipped_loss_on_policy_ratio_is_one_and_clipping_bounds_the_ratio():
    log_prob = torch.tensor([-1.0, -2.0, -3.0])
    advantages = torch.tensor([1.0, -1.0, 2.0])
    on_policy = clipped_policy_loss(log_prob, log_prob.clone(), advantages, 1e-4, 1e-4)
    assert torch.all(on_policy.ratio == 1)
    torch.testing.assert_close(on_policy.loss, -advantages)

    # Ratio far above 1 with a positive advantage: the gain is capped at 1 + eps (no gradient through the ratio).
    new = torch.tensor([-0.5, -2.0, -3.0], requires_grad=True)
    out = clipped_policy_loss(new, log_prob, advantages, 0.1, 0.1)
    assert out.is_high_clipped.tolist() == [True, False, False]
    assert out.loss[0].item() == pytest.approx(-1.1)
    out.loss.sum().backward()
    assert new.grad[0] == 0 and new.grad[2] != 0


def test_group_relative_advantages():
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    group = group_relative_advantages(rewards, 2, "group")
    # Each group is {x, x + d}: its unbiased std is d / sqrt(2), so the advantages are -+1/sqrt(2) * d / std.
    torch.testing.assert_close(group, torch.tensor([-1.0, 1.0, -1.0, 1.0]) / math.sqrt(2), atol=1e-3, rtol=0)
    batch = group_relative_advantages(rewards, 2, "batch")
    torch.testing.assert_close(batch, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (rewards.std() + 1e-4))
    none = group_relative_advantages(rewards, 2, "none", clip=1.5)
    torch.testing.assert_close(none, torch.tensor([-1.0, 1.0, -1.5, 1.5]))
    with_nan = group_relative_advantages(torch.tensor([1.0, float("nan"), 2.0, 4.0]), 2, "none")
    assert with_nan.tolist() == [0.0, 0.0, -1.0, 1.0]


def test_sde_keeps_the_ode_marginals_on_gaussian_data():
    """The paper's claim: the SDE and the ODE have the same marginal distribution at every sigma.

    For 1-D data x0 ~ N(m, c^2) and x_sigma = (1 - sigma) x0 + sigma eps, the exact velocity field is known:
    E[eps - x0 | x_sigma]. Both samplers must end at N(m, c^2) (up to Euler and sampling error).
    """
    m, c = 2.0, 0.5

    def velocity(x, sigma):
        var = (1 - sigma) ** 2 * c**2 + sigma**2
        x0_hat = m + (1 - sigma) * c**2 / var * (x - (1 - sigma) * m)
        eps_hat = sigma / var * (x - (1 - sigma) * m)
        return eps_hat - x0_hat

    sigmas = torch.linspace(1.0, 0.0, 201)
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(40000, 1, generator=generator)
    results = {}
    for noise_level in (0.0, 0.7):
        x = start.clone()
        for i in range(200):
            x = sde_step_with_logprob(
                velocity(x, sigmas[i]),
                sigmas[i],
                sigmas[i + 1],
                x,
                noise_level=noise_level,
                generator=generator,
            ).prev_sample
        results[noise_level] = x
    for x in results.values():
        assert x.mean().item() == pytest.approx(m, abs=0.03)
        assert x.std().item() == pytest.approx(c, abs=0.03)
    # And the SDE really is stochastic: its samples are not the ODE's.
    assert (results[0.7] - results[0.0]).abs().mean() > 0.05
