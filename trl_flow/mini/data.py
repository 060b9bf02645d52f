"""Synthetic shapes for the offline mini-GenEval: prompts, GenEval-style metadata and the images they describe.

Every image is 32x32 RGB: one or two flat-coloured objects on a plain dark-grey background.

* objects: a ``circle``, ``square`` or ``triangle`` (pointing up) coloured ``red``, ``green``, ``blue`` or
  ``yellow`` (the RGB values are the GenEval colour references of :mod:`reward_funcs.geneval`, so its colour
  classifier names them correctly);
* one object (tag ``single_object``) sits in a region of the image: ``left``, ``right``, ``top``, ``bottom`` or
  ``centre`` -- "a red circle on the left";
* two objects of different shapes (tag ``two_object``) stand in a GenEval relation (``left of``, ``right of``,
  ``above``, ``below``) -- "a red circle to the left of a blue square". The two shapes always differ, because the
  GenEval rules look at the first detection of a class only, so "a red circle left of a blue circle" could not be
  judged.

Metadata follows GenEval's ``evaluation_metadata.jsonl``: ``include`` is a list of ``{"class", "count", "color"}``
items; a two-object prompt lists the reference object first and the other one with ``"position": [relation, 0]``
(GenEval's convention). GenEval has no absolute positions, so a single object's region is an extra key,
``"region"``, that the GenEval rules ignore and :mod:`reward_funcs.mini_geneval` checks. Rows carry ``prompt``,
``tag`` and ``include`` (no ``exclude``: there are no counting prompts).

The train/test split holds out whole combinations (:func:`held_out_combinations`): every colour-shape pair is
seen, but some pairs of objects never appear together and some objects never in some regions. A two-object prompt
is a test prompt when its two objects form a held-out pair (in either order, every relation); a single-object prompt
when its object and region are a held-out placement. Neither pretraining nor RL sees a test prompt or a drawing of
one, so the held-out score measures composition, not memory (GenEval's test prompts are likewise new combinations
of classes every model has seen).

Everything is deterministic for a seed (numpy ``PCG64``); object sizes and positions are jittered, and pairs are
redrawn until the drawing satisfies its own metadata under the GenEval position rule and the objects do not touch.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reward_funcs.geneval import Detection, relative_position

__all__ = [
    "BACKGROUND",
    "COLORS",
    "IMAGE_SIZE",
    "MAX_SEQUENCE_LENGTH",
    "PROMPTS_DIR",
    "REGIONS",
    "RELATIONS",
    "SHAPES",
    "PlacedObject",
    "PromptSpec",
    "all_prompts",
    "box_region",
    "held_out_combinations",
    "metadata_rows",
    "object_box",
    "render",
    "sample_images",
    "sample_layout",
    "split_prompts",
    "write_metadata",
]

IMAGE_SIZE: int = 32
"""Image height and width in pixels."""

MAX_SEQUENCE_LENGTH: int = 16
"""Text-encoder tokens a prompt needs (the longest has 10 words, one token each): call the mini pipeline with
``max_sequence_length`` set to this, or T5 pads prompts to 256 tokens."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 35),
    "green": (50, 160, 60),
    "blue": (35, 85, 210),
    "yellow": (245, 220, 40),
}
"""Object colours (sRGB, 0-255): GenEval's reference colours for these names."""

BACKGROUND: tuple[int, int, int] = (40, 40, 40)
"""The plain background colour of every image."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Object classes."""

REGIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
"""Where a single object may be."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
"""GenEval relations between two objects (the first object relative to the second, y growing downwards)."""

PROMPTS_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent / "prompts"
"""The shipped prompt folder (flow_grpo layout: ``train_metadata.jsonl`` / ``test_metadata.jsonl``)."""

REGION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}

# Geometry, in pixels of a 32-pixel image (scaled for other sizes). "radius" is half the object's box size.
_SINGLE_RADIUS = (5.5, 7.0)
_PAIR_RADIUS = (5.0, 6.5)
_REGION_CENTRES = {"left": (9, 16), "right": (23, 16), "top": (16, 9), "bottom": (16, 23), "centre": (16, 16)}
_REGION_JITTER = 2.0
_PAIR_ALONG = (7.0, 11.0)  # position of the first / second object's centre along the relation axis (from the edge)
_PAIR_ACROSS = 4.0  # +- jitter across the relation axis, around the middle
_PAIR_MIN_GAP = 2.0  # minimum gap between the two objects' boxes
_SUPERSAMPLE = 4  # anti-aliasing: draw at 4x and average down
_CENTRE_TOLERANCE = 1 / 8  # "centre": box centre within this fraction of the image size of the image centre


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of the mini-GenEval task.

    Attributes:
        objects: ``((color, shape),)`` for one object, ``((color, shape), (color, shape))`` for two.
        region: the single object's region (one of :data:`REGIONS`); None for two objects.
        relation: how the first object stands to the second (one of :data:`RELATIONS`); None for one object.
    """

    objects: tuple[tuple[str, str], ...]
    region: str | None = None
    relation: str | None = None

    @property
    def tag(self) -> str:
        """``single_object`` or ``two_object``."""
        return "single_object" if len(self.objects) == 1 else "two_object"

    @property
    def prompt(self) -> str:
        """The prompt text, e.g. "a red circle on the left"."""
        first = "a {} {}".format(*self.objects[0])
        if len(self.objects) == 1:
            return f"{first} {REGION_PHRASES[self.region]}"  # type: ignore[index]
        second = "a {} {}".format(*self.objects[1])
        return f"{first} {RELATION_PHRASES[self.relation]} {second}"  # type: ignore[index]

    def metadata(self) -> dict[str, Any]:
        """The GenEval-style row: ``{"prompt", "tag", "include"}``."""
        if len(self.objects) == 1:
            color, shape = self.objects[0]
            include = [{"class": shape, "count": 1, "color": color, "region": self.region}]
        else:
            (color_a, shape_a), (color_b, shape_b) = self.objects
            include = [
                {"class": shape_b, "count": 1, "color": color_b},
                {"class": shape_a, "count": 1, "color": color_a, "position": [self.relation, 0]},
            ]
        return {"prompt": self.prompt, "tag": self.tag, "include": include}


