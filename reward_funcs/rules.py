"""Rule-based image rewards: no models, only numpy and Pillow.

Every function follows TRL's reward-function signature
`fn(prompts, completions, **kwargs) -> list[float | None]`, where `completions` are the generated images
(`PIL.Image.Image`; HxWxC numpy arrays also work). The keyword arguments TRL adds (the other dataset
columns, `completion_ids`, `trainer_state`, `log_extra`, `log_metric`, ...) are accepted and ignored.
`None` means "no reward for this sample"; TRL turns it into NaN and skips it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "COLOR_CHANNELS",
    "brightness",
    "find_color_word",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "mid_grey",
    "prompt_color",
]

COLOR_CHANNELS: dict[str, tuple[int, ...]] = {"red": (0,), "green": (1,), "blue": (2,), "yellow": (0, 1)}
"""Colour word -> the RGB channel indices that make up that colour (yellow = red + green)."""

_WORD = re.compile(r"[a-z]+")


def _to_rgb_array(image: Any) -> np.ndarray:
    """Return an image as a float32 HxWx3 array in [0, 1].

    Accepts a `PIL.Image.Image` (any mode; converted to RGB) or an HxWx3 / HxW numpy array (uint8 in [0, 255],
    or float in [0, 1]).
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise TypeError(f"expected an HxWx3 image array, got shape {array.shape}")
        array = array[..., :3]
        if array.dtype == np.uint8:
            return array.astype(np.float32) / 255.0
        return array.astype(np.float32)
    raise TypeError(f"expected a PIL.Image.Image or a numpy array as completion, got {type(image).__name__}")


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    array = np.clip(_to_rgb_array(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def brightness(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """Mean pixel value of each image over all pixels and RGB channels, in [0, 1] (black 0, white 1)."""
    return [float(_to_rgb_array(image).mean()) for image in completions]


def mid_grey(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """How close each image's pixels are to mid-grey: ``1 - 2 * mean |x - 0.5|`` over pixels and RGB channels, in
    [0, 1] (1: uniform mid-grey; 0: only black and white pixels). A cheap guard reward against blown-out or
    crushed exposure, e.g. when training on `brightness`."""
    return [float(1.0 - 2.0 * np.abs(_to_rgb_array(image) - 0.5).mean()) for image in completions]


def find_color_word(prompt: Any) -> str | None:
    """Return the first colour word of [`COLOR_CHANNELS`] in `prompt` (whole lowercase words), or None."""
    if not isinstance(prompt, str):
        return None
    for word in _WORD.findall(prompt.lower()):
        if word in COLOR_CHANNELS:
            return word
    return None


def prompt_color(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """How much each image shows the colour named in its prompt, in [-1, 1]; None if the prompt names none.

    The colour is the first of red, green, blue, yellow appearing as a whole word in the prompt. With pixel
    values `x` in [0, 1], target channels `T` (red: R; green: G; blue: B; yellow: R and G) and the other
    channels `O`, the score is

        score = mean over pixels of ( mean_{c in T} x_c  -  mean_{c in O} x_c )

    so a pure image of the named colour scores 1, any grey (black, white) scores 0, and an image of the
    complementary colour scores -1 (e.g. blue for "yellow"); pure blue for "red" scores -0.5.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts for {len(completions)} images")
    rewards: list[float | None] = []
    for prompt, image in zip(prompts, completions, strict=True):
        color = find_color_word(prompt)
        if color is None:
            rewards.append(None)
            continue
        target = COLOR_CHANNELS[color]
        others = [c for c in range(3) if c not in target]
        channel_means = _to_rgb_array(image).reshape(-1, 3).mean(axis=0)
        rewards.append(float(channel_means[list(target)].mean() - channel_means[others].mean()))
    return rewards


def _jpeg_kilobytes(image: Any, quality: int = 95) -> float:
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


def jpeg_compressibility(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """Minus the JPEG size (quality 95) of each image in kB, as in DDPO: simpler images score higher."""
    return [-_jpeg_kilobytes(image) for image in completions]


def jpeg_incompressibility(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """The JPEG size (quality 95) of each image in kB, as in DDPO: more detailed images score higher."""
    return [_jpeg_kilobytes(image) for image in completions]
