"""The mini_geneval reward on hand-made images: strict vs partial credit, columns, registry (~2 s)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from reward_funcs import get_builtin_reward
from reward_funcs.mini_geneval import MiniGenEvalScore, classify_shape, mini_geneval, mini_geneval_partial
from trl_flow.errors import UserInputError
from trl_flow.mini.data import BACKGROUND, PlacedObject, PromptSpec, render

PAIR = PromptSpec((("red", "circle"), ("blue", "square")), relation="left of")
SINGLE = PromptSpec((("yellow", "triangle"),), region="top")


def score(images, specs, partial=False):
    rows = [spec.metadata() for spec in specs]
    reward = mini_geneval_partial if partial else mini_geneval
    return reward([r["prompt"] for r in rows], images, include=[r["include"] for r in rows])


def test_registry_and_names() -> None:
    assert get_builtin_reward("mini_geneval") is mini_geneval
    assert mini_geneval.__name__ == "mini_geneval" and mini_geneval_partial.__name__ == "mini_geneval_partial"


def test_strict_and_partial_credit() -> None:
    right = render([PlacedObject("red", "circle", 8, 16, 6), PlacedObject("blue", "square", 24, 16, 6)])
    swapped = render([PlacedObject("red", "circle", 24, 16, 6), PlacedObject("blue", "square", 8, 16, 6)])
    wrong_colour = render([PlacedObject("green", "circle", 8, 16, 6), PlacedObject("blue", "square", 24, 16, 6)])
    empty = render([])
    images = [right, swapped, wrong_colour, empty]
    assert score(images, [PAIR] * 4) == [1.0, 0.0, 0.0, 0.0]
    # requirements: the blue square, and the red circle left of it -> swapped and wrong colour keep the first only
    assert score(images, [PAIR] * 4, partial=True) == pytest.approx([1.0, 1 / 2, 1 / 2, 0.0])
    checks = MiniGenEvalScore().checks(images, include=[PAIR.metadata()["include"]] * 4)
    assert [c["correct"] for c in checks] == [True, False, False, False]
    assert checks[1] == {"correct": False, "fraction": 0.5, "object": [True, True], "color": [True, True],
                         "position": [False]}  # fmt: skip
    assert checks[2]["color"] == [True, False] and checks[2]["position"] == [True]


def test_single_object_region() -> None:
    top = render([PlacedObject("yellow", "triangle", 16, 9, 6)])
    bottom = render([PlacedObject("yellow", "triangle", 16, 23, 6)])
    circle = render([PlacedObject("yellow", "circle", 16, 9, 6)])
    assert score([top, bottom, circle], [SINGLE] * 3) == [1.0, 0.0, 0.0]
    # requirements: the yellow triangle, and its region; a yellow circle is no triangle anywhere
    assert score([top, bottom, circle], [SINGLE] * 3, partial=True) == pytest.approx([1.0, 1 / 2, 0.0])


def test_small_specks_and_off_palette_colours_are_not_objects() -> None:
    image = render([PlacedObject("red", "circle", 8, 16, 6)])
    image[2:4, 2:4] = (50, 160, 60)  # a 4-pixel green speck
    image[20:30, 20:30] = (128, 0, 128)  # purple: no task colour
    detections = [(d.color, d.label) for d in __import__("reward_funcs.mini_geneval").mini_geneval.segment(image)]
    assert detections == [("red", "circle")]


def test_metadata_column_and_missing_requirements() -> None:
    image = render([PlacedObject("yellow", "triangle", 16, 9, 6)])
    meta = json.dumps(SINGLE.metadata())
    assert mini_geneval(["p", "q"], [image, image], metadata=[meta, {"include": []}]) == [1.0, None]
    with pytest.raises(UserInputError, match="include"):
        mini_geneval(["p"], [image])
    with pytest.raises(UserInputError):
        MiniGenEvalScore(max_color_distance=0)


def test_classify_shape_on_blurry_masks() -> None:
    ys, xs = np.mgrid[0:20, 0:20]
    disc = (xs - 9.5) ** 2 + (ys - 9.5) ** 2 <= 8**2
    square = (abs(xs - 9.5) <= 7) & (abs(ys - 9.5) <= 7)
    triangle = (abs(xs - 9.5) <= (ys - 2) / 2) & (ys <= 17)
    assert [classify_shape(m) for m in (disc, square, triangle)] == ["circle", "square", "triangle"]
    assert np.asarray(BACKGROUND).shape == (3,)
