"""Rule-based video rewards: no models, only numpy and Pillow.

A video completion is the list of its frames (`PIL.Image.Image`, or HxWx3 arrays), as a video family's adapter
decodes it. The signature is TRL's, `fn(prompts, completions, **kwargs) -> list[float | None]`; extra keywords (the
dataset's other columns, `fps`, `trainer_state`, ...) are accepted and ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .rules import COLOR_CHANNELS, _to_rgb_array

__all__ = ["color_transition", "parse_color_transition"]

_TRANSITION = re.compile(
    r"\b("
    + "|".join(COLOR_CHANNELS)
    + r")\b\s+(?:turning|becoming|fading|changing)\s+(?:into\s+|to\s+)?\b("
    + "|".join(COLOR_CHANNELS)
    + r")\b"
)


def parse_color_transition(prompt: str) -> tuple[str, str] | None:
    """``(start, end)`` colours of a prompt such as "red turning blue" / "a square fading to green"; None if the
    prompt names no transition between two different colours of `COLOR_CHANNELS`."""
    match = _TRANSITION.search(prompt.lower())
    if match is None or match.group(1) == match.group(2):
        return None
    return match.group(1), match.group(2)


def _color_score(frame: Any, color: str) -> float:
    """`prompt_color`'s score of one frame for ``color``: its channels' mean minus the other channels' mean."""
    target = COLOR_CHANNELS[color]
    others = [c for c in range(3) if c not in target]
    means = _to_rgb_array(frame).reshape(-1, 3).mean(axis=0)
    return float(means[list(target)].mean() - means[others].mean())


def color_transition(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """How well each video goes from the prompt's first colour to its second ("red turning blue"), in [-2, 2].

    With `s_c(frame)` the `prompt_color` score of a frame for colour `c` (in [-1, 1]) and the prompt's colours
    `A` -> `B`::

        score = (s_A(first) - s_B(first) + s_B(last) - s_A(last)) / 2

    Pure red then pure blue scores 1.5 for "red turning blue" (-1.5 for the reverse). A still video scores 0, and
    any fixed video scores ``x`` for "A turning B" and ``-x`` for "B turning A": over prompts balanced in both
    directions any fixed video scores 0 on average, so only a model that follows the prompt over time can raise the
    mean. None when the prompt names no transition, or the completion
    has fewer than two frames.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts for {len(completions)} videos")
    rewards: list[float | None] = []
    for prompt, video in zip(prompts, completions, strict=True):
        colors = parse_color_transition(str(prompt))
        frames = list(video) if isinstance(video, (list, tuple, np.ndarray)) else []
        if colors is None or len(frames) < 2:
            rewards.append(None)
            continue
        start, end = colors
        first, last = frames[0], frames[-1]
        score = _color_score(first, start) - _color_score(first, end)
        score += _color_score(last, end) - _color_score(last, start)
        rewards.append(score / 2)
    return rewards
