"""DiffusionNFT (Zheng et al., arXiv 2509.16117): negative-aware fine-tuning on the forward process.

Rollouts sample the **old** policy deterministically and keep only each final latent ``x0`` and its reward (see
`trl_flow.algorithms.forward_process`). For each sample, ``K = int(T * timestep_fraction)`` timesteps of the
sampler's grid (9 of 10) are drawn without replacement (a random permutation per sample), each with fresh noise::

    x_t   = (1 - t) x0 + t eps
    v+    = beta v_theta + (1 - beta) v_old            implicit positive policy
    v-    = (1 + beta) v_old - beta v_theta            implicit negative policy
    x0^+- = x_t - t v+-
    L+-   = mean_D (x0^+- - x0)^2 / sg(max(mean_D |x0^+- - x0|, 1e-5))      adaptive x0-space weighting
    r     = 0.5 + 0.5 clip(A / A_max, -1, 1)                                optimality probability
    loss  = A_max (r L+ + (1 - r) L-) / beta + beta_KL mean_D (v_theta - v_ref)^2

``A`` is the group-relative advantage (global std: ``scale_rewards: batch``), ``A_max = advantage_clip`` (5: the
official code's literal factor), ``beta = nft_beta`` (1.0; 0.1 for OCR), ``beta_KL = beta`` (official 1e-4) with the
adapter-disabled reference. The old policy ``theta_old <- d theta_old + (1 - d) theta`` after every rollout batch,
``d = min(policy_ema_decay_max, policy_ema_decay_rate * step)`` (official ``decay_type`` 1: 0.001, 0.5).

On-policy (``theta = theta_old``) a constant reward gives ``r = 1/2`` and the two halves' gradients cancel exactly;
when every sample is fully positive (``r = 1``) the gradient is ``A_max`` times the adaptive-weighted flow-matching
loss's. CFG: by default rollouts and training run without guidance (the paper; ``train_guidance_scale`` unset). With
``train_guidance_scale > 1`` the rollouts sample with CFG and the loss is put on the *guided* velocity
``v_u + w (v_c - v_u)`` of each policy, training both branches toward flow-matching targets of guided samples;
measured on the mini model, this undoes guidance (issue 18), so it is an option, not a recommendation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import UserInputError
from .base import LossStats, ReferenceDenoiser
from .forward_process import ForwardProcessAlgorithm, mean_per_sample, noised


def optimality_probability(advantages: torch.Tensor, advantage_max: float) -> torch.Tensor:
    """``r = clamp(clip(A, -A_max, A_max) / A_max / 2 + 0.5, 0, 1)``: 0 fully negative, 1/2 neutral, 1 positive."""
    clipped = advantages.clamp(-advantage_max, advantage_max)
    return (clipped / advantage_max / 2 + 0.5).clamp(0.0, 1.0)


def adaptive_x0_loss(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``mean_D (x0_hat - x0)^2 / sg(max(mean_D |x0_hat - x0|, 1e-5))`` per sample: the weight has no gradient."""
    error = x0_hat - x0
    weight = mean_per_sample(error.abs()).clamp_min(1e-5).detach()
    return mean_per_sample(error**2) / weight


