"""Tests for trl_flow.data.load_prompt_dataset (local files, flow_grpo folders, Hub fallback, errors)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from trl_flow import data as data_module
from trl_flow.data import TINY_EVAL_PROMPTS_PATH, TINY_PROMPTS_PATH, load_prompt_dataset
from trl_flow.errors import UserInputError

GENEVAL_ROWS = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "colors",
        "include": [{"class": "car", "count": 1, "color": "red"}],
        "prompt": "a photo of a red car",
    },
    {
        "tag": "position",
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["right of", 0]}],
        "prompt": "a photo of a cat right of a dog",
    },
    {
        "tag": "counting",
        "include": [{"class": "clock", "count": 2}],
        "exclude": [{"class": "clock", "count": 3}],
        "prompt": "a photo of two clocks",
    },
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- local files


def test_txt_one_prompt_per_line_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("\ufeffa red image\n\n   \n  a blue cat  \r\nlast line without newline", encoding="utf-8")
    ds = load_prompt_dataset(str(path))
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["prompt"]
    assert ds["prompt"] == ["a red image", "a blue cat", "last line without newline"]


def test_txt_ignores_split_and_prompt_column(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("one\ntwo\n")
    ds = load_prompt_dataset(str(path), split="test", prompt_column="caption")
    assert ds.column_names == ["prompt"]
    assert ds["prompt"] == ["one", "two"]


def test_jsonl_keeps_extra_columns(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "a cat", "target": "cat", "score": 1}, {"prompt": "a dog", "target": "dog", "score": 2}],
    )
    ds = load_prompt_dataset(str(path))
    assert ds["prompt"] == ["a cat", "a dog"]
    assert ds["target"] == ["cat", "dog"]
    assert ds["score"] == [1, 2]
    assert ds[1] == {"prompt": "a dog", "target": "dog", "score": 2}


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "x", "k": "a"}, {"prompt": "y", "k": "b"}]))
    ds = load_prompt_dataset(str(path))
    assert ds["prompt"] == ["x", "y"]
    assert ds["k"] == ["a", "b"]


def test_csv_with_prompt_column_rename(tmp_path: Path) -> None:
    path = tmp_path / "prompts.csv"
    path.write_text('caption,source\n"a red car, parked",web\na tree,book\n')
    ds = load_prompt_dataset(str(path), prompt_column="caption")
    assert set(ds.column_names) == {"prompt", "source"}
    assert ds["prompt"] == ["a red car, parked", "a tree"]
    assert ds["source"] == ["web", "book"]


def test_parquet_with_list_column(tmp_path: Path) -> None:
    path = tmp_path / "prompts.parquet"
    datasets.Dataset.from_dict({"text": ["a", "b"], "tags": [["x", "y"], []]}).to_parquet(str(path))
    ds = load_prompt_dataset(str(path), prompt_column="text")
    assert ds["prompt"] == ["a", "b"]
    assert ds["tags"] == [["x", "y"], []]
    assert "text" not in ds.column_names


def test_uppercase_suffix_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "P.TXT").write_text("hello\n")
    monkeypatch.chdir(tmp_path)
    assert load_prompt_dataset("P.TXT")["prompt"] == ["hello"]


# ------------------------------------------------------------------------------------ flow_grpo folders


def test_flow_grpo_txt_folder_splits(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("train one\ntrain two\n")
    (tmp_path / "test.txt").write_text("test one\n")
    assert load_prompt_dataset(str(tmp_path))["prompt"] == ["train one", "train two"]
    for split in ("test", "validation", "eval"):
        assert load_prompt_dataset(str(tmp_path), split=split)["prompt"] == ["test one"]


def test_flow_grpo_metadata_folder_keeps_nested_columns(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train_metadata.jsonl", GENEVAL_ROWS)
    write_jsonl(tmp_path / "test_metadata.jsonl", GENEVAL_ROWS[:1])
    ds = load_prompt_dataset(str(tmp_path), split="train")
    assert ds["prompt"] == [row["prompt"] for row in GENEVAL_ROWS]
    assert ds["tag"] == [row["tag"] for row in GENEVAL_ROWS]
    # nested lists of dicts come back as python objects, exactly as written (no keys added or dropped)
    assert ds["include"] == [row["include"] for row in GENEVAL_ROWS]
    assert ds[2]["include"][1]["position"] == ["right of", 0]
    assert "color" not in ds[0]["include"][0]
    # a column missing from some rows is None there
    assert ds["exclude"] == [None, None, None, [{"class": "clock", "count": 3}]]
    assert len(load_prompt_dataset(str(tmp_path), split="test")) == 1


def test_flow_grpo_metadata_wins_over_txt(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("from txt\n")
    write_jsonl(tmp_path / "train_metadata.jsonl", [{"prompt": "from metadata", "tag": "t"}])
    ds = load_prompt_dataset(str(tmp_path))
    assert ds["prompt"] == ["from metadata"]
    assert ds["tag"] == ["t"]


def test_other_folder_goes_to_datasets(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("prompt,n\na,1\nb,2\n")
    (tmp_path / "test.csv").write_text("prompt,n\nc,3\n")
    assert load_prompt_dataset(str(tmp_path), split="test")["prompt"] == ["c"]
    assert load_prompt_dataset(str(tmp_path))["n"] == [1, 2]


# ------------------------------------------------------------------------------------------- hub datasets


def test_hub_id_is_passed_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"caption": ["a", "b"], "id": [1, 2]})

    monkeypatch.setattr(data_module.datasets, "load_dataset", fake_load_dataset)
    ds = load_prompt_dataset("owner/some-dataset", "cfg", split="validation", prompt_column="caption")
    assert calls == [("owner/some-dataset", "cfg", "validation")]
    assert ds["prompt"] == ["a", "b"]
    assert ds["id"] == [1, 2]


def test_hub_failure_is_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_load_dataset(name, config=None, split=None, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(data_module.datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(UserInputError) as info:
        load_prompt_dataset("owner/no-such-dataset")
    message = str(info.value)
    assert "owner/no-such-dataset" in message
    assert "neither an existing local path nor a loadable Hub dataset" in message
    assert isinstance(info.value.__cause__, ConnectionError)


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name",
    ["missing.jsonl", "missing.txt", "sub/dir/prompts", "./prompts", "missing.parquet", "missing.csv"],
)
def test_missing_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def fail_load_dataset(*args, **kwargs):  # a path-looking name must never reach the Hub
        raise AssertionError("load_dataset should not be called")

    monkeypatch.setattr(data_module.datasets, "load_dataset", fail_load_dataset)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match="does not exist") as info:
        load_prompt_dataset(name)
    assert name in str(info.value)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "prompts.xlsx"
    path.write_text("x")
    with pytest.raises(UserInputError, match=r"prompts\.xlsx.*unsupported suffix"):
        load_prompt_dataset(str(path))


@pytest.mark.parametrize(
    ("filename", "content", "problem"),
    [
        ("empty.txt", "\n  \n\n", "has no prompts"),
        ("empty.jsonl", "", "is empty"),
        ("blank.jsonl", "\n \n", "is empty"),
        ("empty.csv", "", "is empty"),
        ("empty.parquet", "", "is empty"),
    ],
)
def test_empty_file(tmp_path: Path, filename: str, content: str, problem: str) -> None:
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(UserInputError, match=problem) as info:
        load_prompt_dataset(str(path))
    assert filename in str(info.value)


def test_header_only_csv_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("prompt,score\n")
    with pytest.raises(UserInputError, match="no rows") as info:
        load_prompt_dataset(str(path))
    assert "header.csv" in str(info.value)


def test_invalid_json_is_user_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(UserInputError, match=r"broken\.jsonl"):
        load_prompt_dataset(str(path))


def test_missing_prompt_column_lists_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": 1}])
    with pytest.raises(UserInputError) as info:
        load_prompt_dataset(str(path))
    message = str(info.value)
    assert "data.jsonl" in message
    assert "'prompt'" in message
    assert "text, label" in message
    assert "prompt_column" in message


def test_wrong_prompt_column_name(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a"}])
    with pytest.raises(UserInputError, match="no column 'caption'.*prompt_column"):
        load_prompt_dataset(str(path), prompt_column="caption")


def test_prompt_column_clashes_with_existing_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "caption": "b"}])
    with pytest.raises(UserInputError, match="both a 'prompt' column and the prompt_column 'caption'"):
        load_prompt_dataset(str(path), prompt_column="caption")


def test_reserved_column_name(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "completions": "b"}])
    with pytest.raises(UserInputError, match="completions.*clash"):
        load_prompt_dataset(str(path))


@pytest.mark.parametrize(
    ("lines", "row_index", "problem"),
    [
        (['{"prompt": "ok"}', '{"prompt": 3}'], 1, "must be a string, got int 3"),
        (['{"prompt": 1}', '{"prompt": 3}'], 0, "must be a string, got int 1"),
        (['{"prompt": "ok"}', '{"prompt": ["a", "b"]}'], 1, "must be a string, got list"),
        (['{"prompt": "ok"}', '{"other": "no prompt here"}'], 1, "must be a string, got NoneType"),
        (['{"prompt": "ok"}', '{"prompt": "fine"}', '{"prompt": "   "}'], 2, "prompt is empty"),
    ],
)
def test_bad_prompt_values_name_the_row(tmp_path: Path, lines: list[str], row_index: int, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserInputError, match=problem) as info:
        load_prompt_dataset(str(path))
    assert f"row {row_index} " in str(info.value)
    assert "bad.jsonl" in str(info.value)


def test_missing_csv_value_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,n\na,1\n,2\n")
    with pytest.raises(UserInputError, match="row 1") as info:
        load_prompt_dataset(str(path))
    assert "prompts.csv" in str(info.value)


def test_unknown_split_in_folder(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("a\n")
    with pytest.raises(UserInputError, match="unknown split 'dev'") as info:
        load_prompt_dataset(str(tmp_path), split="dev")
    assert str(tmp_path) in str(info.value)


def test_folder_without_requested_split(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("a\n")
    with pytest.raises(UserInputError, match="no test_metadata.jsonl or test.txt") as info:
        load_prompt_dataset(str(tmp_path), split="test")
    assert "found: train.txt" in str(info.value)


def test_folder_without_any_data(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("nothing here")
    with pytest.raises(UserInputError, match="train.txt / test.txt"):
        load_prompt_dataset(str(tmp_path))


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_dataset_name(name: str) -> None:
    with pytest.raises(UserInputError, match="dataset_name"):
        load_prompt_dataset(name)


# -------------------------------------------------------------------------------------- shipped prompts


def test_tiny_prompt_files_load() -> None:
    train = load_prompt_dataset(str(TINY_PROMPTS_PATH))
    evaluation = load_prompt_dataset(str(TINY_EVAL_PROMPTS_PATH))
    assert len(train) == 12
    assert len(evaluation) == 4
    assert not set(train["prompt"]) & set(evaluation["prompt"])
    colors = {"red", "green", "blue"}
    for prompt in list(train["prompt"]) + list(evaluation["prompt"]):
        assert prompt == prompt.lower()
        assert len(colors.intersection(prompt.split())) == 1, prompt
    assert {word for p in train["prompt"] for word in p.split()} >= colors
