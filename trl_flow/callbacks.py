"""Training-lifecycle callbacks of `FlowGRPOTrainer`: weight EMA, evaluation samples, the reward curve.

Each is a `transformers.TrainerCallback`; `FlowGRPOTrainer` registers them itself, so they also run for a trainer
built in Python rather than by the CLI.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .reporting import save_reward_curve, save_sample_grid
from .video import frame_strip, is_video, reward_fps, write_video

logger = logging.getLogger(__name__)

#: Sub-folder of ``output_dir`` holding one sample grid (and its captions) per evaluation.
SAMPLES_DIR = "samples"
#: Name of the reward-curve PNG in ``output_dir``.
REWARD_CURVE_NAME = "reward_curve.png"


# ------------------------------------------------------------------------------------------------------------ EMA
class ParameterEMA:
    """Exponential moving average of a set of parameters, kept in float32 beside them.

    Every ``update_every`` optimizer steps, ``shadow <- d * shadow + (1 - d) * weight`` with
    ``d = min(decay, (1 + step) / (10 + step))``: the warm-up makes the average follow the weights closely early in
    training, when they move most, and settles at ``decay``.

    Args:
        named_parameters: ``(name, parameter)`` pairs to average (the trainable ones).
        decay: the long-run decay ``d``.
        update_every: update period, in optimizer steps.
    """

    def __init__(
        self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], decay: float, update_every: int
    ) -> None:
        self.parameters: dict[str, torch.nn.Parameter] = dict(named_parameters)
        if not self.parameters:
            raise ValueError("ParameterEMA needs at least one parameter")
        self.decay = decay
        self.update_every = update_every
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Start the average afresh from the current weights."""
        self.shadow = {name: p.detach().to(torch.float32, copy=True) for name, p in self.parameters.items()}
        self.num_updates = 0

    def decay_at(self, step: int) -> float:
        """The decay used by an update at optimizer step ``step``."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights into the average (``step``: the optimizer step just taken)."""
        decay = self.decay_at(step)
        for name, parameter in self.parameters.items():
            self.shadow[name].mul_(decay).add_(parameter.detach().to(torch.float32), alpha=1.0 - decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the EMA weights; afterwards, exactly their own values again."""
        with torch.no_grad():
            backup = {name: p.detach().clone() for name, p in self.parameters.items()}
            for name, parameter in self.parameters.items():
                parameter.copy_(self.shadow[name].to(parameter.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    parameter.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by parameter name (CPU, contiguous: ready for safetensors)."""
        return {name: tensor.detach().cpu().contiguous() for name, tensor in self.shadow.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        """Restore the average saved by `state_dict` (the parameter names must match)."""
        missing = set(self.parameters) - set(tensors)
        unexpected = set(tensors) - set(self.parameters)
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the trained parameters (missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(unexpected)[:3]})"
            )
        for name, parameter in self.parameters.items():
            self.shadow[name] = tensors[name].to(device=parameter.device, dtype=torch.float32).clone()
        self.num_updates = num_updates


