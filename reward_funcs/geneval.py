"""GenEval reward: does the image contain the objects, counts, colours and layout the prompt asks for?

GenEval (Ghosh et al., 2023) checks compositional prompts with an object detector. This module has two parts:

1. The rules ([`evaluate_geneval`]), pure functions over detections. A requirement list comes from the GenEval
   metadata of each prompt: `include`, a list of `{"class", "count", "color"?, "position"?: [relation, index]}`,
   and `exclude`, a list of `{"class", "count"}`. With the detections of each class ordered by confidence:

   - include item: at least `count` detections of `class`; if `color` is given, at least `count` of the first
     `count` detections have that colour; if `position = [relation, j]` is given, every one of the first `count`
     detections stands in `relation` ("left of", "right of", "above", "below") to every object matched by
     include item `j` (which must itself have been satisfied);
   - exclude item: fewer than `count` detections of `class` (GenEval's counting prompts ask for exactly N
     objects as include N plus exclude N + 1).

   Relations compare box centres after shrinking the offset by 10% of the two boxes' summed sizes per axis
   ([`relative_position`]): with `(dx, dy)` the shrunk offset divided by the length of the raw offset, A is
   "left of" B when dx < -0.5, "right of" when dx > 0.5, "above" when dy < -0.5, "below" when dy > 0.5 (image
   y grows downwards); overlapping, nearby objects have no relation.

   Score: 1.0 if every requirement holds, else 0.0 (GenEval's strict accuracy). With `partial_credit=True`
   the score is the fraction of requirements (include items plus exclude items) that hold.

2. The detector ([`OwlDetector`]): an open-vocabulary detector from transformers, by default OWLv2
   (`google/owlv2-base-patch16-ensemble`; OWL-ViT checkpoints work too), queried with "a photo of a {class}"
   for every class the metadata names. Each predicted box keeps its best-scoring class; boxes are filtered by
   a score threshold (`threshold`, or `counting_threshold` for prompts tagged `counting`, as GenEval does),
   de-duplicated per class by non-maximum suppression (IoU > `nms_iou`) and capped at `max_objects` per class.
   Colours come from [`classify_color`]: the pixels of the central half of the box (inside the mask, if any)
   vote for their nearest reference colour in CIELAB space; the most voted GenEval colour wins. This replaces
   GenEval's CLIP-based colour classifier and its Mask2Former detector (an mmdetection model), so absolute
   numbers differ from official GenEval scores; use it as a training signal, and the official code for
   evaluation. The default thresholds (0.2 / 0.3) are a starting point for OWLv2, not tuned values.

Dataset columns: `include` (required), `exclude` and `tag` (optional), as in GenEval's `evaluation_metadata.jsonl`;
alternatively a single `metadata` column holding that dict (or its JSON string).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reward_funcs._common import (
    cached,
    check_batch_size,
    check_lengths,
    chunks,
    get_column,
    load_pretrained,
    resolve_device,
    resolve_dtype,
    to_pil_rgb,
)
from trl_flow.errors import UserInputError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

__all__ = [
    "GENEVAL_COLORS",
    "GENEVAL_DETECTOR",
    "RELATIONS",
    "Detection",
    "GenEvalResult",
    "GenEvalScore",
    "OwlDetector",
    "classify_color",
    "evaluate_geneval",
    "geneval",
    "make_geneval",
    "parse_metadata",
    "relative_position",
]

GENEVAL_DETECTOR = "google/owlv2-base-patch16-ensemble"
"""Hub id of the default open-vocabulary detector."""

GENEVAL_COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)
"""The colour names GenEval prompts use."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
"""The relative positions GenEval prompts use."""

# Reference sRGB colours voted for by pixels. "gray" is not a GenEval colour: it keeps grey pixels (shadows,
# backgrounds) from voting for black or white.
_REFERENCE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 35),
    "orange": (245, 135, 25),
    "yellow": (245, 220, 40),
    "green": (50, 160, 60),
    "blue": (35, 85, 210),
    "purple": (125, 55, 165),
    "pink": (245, 160, 195),
    "brown": (125, 80, 40),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}

