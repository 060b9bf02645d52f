"""GRPO's group-relative advantages, shared by every algorithm: each prompt's group of samples is its own baseline.

``A_i = (R_i - mean_group(R)) / std``, with TRL's ``scale_rewards``: ``"group"`` (each group's std), ``"batch"``
(the std of the whole gathered batch: Flow-GRPO's and DiffusionNFT's ``global_std``) or ``"none"``.
"""

from __future__ import annotations

from typing import Literal

import torch
from trl.trainer.utils import nanstd


def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TRL's total reward per sample, ``(rewards_per_func * weights).nansum(1)``; NaN where no function scored it."""
    rewards = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    return rewards


def group_relative_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    clip: float | None = None,
) -> torch.Tensor:
    """GRPO advantages: ``(r - mean_group(r)) / std``, optionally clipped to ``[-clip, clip]``.

    ``rewards`` holds whole groups of ``num_generations`` consecutive samples (gathered over all processes). NaN
    rewards (unscorable samples) are ignored in the statistics and get advantage 0. Flow-GRPO clips advantages to
    +-5.
    """
    grouped = rewards.view(-1, num_generations)
    group_mean = torch.nanmean(grouped, dim=1, keepdim=True)
    advantages = grouped - group_mean
    if scale_rewards == "group":
        advantages = advantages / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (nanstd(rewards) + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', not {scale_rewards!r}")
    advantages = torch.nan_to_num(advantages.reshape(-1), nan=0.0)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages


def reward_metrics(
    rewards_per_func: torch.Tensor, rewards: torch.Tensor, names: list[str], num_generations: int
) -> dict[str, float]:
    """TRL's reward metrics of a gathered batch: ``rewards/<name>/{mean,std}``, ``reward``, ``reward_std`` and
    ``frac_reward_zero_std`` (the share of groups whose samples all scored the same: no learning signal)."""
    metrics = {}
    for i, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, i]).item()
        metrics[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, i]).item()
    metrics["reward"] = torch.nanmean(rewards).item()
    metrics["reward_std"] = nanstd(rewards).item()
    group_std = nanstd(rewards.view(-1, num_generations), dim=1)
    metrics["frac_reward_zero_std"] = torch.isclose(group_std, torch.zeros_like(group_std)).float().mean().item()
    return metrics
