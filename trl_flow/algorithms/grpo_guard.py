"""GRPO-Guard (arXiv 2510.22319): Flow-GRPO with each step's importance ratio normalised and each step's loss
reweighted, against the over-optimisation that the per-step ratios' bias causes.

Why. A trained step's policy is ``N(mean_theta, std^2 I)`` and the rollout drew ``x_next = mean_old + std z``. With
``d = mean_theta - mean_old``, the per-element-mean Gaussian log-ratio (`trl_flow.sde`) is::

    log r = mean_D(z d) / std - mean_D(d^2) / (2 std^2)

Its second term is a negative bias that grows as ``std`` shrinks (low-noise steps), and the spread of the first
differs from step to step: ratios sit below 1, positive-advantage samples are rarely clipped, the policy
over-optimises. GRPO-Guard, per trained step ``k``:

* **ratio normalisation**: add the bias back and undo the ``1 / std`` scale::

      b_k      = mean_D((mean_theta - mean_old)^2) / (2 std^2)                  one value per sample
      log r'_k = (log pi_theta(x_next | x) - log pi_old(x_next | x) + b_k) * std   (= mean_D(z d) exactly)

  ``b_k`` is reduced over each sample's latent elements. The official code reduces it over the dimensions of the
  log-prob, an empty tuple for a ``(B,)`` tensor, which gives the batch's mean instead (flow_grpo issue 244). We
  compute ``mean_D(z d)`` directly (see `normalized_log_ratio`).
* **gradient reweighting**: ``mean_theta`` depends on the velocity through a factor proportional to ``|dt|``, so the
  step's clipped loss is divided by ``-dt = sigma - sigma_next``.

``loss_k = max(-A r'_k, -A clip(r'_k, 1 - eps_low, 1 + eps_high)) / (-dt_k)``, plus Flow-GRPO's KL term when
``beta > 0`` (the official recipes: ``beta = 0``, ``epsilon = 2e-6``, learning rate 1e-4). The official code uses the
batch means of ``std`` and ``sqrt(-dt)`` at a step; here each sample uses its own, which is the same when a batch's
rows share the step (they do: one rollout batch trains the same steps) and stays right under any split of the batch.

The derivation assumes a Gaussian step log-prob, so ``sde_type`` must be ``flow_sde`` or ``dance_sde`` (CPS's
log-prob is not one). The rollout records each trained step's mean (``old_means``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..sde import SDEStepOutput
from .base import LossStats
from .flow_grpo import ClippedLoss, FlowGRPO, clipped_policy_loss


def per_sample_std(std: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A step's ``std`` (a scalar or broadcastable to ``(B, ...)``, one value per sample) as a ``(B,)`` tensor."""
    return std.reshape(-1)[:1].expand(batch_size) if std.numel() == 1 else std.reshape(batch_size, -1)[:, 0]


def normalized_log_ratio(
    next_sample: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio ``(log pi_theta - log pi_old + b) * std`` per sample (``std`` is ``(B,)``),
    computed as ``mean_D((x_next - old_mean) * (mean - old_mean)) / std``: equal in exact arithmetic (gradients
    included), without subtracting two float32 log-probs of size ~1, whose round-off (~1e-7 * std) would be a few
    percent of the official clip range 2e-6. Reduced over each sample's latent elements, never over the batch."""
    dims = tuple(range(1, mean.ndim))
    return ((next_sample - old_mean) * (mean - old_mean)).mean(dim=dims) / std


def gradient_weight(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's per-step loss weight ``1 / (-dt) = 1 / (sigma - sigma_next)``, per sample."""
    return 1.0 / (sigma - sigma_next)


class GRPOGuard(FlowGRPO):
    """Flow-GRPO's loop and KL with GRPO-Guard's normalised ratio and ``1 / (-dt)`` step weight (see the module)."""

    name = "grpo_guard"
    rollout_record = "trajectory_with_means"
    sde_types = ("flow_sde", "dance_sde")

    def step_policy_loss(
        self, step: SDEStepOutput, batch: dict[str, torch.Tensor], term: int, stats: LossStats
    ) -> ClippedLoss:
        advantages = batch["advantages"]
        std = per_sample_std(step.std, advantages.shape[0])
        log_ratio = normalized_log_ratio(step.prev_sample, step.mean, batch["old_means"][:, term], std)
        clipped = clipped_policy_loss(
            log_ratio, torch.zeros_like(log_ratio), advantages, self.epsilon_low, self.epsilon_high
        )
        clipped.loss = clipped.loss * gradient_weight(batch["sigmas"][:, term], batch["sigmas_next"][:, term])
        unnormalized = torch.exp(step.log_prob - batch["old_log_probs"][:, term])
        stats["unnormalized_ratio"].append(unnormalized.detach())
        return clipped

    def metrics(self, stats: LossStats, gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Flow-GRPO's metrics on the normalised ratio, and ``ratio/unnormalized_mean``: the mean plain per-step
        ratio, which GRPO-Guard's diagnosis says sits below 1."""
        metrics = super().metrics(stats, gather)
        metrics["ratio/unnormalized_mean"] = gather(torch.cat(stats["unnormalized_ratio"]).mean()).nanmean().item()
        return metrics
