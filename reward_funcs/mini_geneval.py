"""mini-GenEval reward: GenEval's rules on the synthetic shapes of `trl_flow.mini` (no model, numpy + scipy).

The detector is replaced by colour segmentation; the rules are GenEval's own ([`reward_funcs.geneval`]):

1. Segmentation ([`segment`]): every pixel is read as a blend of the background with one of the task's colours
   (red, green, blue, yellow), as anti-aliased edges and blur are: it belongs to the colour whose blend line
   (background to colour, in RGB) passes closest, provided it is at least half-way along it (blend weight >= 0.5)
   and the line passes within `max_color_distance`; otherwise it is background. (Plain nearest-colour matching
   would call the half-covered edge pixels of a yellow object green.)
   The connected components (4-connectivity, `scipy.ndimage.label`) of each colour of at least `min_area` pixels
   (a fraction of the image, 12 px of a 32x32 image) are the objects, ordered by area (the `score` the GenEval
   rules order a class's detections by).
2. Shape ([`classify_shape`]): the shape template (circle, square or upward triangle filling the component's box)
   that overlaps the component's mask best.
3. Rules: [`reward_funcs.geneval.evaluate_geneval`] checks classes, counts, colours and relative positions (the
   GenEval metadata `include` / `exclude`); a single object's `region` (an extra metadata key, GenEval has no
   absolute positions) is checked by [`trl_flow.mini.data.box_region`] on the first detection of its class (the
   GenEval relation of the object to the image centre, or "centre").

Score: 1.0 when every requirement holds (GenEval's strict score), else 0.0. With `partial_credit=True`: the
fraction of requirements that hold, as `geneval`'s partial credit (each include item -- class, count, colour and
relation together -- and each exclude item is one requirement) plus one requirement per region. An earlier,
finer-grained partial credit (every attribute on its own) was gamed by RL on the mini model: shapes of any colour
collected the per-shape credit while the strict score fell.

[`MiniGenEvalScore.checks`] also returns per image the attribute checks, for per-attribute accuracy: each include
item has an *object* check (enough objects of its class), a *color* check (if it names a colour: the first objects
of its class have it) and a *position* check (its relation to its reference object, both looked for without
colour; or its region); each exclude item an *object* check.

Dataset columns: `include` (required), `exclude` and `tag` (optional); or a single `metadata` column, as for
`geneval`. The shipped prompt folder is `trl_flow/mini/prompts` ([`trl_flow.mini.data.write_metadata`]).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from reward_funcs._common import check_lengths, get_column, to_pil_rgb
from reward_funcs.geneval import Detection, evaluate_geneval, parse_metadata
from trl_flow.errors import UserInputError

__all__ = [
    "ATTRIBUTES",
    "MiniGenEvalScore",
    "classify_shape",
    "make_mini_geneval",
    "mini_geneval",
    "segment",
]

ATTRIBUTES: tuple[str, ...] = ("object", "color", "position")
"""The kinds of attribute check (see the module docstring)."""

DEFAULT_MIN_AREA_FRACTION = 12 / 1024
"""Smallest object, as a fraction of the image area (12 px of a 32x32 image; the task's objects have 50-150 px)."""

DEFAULT_MAX_COLOR_DISTANCE = 64.0
"""RGB distance (0-255 scale) from a colour's blend line beyond which a pixel is not of that colour (the task's
colours are 120-270 apart; pure orange is 65 from the yellow line, purple 85 from the blue one)."""

_TEMPLATE_PADS = (0.0, 0.5)


def _palette() -> tuple[list[str], np.ndarray, np.ndarray]:
    from trl_flow.mini.data import BACKGROUND, COLORS

    return list(COLORS), np.array(list(COLORS.values()), dtype=np.float64), np.array(BACKGROUND, dtype=np.float64)


@functools.lru_cache(maxsize=256)
def _templates(height: int, width: int, pad: float) -> tuple[tuple[str, np.ndarray], ...]:
    """Each shape filling a ``height x width`` pixel box grown by ``pad`` px per side, as the pixels at least half
    covered by it."""
    ys = ((np.arange(height * 4) + 0.5) / 4 + pad) / (height + 2 * pad)
    xs = ((np.arange(width * 4) + 0.5) / 4 + pad) / (width + 2 * pad)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    shapes = {
        "circle": (grid_x - 0.5) ** 2 + (grid_y - 0.5) ** 2 <= 0.25,
        "square": (grid_x >= 0) & (grid_x <= 1) & (grid_y >= 0) & (grid_y <= 1),
        "triangle": (np.abs(grid_x - 0.5) <= grid_y / 2) & (grid_y <= 1),  # apex at the top centre
    }
    return tuple((name, mask.reshape(height, 4, width, 4).mean(axis=(1, 3)) >= 0.5) for name, mask in shapes.items())


def classify_shape(mask: np.ndarray) -> str:
    """``circle``, ``square`` or ``triangle`` for a boolean object mask (cropped to its box or not).

    The shape whose template (the shape filling the mask's box, or that box grown by half a pixel per side, since a
    pixel at the edge counts when it is about half covered; as pixels at least half covered) overlaps the mask best
    (intersection over union). Fill ratios alone fail on small objects: a digitised disc of radius 5 fills 88%
    of its box, like a square.
    """
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        raise ValueError("empty mask")
    crop = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    best, best_iou = "circle", -1.0
    for pad in _TEMPLATE_PADS:
        for name, template in _templates(*crop.shape, pad):
            iou = (crop & template).sum() / (crop | template).sum()
            if iou > best_iou:
                best, best_iou = name, float(iou)
    return best


def segment(
    image: Any,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
    max_color_distance: float = DEFAULT_MAX_COLOR_DISTANCE,
) -> list[Detection]:
    """The objects of a mini-GenEval image as GenEval [`Detection`]s (label = shape, with box, mask and colour).

    Detections are ordered by decreasing area; `score` is the area as a fraction of the image.
    """
    from scipy import ndimage

    pixels = np.asarray(to_pil_rgb(image), dtype=np.float64)
    height, width = pixels.shape[:2]
    names, colors, background = _palette()
    offsets = pixels - background  # (H, W, 3)
    directions = colors - background  # (K, 3)
    weights = offsets @ directions.T / (directions**2).sum(axis=1)  # blend weight of each colour, (H, W, K)
    residual = np.linalg.norm(offsets[:, :, None, :] - weights[..., None] * directions, axis=-1)
    residual[weights < 0.5] = np.inf
    nearest = residual.argmin(axis=-1)
    nearest[residual.min(axis=-1) > max_color_distance] = -1
    min_area = max(int(round(min_area_fraction * height * width)), 1)
    detections: list[Detection] = []
    for index, name in enumerate(names):
        components, count = ndimage.label(nearest == index)
        if count == 0:
            continue
        for k, region in enumerate(ndimage.find_objects(components), start=1):
            mask = components == k
            area = int(mask[region].sum())
            if area < min_area:
                continue
            ys, xs = region
            box = (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop))
            detection = Detection(classify_shape(mask[region]), box, area / (height * width), mask, name)
            detections.append(detection)
    detections.sort(key=lambda d: -d.score)
    return detections


