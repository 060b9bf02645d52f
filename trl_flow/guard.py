"""A reward-hacking guard: held-out rewards and image statistics watched during training, never trained on.

`RewardHackingGuard` is a `transformers.TrainerCallback`. At every evaluation of a `FlowGRPOTrainer` it scores the
evaluation images (ODE samples with fixed seeds, so evaluations are comparable) with its own reward functions and
computes image statistics: mean saturation, edge density, and within-group diversity (the mean pairwise pixel
distance between images of the same prompt). Everything is logged under ``guard/...``, so it lands in
``trainer_state.json``'s ``log_history`` and in every ``report_to`` tracker. Guard rewards never reach the
advantages: they are computed after the rollout, from its images, and only logged.

The first evaluation is the baseline. An evaluation is *degraded* when the training reward (``eval_reward``: the
training rewards on the evaluation images) is above its baseline while a guard reward or the diversity has fallen by
more than ``tolerance`` (relative to its baseline value). After ``patience`` consecutive degraded evaluations the
guard fires: it warns, and with ``action="stop"`` it stops training. Either way it keeps
``output_dir/guard_best_checkpoint.json`` up to date, naming the best saved checkpoint by guard score (see
`RewardHackingGuard.best_checkpoint`), and sets ``state.best_model_checkpoint`` to it (so checkpoint rotation keeps
it) unless ``metric_for_best_model`` is used.

From Python, pass ``RewardHackingGuard(["my_rewards.py:held_out"], action="stop")`` in ``callbacks=``; from a
recipe, set ``guard_reward_funcs`` (and ``guard_tolerance``, ``guard_patience``, ``guard_action``,
``guard_on_rollouts``) and the trainer adds one itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from reward_funcs._common import to_pil_rgb, to_rgb_array

from .errors import UserInputError
from .rewards import call_reward_func, resolve_reward_funcs, reward_func_name, validate_rewards


class WatchedTrainer(Protocol):
    """What the guard reads from the trainer it is bound to (`FlowGRPOTrainer` is one): the latest rollout's dataset
    rows and images, whether it is training, its metric lists and its `log`."""

    model: Any
    _metrics: dict[str, dict[str, list[float]]]
    _last_images: list[Any]
    _last_inputs: list[dict]

    def log(self, logs: dict[str, float], *args: Any) -> None: ...


logger = logging.getLogger(__name__)

#: Prefix of every metric the guard logs.
GUARD_PREFIX = "guard/"
#: File in ``output_dir`` naming the best checkpoint by guard score.
BEST_CHECKPOINT_NAME = "guard_best_checkpoint.json"
GUARD_ACTIONS = ("warn", "stop")
#: Side of the thumbnails diversity is measured on: pixel distances of large images cost much and add little.
DIVERSITY_SIZE = 64
#: A luminance step (on a 0-1 scale) between neighbouring pixels above this counts as an edge.
EDGE_THRESHOLD = 0.1
_DIVERSITY = "diversity"


# ------------------------------------------------------------------------------------------------ image statistics
def mean_saturation(image: Any) -> float:
    """Mean HSV saturation, ``(max - min) / max`` over RGB per pixel (0 for black), in [0, 1]."""
    rgb = to_rgb_array(image)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-12), 0.0)
    return float(saturation.mean())


def edge_density(image: Any, threshold: float = EDGE_THRESHOLD) -> float:
    """Fraction of pixels whose luminance gradient (forward differences) exceeds ``threshold`` (0-1 scale)."""
    rgb = to_rgb_array(image)
    luminance = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if min(luminance.shape) < 2:
        return 0.0
    dx = np.diff(luminance, axis=1)[:-1, :]
    dy = np.diff(luminance, axis=0)[:, :-1]
    return float((np.hypot(dx, dy) > threshold).mean())


def thumbnail(image: Any, size: int = DIVERSITY_SIZE) -> np.ndarray:
    """The image at most ``size`` px on its longer side, as uint8 HxWx3 (what diversity is measured on)."""
    image = to_pil_rgb(image)
    if max(image.size) > size:
        scale = size / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return np.asarray(image, dtype=np.uint8)


def group_diversity(prompts: Sequence[str], thumbnails: Sequence[np.ndarray]) -> float | None:
    """Mean over prompts (with at least two images) of the mean pairwise mean-|pixel difference| (0-1 scale)
    between that prompt's images. None when no prompt has two images."""
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for prompt, image in zip(prompts, thumbnails, strict=True):
        groups[prompt].append(image.astype(np.float32) / 255.0)
    per_group = [
        float(np.mean([np.abs(a - b).mean() for a, b in combinations(images, 2)]))
        for images in groups.values()
        if len(images) >= 2
    ]
    return float(np.mean(per_group)) if per_group else None