POSITION_MARGIN = 0.1
"""Fraction of the two boxes' summed width / height that an offset must exceed before a relation counts."""


# ------------------------------------------------------------------------------------------------ rules


@dataclass
class Detection:
    """One detected object.

    Attributes:
        label: class name, as in the metadata (e.g. "dog").
        box: (x0, y0, x1, y1) in pixels, y growing downwards.
        score: detector confidence (used to order detections of a class; the rules do not threshold it).
        mask: optional boolean HxW mask of the object.
        color: the object's colour name, if known.
    """

    label: str
    box: tuple[float, float, float, float]
    score: float = 1.0
    mask: np.ndarray | None = field(default=None, repr=False)
    color: str | None = None

    @classmethod
    def coerce(cls, value: Detection | Sequence[Any]) -> Detection:
        """Accept a `Detection` or a tuple `(label, box[, mask[, color]])`."""
        if isinstance(value, Detection):
            return value
        label, box, *rest = value
        mask = rest[0] if len(rest) > 0 else None
        color = rest[1] if len(rest) > 1 else None
        return cls(str(label), tuple(float(v) for v in box), 1.0, mask, color)  # type: ignore[arg-type]


@dataclass
class GenEvalResult:
    """Outcome of [`evaluate_geneval`]: overall verdict, per-requirement counts and reasons for failures."""

    correct: bool
    satisfied: int
    total: int
    reasons: list[str]

    @property
    def fraction(self) -> float:
        """Satisfied requirements / all requirements (1.0 when there are none)."""
        return self.satisfied / self.total if self.total else 1.0


