"""The SDE sampler of Flow-GRPO and its Gaussian step policy, one function per equation (shared by rollouts and by
the algorithms that score recorded steps).

Conventions follow diffusers' SD3/FLUX pipelines (and the paper):

* ``x_sigma = (1 - sigma) * x0 + sigma * noise``: sigma runs from 1 (pure noise) down to 0 (data);
* the network predicts the velocity ``v = noise - x0``;
* a denoising step goes from ``sigma`` to ``sigma_next < sigma``, so ``dt = sigma_next - sigma < 0``.

Paper, ODE-to-SDE (Euler-Maruyama form of the reverse SDE with the same marginals as the ODE)::

    x_next = x + [v + s^2 / (2 sigma) * (x + (1 - sigma) v)] dt + s sqrt(-dt) eps,     eps ~ N(0, I)
    s      = a * sqrt(sigma / (1 - sigma))                                             a = noise level

so each step is a Gaussian policy ``pi(x_next | x) = N(mean, std^2 I)`` with ``std = s * sqrt(-dt)``.
Setting ``a = 0`` gives ``x_next = x + v dt``: diffusers' ``FlowMatchEulerDiscreteScheduler.step``.

The KL between two such step policies with the same ``std`` is closed form: ``||mean - mean_ref||^2 / (2 std^2)``.
Flow-GRPO's objective on these steps is in `trl_flow.algorithms.flow_grpo`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SDEStepOutput:
    """Result of one SDE denoising step.

    Attributes:
        prev_sample: ``x_next``, the less noisy sample (given or drawn), float32.
        log_prob: ``log pi(x_next | x)``, one value per batch element: the Gaussian log-density **averaged** over
            the latent's elements (not summed). See :func:`gaussian_log_prob` for why.
        mean: the mean of ``x_next`` given ``x``, float32; gradients flow to it from ``velocity``.
        std: the standard deviation of ``x_next`` given ``x``, broadcastable to ``mean`` (no gradient).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample sigma, shaped to broadcast against a ``(B, ...)`` latent, in float32."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def sde_noise_scale(sigma: float | torch.Tensor, sigma_next: float | torch.Tensor, noise_level: float) -> torch.Tensor:
    """``s = a * sqrt(sigma / (1 - sigma))``, the paper's diffusion coefficient.

    At ``sigma = 1`` (the first step of a schedule that starts from pure noise) the formula divides by zero. Like the
    official Flow-GRPO code, we then put the schedule's second sigma in the denominator; for the first step that
    sigma is exactly ``sigma_next``, so no extra argument is needed.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sigma.device)
    denominator_sigma = torch.where(sigma >= 1.0, sigma_next, sigma)
    return noise_level * torch.sqrt(sigma / (1.0 - denominator_sigma))


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of ``sample`` under ``N(mean, std^2 I)``, averaged over all non-batch elements.

    The average (as in the reference implementation), not the sum: summed over the ~16k-65k latent elements of a
    512 px image, log-probability differences between two nearby policies are in the hundreds and ``exp`` of them
    overflows. The mean is a per-element (geometric-mean) likelihood ratio, which is why Flow-GRPO's clip range is
    tiny (1e-4) compared to GRPO's 0.2 for tokens.
    """
    log_density = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, sample.ndim)))


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> SDEStepOutput:
    """One Flow-GRPO SDE step from ``sigma`` to ``sigma_next`` and the log-probability of its result.

    Args:
        velocity: the model's (guided) velocity prediction ``v(x, sigma)``, shape ``(B, ...)``.
        sigma: the current noise level, a float or a ``(B,)`` tensor.
        sigma_next: the next (smaller) noise level, a float or a ``(B,)`` tensor.
        sample: the current latent ``x``, shape ``(B, ...)``.
        noise_level: ``a`` in the paper; 0 gives the deterministic Euler (ODE) step.
        prev_sample: if given, the step's result is not drawn; its log-probability under the step is returned
            instead (the training pass, where gradients flow through ``velocity``).
        generator: random generator for the step's noise when ``prev_sample`` is drawn, or one per sample.
        noise: the standard-normal draw ``eps`` to use instead of drawing one (antithetic sampling passes mirrored
            pairs); shape of ``sample``.

    Returns:
        :class:`SDEStepOutput`. All math is done in float32 whatever the model's dtype, so that rollout and
        training log-probabilities agree. With ``noise_level == 0`` the step is deterministic: ``log_prob`` is 0
        (a Dirac has no density; such steps cannot be trained) and ``std`` is 0.
    """
    velocity = velocity.float()
    sample = sample.float()
    sigma_b = _per_sample(sigma, sample)
    sigma_next_b = _per_sample(sigma_next, sample)
    dt = sigma_next_b - sigma_b

    if noise_level == 0:
        mean = sample + velocity * dt
        zero = torch.zeros((), dtype=torch.float32, device=sample.device)
        prev = mean if prev_sample is None else prev_sample.float()
        return SDEStepOutput(prev, torch.zeros(sample.shape[0], device=sample.device), mean, zero)

    s = sde_noise_scale(sigma_b, sigma_next_b, noise_level)
    mean = sample + (velocity + s**2 / (2 * sigma_b) * (sample + (1 - sigma_b) * velocity)) * dt
    std = s * torch.sqrt(-dt)

    if prev_sample is None:
        # One generator, or one per sample (noise then independent of how a batch is split into chunks/processes).
        if noise is None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = mean.detach() + std * noise.float()
    prev_sample = prev_sample.float()
    return SDEStepOutput(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std)


def kl_between_steps(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, std^2 I) || N(ref_mean, std^2 I))`` per element, averaged over non-batch elements.

    Two Gaussians with the same covariance: the KL is ``||mean - ref_mean||^2 / (2 std^2)``. Averaged over elements
    to match :func:`gaussian_log_prob`.
    """
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, mean.ndim)))
