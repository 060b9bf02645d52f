"""The SDE samplers of flow-matching RL and their step policies, one function per equation (shared by rollouts and by
the algorithms that score recorded steps; `sde_step_with_logprob` is the one place an ``sde_type`` is chosen).

Conventions follow diffusers' SD3/FLUX pipelines (and the papers):

* ``x_sigma = (1 - sigma) * x0 + sigma * noise``: sigma runs from 1 (pure noise) down to 0 (data);
* the network predicts the velocity ``v = noise - x0``, so ``x0_hat = x - sigma v`` and ``eps_hat = x + (1 - sigma) v``;
* a denoising step goes from ``sigma`` to ``sigma_next < sigma``, so ``dt = sigma_next - sigma < 0``.

``sde_type="flow_sde"``, Flow-GRPO (Euler-Maruyama form of the reverse SDE with the same marginals as the ODE)::

    x_next = x + [v + s^2 / (2 sigma) * (x + (1 - sigma) v)] dt + s sqrt(-dt) eps,     eps ~ N(0, I)
    s      = a * sqrt(sigma / (1 - sigma))                                             a = noise level

``sde_type="dance_sde"``, DanceGRPO: the same reverse SDE with a constant diffusion coefficient ``s = a``.

``sde_type="cps"``, coefficients-preserving sampling (CPS, arXiv 2509.05952): a DDIM-like step that keeps the
coefficient of ``x0`` at ``1 - sigma_next`` and the total noise variance at ``sigma_next^2``::

    x_next = (1 - sigma_next) x0_hat + sigma_next cos(a pi / 2) eps_hat + sigma_next sin(a pi / 2) eps

Each step is a Gaussian policy ``pi(x_next | x) = N(mean, std^2 I)``. Flow-SDE and Dance-SDE score it with the
Gaussian log-density; CPS, like its reference code, with ``-||x_next - mean||^2`` (see :func:`cps_log_prob`). With
``a = 0`` every type is ``x_next = x + v dt``: diffusers' ``FlowMatchEulerDiscreteScheduler.step``.

The KL between two such step policies with the same ``std`` is closed form: ``||mean - mean_ref||^2 / (2 std^2)``.
The objectives on these steps are in `trl_flow.algorithms`.
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


def _reverse_sde_mean(
    velocity: torch.Tensor, sigma: torch.Tensor, dt: torch.Tensor, sample: torch.Tensor, s: float | torch.Tensor
) -> torch.Tensor:
    """``x + [v + s^2 / (2 sigma) * eps_hat] dt`` with ``eps_hat = x + (1 - sigma) v``: the Euler-Maruyama mean of
    the reverse SDE ``dx = [v - s^2 / 2 * score] dt + s dw`` whose score is ``-eps_hat / sigma`` (Flow-SDE and
    Dance-SDE differ only in the diffusion coefficient ``s``)."""
    return sample + (velocity + s**2 / (2 * sigma) * (sample + (1 - sigma) * velocity)) * dt


def _draw_or_score(
    mean: torch.Tensor,
    std: torch.Tensor,
    prev_sample: torch.Tensor | None,
    generator: torch.Generator | list[torch.Generator] | None,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """``prev_sample`` (float32) if given, else ``mean + std * eps`` with ``eps`` the given ``noise`` or a draw from
    ``generator`` (one generator, or one per sample: noise then independent of how a batch is split)."""
    if prev_sample is None:
        if noise is None:
            noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        prev_sample = mean.detach() + std * noise.float()
    return prev_sample.float()


def flow_sde_step(
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> SDEStepOutput:
    """Flow-GRPO's step (``sde_type="flow_sde"``), ``noise_level = a > 0``::

        s      = a * sqrt(sigma / (1 - sigma))
        mean   = x + [v + s^2 / (2 sigma) * (x + (1 - sigma) v)] dt
        std    = s * sqrt(-dt)
        log pi = mean over elements of log N(x_next; mean, std^2)

    Arguments as :func:`sde_step_with_logprob` (float32 tensors, sigmas broadcastable to the latent)."""
    dt = sigma_next - sigma
    s = sde_noise_scale(sigma, sigma_next, noise_level)
    mean = _reverse_sde_mean(velocity, sigma, dt, sample, s)
    std = s * torch.sqrt(-dt)
    prev_sample = _draw_or_score(mean, std, prev_sample, generator, noise)
    return SDEStepOutput(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std)


def dance_sde_step(
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> SDEStepOutput:
    """DanceGRPO's step (``sde_type="dance_sde"``): the reverse SDE with a *constant* diffusion coefficient
    ``s = a`` (``noise_level``; DanceGRPO's FLUX recipe: 0.3) instead of Flow-SDE's ``a * sqrt(sigma / (1 - sigma))``::

        mean   = x + [v + a^2 / (2 sigma) * (x + (1 - sigma) v)] dt
        std    = a * sqrt(-dt)
        log pi = mean over elements of log N(x_next; mean, std^2)

    (DanceGRPO writes the drift as ``v + a^2 (x - (1 - sigma) x0_hat) / (2 sigma^2)``: the same, since
    ``x - (1 - sigma) x0_hat = sigma eps_hat``.) Arguments as :func:`sde_step_with_logprob`."""
    dt = sigma_next - sigma
    mean = _reverse_sde_mean(velocity, sigma, dt, sample, noise_level)
    std = noise_level * torch.sqrt(-dt)
    prev_sample = _draw_or_score(mean, std, prev_sample, generator, noise)
    return SDEStepOutput(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std)


def cps_log_prob(sample: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """CPS's step score, as in its reference code: ``-mean over elements of (x_next - mean)^2``.

    Not a normalised log-density: the Gaussian's ``1 / (2 std^2)`` and its constants are dropped. Between two
    policies, ``log_prob_new - log_prob_old = 2 std^2 * (the Gaussian log-ratio)``, so ``exp`` of it is not a likelihood
    ratio but one whose logarithm is shrunk by ``2 std^2`` (std^2 < sigma_next^2 <= 1): ratios sit much closer to 1,
    which is why CPS recipes clip at ``epsilon = 1e-5``. An on-policy sample scores about ``-std^2``, not 0."""
    return -((sample - mean) ** 2).mean(dim=tuple(range(1, sample.ndim)))


def cps_step(
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> SDEStepOutput:
    """Coefficients-preserving sampling (``sde_type="cps"``), ``noise_level = a`` in ``[0, 1]`` (CPS recipes: 0.8)::

        x0_hat  = x - sigma v,   eps_hat = x + (1 - sigma) v
        std     = sigma_next * sin(a pi / 2)
        mean    = (1 - sigma_next) x0_hat + sigma_next * cos(a pi / 2) * eps_hat
                = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) * eps_hat
        log pi  = cps_log_prob(x_next, mean)   (not a normalised density; see there)

    ``x_next`` keeps the coefficient ``1 - sigma_next`` on ``x0`` and the noise variance ``sigma_next^2`` of the
    marginal at ``sigma_next``. At ``a = 0`` it is the Euler step ``x + v dt`` (up to round-off); the last step of a
    schedule (``sigma_next = 0``) is deterministic (``std = 0``). Arguments as :func:`sde_step_with_logprob`."""
    x0_hat = sample - sigma * velocity
    eps_hat = sample + (1 - sigma) * velocity
    angle = noise_level * math.pi / 2
    std = sigma_next * math.sin(angle)
    mean = (1 - sigma_next) * x0_hat + sigma_next * math.cos(angle) * eps_hat
    prev_sample = _draw_or_score(mean, std, prev_sample, generator, noise)
    return SDEStepOutput(prev_sample, cps_log_prob(prev_sample, mean), mean, std)


#: The step of each ``sde_type`` (the config key); `sde_step_with_logprob` is the one place one is chosen.
SDE_STEPS = {"flow_sde": flow_sde_step, "cps": cps_step, "dance_sde": dance_sde_step}
SDE_TYPES = tuple(SDE_STEPS)


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
    sde_type: str = "flow_sde",
) -> SDEStepOutput:
    """One SDE step of type ``sde_type`` from ``sigma`` to ``sigma_next`` and the log-probability of its result.

    Rollouts and training passes both call this with the run's ``sde_type``, so they cannot score a step with
    different equations.

    Args:
        velocity: the model's (guided) velocity prediction ``v(x, sigma)``, shape ``(B, ...)``.
        sigma: the current noise level, a float or a ``(B,)`` tensor.
        sigma_next: the next (smaller) noise level, a float or a ``(B,)`` tensor.
        sample: the current latent ``x``, shape ``(B, ...)``.
        noise_level: ``a`` in the equations (see `SDE_STEPS`); 0 gives the deterministic Euler (ODE) step.
        prev_sample: if given, the step's result is not drawn; its log-probability under the step is returned
            instead (the training pass, where gradients flow through ``velocity``).
        generator: random generator for the step's noise when ``prev_sample`` is drawn, or one per sample.
        noise: the standard-normal draw ``eps`` to use instead of drawing one (antithetic sampling passes mirrored
            pairs); shape of ``sample``.
        sde_type: ``"flow_sde"`` (Flow-GRPO), ``"cps"`` (coefficients-preserving) or ``"dance_sde"`` (DanceGRPO).

    Returns:
        :class:`SDEStepOutput`. All math is done in float32 whatever the model's dtype, so that rollout and
        training log-probabilities agree. With ``noise_level == 0`` the step is, for every type, diffusers' Euler
        step computed as diffusers does (bit for bit): ``log_prob`` is 0 (a Dirac has no density; such steps cannot
        be trained) and ``std`` is 0.
    """
    if sde_type not in SDE_STEPS:
        raise ValueError(f"sde_type must be one of {', '.join(SDE_TYPES)}, not {sde_type!r}")
    velocity = velocity.float()
    sample = sample.float()
    sigma_b = _per_sample(sigma, sample)
    sigma_next_b = _per_sample(sigma_next, sample)

    if noise_level == 0:
        mean = sample + velocity * (sigma_next_b - sigma_b)
        zero = torch.zeros((), dtype=torch.float32, device=sample.device)
        prev = mean if prev_sample is None else prev_sample.float()
        return SDEStepOutput(prev, torch.zeros(sample.shape[0], device=sample.device), mean, zero)
    step = SDE_STEPS[sde_type]
    return step(velocity, sigma_b, sigma_next_b, sample, noise_level, prev_sample, generator, noise)


def kl_between_steps(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, std^2 I) || N(ref_mean, std^2 I))`` per element, averaged over non-batch elements.

    Two Gaussians with the same covariance: the KL is ``||mean - ref_mean||^2 / (2 std^2)``. Averaged over elements
    to match :func:`gaussian_log_prob`.
    """
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, mean.ndim)))