def relative_position(a: Detection, b: Detection, margin: float = POSITION_MARGIN) -> set[str]:
    """The relations of `a` to `b` among [`RELATIONS`] (possibly two, e.g. left of and above; possibly none)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    offset = ((ax0 + ax1) / 2 - (bx0 + bx1) / 2, (ay0 + ay1) / 2 - (by0 + by1) / 2)
    sizes = (abs(ax1 - ax0) + abs(bx1 - bx0), abs(ay1 - ay0) + abs(by1 - by0))
    shrunk = [math.copysign(max(abs(o) - margin * s, 0.0), o) for o, s in zip(offset, sizes, strict=True)]
    length = math.hypot(*offset)
    if length == 0.0 or all(abs(v) < 1e-3 for v in shrunk):
        return set()
    dx, dy = shrunk[0] / length, shrunk[1] / length
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _by_class(detections: Sequence[Detection | Sequence[Any]]) -> dict[str, list[Detection]]:
    groups: dict[str, list[Detection]] = {}
    for detection in (Detection.coerce(d) for d in detections):
        groups.setdefault(detection.label, []).append(detection)
    for group in groups.values():
        group.sort(key=lambda d: -d.score)  # stable: equal scores keep their order
    return groups


def evaluate_geneval(
    detections: Sequence[Detection | Sequence[Any]],
    include: Sequence[Mapping[str, Any]],
    exclude: Sequence[Mapping[str, Any]] = (),
    margin: float = POSITION_MARGIN,
) -> GenEvalResult:
    """Check GenEval requirements against detections; see the module docstring for the rules.

    Args:
        detections: `Detection`s or tuples `(label, box[, mask[, color]])`, already filtered by confidence.
        include: requirements `{"class", "count", "color"?, "position"?}` (None values count as absent).
        exclude: limits `{"class", "count"}`: fewer than `count` objects of `class` may appear.
        margin: see [`relative_position`].
    """
    objects = _by_class(detections)
    reasons: list[str] = []
    satisfied = 0
    matched: list[list[Detection] | None] = []
    for item in include:
        name, count = str(item["class"]), int(item.get("count") or 1)
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected at least {count} {name}, found {len(found)}")
        color = item.get("color")
        if ok and color:
            colored = sum(d.color == color for d in found)
            if colored < count:
                ok = False
                reasons.append(f"expected {count} {color} {name}, found {colored}")
        position = item.get("position")
        if ok and position:
            relation, target = str(position[0]), int(position[1])
            targets = matched[target] if 0 <= target < len(matched) else None
            if targets is None:
                ok = False
                reasons.append(f"no object for {name} to be {relation}")
            elif not all(relation in relative_position(d, t, margin) for d in found for t in targets):
                ok = False
                reasons.append(f"{name} is not {relation} {targets[0].label}")
        matched.append(found if ok else None)
        satisfied += ok
    for item in exclude:
        name, count = str(item["class"]), int(item.get("count", 1))
        present = len(objects.get(name, []))
        if present >= count:
            reasons.append(f"expected fewer than {count} {name}, found {present}")
        else:
            satisfied += 1
    total = len(include) + len(exclude)
    return GenEvalResult(correct=satisfied == total, satisfied=satisfied, total=total, reasons=reasons)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in [0, 255] -> CIELAB (D65)."""
    import numpy as np

    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array(
        [[0.4124564, 0.2126729, 0.0193339], [0.3575761, 0.7151522, 0.1191920], [0.1804375, 0.0721750, 0.9503041]]
    )
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def classify_color(
    image: Image.Image | np.ndarray,
    box: Sequence[float],
    mask: np.ndarray | None = None,
    method: str = "vote",
) -> str | None:
    """The GenEval colour name of the object in `box` (None for an empty region).

    Looks at the central half of the box (in each dimension), restricted to `mask` where given. `method="vote"`:
    every pixel picks its nearest reference colour in CIELAB and the most common one wins; the reference
    set includes a "gray" (not a GenEval colour) so that grey pixels do not vote for black or white, and a region
    that is mostly grey is called white or black by its mean lightness. `method="mean"`: the mean colour of the
    region, mapped to the nearest GenEval colour.
    """
    import numpy as np

    pixels = np.asarray(to_pil_rgb(image), dtype=np.float64)
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    cx0, cx1 = x0 + (x1 - x0) / 4, x1 - (x1 - x0) / 4
    cy0, cy1 = y0 + (y1 - y0) / 4, y1 - (y1 - y0) / 4
    ix0, iy0 = max(int(math.floor(cx0)), 0), max(int(math.floor(cy0)), 0)
    ix1, iy1 = min(int(math.ceil(cx1)), width), min(int(math.ceil(cy1)), height)
    if ix1 <= ix0 or iy1 <= iy0:
        return None
    region = pixels[iy0:iy1, ix0:ix1].reshape(-1, 3)
    if mask is not None:
        region_mask = np.asarray(mask, dtype=bool)[iy0:iy1, ix0:ix1].reshape(-1)
        if region_mask.any():
            region = region[region_mask]
    if len(region) == 0:
        return None
    names = list(_REFERENCE_COLORS)
    references = _srgb_to_lab(np.array([_REFERENCE_COLORS[n] for n in names]))
    if method == "mean":
        samples = _srgb_to_lab(region.mean(axis=0, keepdims=True))
        genevals = [i for i, n in enumerate(names) if n in GENEVAL_COLORS]
        distances = np.linalg.norm(samples[:, None] - references[None, genevals], axis=-1)
        return names[genevals[int(distances.argmin())]]
    if method != "vote":
        raise ValueError(f"unknown colour method {method!r}; use 'vote' or 'mean'")
    nearest = np.linalg.norm(_srgb_to_lab(region)[:, None] - references[None], axis=-1).argmin(axis=1)
    votes = np.bincount(nearest, minlength=len(names))
    gray = names.index("gray")
    if votes[gray] == votes.max():
        # Mostly grey (GenEval has no grey): call it white or black by lightness, as a human would pick.
        return "white" if _srgb_to_lab(region.mean(axis=0))[0] >= 50 else "black"
    return names[int(votes.argmax())]


