"""Prompt datasets for text-to-image RL.

[`load_prompt_dataset`] turns whatever a recipe names in `dataset_name` into a `datasets.Dataset` with
a string column `prompt`. Every other column is kept: TRL's `GRPOTrainer` hands each of them to the
reward functions as a keyword argument holding one value per sample (for example GenEval's `include` /
`exclude` metadata).

Accepted sources, tried in this order:

1. a local file: `.txt` (one prompt per line, blank lines skipped), `.jsonl` / `.json` / `.csv` /
   `.parquet` (read with `datasets.load_dataset("json" | "csv" | "parquet", data_files=...)`). A single
   file *is* the data, so `split` and `dataset_config` are ignored for it.
2. a local folder laid out like the official flow_grpo datasets: `train.txt` / `test.txt` or
   `train_metadata.jsonl` / `test_metadata.jsonl` (the metadata file wins when both exist). Split
   `"train"` reads the `train*` file; `"test"`, `"validation"` and `"eval"` read the `test*` file. A
   folder without those files is handed to `datasets.load_dataset(folder, split=split)` (e.g. a folder
   with `train.csv` / `test.csv`).
3. anything else is a Hugging Face Hub dataset id, loaded with
   `datasets.load_dataset(name, config, split=split)` (it must be cached when running offline).

Source images (image editing): a column `image` (or the one `image_column` names) holding image file paths
(relative paths are resolved against the folder of the dataset file, as flow_grpo's `*_metadata.jsonl` folders
need), a `datasets.Image` feature, or PIL images. Every image is opened once here, so a missing or unreadable one is
an error naming its row and column before anything runs; the column comes out as a `datasets.Image` feature
called `source_images` (see [`SOURCE_IMAGES_COLUMN`]), which TRL hands to every reward function as the keyword
argument `source_images`.

Every mistake raises [`trl_flow.errors.UserInputError`] with a message naming the file, column or row.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

from trl_flow.errors import UserInputError

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Folder with the prompt files shipped with trl-flow."""

TINY_PROMPTS_PATH = DATA_DIR / "tiny_prompts.txt"
"""16 short colour prompts ("a red image", ...) for the offline CPU demo with the `prompt_color` reward."""

TINY_EVAL_PROMPTS_PATH = DATA_DIR / "tiny_eval_prompts.txt"
"""4 held-out colour prompts for evaluating the offline CPU demo."""

TINY_VIDEO_PROMPTS_PATH = DATA_DIR / "tiny_video_prompts.txt"
"""Colour-transition prompts ("red turning blue" and its reverse) for the tiny Wan and the `color_transition` reward:
balanced in both directions, so any fixed video scores 0 on average."""

TINY_EDIT_DIR = DATA_DIR / "tiny_edit"
"""The tiny edit task (flow_grpo folder layout): 4 light shapes on black (the left, right, top and bottom halves),
each with "make it red / green / blue" (12 rows, the same in train and test), for the `recolor_shape` reward."""

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
"""Suffixes of local files that [`load_prompt_dataset`] reads (case-insensitive)."""

_BUILDER_FOR_SUFFIX = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

SPLIT_ALIASES: dict[str, str] = {"train": "train", "test": "test", "validation": "test", "eval": "test"}
"""Split name -> file prefix in a flow_grpo-style folder."""

SOURCE_IMAGES_COLUMN = "source_images"
"""The column a dataset's source images are renamed to: TRL passes every column to the rewards by its name, so
each reward gets `source_images=[one PIL image per sample]`, and the trainer hands the same images to the rollout."""

RESERVED_COLUMNS = frozenset(
    {"prompts", "completions", "completion", "completion_ids", "trainer_state", "log_extra", "log_metric"}
)
"""Column names that clash with the arguments TRL passes to reward functions (or that TRL drops)."""


