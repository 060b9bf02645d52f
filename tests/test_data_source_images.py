"""Source-image columns of editing datasets (trl_flow.data): paths relative to the dataset file, datasets.Image and
PIL values, the image_column rename, and bad images named by row and column (through the CLI: exit 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from trl_flow.cli import main
from trl_flow.data import SOURCE_IMAGES_COLUMN, load_prompt_dataset, with_source_images
from trl_flow.errors import UserInputError

TINY_EDIT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_edit.yaml"


def write_images(folder: Path) -> list[tuple[int, int, int]]:
    colours = [(255, 0, 0), (0, 0, 255)]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", (8, 8), colour).save(folder / "images" / f"{i}.png")
    return colours


def pixel(image: Image.Image) -> tuple[int, int, int]:
    return image.convert("RGB").getpixel((0, 0))


def test_flow_grpo_folder_resolves_relative_paths_against_itself(tmp_path, monkeypatch):
    colours = write_images(tmp_path / "data")
    rows = [{"prompt": f"edit {i}", "image": f"images/{i}.png"} for i in range(2)]
    (tmp_path / "data" / "train_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)  # not the dataset's folder: paths must not depend on the working directory
    ds = load_prompt_dataset(str(tmp_path / "data"), split="train")
    assert ds.column_names == ["prompt", SOURCE_IMAGES_COLUMN]
    assert isinstance(ds.features[SOURCE_IMAGES_COLUMN], datasets.Image)
    assert [pixel(image) for image in ds[SOURCE_IMAGES_COLUMN]] == colours


def test_csv_with_a_renamed_image_column(tmp_path):
    colours = write_images(tmp_path)
    (tmp_path / "edits.csv").write_text("prompt,src\nedit 0,images/0.png\nedit 1,images/1.png\n")
    ds = load_prompt_dataset(str(tmp_path / "edits.csv"), image_column="src")
    assert [pixel(image) for image in ds[SOURCE_IMAGES_COLUMN]] == colours and "src" not in ds.column_names
    with pytest.raises(UserInputError, match="no column 'source'.*image_column"):
        load_prompt_dataset(str(tmp_path / "edits.csv"), image_column="source")


def test_parquet_image_feature_and_pil_values(tmp_path):
    images = [Image.new("RGB", (8, 8), (0, 255, 0)), Image.new("RGB", (8, 8), (9, 9, 9))]
    in_memory = datasets.Dataset.from_dict({"prompt": ["a", "b"], "image": images})
    in_memory.to_parquet(str(tmp_path / "edits.parquet"))
    for ds in (load_prompt_dataset(str(tmp_path / "edits.parquet")), with_source_images(in_memory)):
        assert [pixel(image) for image in ds[SOURCE_IMAGES_COLUMN]] == [(0, 255, 0), (9, 9, 9)]
    text_only = datasets.Dataset.from_dict({"prompt": ["a"]})
    assert with_source_images(text_only) is text_only  # the default column is optional


def bad_dataset(tmp_path: Path, kind: str) -> Path:
    write_images(tmp_path)
    (tmp_path / "images" / "broken.png").write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    second = {"missing": "images/nope.png", "unreadable": "images/broken.png"}[kind]
    rows = [{"prompt": "make it red", "image": "images/0.png"}, {"prompt": "make it blue", "image": second}]
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("missing", r"image file 'images/nope\.png' does not exist"), ("unreadable", "is not a readable image")],
)
def test_a_bad_image_names_row_and_column_and_the_cli_exits_2(tmp_path, capsys, kind, reason):
    data = bad_dataset(tmp_path, kind)
    output_dir = tmp_path / "out"
    code = main(
        ["grpo", "--recipe", str(TINY_EDIT_RECIPE), "--dataset_name", str(data), "--output_dir", str(output_dir)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "column 'image', row 1 (0-based)" in err and re.search(reason, err)
    assert not output_dir.exists()