def parse_metadata(value: Any, reward: str = "geneval") -> dict[str, Any]:
    """Normalise one sample's GenEval metadata (a dict or its JSON string) to `{"include", "exclude", "tag"}`.

    Entries' None fields (as `datasets` fills in missing struct keys) are dropped.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise UserInputError(f"reward '{reward}': metadata is not valid JSON: {e}") from e
    if not isinstance(value, Mapping):
        raise UserInputError(f"reward '{reward}': metadata must be a dict, got {type(value).__name__}.")

    def items(key: str) -> list[dict[str, Any]]:
        raw = value.get(key) or []
        if isinstance(raw, str):
            raw = json.loads(raw)
        result = []
        for entry in raw:
            if not isinstance(entry, Mapping) or not entry.get("class"):
                raise UserInputError(f"reward '{reward}': every '{key}' entry needs a 'class', got {entry!r}.")
            result.append({k: v for k, v in entry.items() if v is not None})
        return result

    return {"include": items("include"), "exclude": items("exclude"), "tag": value.get("tag")}


# --------------------------------------------------------------------------------------------- detector


class OwlDetector:
    """Open-vocabulary detection with an OWL-ViT / OWLv2 checkpoint (loaded lazily, cached per process).

    Args:
        model_name_or_path: hub id or local directory (safetensors) of an `OwlViTForObjectDetection` or
            `Owlv2ForObjectDetection` checkpoint with its processor.
        device: where to run it; None means the current CUDA device if any, else the CPU.
        dtype: model dtype; None means float32.
        batch_size: images per forward pass.
        query_template: text query per class name.
        nms_iou: boxes of the same class overlapping more than this (IoU) with a better one are dropped.
        max_objects: at most this many detections per class and image.
        reward: the reward's name, for error messages.
    """

    def __init__(
        self,
        model_name_or_path: str = GENEVAL_DETECTOR,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 8,
        query_template: str = "a photo of a {}",
        nms_iou: float = 0.5,
        max_objects: int = 16,
        reward: str = "geneval",
    ) -> None:
        self.model_name_or_path = model_name_or_path
        self.device = device
        self.dtype = dtype
        self.batch_size = check_batch_size(batch_size, reward)
        self.query_template = query_template
        self.nms_iou = float(nms_iou)
        self.max_objects = int(max_objects)
        self.reward = reward

    def _load(self) -> tuple[Any, Any, torch.device, torch.dtype]:
        device, dtype = resolve_device(self.device), resolve_dtype(self.dtype)

        def load_model() -> Any:
            from transformers import AutoModelForZeroShotObjectDetection

            model = load_pretrained(
                AutoModelForZeroShotObjectDetection.from_pretrained,
                self.model_name_or_path,
                "the detector",
                self.reward,
                use_safetensors=True,
                dtype=dtype,
            )
            if model.config.model_type not in ("owlvit", "owlv2"):
                raise UserInputError(
                    f"reward '{self.reward}': '{self.model_name_or_path}' is a {model.config.model_type} model; "
                    "the GenEval reward supports OWL-ViT and OWLv2 detectors."
                )
            return model.to(device).eval().requires_grad_(False)

        def load_processor() -> Any:
            from transformers import AutoProcessor

            return load_pretrained(AutoProcessor.from_pretrained, self.model_name_or_path, "the processor", self.reward)

        model = cached(("ZeroShotDetector", self.model_name_or_path, str(device), str(dtype)), load_model)
        processor = cached(("DetectorProcessor", self.model_name_or_path), load_processor)
        return model, processor, device, dtype

    def __call__(
        self, images: Sequence[Any], classes: Sequence[Sequence[str]], min_score: float = 0.1
    ) -> list[list[Detection]]:
        """Detect, in each image, the objects of its class list; keep those scoring at least `min_score`.

        Returns per image a list of `Detection`s (no colours), each class ordered by decreasing score.
        """
        import torch

        model, processor, device, dtype = self._load()
        pil_images = [to_pil_rgb(image) for image in images]
        results: list[list[Detection]] = []
        with torch.no_grad():
            for batch in chunks(list(range(len(pil_images))), self.batch_size):
                names = [list(dict.fromkeys(classes[i])) or ["object"] for i in batch]
                queries = [[self.query_template.format(name) for name in group] for group in names]
                inputs = processor(
                    text=queries, images=[pil_images[i] for i in batch], return_tensors="pt", truncation=True
                )
                inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
                outputs = model(**inputs)
                for row, i in enumerate(batch):
                    results.append(
                        self._postprocess(
                            outputs.logits[row].float(),
                            outputs.pred_boxes[row].float(),
                            names[row],
                            pil_images[i].size,
                            model.config.model_type == "owlv2",
                            min_score,
                        )
                    )
        return results

    def _postprocess(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        names: list[str],
        size: tuple[int, int],
        padded_square: bool,
        min_score: float,
    ) -> list[Detection]:
        import torch

        probs = torch.sigmoid(logits[:, : len(names)])
        scores, labels = probs.max(dim=-1)
        width, height = size
        # OWLv2 pads images to a square before resizing, so its boxes are relative to the padded square.
        scale_x, scale_y = (max(size), max(size)) if padded_square else (width, height)
        cx, cy, w, h = boxes.unbind(-1)
        xyxy = torch.stack(
            [(cx - w / 2) * scale_x, (cy - h / 2) * scale_y, (cx + w / 2) * scale_x, (cy + h / 2) * scale_y], dim=-1
        )
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        detections: list[Detection] = []
        for label_index, name in enumerate(names):
            keep = ((labels == label_index) & (scores >= min_score)).nonzero().flatten()
            kept = _nms(xyxy[keep], scores[keep], self.nms_iou)[: self.max_objects]
            for k in kept.tolist():
                index = int(keep[k])
                box = tuple(float(v) for v in xyxy[index].tolist())
                detections.append(Detection(name, box, float(scores[index])))  # type: ignore[arg-type]
        return detections


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, by decreasing score."""
    import torch

    order = scores.argsort(descending=True)
    kept: list[int] = []
    areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for index in order.tolist():
        if suppressed[index]:
            continue
        kept.append(index)
        top_left = torch.maximum(boxes[index, :2], boxes[:, :2])
        bottom_right = torch.minimum(boxes[index, 2:], boxes[:, 2:])
        inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
        iou = inter / (areas[index] + areas - inter).clamp(min=1e-9)
        suppressed |= iou > iou_threshold
    return torch.tensor(kept, dtype=torch.long)