def load_prompt_dataset(
    dataset_name: str,
    dataset_config: str | None = None,
    split: str = "train",
    prompt_column: str = "prompt",
    image_column: str = "image",
) -> datasets.Dataset:
    """Load a prompt dataset from a local file, a flow_grpo-style folder or the Hugging Face Hub.

    Args:
        dataset_name: path to a `.txt` / `.jsonl` / `.json` / `.csv` / `.parquet` file, path to a folder, or a
            Hub dataset id. `~` is expanded.
        dataset_config: Hub dataset configuration name; ignored for local files and folders.
        split: which split to read. For a flow_grpo-style folder: `"train"`, or `"test"` / `"validation"` /
            `"eval"` (all three read `test.txt` / `test_metadata.jsonl`). Ignored for a single local file.
        prompt_column: the column holding the prompts; renamed to `prompt`. Ignored for `.txt` files.
        image_column: the column holding the source images of an editing dataset (paths, `datasets.Image` or PIL
            images), renamed to `source_images` and decoded as `datasets.Image`. The default `image` is optional
            (a text-to-image dataset has none); any other name must exist.

    Returns:
        A `datasets.Dataset` whose `prompt` column holds non-empty strings; all other columns are kept
        unchanged (nested JSON values stay Python lists / dicts).

    Raises:
        UserInputError: missing file, unreadable file, unknown split, empty dataset, missing prompt column,
            column name that clashes with TRL's reward-function arguments, or a non-string / empty prompt.
    """
    if not isinstance(dataset_name, str) or not dataset_name.strip():
        raise UserInputError(
            f"dataset_name must be a non-empty string (a file, a folder or a Hub dataset id), got {dataset_name!r}."
        )
    if not isinstance(prompt_column, str) or not prompt_column:
        raise UserInputError(f"prompt_column must be a non-empty column name, got {prompt_column!r}.")

    path = Path(os.path.expanduser(dataset_name))
    base = Path.cwd()  # where relative image paths point: the dataset file's folder for local files
    if path.is_file():
        if dataset_config is not None:
            logger.warning("dataset_config=%r is ignored for the local file %s.", dataset_config, path)
        ds = _load_file(path, prompt_column)
        where, base = str(path), path.resolve().parent
    elif path.is_dir():
        ds, where = _load_folder(path, split, prompt_column)
        base = path.resolve()
    elif _looks_like_path(dataset_name):
        raise UserInputError(
            f"dataset file or folder '{dataset_name}' does not exist (resolved to '{path.resolve()}'). "
            "Fix the dataset_name path; local files may be " + ", ".join(FILE_SUFFIXES) + "."
        )
    else:
        ds = _load_hub(dataset_name, dataset_config, split)
        where = f"Hub dataset '{dataset_name}' (split '{split}')"
    ds = _finalize(ds, where, prompt_column)
    return with_source_images(ds, image_column, where, base)


def _looks_like_path(name: str) -> bool:
    """Whether a name that exists neither as file nor folder was meant as a local path rather than a Hub id.

    Hub ids are `name` or `owner/name`, so a known file suffix, a leading `/`, `.`, `~`, a backslash or
    more than one `/` mark a path.
    """
    if Path(name).suffix.lower() in FILE_SUFFIXES:
        return True
    if name.startswith(("/", ".", "~")) or "\\" in name:
        return True
    return name.count("/") > 1


def _load_file(path: Path, prompt_column: str) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _load_txt(path, prompt_column)
    builder = _BUILDER_FOR_SUFFIX.get(suffix)
    if builder is None:
        raise UserInputError(
            f"dataset file '{path}' has an unsupported suffix '{path.suffix}'. "
            "Use one of " + ", ".join(FILE_SUFFIXES) + ", a flow_grpo-style folder, or a Hub dataset id."
        )
    if path.stat().st_size == 0 or (builder != "parquet" and not _has_non_blank_text(path)):
        raise UserInputError(f"dataset file '{path}' is empty; add at least one prompt.")
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # the builders raise many types (ArrowInvalid, DatasetGenerationError, ...)
        if "corresponds to no data" in str(e):  # datasets: a file without rows, e.g. a header-only csv
            hint = " (only a header?)" if builder == "csv" else ""
            raise UserInputError(f"dataset file '{path}' has no rows{hint}; add at least one prompt.") from e
        raise UserInputError(
            f"could not read dataset file '{path}' as {builder}: {type(e).__name__}: {e}. "
            "Check that the file is valid " + builder + "."
        ) from e
    return ds


