"""Pictures of a run: a grid of sample images and a reward curve, written as PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image


def _write_atomically(save, path: Path) -> Path:
    """Write to a temporary name, then rename: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save(partial)
    os.replace(partial, path)
    return path


def save_sample_grid(
    images: list[Image.Image], path: str | os.PathLike, columns: int | None = None, min_tile: int = 128
) -> Path:
    """Tile ``images`` (all the same size) into one PNG, row by row; tiny images are enlarged to ``min_tile``."""
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    scale = max(1, math.ceil(min_tile / max(images[0].size)))
    if scale > 1:  # nearest neighbour keeps a 32 px image's pixels visible as they are
        images = [image.resize((image.width * scale, image.height * scale), Image.NEAREST) for image in images]
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return _write_atomically(lambda p: grid.save(p, format="PNG"), Path(path))


def save_captioned_grid(
    images: list[Image.Image], captions: list[str], path: str | os.PathLike, columns: int, tile: int = 160
) -> Path:
    """Tile ``images`` into one PNG, ``columns`` per row, each enlarged to ``tile`` pixels (nearest neighbour) with
    its caption (wrapped; lines split at ``\\n``) printed below it."""
    from PIL import ImageDraw, ImageFont

    if not images or len(images) != len(captions):
        raise ValueError(f"need one caption per image, got {len(images)} images and {len(captions)} captions")
    font = ImageFont.load_default(size=11)
    wrapped = [_wrap(caption, font, tile - 6) for caption in captions]
    line_height = 13
    text_height = line_height * max(len(lines) for lines in wrapped) + 6
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * tile, rows * (tile + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, lines) in enumerate(zip(images, wrapped, strict=True)):
        x, y = (index % columns) * tile, (index // columns) * (tile + text_height)
        grid.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y))
        for k, line in enumerate(lines):
            draw.text((x + 3, y + tile + 3 + k * line_height), line, fill="black", font=font)
    return _write_atomically(lambda p: grid.save(p, format="PNG"), Path(path))


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels in ``font`` (words kept whole)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def save_reward_curve(log_history: list[dict], path: str | os.PathLike) -> Path:
    """Plot ``reward`` (and ``eval_reward`` when present) against the step from a Trainer's log history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for key, label in (("reward", "train reward"), ("eval_reward", "eval reward")):
        points = [(entry["step"], entry[key]) for entry in log_history if entry.get(key) is not None]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o", markersize=3, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("reward")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    try:
        return _write_atomically(lambda p: figure.savefig(p, format="png"), Path(path))
    finally:
        plt.close(figure)