def _without(item: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in keys}


def _checks(
    detections: list[Detection], meta: Mapping[str, Any], width: int, height: int
) -> tuple[float, list[tuple[str, bool]]]:
    """(fraction of requirements that hold, [(attribute, passed), ...]) for one image's detections against its
    parsed metadata; the fraction is 1.0 exactly when the image is correct."""
    from trl_flow.mini.data import box_region

    include, exclude = meta["include"], meta["exclude"]
    result = evaluate_geneval(detections, include, exclude)
    satisfied, total = result.satisfied, result.total
    checks: list[tuple[str, bool]] = []
    by_class: dict[str, list[Detection]] = {}
    for detection in detections:  # already ordered by score, as evaluate_geneval orders them
        by_class.setdefault(detection.label, []).append(detection)
    for item in include:
        plain = _without(item, "color", "position", "region")
        checks.append(("object", evaluate_geneval(detections, [plain]).correct))
        if item.get("color"):
            checks.append(("color", evaluate_geneval(detections, [_without(item, "position", "region")]).correct))
        position = item.get("position")
        if position:
            target = include[int(position[1])]
            pair = [_without(target, "color", "position", "region"), {**plain, "position": [position[0], 0]}]
            checks.append(("position", evaluate_geneval(detections, pair).correct))
        if item.get("region"):
            found = by_class.get(str(item["class"]), [])[: int(item.get("count") or 1)]
            ok = bool(found) and all(box_region(d.box, width, height) == item["region"] for d in found)
            checks.append(("position", ok))
            satisfied, total = satisfied + ok, total + 1
    for item in exclude:
        checks.append(("object", evaluate_geneval(detections, [], [item]).correct))
    return (satisfied / total if total else 1.0), checks


