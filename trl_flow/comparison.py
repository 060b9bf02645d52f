"""Base model against trained policy on held-out prompts: the same seeds, the run's rewards, numbers and a grid.

`trl-flow grpo` runs :func:`compare_with_base` after training when ``compare_to_base`` is set: the evaluation
split's prompts (``eval_dataset``, never seen in training) are drawn by the base model (LoRA disabled, or the frozen
reference copy) and by the trained policy (its EMA weights when ``ema``) from the same initial noise, ODE sampling,
and scored by every reward function of the run. With a ``tag`` column (GenEval's task names), each reward is also
reported per tag and as GenEval's overall score, the mean over tags. Standard errors are over images; the gain's is
of the paired per-image differences (same prompt, same noise), so it is not inflated by prompt-to-prompt variance.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Comparison", "compare_with_base", "paired_gain", "save_comparison_grid"]


@dataclass
class Comparison:
    """Images and per-image rewards of the base model and the trained policy on the same prompts and noise.

    Attributes:
        prompts: one per image (each evaluation row repeated ``images_per_prompt`` times).
        tags: the rows' ``tag`` column per image, or None.
        base_images / trained_images: PIL images, aligned with ``prompts``.
        base_rewards / trained_rewards: reward function name -> per-image values (NaN where a reward returned None).
    """

    prompts: list[str]
    tags: list[str] | None
    base_images: list
    trained_images: list
    base_rewards: dict[str, np.ndarray] = field(default_factory=dict)
    trained_rewards: dict[str, np.ndarray] = field(default_factory=dict)

    def score(self, name: str, trained: bool) -> float:
        """Mean of reward ``name``; with tags, GenEval's overall score (the mean over tags of each tag's mean)."""
        values = (self.trained_rewards if trained else self.base_rewards)[name]
        if self.tags is None:
            return float(np.nanmean(values))
        tags = np.asarray(self.tags)
        return float(np.mean([np.nanmean(values[tags == tag]) for tag in sorted(set(self.tags))]))

    def summary_lines(self) -> list[str]:
        """Human-readable lines: per reward, base -> trained with standard errors, then per tag."""
        lines = [
            f"held-out prompts: {len(set(self.prompts))}, {len(self.prompts)} images each for base and trained "
            "(same seeds, ODE)"
        ]
        for name in self.base_rewards:
            base, trained = self.base_rewards[name], self.trained_rewards[name]
            gain, gain_se = paired_gain(base, trained, self.tags)
            kind = "score (mean over tags)" if self.tags is not None else "mean"
            lines.append(
                f"{name}: base {self.score(name, False):.3f} -> trained {self.score(name, True):.3f} ({kind}); "
                f"gain {gain:+.3f} +- {gain_se:.3f} (paired standard error)"
            )
            if self.tags is not None:
                tags = np.asarray(self.tags)
                for tag in sorted(set(self.tags)):
                    mask = tags == tag
                    lines.append(
                        f"    {tag} ({int(mask.sum())} images): {np.nanmean(base[mask]):.3f} -> "
                        f"{np.nanmean(trained[mask]):.3f}"
                    )
        return lines

    def captions(self, trained: bool) -> list[str]:
        """A caption per image: its prompt, then each reward's value."""
        rewards = self.trained_rewards if trained else self.base_rewards
        captions = []
        for i, prompt in enumerate(self.prompts):
            values = " ".join(f"{name.split(':')[-1]} {_fmt(values[i])}" for name, values in rewards.items())
            captions.append(f"{'trained' if trained else 'base'}: {prompt}\n{values}")
        return captions


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def paired_gain(
    base: Sequence[float], trained: Sequence[float], tags: Sequence[str] | None = None
) -> tuple[float, float]:
    """``(gain, standard error)`` of trained minus base, image by image (NaN pairs dropped).

    With ``tags``, the gain of GenEval's overall score: the mean over tags of each tag's mean difference, whose
    standard error combines the tags' (``sqrt(sum se_tag^2) / n_tags``).
    """
    difference = np.asarray(trained, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    groups = [np.ones(len(difference), dtype=bool)]
    if tags is not None:
        labels = np.asarray(tags)
        groups = [labels == tag for tag in sorted(set(tags))]
    means, variances = [], []
    for mask in groups:
        values = difference[mask]
        values = values[~np.isnan(values)]
        if len(values) == 0:
            continue
        means.append(values.mean())
        variances.append(values.var(ddof=1) / len(values) if len(values) > 1 else math.nan)
    if not means:
        return math.nan, math.nan
    return float(np.mean(means)), float(math.sqrt(sum(variances)) / len(means))


def compare_with_base(
    trainer: Any,
    dataset: Any,
    images_per_prompt: int = 1,
    seed: int = 1234,
    base_guidance_scale: float | None = None,
) -> Comparison:
    """Draw every row of ``dataset`` with the base model and the trained policy, the same noise, and score both.

    ``trainer`` is a :class:`~trl_flow.trainer.FlowGRPOTrainer` after training. The base model is the policy with
    its LoRA adapter disabled, or the trainer's frozen reference copy (a full fine-tune with ``beta > 0``).
    ``base_guidance_scale``: the base model's CFG scale (default: the config's ``guidance_scale``, the trained
    policy's), so that a policy trained CFG-free can be compared with the base at its usual guidance.
    The CLI runs it on the main process only, after training (so not under DeepSpeed ZeRO-3, whose generation
    gathers the weights collectively).
    """
    from trl_flow.data import SOURCE_IMAGES_COLUMN
    from trl_flow.errors import UserInputError

    rows = [dict(row) for row in dataset for _ in range(images_per_prompt)]
    if not rows:
        raise UserInputError("compare_to_base: the evaluation dataset is empty")
    prompts = [row["prompt"] for row in rows]
    condition_images = [row[SOURCE_IMAGES_COLUMN] for row in rows] if SOURCE_IMAGES_COLUMN in rows[0] else None
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.ref_model is not None:
        base_context = contextlib.nullcontext()
        base_denoiser = trainer.ref_model
    elif hasattr(model, "disable_adapter"):
        base_context = model.disable_adapter()
        base_denoiser = None
    else:
        raise UserInputError(
            "compare_to_base needs the base model: train a LoRA (use_peft: true), or set beta > 0 so that a full "
            "fine-tune keeps a frozen reference copy"
        )
    with base_context:
        base_images = trainer.generate_images(
            prompts,
            seed=seed,
            condition_images=condition_images,
            guidance_scale=base_guidance_scale,
            denoiser=base_denoiser,
        )
    with trainer.ema_weights():
        trained_images = trainer.generate_images(prompts, seed=seed, condition_images=condition_images)
    tags = [str(row["tag"]) for row in rows] if "tag" in rows[0] else None
    comparison = Comparison(prompts, tags, base_images, trained_images)
    for images, target in ((base_images, comparison.base_rewards), (trained_images, comparison.trained_rewards)):
        scores = trainer._score_locally(rows, images).cpu().numpy()
        for i, name in enumerate(trainer.reward_func_names):
            target[name] = scores[:, i].astype(np.float64)
    return comparison


def save_comparison_grid(comparison: Comparison, path: Any, max_prompts: int = 8) -> Any:
    """A PNG of up to ``max_prompts`` prompts spread over the comparison, one column each: a row of base images
    above a row of the trained policy's from the same noise (two such pairs of rows with two or more images per
    prompt), each tile captioned with its prompt and rewards."""
    from trl_flow.reporting import save_captioned_grid

    per_prompt: dict[str, list[int]] = {}
    for i, prompt in enumerate(comparison.prompts):
        per_prompt.setdefault(prompt, []).append(i)
    groups = list(per_prompt.values())
    picks = np.linspace(0, len(groups) - 1, min(max_prompts, len(groups))).round().astype(int)
    base_captions, trained_captions = comparison.captions(False), comparison.captions(True)
    images, captions = [], []
    for seed_index in range(min(2, min(len(groups[p]) for p in picks))):
        for source, texts in ((comparison.base_images, base_captions), (comparison.trained_images, trained_captions)):
            indices = [groups[p][seed_index] for p in picks]
            images += [source[i] for i in indices]
            captions += [texts[i] for i in indices]
    return save_captioned_grid(images, captions, path, columns=len(picks))