class AfterStepCallback(TrainerCallback):
    """Calls ``hook(global_step)`` after every optimizer step (an algorithm's old-policy and EMA updates)."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.hook(state.global_step)


class EMACallback(TrainerCallback):
    """Updates a `ParameterEMA` after every ``ema.update_every``-th optimizer step."""

    def __init__(self, ema: ParameterEMA) -> None:
        self.ema = ema

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step % self.ema.update_every == 0:
            self.ema.update(state.global_step)


# ---------------------------------------------------------------------------------------------- evaluation samples
@dataclass
class EvalSample:
    """One evaluation rollout: its prompt, image (a video family: the list of its frames), reward per function and
    weighted total (NaN: not scored)."""

    prompt: str
    image: Image.Image | list[Image.Image]
    reward: float
    rewards: dict[str, float] = field(default_factory=dict)

    def caption(self) -> str:
        """``prompt | reward 0.123 (name 0.123, ...)``, as shown beside the image in trackers."""
        details = ", ".join(f"{name} {value:.3f}" for name, value in self.rewards.items())
        return f"{self.prompt} | reward {self.reward:.3f}" + (f" ({details})" if len(self.rewards) > 1 else "")


def _optional_module(name: str) -> ModuleType | None:
    """The module ``name`` if it is imported or importable, else None (never raises)."""
    if name in sys.modules:
        return sys.modules[name]
    try:
        if importlib.util.find_spec(name) is None:
            return None
        return importlib.import_module(name)
    except Exception:  # a broken optional install must not stop training
        return None


def log_samples_to_trackers(
    samples: list[EvalSample],
    grid: Image.Image,
    step: int,
    report_to: Iterable[str],
    tensorboard_writer: Any | None = None,
    videos: list[Path] | None = None,
    fps: float | None = None,
) -> list[str]:
    """Log evaluation samples to every image-capable tracker of ``report_to`` that is active; return their names.

    wandb and trackio get one captioned image per sample under ``eval/samples`` (with ``train/global_step``, as the
    transformers callbacks log it); TensorBoard gets the grid as an image and the captions as a text table. Video
    samples are shown as frame strips there, and their files (``videos``, one per sample, written at ``fps``) are
    logged as well: ``wandb.Video`` from the file under ``eval/videos``, and TensorBoard's ``add_video`` (which needs
    moviepy; without it TensorBoard keeps the strips only).
    """
    report_to = set(report_to or ())
    captions = [sample.caption() for sample in samples]
    pictures = [frame_strip(s.image) if is_video(s.image) else s.image for s in samples]
    logged = []
    if "wandb" in report_to:
        wandb = _optional_module("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            entry: dict[str, Any] = {
                "eval/samples": [wandb.Image(p, caption=text) for p, text in zip(pictures, captions, strict=True)]
            }
            if videos:
                entry["eval/videos"] = [
                    wandb.Video(str(path), caption=text)  # from the file: wandb reads its format from the suffix
                    for path, text in zip(videos, captions, strict=True)
                ]
            wandb.log({**entry, "train/global_step": step})
            logged.append("wandb")
    if "trackio" in report_to:
        trackio = _optional_module("trackio")
        if trackio is not None and hasattr(trackio, "Image"):
            images = [trackio.Image(p, caption=text) for p, text in zip(pictures, captions, strict=True)]
            trackio.log({"eval/samples": images, "train/global_step": step})
            logged.append("trackio")
    if "tensorboard" in report_to and tensorboard_writer is not None:
        import numpy as np

        tensorboard_writer.add_image("eval/samples", np.asarray(grid.convert("RGB")), step, dataformats="HWC")
        rows = "\n".join(f"| {i} | {text.replace('|', '/')} |" for i, text in enumerate(captions))
        tensorboard_writer.add_text("eval/samples", f"| tile | prompt / reward |\n|---|---|\n{rows}", step)
        # torch's make_video prints a warning and logs nothing without moviepy: add_video only where it works.
        if videos and _optional_module("moviepy") is not None:
            for index, sample in enumerate(samples):
                frames = np.stack([np.asarray(frame.convert("RGB")) for frame in sample.image])  # (T, H, W, C)
                clip = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # (1, T, C, H, W) uint8
                tensorboard_writer.add_video(f"eval/videos/{index}", clip, step, fps=int(round(fps or 1)))
        logged.append("tensorboard")
    return logged


class SampleSource(Protocol):
    """What `EvalSamplesCallback` reads from its trainer (`FlowGRPOTrainer` is one): the evaluation samples it kept,
    and its callbacks (to share the TensorBoard writer)."""

    eval_samples: list[EvalSample]
    callback_handler: Any


class EvalSamplesCallback(TrainerCallback):
    """At each evaluation: a grid of the trainer's evaluation samples in ``output_dir/samples/eval_step_NNNNNN.png``
    (captions, row by row, in the ``.json`` beside it), and the samples logged to the trackers (main process only).

    Video samples (lists of frames): the PNG holds one frame strip per sample, and each video is written to
    ``samples/eval_step_NNNNNN/sample_II.mp4`` (GIF where ffmpeg is unavailable) at the adapter's ``fps``."""

    def __init__(self, trainer: SampleSource) -> None:
        self.trainer = trainer
        self._own_tensorboard_writer = None

    def _tensorboard_writer(self, args: TrainingArguments) -> Any | None:
        """The TensorBoardCallback's writer, else one of our own (if torch's tensorboard support is installed)."""
        for callback in self.trainer.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                return writer
        if self._own_tensorboard_writer is None:
            with contextlib.suppress(Exception):
                from torch.utils.tensorboard import SummaryWriter

                self._own_tensorboard_writer = SummaryWriter(log_dir=args.logging_dir)
        return self._own_tensorboard_writer

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        samples = list(self.trainer.eval_samples)
        if not samples or not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / SAMPLES_DIR / f"eval_step_{state.global_step:06d}.png"
        captions = [{"prompt": s.prompt, "reward": _json_float(s.reward), "rewards": s.rewards} for s in samples]
        videos, fps = None, None
        if all(is_video(sample.image) for sample in samples):
            # A video family: the PNG holds one frame strip per sample (a row each); the videos go beside it.
            save_sample_grid([frame_strip(sample.image) for sample in samples], path, columns=1)
            fps = reward_fps(getattr(self.trainer, "adapter", None), [sample.image for sample in samples])
            folder = path.with_suffix("")
            videos = [write_video(s.image, folder / f"sample_{i:02d}", fps) for i, s in enumerate(samples)]
            for caption, video in zip(captions, videos, strict=True):
                caption["video"] = video.relative_to(path.parent).as_posix()
        else:
            save_sample_grid([sample.image for sample in samples], path)
        path.with_suffix(".json").write_text(json.dumps({"step": state.global_step, "samples": captions}, indent=1))
        report_to = list(args.report_to or ())
        writer = self._tensorboard_writer(args) if "tensorboard" in report_to else None
        with Image.open(path) as grid:
            log_samples_to_trackers(samples, grid, state.global_step, report_to, writer, videos=videos, fps=fps)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._own_tensorboard_writer is not None:
            self._own_tensorboard_writer.close()
            self._own_tensorboard_writer = None


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


# ---------------------------------------------------------------------------------------------------- reward curve
class RewardCurveCallback(TrainerCallback):
    """Redraws ``output_dir/reward_curve.png`` (train and eval reward) when rewards are logged, on the main process.

    A redraw costs ~0.1-0.2 s, so training logs redraw at most every ``min_interval_s`` seconds; evaluation logs
    and the end of training always redraw.
    """

    def __init__(self, min_interval_s: float = 10.0) -> None:
        self.min_interval_s = min_interval_s
        self._last_drawn = -math.inf
        self._pending = False
        self._warned = False

    def _draw(self, args: TrainingArguments, state: TrainerState) -> None:
        try:
            save_reward_curve(state.log_history, Path(args.output_dir) / REWARD_CURVE_NAME)
        except Exception as error:  # a plotting problem must not end a long run
            if not self._warned:
                logger.warning(f"could not draw the reward curve: {type(error).__name__}: {error}")
                self._warned = True
        self._last_drawn = time.monotonic()
        self._pending = False

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        is_eval = logs.get("eval_reward") is not None
        if not is_eval and logs.get("reward") is None:
            return
        if is_eval or time.monotonic() - self._last_drawn >= self.min_interval_s:
            self._draw(args, state)
        else:
            self._pending = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and self._pending:
            self._draw(args, state)
