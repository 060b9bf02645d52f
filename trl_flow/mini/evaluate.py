"""Scoring mini-GenEval generations: GenEval's overall score, per-tag and per-attribute accuracy, background drift.

GenEval reports the mean over its tasks (tags) of the fraction of images that satisfy every requirement; here the
tasks are ``single_object`` and ``two_object``. Per-attribute accuracy is the fraction of the reward's *object*,
*color* and *position* checks that hold (see :mod:`reward_funcs.mini_geneval`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from trl_flow.mini.data import BACKGROUND, IMAGE_SIZE, MAX_SEQUENCE_LENGTH, metadata_rows

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_NUM_INFERENCE_STEPS",
    "background_colours",
    "background_drift",
    "evaluation_rows",
    "generate",
    "score_images",
]

DEFAULT_GUIDANCE_SCALE: float = 4.0
"""Classifier-free guidance scale the mini model is evaluated (and RL-trained) with."""

DEFAULT_NUM_INFERENCE_STEPS: int = 10
"""Denoising steps of evaluation sampling."""


def evaluation_rows(
    split: str = "test", num_two_object: int | None = None, single_images: int = 1, pair_images: int = 1
) -> list[dict[str, Any]]:
    """The metadata rows of ``split``: every single-object row, and ``num_two_object`` two-object rows spread evenly
    over the split (all of them when None), in a fixed order; each single-object row repeated ``single_images``
    times and each two-object row ``pair_images`` times (one image per row: the test split has only 12
    single-object prompts, so they need more images each for the same standard error)."""
    rows = metadata_rows(split)
    singles = [row for row in rows if row["tag"] == "single_object"]
    pairs = [row for row in rows if row["tag"] == "two_object"]
    if num_two_object is not None and num_two_object < len(pairs):
        picks = np.linspace(0, len(pairs) - 1, num_two_object).round().astype(int)
        pairs = [pairs[i] for i in picks]
    return [row for row in singles for _ in range(single_images)] + [row for row in pairs for _ in range(pair_images)]


def generate(
    pipe,
    prompts: Sequence[str],
    seed: int = 0,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    batch_size: int = 64,
) -> list:
    """Images of a plain diffusers SD3 pipeline for ``prompts`` (ODE sampling), deterministic for ``seed``."""
    import torch

    images = []
    for start in range(0, len(prompts), batch_size):
        images += pipe(
            list(prompts[start : start + batch_size]),
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            generator=torch.Generator().manual_seed(seed + start),
        ).images
    return images


def background_colours(images: Sequence[Any]) -> np.ndarray:
    """Each image's mean background colour (RGB, 0-255; NaN when nothing is background), the background being every
    pixel outside the objects the reward's segmentation finds, grown by one pixel (to skip anti-aliased edges)."""
    from scipy import ndimage

    from reward_funcs._common import to_pil_rgb
    from reward_funcs.mini_geneval import segment

    colours = []
    for image in images:
        pixels = np.asarray(to_pil_rgb(image), dtype=np.float64)
        objects = np.zeros(pixels.shape[:2], dtype=bool)
        for detection in segment(image):
            objects |= detection.mask
        background = ~ndimage.binary_dilation(objects)
        colours.append(pixels[background].mean(axis=0) if background.any() else np.full(3, np.nan))
    return np.array(colours).reshape(len(colours), 3)


def background_drift(images: Sequence[Any]) -> float:
    """Mean RGB distance (0-255) between each image's background (:func:`background_colours`) and the training
    background colour."""
    colours = background_colours(images)
    colours = colours[~np.isnan(colours).any(axis=1)]
    if not len(colours):
        return float("nan")
    return float(np.linalg.norm(colours - np.asarray(BACKGROUND, dtype=np.float64), axis=1).mean())


def score_images(
    images: Sequence[Any], rows: Sequence[dict[str, Any]], reward: Callable[..., Any] | None = None
) -> dict[str, Any]:
    """Score ``images`` (one per row of ``rows``, GenEval-style metadata) with the mini-GenEval rules.

    Returns ``{"score", "strict", "n", "per_tag": {tag: accuracy}, "per_attribute": {attribute: accuracy},
    "background_drift", "correct"}``: ``score`` is GenEval's overall score (mean over tags of the fraction of fully
    correct images), ``strict`` the plain fraction of fully correct images, ``correct`` each image's 0/1.
    """
    from reward_funcs.mini_geneval import ATTRIBUTES, MiniGenEvalScore

    scorer = reward if isinstance(reward, MiniGenEvalScore) else MiniGenEvalScore()
    results = scorer.checks(images, include=[row["include"] for row in rows], tag=[row["tag"] for row in rows])
    per_tag: dict[str, list[bool]] = {}
    for row, result in zip(rows, results, strict=True):
        per_tag.setdefault(row["tag"], []).append(result["correct"])
    tag_accuracy = {tag: float(np.mean(values)) for tag, values in sorted(per_tag.items())}
    attributes = {}
    for attribute in ATTRIBUTES:
        values = [ok for result in results for ok in result[attribute]]
        attributes[attribute] = float(np.mean(values)) if values else float("nan")
    return {
        "score": float(np.mean(list(tag_accuracy.values()))),
        "strict": float(np.mean([result["correct"] for result in results])),
        "n": len(results),
        "per_tag": tag_accuracy,
        "per_attribute": attributes,
        "background_drift": background_drift(images),
        "correct": np.asarray([float(result["correct"]) for result in results]),
    }