def nft_policy_loss(
    velocity: torch.Tensor,
    old_velocity: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    advantages: torch.Tensor,
    beta: float,
    advantage_max: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiffusionNFT's per-sample loss ``A_max (r L+ + (1 - r) L-) / beta`` and the two halves ``(L+, L-)``."""
    positive = beta * velocity + (1 - beta) * old_velocity
    negative = (1 + beta) * old_velocity - beta * velocity
    t_b = t.reshape(-1, *([1] * (x0.ndim - 1)))
    positive_loss = adaptive_x0_loss(x_t - t_b * positive, x0)
    negative_loss = adaptive_x0_loss(x_t - t_b * negative, x0)
    r = optimality_probability(advantages, advantage_max)
    loss = advantage_max * (r * positive_loss + (1 - r) * negative_loss) / beta
    return loss, positive_loss, negative_loss


class DiffusionNFT(ForwardProcessAlgorithm):
    """DiffusionNFT's objective on re-noised final latents, with the old policy an EMA of the weights (the module)."""

    name = "nft"

    def __init__(self, args: Any, adapter: Any) -> None:
        super().__init__(args, adapter)
        self.nft_beta = args.nft_beta
        self.advantage_max = args.advantage_clip if args.advantage_clip is not None else 5.0

    @classmethod
    def check_args(cls, args: Any) -> None:
        cls.check_schedule(args)
        if not args.nft_beta > 0:
            raise UserInputError(f"nft_beta = {args.nft_beta}: DiffusionNFT's beta must be > 0 (official 1.0; OCR 0.1)")
        if args.train_timesteps is not None and args.train_timesteps > args.num_inference_steps:
            raise UserInputError(
                f"train_timesteps = {args.train_timesteps} exceeds num_inference_steps = {args.num_inference_steps}: "
                "DiffusionNFT trains on distinct steps of the sampler's grid"
            )

    def averages_to_keep(self) -> dict[str, tuple[float, float, int]]:
        return {"old": self.policy_schedule(default_max=0.5)}

    def sampling_weights(self):
        """Rollouts sample the old policy (the official code's "old" adapter)."""
        return self.applied("old")

    def num_timesteps(self) -> int:
        if self.args.train_timesteps is not None:
            return self.args.train_timesteps
        return max(1, int(self.args.num_inference_steps * self.args.timestep_fraction))

    @torch.no_grad()
    def prepare(self, model: Any, batch: dict[str, torch.Tensor], reference: ReferenceDenoiser) -> list[dict]:
        """Per term: the sample's timestep (its own permutation of the grid), fresh noise, ``x_t``, the old policy's
        velocity and (``beta > 0``) the reference's. Drawn from torch's global generator, which checkpoints restore."""
        x0 = batch["final_latents"].float()
        grid = self.grid(x0.device)
        num_terms = self.num_timesteps()
        order = torch.stack([torch.randperm(len(grid))[:num_terms] for _ in range(x0.shape[0])], dim=1)
        noise = torch.randn((num_terms, *x0.shape)).to(x0.device)
        terms = []
        for k in range(num_terms):
            t = grid[order[k].to(x0.device)]
            terms.append({"t": t, "x_t": noised(x0, t, noise[k])})
        with self.applied("old"):
            for term in terms:
                term["v_old"] = self.velocity(model, batch, term["x_t"], term["t"])
        self.reference_velocities(model, batch, terms, reference)
        return terms

    def term_loss(
        self,
        model: Any,
        batch: dict[str, torch.Tensor],
        term: int,
        prepared: dict[str, torch.Tensor] | None,
        stats: LossStats,
    ) -> torch.Tensor:
        x0 = batch["final_latents"].float()
        velocity = self.velocity(model, batch, prepared["x_t"], prepared["t"])
        loss, positive, negative = nft_policy_loss(
            velocity,
            prepared["v_old"],
            prepared["x_t"],
            x0,
            prepared["t"],
            batch["advantages"],
            self.nft_beta,
            self.advantage_max,
        )
        loss = loss.mean()
        if "v_ref" in prepared:
            kl = mean_per_sample((velocity - prepared["v_ref"]) ** 2)
            loss = loss + self.beta * kl.mean()
            stats["kl"].append(kl.detach())
        stats["positive_loss"].append(positive.detach())
        stats["negative_loss"].append(negative.detach())
        stats["old_deviation"].append(mean_per_sample((velocity.detach() - prepared["v_old"]) ** 2))
        return loss

    def metrics(self, stats: LossStats, gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """``kl`` (v-space MSE to the reference), ``nft/{positive,negative}_loss`` (the implicit policies' adaptive
        x0 losses) and ``nft/old_deviation`` (mean (v_theta - v_old)^2: 0 while the policy is the old one)."""
        metrics = {}
        names = {"kl": "kl", "positive_loss": "nft/positive_loss", "negative_loss": "nft/negative_loss"}
        names["old_deviation"] = "nft/old_deviation"
        for key, name in names.items():
            if stats[key]:
                metrics[name] = gather(torch.cat(stats[key]).mean()).nanmean().item()
        return metrics