class MiniGenEvalScore:
    """The mini-GenEval reward callable; see the module docstring.

    Args:
        partial_credit: score the fraction of requirements that hold instead of all-or-nothing.
        min_area_fraction: smallest object, as a fraction of the image area.
        max_color_distance: RGB distance (0-255) from a colour's blend line beyond which a pixel is not of it.
        name: the reward's `__name__` (TRL logs `rewards/<name>/mean`).
    """

    def __init__(
        self,
        partial_credit: bool = False,
        min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
        max_color_distance: float = DEFAULT_MAX_COLOR_DISTANCE,
        name: str = "mini_geneval",
    ) -> None:
        if not 0 <= min_area_fraction < 1:
            raise UserInputError(f"reward '{name}': min_area_fraction must be in [0, 1), got {min_area_fraction!r}.")
        if max_color_distance <= 0:
            raise UserInputError(f"reward '{name}': max_color_distance must be > 0, got {max_color_distance!r}.")
        self.__name__ = name
        self.partial_credit = partial_credit
        self.min_area_fraction = float(min_area_fraction)
        self.max_color_distance = float(max_color_distance)

    def __repr__(self) -> str:
        return f"MiniGenEvalScore(name={self.__name__!r}, partial_credit={self.partial_credit})"

    def metadata(self, num_samples: int, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """Each sample's parsed metadata, from the `include` / `exclude` / `tag` columns or a `metadata` column."""
        include = get_column(kwargs, "include", num_samples, self.__name__, required=False)
        if include is None:
            column = get_column(kwargs, ["include", "metadata"], num_samples, self.__name__)
            return [parse_metadata(value, self.__name__) for value in column]  # type: ignore[union-attr]
        exclude = get_column(kwargs, "exclude", num_samples, self.__name__, required=False) or [None] * num_samples
        tags = get_column(kwargs, "tag", num_samples, self.__name__, required=False) or [None] * num_samples
        return [
            parse_metadata({"include": inc, "exclude": exc, "tag": tag}, self.__name__)
            for inc, exc, tag in zip(include, exclude, tags, strict=True)
        ]

    def evaluate(self, image: Any, meta: Mapping[str, Any]) -> tuple[float, list[tuple[str, bool]]]:
        """(fraction of requirements that hold, attribute checks) of one image against one parsed metadata dict."""
        detections = segment(image, self.min_area_fraction, self.max_color_distance)
        height, width = np.asarray(to_pil_rgb(image)).shape[:2]
        return _checks(detections, meta, width, height)

    def checks(self, completions: Sequence[Any], **kwargs: Any) -> list[dict[str, Any]]:
        """Per image: ``{"correct": bool, "fraction": float, "object": [bool, ...], "color": [...], "position": [...]}``
        (the attribute checks of the module docstring)."""
        metadata = self.metadata(len(completions), kwargs)
        results = []
        for image, meta in zip(completions, metadata, strict=True):
            fraction, checks = self.evaluate(image, meta)
            result: dict[str, Any] = {"correct": fraction == 1.0, "fraction": fraction}
            for attribute in ATTRIBUTES:
                result[attribute] = [ok for kind, ok in checks if kind == attribute]
            results.append(result)
        return results

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Score each image against its metadata."""
        check_lengths(prompts, completions, self.__name__)
        metadata = self.metadata(len(completions), kwargs)
        scores: list[float | None] = []
        for image, meta in zip(completions, metadata, strict=True):
            if not meta["include"] and not meta["exclude"]:
                scores.append(None)
                continue
            fraction, _ = self.evaluate(image, meta)
            scores.append(fraction if self.partial_credit else float(fraction == 1.0))
        return scores


def make_mini_geneval(
    partial_credit: bool = False,
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION,
    max_color_distance: float = DEFAULT_MAX_COLOR_DISTANCE,
    name: str = "mini_geneval",
) -> MiniGenEvalScore:
    """Create a mini-GenEval reward. Arguments: see [`MiniGenEvalScore`]."""
    return MiniGenEvalScore(partial_credit, min_area_fraction, max_color_distance, name)


mini_geneval = make_mini_geneval()
"""The built-in `mini_geneval` reward: strict (all-or-nothing) GenEval score over colour segmentation."""

mini_geneval_partial = make_mini_geneval(partial_credit=True, name="mini_geneval_partial")
"""Partial-credit variant (fraction of requirements); use it as `reward_funcs.mini_geneval:mini_geneval_partial`."""