@dataclass
class GuardRecord:
    """What the guard keeps of one image: prompt, guard rewards (NaN: not scored), statistics, thumbnail."""

    prompt: str
    rewards: dict[str, float]
    saturation: float
    edge_density: float
    thumbnail: np.ndarray


@dataclass
class GuardEvaluation:
    """The guard's summary of one evaluation."""

    step: int
    reward: float | None
    values: dict[str, float]  # guarded quantities: guard rewards and diversity
    score: float | None = None  # the worst relative change of a guarded quantity from its baseline
    within_tolerance: bool = True
    degraded: bool = False
    extra: dict[str, float] = field(default_factory=dict)


def _nanmean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


# ------------------------------------------------------------------------------------------------------ callback
class RewardHackingGuard(TrainerCallback):
    """Watches held-out rewards and image statistics at each evaluation; warns or stops on reward hacking.

    Args:
        reward_funcs: guard rewards, in any form `reward_funcs` accepts (callables, built-in names,
            ``module:function``, ``file.py:function``, reward-server URLs). Scored on evaluation images only, never
            used for advantages.
        tolerance: relative fall of a guarded quantity from its baseline (first evaluation) that counts as a
            breach: ``(baseline - value) / |baseline| > tolerance``.
        patience: consecutive degraded evaluations (training reward up, a guarded quantity breached) before the
            guard fires.
        action: ``"warn"`` (log a warning) or ``"stop"`` (also stop training) when it fires.
        watch_diversity: also guard the within-group diversity (it is always logged).
        on_rollouts: also score up to this many images of each training rollout batch (per process) with the guard
            rewards and statistics, logged as ``guard/rollouts/...`` (0: off). Rollout scores are only logged.
    """

    def __init__(
        self,
        reward_funcs: Sequence[str | Callable[..., Any]] = (),
        tolerance: float = 0.1,
        patience: int = 2,
        action: str = "warn",
        watch_diversity: bool = True,
        on_rollouts: int = 0,
    ) -> None:
        if action not in GUARD_ACTIONS:
            raise UserInputError(f"guard_action = {action!r}: use one of {', '.join(map(repr, GUARD_ACTIONS))}")
        if not tolerance > 0:
            raise UserInputError(f"guard_tolerance = {tolerance!r}: use a relative fall > 0, e.g. 0.1 (10%)")
        if patience < 1:
            raise UserInputError(f"guard_patience = {patience!r}: use a number of evaluations >= 1")
        if on_rollouts < 0:
            raise UserInputError(f"guard_on_rollouts = {on_rollouts!r}: use 0 (off) or a number of images >= 1")
        self.reward_funcs = resolve_reward_funcs(list(reward_funcs)) if reward_funcs else []
        self.reward_names = [reward_func_name(func) for func in self.reward_funcs]
        if len(set(self.reward_names)) != len(self.reward_names):
            raise UserInputError(f"guard_reward_funcs: two guard rewards share a name ({self.reward_names})")
        self.tolerance = tolerance
        self.patience = patience
        self.action = action
        self.watch_diversity = watch_diversity
        self.on_rollouts = on_rollouts
        self.trainer: WatchedTrainer | None = None
        self.evaluations: list[GuardEvaluation] = []
        self.baseline: GuardEvaluation | None = None
        self.consecutive = 0
        self.fired_at_step: int | None = None
        self.checkpoints: dict[str, GuardEvaluation] = {}
        self._records: list[GuardRecord] = []
        self._last_rollout_id: int | None = None

    @classmethod
    def from_args(cls, args: Any) -> RewardHackingGuard:
        """The guard a `FlowGRPOConfig` asks for (its ``guard_*`` keys)."""
        return cls(
            reward_funcs=list(args.guard_reward_funcs or []),
            tolerance=args.guard_tolerance,
            patience=args.guard_patience,
            action=args.guard_action,
            on_rollouts=args.guard_on_rollouts,
        )

    def bind(self, trainer: WatchedTrainer) -> None:
        """Attach to the trainer whose images are watched (`FlowGRPOTrainer` does this for its callbacks)."""
        self.trainer = trainer

    # -------------------------------------------------------------------------------------------- scoring
    def score_images(self, inputs: Sequence[dict], images: Sequence[Any]) -> list[GuardRecord]:
        """Guard rewards and statistics of ``images`` (one per dataset row of ``inputs``), on this process."""
        if not images:
            return []
        prompts = [row["prompt"] for row in inputs]
        columns = {key: [row[key] for row in inputs] for key in inputs[0] if key not in ("prompt", "completion")}
        scores: dict[str, list[float]] = {}
        for func, name in zip(self.reward_funcs, self.reward_names, strict=True):
            values = call_reward_func(func, prompts, list(images), **columns)
            scores[name] = validate_rewards(name, values, len(images))
        return [
            GuardRecord(
                prompt=prompt,
                rewards={name: scores[name][i] for name in self.reward_names},
                saturation=mean_saturation(image),
                edge_density=edge_density(image),
                thumbnail=thumbnail(image),
            )
            for i, (prompt, image) in enumerate(zip(prompts, images, strict=True))
        ]

    def summarize(self, records: Sequence[GuardRecord]) -> dict[str, float | None]:
        """Mean guard rewards and statistics of ``records``, by metric name (without the ``guard/`` prefix)."""
        summary: dict[str, float | None] = {
            name: _nanmean([r.rewards[name] for r in records]) for name in self.reward_names
        }
        summary["saturation"] = _nanmean([r.saturation for r in records])
        summary["edge_density"] = _nanmean([r.edge_density for r in records])
        summary[_DIVERSITY] = group_diversity([r.prompt for r in records], [r.thumbnail for r in records])
        return summary

    # ------------------------------------------------------------------------------------------- events
    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        records, self._records = self._records, []
        if not records:
            logger.warning("reward-hacking guard: this evaluation produced no images to score")
            return
        summary = self.summarize(records)
        evaluation = self.judge(state.global_step, self._training_reward(metrics, state), summary)
        logs = {f"{GUARD_PREFIX}{name}": value for name, value in summary.items() if value is not None}
        logs[f"{GUARD_PREFIX}score"] = evaluation.score if evaluation.score is not None else 0.0
        logs[f"{GUARD_PREFIX}degraded"] = float(evaluation.degraded)
        logs[f"{GUARD_PREFIX}consecutive_degraded"] = float(self.consecutive)
        logs[f"{GUARD_PREFIX}fired"] = float(self.fired_at_step is not None)
        logs.update({f"{GUARD_PREFIX}{key}": value for key, value in evaluation.extra.items()})
        if metrics is not None:
            metrics.update(logs)
        if self.consecutive == self.patience:  # fire once per run of degraded evaluations
            self._fire(args, state, control, evaluation)
            logs[f"{GUARD_PREFIX}fired"] = 1.0
            if metrics is not None:
                metrics[f"{GUARD_PREFIX}fired"] = 1.0
        if self.trainer is not None:
            self.trainer.log(logs)  # a log entry of its own: log_history and every report_to tracker
        self._update_best(args, state)

    def judge(self, step: int, reward: float | None, summary: dict[str, float | None]) -> GuardEvaluation:
        """Compare one evaluation's guarded quantities with the baseline (the first evaluation) and update the
        count of consecutive degraded evaluations."""
        guarded = list(self.reward_names) + ([_DIVERSITY] if self.watch_diversity else [])
        values = {name: summary[name] for name in guarded if summary.get(name) is not None}
        evaluation = GuardEvaluation(step=step, reward=reward, values=values)
        if self.baseline is None:
            self.baseline = evaluation
        baseline = self.baseline
        changes = {
            name: (value - baseline.values[name]) / max(abs(baseline.values[name]), 1e-8)
            for name, value in values.items()
            if name in baseline.values
        }
        for name, change in changes.items():
            evaluation.extra[f"change/{name}"] = change
        evaluation.score = min(changes.values()) if changes else None
        evaluation.within_tolerance = all(change >= -self.tolerance for change in changes.values())
        rising = reward is not None and baseline.reward is not None and reward > baseline.reward
        if reward is not None and baseline.reward is not None:
            evaluation.extra["reward_change"] = reward - baseline.reward
        evaluation.degraded = rising and not evaluation.within_tolerance
        self.consecutive = self.consecutive + 1 if evaluation.degraded else 0
        self.evaluations.append(evaluation)
        return evaluation

    @staticmethod
    def _training_reward(metrics: dict[str, float] | None, state: TrainerState) -> float | None:
        """The training rewards on the evaluation images (``eval_reward``); if absent, the last training log's."""
        value = (metrics or {}).get("eval_reward")
        if value is None:
            value = next((e["reward"] for e in reversed(state.log_history) if e.get("reward") is not None), None)
        return None if value is None or math.isnan(value) else float(value)

    def _fire(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, evaluation: GuardEvaluation
    ) -> None:
        self.fired_at_step = state.global_step
        fallen = ", ".join(
            f"{name} {100 * evaluation.extra[f'change/{name}']:+.1f}%"
            for name in evaluation.values
            if evaluation.extra.get(f"change/{name}", 0.0) < -self.tolerance
        )
        message = (
            f"reward-hacking guard: at step {state.global_step} the training reward rose "
            f"({evaluation.extra.get('reward_change', math.nan):+.4g} since the first evaluation) while {fallen} "
            f"(tolerance {100 * self.tolerance:g}%) for {self.patience} evaluation(s) in a row"
        )
        if self.action == "stop":
            control.should_training_stop = True
            message += "; stopping (guard_action: stop)"
        best = self.best_checkpoint(args)
        if best is not None:
            message += f"; best checkpoint by guard score: {best[0]}"
        logger.warning(message)
        if state.is_world_process_zero:
            print(message, flush=True)  # a long run's log must show it even without logging configured

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        """With ``on_rollouts``, score a sample of each new training rollout batch (logged with the training
        metrics)."""
        trainer = self.trainer
        if not self.on_rollouts or trainer is None:
            return
        images = getattr(trainer, "_last_images", None)
        inputs = getattr(trainer, "_last_inputs", None)
        if not images or inputs is None or id(images) == self._last_rollout_id:
            return
        self._last_rollout_id = id(images)
        records = self.score_images(inputs[: self.on_rollouts], images[: self.on_rollouts])
        for name, value in self.summarize(records).items():
            if value is not None:
                trainer._metrics["train"][f"{GUARD_PREFIX}rollouts/{name}"].append(value)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.evaluations:
            name = f"checkpoint-{state.global_step}"
            self.checkpoints[name] = self.evaluations[-1]  # the latest evaluation describes this checkpoint
            self._update_best(args, state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._update_best(args, state)

    # ------------------------------------------------------------------------------------- best checkpoint
    def best_checkpoint(self, args: TrainingArguments) -> tuple[str, GuardEvaluation] | None:
        """The saved checkpoint (still on disk) to use if the run hacked its reward: of those whose guarded
        quantities stayed within ``tolerance``, the one with the highest training reward; if none did, the one
        with the highest guard score. None when no checkpoint was saved after an evaluation."""
        existing = [
            (name, evaluation)
            for name, evaluation in self.checkpoints.items()
            if os.path.isdir(os.path.join(args.output_dir, name))
        ]
        if not existing:
            return None
        safe = [item for item in existing if item[1].within_tolerance]
        if safe:
            return max(safe, key=lambda item: (-math.inf if item[1].reward is None else item[1].reward, item[1].step))
        return max(existing, key=lambda item: (-math.inf if item[1].score is None else item[1].score, item[1].step))

    def _update_best(self, args: TrainingArguments, state: TrainerState) -> None:
        """Write ``guard_best_checkpoint.json`` and point ``state.best_model_checkpoint`` at the best checkpoint."""
        if not self.evaluations:
            return
        best = self.best_checkpoint(args)
        if best is not None and args.metric_for_best_model is None:
            state.best_model_checkpoint = os.path.join(args.output_dir, best[0])
        if not state.is_world_process_zero:
            return
        report = {
            "best_checkpoint": best[0] if best else None,
            "rule": "highest training reward among checkpoints whose guarded quantities stayed within tolerance; "
            "if none did, the highest guard score",
            "fired_at_step": self.fired_at_step,
            "action": self.action,
            "tolerance": self.tolerance,
            "patience": self.patience,
            "checkpoints": {
                name: {"step": e.step, "reward": e.reward, "score": e.score, "within_tolerance": e.within_tolerance}
                for name, e in self.checkpoints.items()
            },
            "evaluations": [
                {
                    "step": e.step,
                    "reward": e.reward,
                    "values": e.values,
                    "score": e.score,
                    "within_tolerance": e.within_tolerance,
                    "degraded": e.degraded,
                }
                for e in self.evaluations
            ],
        }
        os.makedirs(args.output_dir, exist_ok=True)
        Path(args.output_dir, BEST_CHECKPOINT_NAME).write_text(json.dumps(report, indent=1))

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After each evaluation batch: score its images (every process calls this, so the gather is safe)."""
        trainer = self.trainer
        if trainer is None or trainer.model.training:
            return
        images, inputs = getattr(trainer, "_last_images", None), getattr(trainer, "_last_inputs", None)
        if images and inputs is not None:
            self.collect(inputs, images)

    def collect(self, inputs: Sequence[dict], images: Sequence[Any]) -> None:
        """Score one evaluation batch on this process and keep every process's records (a collective call when
        distributed: every process makes it, so all of them take the same decision at `on_evaluate`)."""
        from accelerate.utils import gather_object

        self._records.extend(gather_object(self.score_images(inputs, images)))