@dataclass(frozen=True)
class PlacedObject:
    """An object as drawn: colour, shape, box centre ``(cx, cy)`` and half box size ``radius``, in pixels."""

    color: str
    shape: str
    cx: float
    cy: float
    radius: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)``, as :func:`object_box`."""
        return object_box(self.shape, self.cx, self.cy, self.radius)


# ------------------------------------------------------------------------------------------------- prompts


def all_prompts() -> list[PromptSpec]:
    """Every prompt of the task, in a fixed order: 60 single-object, then 384 two-object prompts."""
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    specs = [PromptSpec(((c, s),), region=r) for (c, s) in pairs for r in REGIONS]
    for a, b in itertools.product(pairs, pairs):
        if a[1] != b[1]:
            specs.extend(PromptSpec((a, b), relation=rel) for rel in RELATIONS)
    return specs


def held_out_combinations() -> tuple[set[tuple[tuple[str, str], str]], set[frozenset[tuple[str, str]]]]:
    """``(placements, object_pairs)`` that only the test split contains.

    * placements: one region per colour-shape pair, ``REGIONS[i % 5]`` for the i-th pair (colour-major order), so
      each object keeps four train regions and each region is held out for some objects;
    * object pairs: every fourth unordered pair of differently-shaped objects (12 of 48), so each object still
      meets most partners in train.
    """
    objects = [(color, shape) for color in COLORS for shape in SHAPES]
    placements = {(obj, REGIONS[i % len(REGIONS)]) for i, obj in enumerate(objects)}
    unordered = [frozenset((a, b)) for a, b in itertools.combinations(objects, 2) if a[1] != b[1]]
    return placements, set(unordered[::4])


def split_prompts() -> tuple[list[PromptSpec], list[PromptSpec]]:
    """``(train, test)``: a test prompt is a held-out combination (:func:`held_out_combinations`)."""
    placements, object_pairs = held_out_combinations()
    train, test = [], []
    for spec in all_prompts():
        if len(spec.objects) == 1:
            held_out = (spec.objects[0], spec.region) in placements
        else:
            held_out = frozenset(spec.objects) in object_pairs
        (test if held_out else train).append(spec)
    return train, test


def metadata_rows(split: str = "train") -> list[dict[str, Any]]:
    """The GenEval-style rows of a split (``"train"`` or ``"test"``)."""
    train, test = split_prompts()
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return [spec.metadata() for spec in (train if split == "train" else test)]


def write_metadata(folder: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``train_metadata.jsonl`` and ``test_metadata.jsonl`` (flow_grpo layout) into ``folder``; return them."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in ("train", "test"):
        path = folder / f"{split}_metadata.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in metadata_rows(split)), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


# -------------------------------------------------------------------------------------------------- layout


def object_box(shape: str, cx: float, cy: float, radius: float) -> tuple[float, float, float, float]:
    """The box ``(x0, y0, x1, y1)`` of a drawn object (pixels; a triangle's box is narrower than tall)."""
    half_w, half_h = _half_extent(shape, radius)
    return (cx - half_w, cy - half_h, cx + half_w, cy + half_h)


def _half_extent(shape: str, radius: float) -> tuple[float, float]:
    if shape == "circle":
        return radius, radius
    if shape == "square":
        return 0.9 * radius, 0.9 * radius  # same area as the circle, near enough
    if shape == "triangle":
        return 1.1 * radius, radius
    raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")


def box_region(box: Sequence[float], width: int, height: int) -> str | None:
    """The region (one of :data:`REGIONS`) of an object with this box, or None when it is in none of them.

    ``centre``: the box centre lies within 1/8 of the image size of the image centre on both axes. Otherwise the
    region is the GenEval relation of the object to the image centre (:func:`reward_funcs.geneval.relative_position`
    against a point-sized box there): ``left`` for exactly "left of", ``top`` for exactly "above", and so on; a
    diagonal placement (two relations) or a near-centre one (none) has no region.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if abs(cx - width / 2) <= _CENTRE_TOLERANCE * width and abs(cy - height / 2) <= _CENTRE_TOLERANCE * height:
        return "centre"
    anchor = Detection("image centre", (width / 2, height / 2, width / 2, height / 2))
    relations = relative_position(Detection("object", (x0, y0, x1, y1)), anchor)
    names = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}
    return names[relations.pop()] if len(relations) == 1 else None


def _gap(a: PlacedObject, b: PlacedObject) -> float:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def sample_layout(spec: PromptSpec, rng: np.random.Generator, size: int = IMAGE_SIZE) -> list[PlacedObject]:
    """Draw sizes and positions for ``spec``'s objects so that the picture satisfies the prompt.

    Single objects: around the region's centre, +-2 px. Pairs: along the relation's axis one object near each
    side, across it jittered around the middle; redrawn until the first object stands in exactly the prompt's
    relation to the second (GenEval rule) and the boxes are at least 2 px apart.
    """
    scale = size / IMAGE_SIZE
    if len(spec.objects) == 1:
        color, shape = spec.objects[0]
        base_x, base_y = _REGION_CENTRES[spec.region]  # type: ignore[index]
        jitter = rng.uniform(-_REGION_JITTER, _REGION_JITTER, size=2)
        radius = rng.uniform(*_SINGLE_RADIUS)
        return [PlacedObject(color, shape, (base_x + jitter[0]) * scale, (base_y + jitter[1]) * scale, radius * scale)]
    for _ in range(1000):
        radii = rng.uniform(*_PAIR_RADIUS, size=2)
        near = rng.uniform(*_PAIR_ALONG, size=2)
        across = IMAGE_SIZE / 2 + rng.uniform(-_PAIR_ACROSS, _PAIR_ACROSS, size=2)
        # the first object is on the low side of the axis for "left of" / "above", on the high side otherwise
        first_low = spec.relation in ("left of", "above")
        along = (near[0], IMAGE_SIZE - near[1]) if first_low else (IMAGE_SIZE - near[0], near[1])
        placed = []
        for (color, shape), a, c, r in zip(spec.objects, along, across, radii, strict=True):
            x, y = (a, c) if spec.relation in ("left of", "right of") else (c, a)
            placed.append(PlacedObject(color, shape, x * scale, y * scale, r * scale))
        first, second = placed
        relations = relative_position(Detection("a", first.box), Detection("b", second.box))
        if relations == {spec.relation} and _gap(first, second) >= _PAIR_MIN_GAP * scale:
            return placed
    raise RuntimeError(f"could not lay out {spec.prompt!r}")  # pragma: no cover - never happens with these sizes


# ------------------------------------------------------------------------------------------------- drawing


def _shape_mask(obj: PlacedObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    half_w, half_h = _half_extent(obj.shape, obj.radius)
    dx, dy = xs - obj.cx, ys - obj.cy
    if obj.shape == "circle":
        return dx**2 + dy**2 <= obj.radius**2
    if obj.shape == "square":
        return (np.abs(dx) <= half_w) & (np.abs(dy) <= half_h)
    # isosceles triangle, apex at the top centre of the box, base along its bottom edge
    t = (dy + half_h) / (2 * half_h)  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * half_w)


def render(objects: Sequence[PlacedObject], size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw ``objects`` on the background; an anti-aliased ``(size, size, 3)`` uint8 image.

    Each pixel is blended with an object's colour by the fraction of a 4x4 grid of sample points inside the object
    (objects are assumed not to overlap, as :func:`sample_layout` guarantees).
    """
    image = np.empty((size, size, 3), dtype=np.float64)
    image[:] = BACKGROUND
    offsets = (np.arange(_SUPERSAMPLE, dtype=np.float64) + 0.5) / _SUPERSAMPLE
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        px0, py0 = max(int(math.floor(x0)), 0), max(int(math.floor(y0)), 0)
        px1, py1 = min(int(math.ceil(x1)), size), min(int(math.ceil(y1)), size)
        if px1 <= px0 or py1 <= py0:
            continue
        xs = (np.arange(px0, px1)[:, None] + offsets[None]).reshape(-1)
        ys = (np.arange(py0, py1)[:, None] + offsets[None]).reshape(-1)
        grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
        inside = _shape_mask(obj, grid_x, grid_y).astype(np.float64)
        coverage = inside.reshape(py1 - py0, _SUPERSAMPLE, px1 - px0, _SUPERSAMPLE).mean(axis=(1, 3))[..., None]
        window = image[py0:py1, px0:px1]
        image[py0:py1, px0:px1] = window * (1 - coverage) + np.asarray(COLORS[obj.color], np.float64) * coverage
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def sample_images(
    specs: Sequence[PromptSpec],
    n: int,
    seed: int,
    size: int = IMAGE_SIZE,
    single_fraction: float | None = None,
) -> tuple[np.ndarray, list[int], list[list[PlacedObject]]]:
    """Draw ``n`` images of prompts from ``specs``, deterministically for ``seed``.

    Prompts are drawn uniformly from ``specs``, or, with ``single_fraction``, a single-object prompt with that
    probability and a two-object one otherwise (each uniformly among its kind). Returns ``(images, prompt_indices,
    layouts)``: uint8 images ``(n, size, size, 3)``, the index into ``specs`` of each image's prompt, and the objects
    drawn.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    indices: list[int] = []
    layouts: list[list[PlacedObject]] = []
    singles = [i for i, spec in enumerate(specs) if len(spec.objects) == 1]
    pairs = [i for i, spec in enumerate(specs) if len(spec.objects) == 2]
    for i in range(n):
        if single_fraction is None or not singles or not pairs:
            index = int(rng.integers(len(specs)))
        else:
            pool = singles if rng.random() < single_fraction else pairs
            index = pool[int(rng.integers(len(pool)))]
        layout = sample_layout(specs[index], rng, size)
        images[i] = render(layout, size)
        indices.append(index)
        layouts.append(layout)
    return images, indices, layouts
