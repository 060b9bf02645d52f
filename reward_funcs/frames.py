"""Any image reward applied to videos: score some frames of each video, pool the scores per video.

One wrapper serves every image reward (built-in, your own, a reward server): in a recipe, append ``@frames`` to the
reward's spec, optionally with options::

    reward_funcs:
      - pickscore@frames                       # every frame, mean
      - pickscore@frames(every=4,pool=min)     # frames 0, 4, 8, ...; the worst one counts
      - my_rewards.py:sharpness@frames(pool=first)
      - clipscore@frames(every=2,chunk=32)     # at most 32 frames per call of the image reward (long videos)

Options: ``every`` (k: frames 0, k, 2k, ... and always at least the first; default 1), ``pool`` (``mean``,
``min``, ``max`` or ``first``: the first frame only; default ``mean``), ``chunk`` (at most this many frames per call
of the image reward, to bound its memory on long videos; default: all frames of the batch in one call). From Python:
``FramePooled(make_pickscore(), every=4, pool="min")``.

The image reward is called with one entry per scored frame: the prompt and every per-sample column (lists with one
value per video) repeated for each of the video's frames, other keywords (``fps``, ``trainer_state``) as they are.
Frames it returns None for are left out of the pool; a video none of whose frames is scored gets None. An image
(not a list of frames) counts as a one-frame video, so the same recipe also runs on an image family.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from trl_flow.errors import UserInputError
from trl_flow.video import frames_of

__all__ = ["POOLS", "FramePooled"]

POOLS = ("mean", "min", "max", "first")
"""How the frame scores of a video become its reward."""

# Keywords that are not per-sample columns even when they happen to have one entry per video.
_NOT_COLUMNS = frozenset({"trainer_state", "log_extra", "log_metric", "environments"})


def _inner_name(func: Callable[..., Any]) -> str:
    from functools import partial

    while isinstance(func, partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


class FramePooled:
    """An image reward scoring videos by pooling the scores of every ``every``-th frame (see the module docstring).

    Args:
        reward: the image reward, ``fn(prompts, completions, **kwargs) -> list[float | None]``.
        every: score frames 0, every, 2*every, ... (a positive integer).
        pool: ``mean``, ``min``, ``max`` or ``first`` (score the first frame only).
        chunk: at most this many frames per call of ``reward`` (None: one call per batch).
        name: the reward's ``__name__`` (TRL logs ``rewards/<name>/mean``); None: ``<reward's name>@frames``.

    Raises:
        UserInputError: a bad option, naming it.
    """

    def __init__(
        self,
        reward: Callable[..., Any],
        every: int = 1,
        pool: str = "mean",
        chunk: int | None = None,
        name: str | None = None,
    ) -> None:
        label = name or f"{_inner_name(reward)}@frames"
        if not callable(reward):
            raise UserInputError(f"reward '{label}': the frame-pooled reward must be callable, got {reward!r}")
        for key, value in (("every", every), ("chunk", chunk)):
            if value is None and key == "chunk":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserInputError(f"reward '{label}': {key} must be a positive integer, got {value!r}")
        if pool not in POOLS:
            raise UserInputError(f"reward '{label}': pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.reward, self.every, self.pool, self.chunk = reward, every, pool, chunk
        self.__name__ = label

    def __repr__(self) -> str:
        return f"FramePooled({self.reward!r}, every={self.every}, pool={self.pool!r}, chunk={self.chunk})"

    def frame_indices(self, num_frames: int) -> list[int]:
        """The indices of the frames scored in a video of ``num_frames`` frames."""
        if self.pool == "first":
            return [0]
        return list(range(0, num_frames, self.every))

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Score the chosen frames of each video with the image reward and pool them per video."""
        if len(prompts) != len(completions):
            raise ValueError(f"reward '{self.__name__}': got {len(prompts)} prompts for {len(completions)} videos")
        num_videos = len(completions)
        columns = {
            key: value
            for key, value in kwargs.items()
            if key not in _NOT_COLUMNS
            and isinstance(value, (list, tuple))
            and len(value) == num_videos
            and not isinstance(value, str)
        }
        others = {key: value for key, value in kwargs.items() if key not in columns}
        owners: list[int] = []  # the video of each scored frame
        frames: list[Any] = []
        for video, completion in enumerate(completions):
            video_frames = frames_of(completion)
            if not video_frames:
                raise ValueError(f"reward '{self.__name__}': video {video} has no frames")
            picked = self.frame_indices(len(video_frames))
            frames.extend(video_frames[i] for i in picked)
            owners.extend([video] * len(picked))
        scores: list[float | None] = []
        step = self.chunk or max(len(frames), 1)
        for start in range(0, len(frames), step):
            part = owners[start : start + step]
            values = self.reward(
                prompts=[prompts[v] for v in part],
                completions=frames[start : start + step],
                **{key: [column[v] for v in part] for key, column in columns.items()},
                **others,
            )
            values = list(values.tolist() if hasattr(values, "tolist") else values)
            if len(values) != len(part):
                raise ValueError(
                    f"reward '{self.__name__}': the image reward returned {len(values)} values for {len(part)} frames"
                )
            scores.extend(values)
        per_video: list[list[float]] = [[] for _ in range(num_videos)]
        for video, value in zip(owners, scores, strict=True):
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                per_video[video].append(float(value))
        return [self._pool(values) for values in per_video]

    def _pool(self, values: list[float]) -> float | None:
        if not values:
            return None
        if self.pool == "min":
            return min(values)
        if self.pool == "max":
            return max(values)
        return sum(values) / len(values)  # mean; "first" scored one frame
