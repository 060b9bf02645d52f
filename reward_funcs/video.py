"""Video-native rewards: `temporal_consistency` (CLIP similarity of consecutive frames) and `motion` (how much the
frames change).

Both take completions that are videos (lists of frames, as a video family's rollouts give them); an image counts as a
one-frame video, which has no consecutive pair and gets None. Neither reads the prompt.

- `temporal_consistency`: the mean cosine similarity of the L2-normalised CLIP image embeddings of consecutive
  frames (frames 0, k, 2k, ... with ``every=k``), in [-1, 1]; 1 for a still video. It rewards videos whose content
  stays the same object / scene across frames, and by itself also rewards standing still: pair it with `motion`.
- `motion`: the mean absolute difference of consecutive frames, per pixel and channel, in [0, 1] (RGB scaled to
  [0, 1]); 0 for a still video. A positive reward weight asks for more motion, a negative one for less;
  ``make_motion(target=m)`` scores ``-|motion - m|`` (this much motion, neither more nor less).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from reward_funcs._clip import load_clip
from reward_funcs._common import check_batch_size, check_lengths, to_rgb_array
from reward_funcs.clipscore import CLIPSCORE_MODEL
from trl_flow.errors import UserInputError
from trl_flow.video import frames_of

if TYPE_CHECKING:
    import torch

__all__ = [
    "Motion",
    "TemporalConsistency",
    "make_motion",
    "make_temporal_consistency",
    "motion",
    "temporal_consistency",
]


def _check_every(every: int, name: str) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise UserInputError(f"reward '{name}': every must be a positive integer, got {every!r}.")
    return every


class TemporalConsistency:
    """`temporal_consistency` reward callable; the CLIP model loads on the first call. See the module docstring.

    Args:
        model_name_or_path: `CLIPModel` checkpoint (hub id or local directory, safetensors); CLIPScore's by default.
        processor_name_or_path: its `CLIPProcessor`; None means the model's own.
        device: where to run the model; None means the current CUDA device if any, else the CPU.
        dtype: model dtype; None means float32.
        batch_size: frames per forward pass.
        every: compare frames 0, every, 2*every, ... (consecutive among those).
        name: the reward's `__name__`.
    """

    def __init__(
        self,
        model_name_or_path: str = CLIPSCORE_MODEL,
        processor_name_or_path: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
        every: int = 1,
        name: str = "temporal_consistency",
    ) -> None:
        self.__name__ = name
        self.model_name_or_path = model_name_or_path
        self.processor_name_or_path = processor_name_or_path
        self.device = device
        self.dtype = dtype
        self.batch_size = check_batch_size(batch_size, name)
        self.every = _check_every(every, name)

    def __repr__(self) -> str:
        return f"TemporalConsistency(name={self.__name__!r}, model={self.model_name_or_path!r}, every={self.every})"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Mean cosine similarity of consecutive frames' CLIP embeddings, per video (None for one frame)."""
        check_lengths(prompts, completions, self.__name__)
        videos = [frames_of(completion)[:: self.every] for completion in completions]
        if not any(len(frames) > 1 for frames in videos):
            return [None] * len(videos)
        clip = load_clip(self.model_name_or_path, self.processor_name_or_path, self.device, self.dtype, self.__name__)
        # One pass over every frame of the batch (batched by batch_size), then split per video.
        embeddings = clip.embed_images([frame for frames in videos for frame in frames], self.batch_size)
        scores: list[float | None] = []
        start = 0
        for frames in videos:
            video = embeddings[start : start + len(frames)]
            start += len(frames)
            scores.append(float((video[1:] * video[:-1]).sum(dim=-1).mean()) if len(frames) > 1 else None)
        return scores


def make_temporal_consistency(
    model_name_or_path: str = CLIPSCORE_MODEL,
    processor_name_or_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
    every: int = 1,
    name: str = "temporal_consistency",
) -> TemporalConsistency:
    """Create a `temporal_consistency` reward; nothing loads until its first call. Arguments: see
    [`TemporalConsistency`]."""
    return TemporalConsistency(model_name_or_path, processor_name_or_path, device, dtype, batch_size, every, name)


class Motion:
    """`motion` reward callable (numpy only). See the module docstring.

    Args:
        every: compare frames 0, every, 2*every, ...
        target: None scores the motion itself; a number m scores ``-|motion - m|``.
        name: the reward's `__name__`.
    """

    def __init__(self, every: int = 1, target: float | None = None, name: str = "motion") -> None:
        self.__name__ = name
        self.every = _check_every(every, name)
        if target is not None and not 0.0 <= float(target) <= 1.0:
            raise UserInputError(f"reward '{name}': target must lie in [0, 1] (a mean frame difference), got {target}.")
        self.target = None if target is None else float(target)

    def __repr__(self) -> str:
        return f"Motion(name={self.__name__!r}, every={self.every}, target={self.target})"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Mean absolute difference of consecutive frames per video (None for one frame)."""
        check_lengths(prompts, completions, self.__name__)
        scores: list[float | None] = []
        for completion in completions:
            frames = frames_of(completion)[:: self.every]
            if len(frames) < 2:
                scores.append(None)
                continue
            video = np.stack([to_rgb_array(frame) for frame in frames])  # (F, H, W, 3) in [0, 1]
            amount = float(np.abs(np.diff(video, axis=0)).mean())
            scores.append(amount if self.target is None else -abs(amount - self.target))
        return scores


def make_motion(every: int = 1, target: float | None = None, name: str = "motion") -> Motion:
    """Create a `motion` reward. Arguments: see [`Motion`]."""
    return Motion(every=every, target=target, name=name)


temporal_consistency = make_temporal_consistency()
"""The built-in `temporal_consistency` reward: CLIP ViT-L/14, every frame, batch size 16, float32."""

motion = make_motion()
"""The built-in `motion` reward: mean absolute difference of consecutive frames, in [0, 1]."""
