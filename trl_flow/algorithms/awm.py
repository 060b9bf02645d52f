"""Advantage Weighted Matching (AWM, Xue et al., arXiv 2509.25050): policy gradient on a flow-matching surrogate
of the log-likelihood, on re-noised final latents (`trl_flow.algorithms.forward_process`).

``K`` training timesteps are drawn stratified over the grid indices ``[1, int(T * timestep_fraction))`` (the official
``discrete_wo_init``: sigma 1 excluded), shared by the batch, each with fresh noise ``eps``::

    x_t      = (1 - t) x0 + t eps
    l_theta  = mean_D (v_theta(x_t, t) - (eps - x0))^2                 the matching error
    log p    = -w(l_theta, t),  w = t ((l + 1e-10)^p - (1e-10)^p) / p    generalised Huber (default, p = 0.25)
    rho      = exp(log p_theta - log p_old)                             same x_t, old = the rollout's weights
    A'       = clip(A, +-advantage_clip) / advantage_clip * awm_advantage_max
    loss     = max(-A' rho, -A' clip(rho, 1 - epsilon, 1 + epsilon_high))
               + beta mean_D (v_theta - v_ref)^2 + awm_ema_kl_beta mean_D (v_theta - v_ema)^2

Other weightings: ``uniform`` (w = l), ``t`` (t l), ``t2`` (t^2 l), ``huber`` (t (sqrt(l + 1e-10) - 1e-5)). The
official GenEval recipe: 6 timesteps of 14, timestep_fraction 0.9, p 0.25, clip range 1 (``epsilon: 1.0``),
advantage_max 1, beta 0.001, EMA-KL weight 1 with decay ``min(0.3, 0.001 step)`` (the KL-EMA is a separate average
of the weights, updated after every rollout batch), learning rate 3e-4, CFG 1.

On-policy (one optimizer update per rollout batch) ``rho = 1`` and ``log p_old`` is the detached ``log p_theta``, so
the gradient is ``A' grad w(l_theta, t)``: an advantage-weighted flow-matching loss; it is 0 for a constant reward,
and with every ``A' = 1`` and ``uniform`` weighting it is the flow-matching gradient. With several updates per batch
the rollout's weights are kept (a copy, refreshed after each batch) and ``log p_old`` is their forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import UserInputError
from .base import LossStats, ReferenceDenoiser
from .flow_grpo import clipped_policy_loss
from .forward_process import ForwardProcessAlgorithm, PolicyEMA, mean_per_sample, noised

WEIGHTINGS = ("ghuber", "huber", "uniform", "t", "t2")


def surrogate_weight(error: torch.Tensor, t: torch.Tensor, weighting: str, power: float = 0.25) -> torch.Tensor:
    """``w(l, t)``, AWM's negative log-likelihood surrogate of the per-sample matching error ``l`` at time ``t``."""
    if weighting == "uniform":
        return error
    if weighting == "t":
        return t * error
    if weighting == "t2":
        return t**2 * error
    if weighting == "huber":
        return t * (torch.sqrt(error + 1e-10) - 1e-5)
    if weighting == "ghuber":
        return t * ((error + 1e-10) ** power - 1e-10**power) / power
    raise ValueError(f"unknown AWM weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def stratified_indices(low: int, high: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` grid indices from ``[low, high)``, one uniformly from each of ``count`` near-equal strata."""
    strata = torch.arange(low, high).tensor_split(count)
    picks = [stratum[torch.randint(len(stratum), (1,), generator=generator)] for stratum in strata]
    return torch.cat(picks)


class AWM(ForwardProcessAlgorithm):
    """AWM's clipped advantage-weighted matching loss with reference and EMA KL (see the module)."""

    name = "awm"

    def __init__(self, args: Any, adapter: Any) -> None:
        super().__init__(args, adapter)
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self.advantage_clip = args.advantage_clip if args.advantage_clip is not None else 5.0
        self.ema_kl_beta = args.awm_ema_kl_beta
        #: whether ``log p_old`` is the current weights' (one update per rollout batch); False forces the forward
        self.on_policy = self.updates_per_generation == 1

    @classmethod
    def check_args(cls, args: Any) -> None:
        cls.check_schedule(args)
        if args.awm_weighting not in WEIGHTINGS:
            raise UserInputError(f"awm_weighting = {args.awm_weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        if not args.awm_ghuber_power > 0:
            raise UserInputError(f"awm_ghuber_power = {args.awm_ghuber_power}: use a power > 0 (official 0.25)")
        if args.awm_ema_kl_beta < 0 or not args.awm_advantage_max > 0:
            raise UserInputError("awm_ema_kl_beta must be >= 0 and awm_advantage_max > 0 (official 1 and 1)")
        available = cls.index_range(args)[1] - 1
        if available < 1 or (args.train_timesteps or 1) > available:
            raise UserInputError(
                f"algorithm awm trains on grid indices [1, int(num_inference_steps * timestep_fraction)) = "
                f"{available} index(es), but train_timesteps = {args.train_timesteps}: raise num_inference_steps or "
                "timestep_fraction, or lower train_timesteps"
            )

    @staticmethod
    def index_range(args: Any) -> tuple[int, int]:
        return 1, int(args.num_inference_steps * args.timestep_fraction)

    def averages_to_keep(self) -> dict[str, tuple[float, float, int]]:
        averages = {}
        if self.ema_kl_beta > 0:
            averages["kl_ema"] = self.policy_schedule(default_max=0.3)
        if not self.on_policy:
            averages["rollout"] = (0.0, 0.0, 0)  # decay 0: the weights as they were at the rollout
        return averages

    def doctor_overrides(self) -> None:
        self.ema_kl_beta = 0.0
        self.on_policy = False
        self.averages = {"rollout": PolicyEMA(self.parameters, 0.0, 0.0)}  # the current weights, by a forward

    def num_timesteps(self) -> int:
        low, high = self.index_range(self.args)
        return self.args.train_timesteps or high - low

    @torch.no_grad()
    def prepare(self, model: Any, batch: dict[str, torch.Tensor], reference: ReferenceDenoiser) -> list[dict]:
        """Per term: the shared timestep, fresh noise, ``x_t``, and the no-gradient velocities the loss compares to
        (rollout weights when off-policy, reference, KL-EMA). Drawn from torch's global generator (checkpointed)."""
        x0 = batch["final_latents"].float()
        grid = self.grid(x0.device)
        indices = stratified_indices(*self.index_range(self.args), self.num_timesteps())
        noise = torch.randn((len(indices), *x0.shape)).to(x0.device)
        terms = []
        for k, index in enumerate(indices.tolist()):
            t = grid[index].expand(x0.shape[0])
            terms.append({"t": t, "x_t": noised(x0, t, noise[k]), "target": noise[k] - x0})
        for name, key in (("rollout", "v_old"), ("kl_ema", "v_ema")):
            if name in self.averages:
                with self.applied(name):
                    for term in terms:
                        term[key] = self.velocity(model, batch, term["x_t"], term["t"])
        self.reference_velocities(model, batch, terms, reference)
        return terms

    def log_prob(self, velocity: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """AWM's surrogate ``-w(mean_D (v - target)^2, t)`` per sample."""
        error = mean_per_sample((velocity - target) ** 2)
        return -surrogate_weight(error, t, self.args.awm_weighting, self.args.awm_ghuber_power)

    def term_loss(
        self,
        model: Any,
        batch: dict[str, torch.Tensor],
        term: int,
        prepared: dict[str, torch.Tensor] | None,
        stats: LossStats,
    ) -> torch.Tensor:
        t, target = prepared["t"], prepared["target"]
        velocity = self.velocity(model, batch, prepared["x_t"], t)
        log_prob = self.log_prob(velocity, target, t)
        old_log_prob = self.log_prob(prepared["v_old"], target, t) if "v_old" in prepared else log_prob.detach()
        advantages = batch["advantages"].clamp(-self.advantage_clip, self.advantage_clip) / self.advantage_clip
        advantages = advantages * self.args.awm_advantage_max
        clipped = clipped_policy_loss(log_prob, old_log_prob, advantages, self.epsilon_low, self.epsilon_high)
        loss = clipped.loss.mean()
        if "v_ref" in prepared:
            kl = mean_per_sample((velocity - prepared["v_ref"]) ** 2)
            loss = loss + self.beta * kl.mean()
            stats["kl"].append(kl.detach())
        if "v_ema" in prepared:
            ema_kl = mean_per_sample((velocity - prepared["v_ema"]) ** 2)
            loss = loss + self.ema_kl_beta * ema_kl.mean()
            stats["ema_kl"].append(ema_kl.detach())
        stats["low_clipped"].append(clipped.is_low_clipped.float())
        stats["high_clipped"].append(clipped.is_high_clipped.float())
        stats["ratio_deviation"].append((clipped.ratio.detach() - 1).abs())
        return loss

    def metrics(self, stats: LossStats, gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """``kl`` (v-space MSE to the reference), ``awm/ema_kl`` (to the KL-EMA), TRL's ``clip_ratio/*`` and
        ``ratio/max_abs_deviation`` (|rho - 1|: 0 on-policy)."""
        metrics = {}
        for key, name in (("kl", "kl"), ("ema_kl", "awm/ema_kl")):
            if stats[key]:
                metrics[name] = gather(torch.cat(stats[key]).mean()).nanmean().item()
        low = gather(torch.cat(stats["low_clipped"]).mean())
        high = gather(torch.cat(stats["high_clipped"]).mean())
        metrics["clip_ratio/low_mean"] = low.nanmean().item()
        metrics["clip_ratio/high_mean"] = high.nanmean().item()
        metrics["clip_ratio/region_mean"] = (low + high).nanmean().item()
        metrics["ratio/max_abs_deviation"] = gather(torch.cat(stats["ratio_deviation"]).max()).max().item()
        return metrics
