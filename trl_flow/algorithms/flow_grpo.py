"""Flow-GRPO (Liu et al., 2025): PPO-clip on each trained SDE denoising step, plus a KL penalty to the reference.

Per trained denoising step ``k`` of a rollout, with the group-relative advantage ``A`` of the whole trajectory
(`trl_flow.algorithms.advantages`) and the step's Gaussian policy ``pi(x_next | x)`` (`trl_flow.sde`)::

    r_k    = exp(log pi_theta(x_next | x) - log pi_old(x_next | x))
    loss_k = max(-A r_k, -A clip(r_k, 1 - eps_low, 1 + eps_high)) + beta * ||mean_theta - mean_ref||^2 / (2 std^2)

and the micro-batch's loss is the mean over samples and trained steps. Log-probs are per-element means (the clip
range is per element, hence tiny: 1e-4 in the paper).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..sde import SDEStepOutput, kl_between_steps, sde_step_with_logprob
from .base import Algorithm, LossStats, ReferenceDenoiser, conditioning_of


@dataclass
class ClippedLoss:
    """Per-sample PPO-clip loss of one denoising step, and what to log about it."""

    loss: torch.Tensor
    ratio: torch.Tensor
    is_low_clipped: torch.Tensor
    is_high_clipped: torch.Tensor


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
) -> ClippedLoss:
    """``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` with ``r = exp(log_prob - old_log_prob)``, per sample."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)
    return ClippedLoss(
        loss=loss,
        ratio=ratio,
        is_low_clipped=(ratio < 1 - epsilon_low) & (advantages < 0),
        is_high_clipped=(ratio > 1 + epsilon_high) & (advantages > 0),
    )


class FlowGRPO(Algorithm):
    """Flow-GRPO's objective on the recorded SDE trajectory of the trained denoising steps.

    The clip range of the per-step ratio is TRL's: ``[1 - epsilon, 1 + epsilon_high]`` (``epsilon_high`` defaults to
    ``epsilon``); ``beta`` weighs the KL; ``noise_level`` and the guidance scale are the rollout's.
    """

    name = "flow_grpo"
    rollout_record = "trajectory"

    def __init__(self, args: Any, adapter: Any) -> None:
        super().__init__(args, adapter)
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon

    def rescore_step(self, denoiser: Any, batch: dict[str, torch.Tensor], k: int) -> SDEStepOutput:
        """The ``k``-th trained step of ``batch`` recomputed by ``denoiser``: its mean, std and the log-prob of the
        recorded next latent (the training pass; `trl-flow doctor` uses it for the on-policy ratio)."""
        latents, sigma = batch["latents"][:, k], batch["sigmas"][:, k]
        velocity = self.adapter.predict_velocity(denoiser, latents, sigma, conditioning_of(batch), self.guidance_scale)
        return sde_step_with_logprob(
            velocity,
            sigma,
            batch["sigmas_next"][:, k],
            latents,
            self.args.noise_level,
            prev_sample=batch["next_latents"][:, k],
            sde_type=self.args.sde_type,
        )

    def num_terms(self, batch: dict[str, torch.Tensor]) -> int:
        old_log_probs = batch.get("old_log_probs")
        return 0 if old_log_probs is None else old_log_probs.shape[1]

    @torch.no_grad()
    def prepare(self, model: Any, batch: dict[str, torch.Tensor], reference: ReferenceDenoiser) -> list[dict] | None:
        """The reference policy's step means (for the KL), in one switch to the reference: toggling PEFT's adapters
        walks the whole model, so it is not done per step."""
        if self.beta == 0.0:
            return None
        with reference(model) as denoiser:
            return [{"ref_mean": self.rescore_step(denoiser, batch, k).mean} for k in range(self.num_terms(batch))]

    def step_policy_loss(
        self, step: SDEStepOutput, batch: dict[str, torch.Tensor], term: int, stats: LossStats
    ) -> ClippedLoss:
        """The per-sample PPO-clip loss of trained step ``term``, given its rescored ``step`` (the seam GRPO-Guard
        overrides; extra diagnostics go into ``stats``)."""
        return clipped_policy_loss(
            step.log_prob, batch["old_log_probs"][:, term], batch["advantages"], self.epsilon_low, self.epsilon_high
        )

    def term_loss(
        self,
        model: Any,
        batch: dict[str, torch.Tensor],
        term: int,
        prepared: dict[str, torch.Tensor] | None,
        stats: LossStats,
    ) -> torch.Tensor:
        step = self.rescore_step(model, batch, term)
        clipped = self.step_policy_loss(step, batch, term, stats)
        loss = clipped.loss.mean()
        if prepared is not None:
            kl = kl_between_steps(step.mean, prepared["ref_mean"], step.std)
            loss = loss + self.beta * kl.mean()
            stats["kl"].append(kl.detach())
        stats["low_clipped"].append(clipped.is_low_clipped.float())
        stats["high_clipped"].append(clipped.is_high_clipped.float())
        stats["ratio_deviation"].append((clipped.ratio.detach() - 1).abs())
        return loss

    def metrics(self, stats: LossStats, gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """TRL's names: ``kl``, ``clip_ratio/{low,high,region}_mean``; and ``ratio/max_abs_deviation`` (|r - 1|,
        0 on-policy up to round-off)."""
        metrics = {}
        if stats["kl"]:
            metrics["kl"] = gather(torch.cat([kl.flatten() for kl in stats["kl"]]).mean()).nanmean().item()
        low = gather(torch.cat(stats["low_clipped"]).mean())
        high = gather(torch.cat(stats["high_clipped"]).mean())
        metrics["clip_ratio/low_mean"] = low.nanmean().item()
        metrics["clip_ratio/high_mean"] = high.nanmean().item()
        metrics["clip_ratio/region_mean"] = (low + high).nanmean().item()
        metrics["ratio/max_abs_deviation"] = gather(torch.cat(stats["ratio_deviation"]).max()).max().item()
        return metrics
