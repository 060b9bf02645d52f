"""Score images grouped by prompt, for scorers whose API takes one prompt and a list of images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["score_by_prompt"]


def score_by_prompt(
    prompts: Sequence[str],
    images: Sequence[Any],
    score: Callable[[str, list[Any]], Sequence[float]],
    batch_size: int,
) -> list[float]:
    """Call `score(prompt, images_of_that_prompt)` per distinct prompt, at most `batch_size` images per call.

    GRPO batches hold several images per prompt, so this makes few calls. Returns one float per image, in
    input order.
    """
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    results: list[float | None] = [None] * len(images)
    for prompt, indices in groups.items():
        for start in range(0, len(indices), batch_size):
            part = indices[start : start + batch_size]
            values = score(prompt, [images[i] for i in part])
            if isinstance(values, (int, float)):
                values = [values]
            values = list(values)
            if len(values) != len(part):
                raise RuntimeError(f"the scorer returned {len(values)} scores for {len(part)} images")
            for i, value in zip(part, values, strict=True):
                results[i] = float(value)
    return [float(value) for value in results]  # type: ignore[arg-type]
