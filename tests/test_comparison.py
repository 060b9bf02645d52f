"""Base vs trained comparison (`compare_to_base`): the paired gain's arithmetic, the base really is the base, and the
captioned grid's layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.factories import tiny_trainer
from trl_flow.comparison import Comparison, compare_with_base, paired_gain, save_comparison_grid
from trl_flow.data import TINY_EVAL_PROMPTS_PATH, load_prompt_dataset
from trl_flow.reporting import save_captioned_grid


def test_paired_gain_is_the_mean_over_tags_of_mean_differences() -> None:
    rng = np.random.default_rng(0)
    base, trained = rng.random(30), rng.random(30)
    tags = ["a"] * 10 + ["b"] * 20
    gain, se = paired_gain(base, trained, tags)
    d = trained - base
    expected = (d[:10].mean() + d[10:].mean()) / 2
    expected_se = math.sqrt(d[:10].var(ddof=1) / 10 + d[10:].var(ddof=1) / 20) / 2
    assert gain == pytest.approx(expected) and se == pytest.approx(expected_se)
    untagged, untagged_se = paired_gain(base, trained)
    assert untagged == pytest.approx(d.mean()) and untagged_se == pytest.approx(d.std(ddof=1) / math.sqrt(30))


def test_paired_gain_drops_missing_scores() -> None:
    gain, _ = paired_gain([0.0, np.nan, 1.0], [1.0, 5.0, 1.0])
    assert gain == pytest.approx(0.5)


def test_tag_score_is_geneval_mean_over_tags() -> None:
    comparison = Comparison(["p"] * 4, ["a", "a", "a", "b"], [], [])
    comparison.base_rewards["r"] = np.array([1.0, 1.0, 1.0, 0.0])
    comparison.trained_rewards["r"] = np.array([0.0, 0.0, 0.0, 1.0])
    assert comparison.score("r", trained=False) == pytest.approx(0.5)  # not the plain mean 0.75
    assert comparison.score("r", trained=True) == pytest.approx(0.5)


def test_captioned_grid_layout_and_errors(tmp_path) -> None:
    images = [Image.new("RGB", (32, 32), color) for color in ("red", "green", "blue", "white")]
    path = save_captioned_grid(images, ["a red one\nscore 1.00"] * 4, tmp_path / "grid.png", columns=2, tile=64)
    with Image.open(path) as grid:
        assert grid.width == 128 and grid.height > 128  # two rows of 64 px tiles plus caption bands
        assert grid.getpixel((10, 10)) == (255, 0, 0)  # the first tile, enlarged
    with pytest.raises(ValueError, match="one caption per image"):
        save_captioned_grid(images, ["x"], tmp_path / "bad.png", columns=2)


@pytest.fixture(scope="module")
def trainers(tiny_sd3_path, tmp_path_factory):
    """A trainer whose LoRA is zero (PEFT's init: its policy is the base) and one whose LoRA is random."""
    work = tmp_path_factory.mktemp("comparison")
    zero = tiny_trainer(tiny_sd3_path, work / "zero")
    moved = tiny_trainer(tiny_sd3_path, work / "moved")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in moved.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return zero, moved


def test_the_base_is_the_adapter_free_model_and_the_gain_is_measured(trainers, tmp_path) -> None:
    zero, moved = trainers
    dataset = load_prompt_dataset(str(TINY_EVAL_PROMPTS_PATH))
    same = compare_with_base(zero, dataset, images_per_prompt=2)
    assert len(same.prompts) == 2 * len(dataset)
    for a, b in zip(same.base_images, same.trained_images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # a zero LoRA draws the base's images
    assert paired_gain(same.base_rewards["prompt_color"], same.trained_rewards["prompt_color"])[0] == 0.0
    different = compare_with_base(moved, dataset, images_per_prompt=2)
    for a, b in zip(same.base_images, different.base_images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # the random LoRA is off for the base
    changed = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(same.base_images, different.trained_images, strict=True)
    ]
    assert all(changed)
    assert not np.allclose(different.trained_rewards["prompt_color"], different.base_rewards["prompt_color"])
    path = save_comparison_grid(different, tmp_path / "comparison.png")
    with Image.open(path) as grid:
        assert grid.width == len(dataset) * 160  # a column per prompt; base/trained rows for 2 seeds
