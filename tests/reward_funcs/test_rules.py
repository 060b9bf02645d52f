"""Tests for the built-in rule rewards (reward_funcs.rules) and their registry (reward_funcs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reward_funcs
from reward_funcs import BUILTIN_REWARDS, get_builtin_reward, list_builtin_rewards
from reward_funcs.rules import (
    brightness,
    find_color_word,
    jpeg_compressibility,
    jpeg_incompressibility,
    prompt_color,
)
from trl_flow.errors import UserInputError

RGB = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
TRL_EXTRAS = {
    "completion_ids": [None, None],
    "trainer_state": object(),
    "log_extra": print,
    "log_metric": print,
}


def solid(color: str, size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), RGB[color])


def noise(size: int = 64, seed: int = 0) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(array)


# ------------------------------------------------------------------------------------------- prompt_color


def test_prompt_color_ranks_red_and_blue_both_ways() -> None:
    red, blue = solid("red"), solid("blue")
    for_red = prompt_color(["a red image", "a red image"], [red, blue], **TRL_EXTRAS)
    for_blue = prompt_color(["a bright blue picture", "a bright blue picture"], [red, blue], **TRL_EXTRAS)
    assert for_red[0] > for_red[1]
    assert for_blue[1] > for_blue[0]
    assert for_red == pytest.approx([1.0, -0.5])
    assert for_blue == pytest.approx([-0.5, 1.0])


@pytest.mark.parametrize(
    ("prompt", "image", "expected"),
    [
        ("something green", "green", 1.0),
        ("a yellow canvas", "yellow", 1.0),  # yellow = red + green
        ("a yellow canvas", "blue", -1.0),
        ("a yellow canvas", "red", 0.5),
        ("a red image", "white", 0.0),
        ("a red image", "black", 0.0),
        ("A RED Image!", "red", 1.0),
        ("red, green and blue", "green", -0.5),  # the first colour word counts
    ],
)
def test_prompt_color_values(prompt: str, image: str, expected: float) -> None:
    assert prompt_color([prompt], [solid(image)]) == [pytest.approx(expected)]


def test_prompt_color_is_mean_over_pixels() -> None:
    array = np.zeros((10, 10, 3), dtype=np.uint8)
    array[:5, :, 0] = 255  # top half red, bottom half black
    assert prompt_color(["a red image"], [Image.fromarray(array)]) == [pytest.approx(0.5)]


def test_prompt_color_none_without_colour_word() -> None:
    images = [solid("red")] * 4
    prompts = ["a cat", "a reddish sky", "a bluebird", "a red image"]
    result = prompt_color(prompts, images, include=[[], [], [], []], **{"tag": ["a"] * 4})
    assert result[:3] == [None, None, None]
    assert result[3] == pytest.approx(1.0)


def test_find_color_word() -> None:
    assert find_color_word("a Bright BLUE picture") == "blue"
    assert find_color_word("yellowish") is None
    assert find_color_word(None) is None


def test_prompt_color_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        prompt_color(["a red image", "a blue image"], [solid("red")])


# ------------------------------------------------------------------------------------------- brightness


def test_brightness_black_white_grey() -> None:
    grey = Image.new("RGB", (8, 8), (51, 102, 153))
    assert brightness(["", "", ""], [solid("black"), solid("white"), grey], **TRL_EXTRAS) == pytest.approx(
        [0.0, 1.0, 0.4]
    )


def test_brightness_accepts_other_modes_and_arrays() -> None:
    gray_l = Image.new("L", (8, 8), 255)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    array_uint8 = np.full((8, 8, 3), 255, dtype=np.uint8)
    array_float = np.full((8, 8, 3), 0.25, dtype=np.float32)
    assert brightness([""] * 4, [gray_l, rgba, array_uint8, array_float]) == pytest.approx([1.0, 0.0, 1.0, 0.25])


def test_rewards_reject_non_images() -> None:
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        brightness(["a"], ["not an image"])


# ------------------------------------------------------------------------------------------------- jpeg


def test_jpeg_compressibility_prefers_flat_images() -> None:
    flat, noisy = Image.new("RGB", (64, 64), (120, 30, 200)), noise()
    compress = jpeg_compressibility(["a", "b"], [flat, noisy], **TRL_EXTRAS)
    incompress = jpeg_incompressibility(["a", "b"], [flat, noisy], **TRL_EXTRAS)
    assert compress[0] > compress[1]
    assert incompress[1] > incompress[0]
    assert incompress == pytest.approx([-v for v in compress])
    assert all(v < 0 for v in compress)
    # kilobytes: 64x64 RGB noise at quality 95 is several kB, a flat image well under 1 kB
    assert 2.0 < incompress[1] < 20.0
    assert incompress[0] < 1.0


def test_jpeg_accepts_numpy_arrays() -> None:
    array = np.asarray(noise(seed=1))
    assert jpeg_incompressibility(["a"], [array]) == pytest.approx(
        jpeg_incompressibility(["a"], [Image.fromarray(array)])
    )


# --------------------------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    expected = ["brightness", "jpeg_compressibility", "jpeg_incompressibility", "mid_grey", "prompt_color"]
    model_based = ["aesthetic", "clipscore", "geneval", "hps", "imagereward", "ocr", "pickscore", "vlm_judge"]
    model_based += ["image_similarity", "temporal_consistency"]  # editing (source vs output), video (CLIP frames)
    # mini_geneval.py; video_rules.py, video.py (frame differences); edit_rules.py
    other_rules = ["mini_geneval", "color_transition", "motion", "recolor_shape"]
    assert list_builtin_rewards() == sorted(expected + model_based + other_rules)
    assert sorted(BUILTIN_REWARDS) == sorted(expected + model_based + other_rules)
    for name in expected:
        func = get_builtin_reward(name)
        assert callable(func)
        assert func.__name__ == name
        assert BUILTIN_REWARDS[name] == f"reward_funcs.rules:{name}"


def test_registry_functions_are_the_module_functions() -> None:
    assert get_builtin_reward("prompt_color") is prompt_color
    assert get_builtin_reward("brightness") is brightness


def test_unknown_builtin() -> None:
    with pytest.raises(UserInputError, match="unknown built-in reward 'nope'.*brightness"):
        get_builtin_reward("nope")


def test_registry_import_is_lazy() -> None:
    root = Path(reward_funcs.__file__).resolve().parent.parent
    code = (
        "import sys, reward_funcs; "
        "print('reward_funcs.rules' in sys.modules, 'PIL' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["False", "False", "False"]