def _has_non_blank_text(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _load_txt(path: Path, prompt_column: str = "prompt") -> datasets.Dataset:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserInputError(f"prompt file '{path}' is not valid UTF-8 text ({e}); save it as UTF-8.") from e
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserInputError(f"prompt file '{path}' has no prompts (only blank lines); add one prompt per line.")
    return datasets.Dataset.from_dict({prompt_column: prompts})


def _load_folder(folder: Path, split: str, prompt_column: str) -> tuple[datasets.Dataset, str]:
    known = [f"{p}{s}" for p in ("train", "test") for s in ("_metadata.jsonl", ".txt")]
    present = [name for name in known if (folder / name).is_file()]
    if not present:
        try:
            ds = datasets.load_dataset(str(folder), split=split)
        except Exception as e:
            raise UserInputError(
                f"could not load split '{split}' from the folder '{folder}': {type(e).__name__}: {e}. "
                "A prompt folder should hold train.txt / test.txt or train_metadata.jsonl / "
                "test_metadata.jsonl (flow_grpo layout), or data files that datasets.load_dataset can read."
            ) from e
        if not isinstance(ds, datasets.Dataset):
            raise UserInputError(f"folder '{folder}' did not load as a single dataset split (got {type(ds).__name__}).")
        return ds, f"folder '{folder}' (split '{split}')"

    prefix = SPLIT_ALIASES.get(split)
    if prefix is None:
        raise UserInputError(
            f"unknown split '{split}' for the prompt folder '{folder}'. Use 'train' (reads train*) or "
            "'test' / 'validation' / 'eval' (read test*)."
        )
    for name in (f"{prefix}_metadata.jsonl", f"{prefix}.txt"):
        file = folder / name
        if file.is_file():
            return _load_file(file, prompt_column), str(file)
    raise UserInputError(
        f"prompt folder '{folder}' has no {prefix}_metadata.jsonl or {prefix}.txt for split '{split}' "
        f"(found: {', '.join(present)}). Add the file or choose another split."
    )


def _load_hub(name: str, config: str | None, split: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise UserInputError(
            f"could not load the dataset '{name}'"
            + (f" (config '{config}')" if config else "")
            + f", split '{split}': {type(e).__name__}: {e}. "
            "It is neither an existing local path nor a loadable Hub dataset: fix dataset_name (a local "
            ".txt/.jsonl/.json/.csv/.parquet file, a folder, or a Hub id that is cached when offline)."
        ) from e
    if not isinstance(ds, datasets.Dataset):
        raise UserInputError(
            f"dataset '{name}' split '{split}' loaded as {type(ds).__name__}, not a datasets.Dataset; "
            "name a single split."
        )
    return ds


def _finalize(ds: datasets.Dataset, where: str, prompt_column: str) -> datasets.Dataset:
    if len(ds) == 0:
        raise UserInputError(f"dataset {where} has no rows; add at least one prompt.")
    columns = list(ds.column_names)
    if prompt_column not in columns:
        raise UserInputError(
            f"dataset {where} has no column '{prompt_column}' (available columns: {', '.join(columns)}). "
            "Set the prompt_column key of the recipe to the column holding the prompts."
        )
    if prompt_column != "prompt" and "prompt" in columns:
        raise UserInputError(
            f"dataset {where} has both a 'prompt' column and the prompt_column '{prompt_column}', which "
            "would be renamed to 'prompt'. Set prompt_column: prompt, or remove / rename the existing "
            "'prompt' column."
        )
    clashes = sorted(RESERVED_COLUMNS.intersection(columns))
    if clashes:
        raise UserInputError(
            f"dataset {where} has column(s) {', '.join(clashes)} whose names clash with the arguments "
            "TRL passes to reward functions; rename them."
        )
    for i, value in enumerate(ds[prompt_column]):
        if not isinstance(value, str):
            raise UserInputError(
                f"dataset {where}, column '{prompt_column}', row {i} (0-based): prompt must be a string, got "
                f"{type(value).__name__} {value!r}. Fix that row or choose another prompt_column."
            )
        if not value.strip():
            raise UserInputError(
                f"dataset {where}, column '{prompt_column}', row {i} (0-based): prompt is empty. "
                "Remove that row or fill in a prompt."
            )
    if prompt_column != "prompt":
        ds = ds.rename_column(prompt_column, "prompt")
    return ds


def with_source_images(
    ds: datasets.Dataset, image_column: str = "image", where: str = "", base: str | os.PathLike | None = None
) -> datasets.Dataset:
    """``ds`` with its source-image column checked (every image opened) and renamed to `source_images`, as a
    `datasets.Image` feature (rows decode to PIL images). Returns ``ds`` unchanged when it has no ``image`` column
    and ``image_column`` is the default.

    Args:
        ds: the dataset.
        image_column: the column holding the images: file paths (relative ones resolved against ``base``), a
            `datasets.Image` feature, PIL images, or `{"bytes", "path"}` dicts.
        where: how error messages name the dataset.
        base: the folder relative paths are resolved against (default: the working directory).

    Raises:
        UserInputError: a missing column (other than the default), a missing or unreadable image (naming its row
            and the column), or a clash with an existing `source_images` column.
    """
    where = where or "given"
    if not isinstance(image_column, str) or not image_column:
        raise UserInputError(f"image_column must be a non-empty column name, got {image_column!r}.")
    columns = list(ds.column_names)
    if image_column not in columns:
        if image_column != "image":
            raise UserInputError(
                f"dataset {where} has no column '{image_column}' (available columns: {', '.join(columns)}). "
                "Set the image_column key of the recipe to the column holding the source images."
            )
        return ds
    if image_column != SOURCE_IMAGES_COLUMN and SOURCE_IMAGES_COLUMN in columns:
        raise UserInputError(
            f"dataset {where} has both a '{SOURCE_IMAGES_COLUMN}' column and the image_column '{image_column}', "
            f"which would be renamed to '{SOURCE_IMAGES_COLUMN}'; rename or remove one."
        )
    base = Path(base) if base is not None else Path.cwd()
    feature = ds.features[image_column]
    raw = ds.cast_column(image_column, datasets.Image(decode=False)) if isinstance(feature, datasets.Image) else ds
    values = []
    for row, value in enumerate(raw[image_column]):
        values.append(_checked_image(value, row, image_column, where, base))
    # Stored as the Image feature stores them (paths stay paths, PIL images become bytes); rows decode to PIL images.
    feature = datasets.Image()
    encoded = [feature.encode_example(value) for value in values]
    return ds.remove_columns(image_column).add_column(SOURCE_IMAGES_COLUMN, encoded, feature=feature)


def _checked_image(value: Any, row: int, column: str, where: str, base: Path) -> Any:
    """One source image, opened to prove it is readable; returned as a storable value (absolute path, bytes dict or
    the PIL image)."""

    def fail(reason: str) -> UserInputError:
        return UserInputError(
            f"dataset {where}, column '{column}', row {row} (0-based): {reason}. Fix that row's image or choose "
            "another image_column."
        )

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):  # a datasets.Image value left undecoded: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            _open_image(io.BytesIO(value["bytes"]), fail, "its image bytes")
            return {"bytes": value["bytes"], "path": None}
        value = value.get("path")
    if isinstance(value, str) and value.strip():
        if "://" in value:
            raise fail(f"'{value}' is a URL; source images must be local files (download them first)")
        path = Path(os.path.expanduser(value))
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise fail(f"image file '{value}' does not exist (resolved to '{path}')")
        _open_image(path, fail, f"the image file '{path}'")
        return str(path)
    raise fail(f"expected an image file path, a PIL image or a datasets.Image value, got {type(value).__name__}")


def _open_image(source: Any, fail, what: str) -> None:
    try:
        with Image.open(source) as image:
            image.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise fail(f"{what} is not a readable image ({type(e).__name__}: {e})") from e


def require_source_images(dataset: Any, which: str) -> Any:
    """The trainer's check of a dataset for an image-editing family: a `source_images` column, or an `image` column
    made into one ([`with_source_images`]). None and non-`datasets.Dataset` inputs pass unchanged.

    Raises:
        UserInputError: the dataset has neither column (naming ``which`` and the image_column key).
    """
    if not isinstance(dataset, datasets.Dataset) or SOURCE_IMAGES_COLUMN in dataset.column_names:
        return dataset
    if "image" in dataset.column_names:
        return with_source_images(dataset, "image", which)
    raise UserInputError(
        f"{which} has no source images: an image-editing model needs a column of source images (default 'image'; "
        f"the image_column key renames another; available columns: {', '.join(dataset.column_names)})."
    )
