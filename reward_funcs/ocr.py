"""OCR reward: how accurately an image renders the text its prompt asks for.

Source model: RapidOCR (`rapidocr-onnxruntime`, PP-OCRv4 text detection + recognition in ONNX format; the
weights ship inside the wheel, so it runs offline on the CPU). Install it with `pip install 'trl-flow[ocr]'`.
By default the detector sees the image at its own size, shrunk so its longer side is at most 960 pixels
([`DEFAULT_ENGINE_KWARGS`]; RapidOCR's own default enlarges the shorter side to 736, several times slower on
small images for no gain on rendered text). Other RapidOCR settings go in `engine_kwargs`.

Measures: `score = 1 - edit_distance(ocr_text, target) / max(len(ocr_text), len(target))`, in [0, 1]: 1 when
the recognised text equals the target, 0 when nothing matches (or nothing is recognised). Both strings are
normalised first: Unicode NFKC, case folded (case-insensitive; `case_sensitive=True` keeps case), and all
whitespace removed (OCR engines split and merge words unreliably, so spacing is not judged). Everything the
engine recognises with at least `min_confidence` is concatenated in its reading order, so extra text in the
image lowers the score.

Target text, per sample: the dataset column `text` or `target_text` if present (or `target_column`, if given);
otherwise the text between double quotes in the prompt (`a sign that says "OPEN"` -> `OPEN`; straight quotes,
curly quotes and guillemets; several quoted parts are joined with a space). Samples without a target get None
(no reward).

Dataset columns: optional `text` / `target_text` (see above).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from reward_funcs._common import cached, check_lengths, get_column, missing_extra_error, to_pil_rgb
from trl_flow.errors import UserInputError

__all__ = [
    "DEFAULT_ENGINE_KWARGS",
    "OCR_TARGET_COLUMNS",
    "OcrScore",
    "edit_distance",
    "extract_quoted_text",
    "make_ocr",
    "normalize_text",
    "ocr",
    "text_similarity",
]

OCR_TARGET_COLUMNS: tuple[str, ...] = ("text", "target_text")
"""Dataset columns holding the text an image should show, in order of preference."""

DEFAULT_ENGINE_KWARGS: dict[str, Any] = {"det_limit_type": "max", "det_limit_side_len": 960}
"""RapidOCR settings used unless `engine_kwargs` is given: detect at native size, longer side at most 960 px."""

_QUOTED = re.compile(
    r'"([^"]+)"'  # "straight"
    r"|\u201c([^\u201d]+)\u201d"  # “curly”
    r"|\u201e([^\u201c\u201d]+)[\u201c\u201d]"  # „low-high“
    r"|\u00ab([^\u00bb]+)\u00bb"  # «guillemets»
)
_WHITESPACE = re.compile(r"\s+")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between `a` and `b`: the fewest single-character insertions, deletions and
    substitutions turning one into the other."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def normalize_text(text: str, case_sensitive: bool = False) -> str:
    """NFKC-normalise `text`, drop all whitespace and, unless `case_sensitive`, case-fold it."""
    text = _WHITESPACE.sub("", unicodedata.normalize("NFKC", text))
    return text if case_sensitive else text.casefold()


def text_similarity(recognized: str, target: str, case_sensitive: bool = False) -> float:
    """`1 - edit_distance / max(len)` of the two normalised strings, in [0, 1] (1.0 when both are empty)."""
    a = normalize_text(recognized, case_sensitive)
    b = normalize_text(target, case_sensitive)
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return 1.0 - edit_distance(a, b) / longest


def extract_quoted_text(prompt: str) -> str | None:
    """The text between double quotes in `prompt` (several quoted parts joined by a space), or None."""
    parts = [next(group for group in match.groups() if group is not None) for match in _QUOTED.finditer(prompt)]
    parts = [part.strip() for part in parts if part.strip()]
    return " ".join(parts) if parts else None


def _rapidocr_engine(reward: str, engine_kwargs: dict[str, Any]) -> Callable[[Any], list[tuple[str, float]]]:
    """A RapidOCR engine (cached per process and settings) returning (text, confidence) pairs in reading order."""

    def load() -> Any:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise missing_extra_error(reward, "rapidocr-onnxruntime", "ocr", e) from e
        return RapidOCR(**engine_kwargs)

    engine = cached(("RapidOCR", tuple(sorted(engine_kwargs.items()))), load)

    def run(image: Any) -> list[tuple[str, float]]:
        result, _ = engine(image)
        return [(str(text), float(score)) for _, text, score in (result or [])]

    return run


class OcrScore:
    """OCR text-accuracy reward callable; the OCR engine loads on the first call. See the module docstring.

    Args:
        target_column: dataset column with the target text; None means `text` or `target_text` when present,
            else the quoted text of the prompt.
        case_sensitive: compare case too (default: case-insensitive).
        min_confidence: ignore recognised text lines with a lower recognition confidence (0-1).
        engine: a function image -> list of (text, confidence) in reading order; None means RapidOCR.
        engine_kwargs: keyword arguments for `RapidOCR(...)`; None means [`DEFAULT_ENGINE_KWARGS`].
        name: the reward's `__name__` (TRL logs `rewards/<name>/mean`).
    """

    def __init__(
        self,
        target_column: str | None = None,
        case_sensitive: bool = False,
        min_confidence: float = 0.0,
        engine: Callable[[Any], list[tuple[str, float]]] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        name: str = "ocr",
    ) -> None:
        self.__name__ = name
        self.target_column = target_column
        self.case_sensitive = case_sensitive
        self.min_confidence = float(min_confidence)
        self.engine = engine
        self.engine_kwargs = dict(DEFAULT_ENGINE_KWARGS if engine_kwargs is None else engine_kwargs)

    def __repr__(self) -> str:
        return f"OcrScore(name={self.__name__!r}, target_column={self.target_column!r})"

    def targets(self, prompts: Sequence[Any], num_samples: int, kwargs: dict[str, Any]) -> list[str | None]:
        """The target text of each sample (None where there is none)."""
        names = [self.target_column] if self.target_column is not None else list(OCR_TARGET_COLUMNS)
        column = get_column(kwargs, names, num_samples, self.__name__, required=self.target_column is not None)
        if column is not None:
            for i, value in enumerate(column):
                if value is not None and not isinstance(value, str):
                    raise UserInputError(
                        f"reward '{self.__name__}': target text {i} is a {type(value).__name__}, not a string."
                    )
            return [value if value and value.strip() else None for value in column]
        return [extract_quoted_text(prompt) if isinstance(prompt, str) else None for prompt in prompts]

    def recognize(self, image: Any) -> str:
        """All text the engine finds in `image` with at least `min_confidence`, concatenated with spaces."""
        engine = self.engine if self.engine is not None else _rapidocr_engine(self.__name__, self.engine_kwargs)
        lines = engine(to_pil_rgb(image))
        return " ".join(text for text, confidence in lines if confidence >= self.min_confidence)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Score how well each image renders its target text; None for samples without a target."""
        check_lengths(prompts, completions, self.__name__)
        targets = self.targets(prompts, len(completions), kwargs)
        scores: list[float | None] = []
        for target, image in zip(targets, completions, strict=True):
            if target is None:
                scores.append(None)
                continue
            scores.append(text_similarity(self.recognize(image), target, self.case_sensitive))
        return scores


def make_ocr(
    target_column: str | None = None,
    case_sensitive: bool = False,
    min_confidence: float = 0.0,
    engine: Callable[[Any], list[tuple[str, float]]] | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    name: str = "ocr",
) -> OcrScore:
    """Create an OCR reward; nothing loads until its first call. Arguments: see [`OcrScore`]."""
    return OcrScore(
        target_column=target_column,
        case_sensitive=case_sensitive,
        min_confidence=min_confidence,
        engine=engine,
        engine_kwargs=engine_kwargs,
        name=name,
    )


ocr = make_ocr()
"""The built-in `ocr` reward: RapidOCR, case-insensitive, whitespace ignored."""
