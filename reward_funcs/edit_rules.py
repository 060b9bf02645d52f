"""Rule-based rewards for image editing: they read the source image each sample edits (numpy + Pillow only).

TRL hands every dataset column to the rewards; an editing dataset's source images arrive as the keyword argument
`source_images` (one PIL image per sample, see `trl_flow.data.SOURCE_IMAGES_COLUMN`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .rules import COLOR_CHANNELS, _to_rgb_array, find_color_word

__all__ = ["recolor_shape", "shape_mask"]


def shape_mask(source: Any, size: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """The source's shape as a boolean ``(H, W)`` mask at ``size`` (width, height): the pixels whose mean over RGB is
    above ``threshold``, i.e. a light shape on a dark background (as the tiny edit task's sources are)."""
    image = source if isinstance(source, Image.Image) else Image.fromarray(np.uint8(_to_rgb_array(source) * 255))
    pixels = _to_rgb_array(image.convert("RGB").resize(size, Image.Resampling.NEAREST))
    return pixels.mean(axis=-1) > threshold


def recolor_shape(
    prompts: Sequence[Any], completions: Sequence[Any], source_images: Sequence[Any] | None = None, **kwargs: Any
) -> list[float | None]:
    """The tiny edit task's reward: the source's shape, and only it, painted in the colour the prompt names.

    With ``q(p)`` the per-pixel `prompt_color` score of the named colour (target channels' mean minus the others',
    in [-1, 1]) and ``M`` the source's shape mask (:func:`shape_mask`: its light pixels), the reward is the
    contrast

        mean_{p in M} q(p)  -  mean_{p not in M} q(p)

    in [-2, 2]: 1 for the shape recoloured exactly on a neutral (grey, black, white) background, 0 for any image
    that is the same inside and outside the shape. None when the prompt names no colour or the source has no shape
    (or fills the whole image).

    Why a contrast: on a balanced dataset (each source with every colour, the shapes covering each pixel equally
    often) a policy that ignores either input averages exactly 0, whatever it paints. Ignoring the prompt, both
    terms average to 0 over the colours (the per-pixel scores of red, green and blue sum to 0); ignoring the
    source, both terms average to the image's mean ``q``. So the mean reward rises only if the output follows the
    prompt *and* the source's shape.
    """
    if source_images is None:
        raise ValueError("recolor_shape needs the dataset's source images (source_images=...); is it an edit dataset?")
    if not len(prompts) == len(completions) == len(source_images):
        raise ValueError(f"got {len(prompts)} prompts, {len(completions)} images, {len(source_images)} sources")
    rewards: list[float | None] = []
    for prompt, image, source in zip(prompts, completions, source_images, strict=True):
        color = find_color_word(prompt)
        pixels = _to_rgb_array(image)
        mask = shape_mask(source, (pixels.shape[1], pixels.shape[0]))
        if color is None or mask.all() or not mask.any():
            rewards.append(None)
            continue
        target = list(COLOR_CHANNELS[color])
        others = [c for c in range(3) if c not in target]
        score = pixels[..., target].mean(axis=-1) - pixels[..., others].mean(axis=-1)
        rewards.append(float(score[mask].mean() - score[~mask].mean()))
    return rewards