# ----------------------------------------------------------------------------------------------- reward


class GenEvalScore:
    """GenEval reward callable; the detector loads on the first call. See the module docstring.

    Args:
        detector_name_or_path: OWL-ViT / OWLv2 checkpoint (hub id or local directory, safetensors).
        device: where to run the detector; None means the current CUDA device if any, else the CPU.
        dtype: detector dtype; None means float32.
        batch_size: images per detector forward pass.
        threshold: minimum detection score for an object to count.
        counting_threshold: the minimum for prompts tagged `counting` (stricter, against duplicate boxes).
        nms_iou: IoU above which a lower-scoring box of the same class is dropped.
        max_objects: at most this many objects per class and image.
        partial_credit: score the fraction of satisfied requirements instead of all-or-nothing.
        color_method: "vote" or "mean", see [`classify_color`].
        name: the reward's `__name__` (TRL logs `rewards/<name>/mean`).
    """

    def __init__(
        self,
        detector_name_or_path: str = GENEVAL_DETECTOR,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 8,
        threshold: float = 0.2,
        counting_threshold: float = 0.3,
        nms_iou: float = 0.5,
        max_objects: int = 16,
        partial_credit: bool = False,
        color_method: str = "vote",
        name: str = "geneval",
    ) -> None:
        if color_method not in ("vote", "mean"):
            raise UserInputError(f"reward '{name}': color_method must be 'vote' or 'mean', got {color_method!r}.")
        self.__name__ = name
        self.detector = OwlDetector(
            detector_name_or_path, device, dtype, batch_size, nms_iou=nms_iou, max_objects=max_objects, reward=name
        )
        self.threshold = float(threshold)
        self.counting_threshold = float(counting_threshold)
        self.partial_credit = partial_credit
        self.color_method = color_method

    def __repr__(self) -> str:
        return (
            f"GenEvalScore(name={self.__name__!r}, detector={self.detector.model_name_or_path!r}, "
            f"partial_credit={self.partial_credit})"
        )

    def metadata(self, num_samples: int, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """Each sample's parsed metadata, from the `include` / `exclude` / `tag` columns or a `metadata` column."""
        include = get_column(kwargs, "include", num_samples, self.__name__, required=False)
        if include is None:
            column = get_column(kwargs, "metadata", num_samples, self.__name__, required=False)
            if column is None:
                get_column(kwargs, ["include", "metadata"], num_samples, self.__name__)  # raises, naming both
            return [parse_metadata(value, self.__name__) for value in column]  # type: ignore[union-attr]
        exclude = get_column(kwargs, "exclude", num_samples, self.__name__, required=False) or [None] * num_samples
        tags = get_column(kwargs, "tag", num_samples, self.__name__, required=False) or [None] * num_samples
        return [
            parse_metadata({"include": inc, "exclude": exc, "tag": tag}, self.__name__)
            for inc, exc, tag in zip(include, exclude, tags, strict=True)
        ]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Score each image against its GenEval metadata."""
        check_lengths(prompts, completions, self.__name__)
        metadata = self.metadata(len(completions), kwargs)
        if not completions:
            return []
        classes = [[item["class"] for item in meta["include"] + meta["exclude"]] for meta in metadata]
        floor = min(self.threshold, self.counting_threshold)
        all_detections = self.detector(completions, classes, min_score=floor)
        scores: list[float | None] = []
        for image, meta, detections in zip(completions, metadata, all_detections, strict=True):
            if not meta["include"] and not meta["exclude"]:
                scores.append(None)
                continue
            threshold = self.counting_threshold if meta["tag"] == "counting" else self.threshold
            kept = [d for d in detections if d.score >= threshold]
            if any(item.get("color") for item in meta["include"]):
                for detection in kept:
                    detection.color = classify_color(image, detection.box, detection.mask, self.color_method)
            result = evaluate_geneval(kept, meta["include"], meta["exclude"])
            scores.append(result.fraction if self.partial_credit else float(result.correct))
        return scores


def make_geneval(
    detector_name_or_path: str = GENEVAL_DETECTOR,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 8,
    threshold: float = 0.2,
    counting_threshold: float = 0.3,
    nms_iou: float = 0.5,
    max_objects: int = 16,
    partial_credit: bool = False,
    color_method: str = "vote",
    name: str = "geneval",
) -> GenEvalScore:
    """Create a GenEval reward; nothing loads until its first call. Arguments: see [`GenEvalScore`]."""
    return GenEvalScore(
        detector_name_or_path=detector_name_or_path,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        threshold=threshold,
        counting_threshold=counting_threshold,
        nms_iou=nms_iou,
        max_objects=max_objects,
        partial_credit=partial_credit,
        color_method=color_method,
        name=name,
    )


geneval = make_geneval()
"""The built-in `geneval` reward: OWLv2 base, strict (all-or-nothing) GenEval score."""
