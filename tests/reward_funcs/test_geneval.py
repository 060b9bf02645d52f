"""Tests for the GenEval reward: the rules on hand-made detections, the colour classifier, and the detector
plumbing on tiny random OWL-ViT / OWLv2 checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from reward_funcs import _common
from reward_funcs.geneval import (
    Detection,
    OwlDetector,
    classify_color,
    evaluate_geneval,
    make_geneval,
    parse_metadata,
    relative_position,
)
from trl_flow.errors import UserInputError

LEFT = (0.0, 40.0, 30.0, 70.0)
RIGHT = (70.0, 40.0, 100.0, 70.0)
TOP = (40.0, 0.0, 70.0, 30.0)
BOTTOM = (40.0, 70.0, 70.0, 100.0)


def det(label: str, box=LEFT, score: float = 0.9, color: str | None = None) -> Detection:
    return Detection(label, box, score, None, color)


# ------------------------------------------------------------------------------------------------ relations


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (LEFT, RIGHT, {"left of"}),
        (RIGHT, LEFT, {"right of"}),
        (TOP, BOTTOM, {"above"}),
        (BOTTOM, TOP, {"below"}),
        ((0.0, 0.0, 30.0, 30.0), (70.0, 70.0, 100.0, 100.0), {"left of", "above"}),  # diagonal: both
        ((40.0, 40.0, 60.0, 60.0), (42.0, 41.0, 62.0, 61.0), set()),  # nearly the same place: none
        ((0.0, 40.0, 50.0, 60.0), (5.0, 40.0, 55.0, 60.0), set()),  # offset within the 10% margin
    ],
)
def test_relative_position(a, b, expected) -> None:
    assert relative_position(Detection("a", a), Detection("b", b)) == expected


@pytest.mark.parametrize("relation", ["left of", "right of", "above", "below"])
def test_position_requirement_each_relation(relation: str) -> None:
    place = {"left of": (LEFT, RIGHT), "right of": (RIGHT, LEFT), "above": (TOP, BOTTOM), "below": (BOTTOM, TOP)}
    dog_box, cat_box = place[relation]
    include = [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": [relation, 0]}]
    assert evaluate_geneval([det("cat", cat_box), det("dog", dog_box)], include).correct
    swapped = evaluate_geneval([det("cat", dog_box), det("dog", cat_box)], include)
    assert not swapped.correct and swapped.satisfied == 1
    assert f"dog is not {relation} cat" in swapped.reasons


def test_position_without_target() -> None:
    include = [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]
    result = evaluate_geneval([det("dog")], include)
    assert not result.correct and result.satisfied == 0
    assert result.reasons == ["expected at least 1 cat, found 0", "no object for dog to be left of"]


# ------------------------------------------------------------------------------------- presence / counting


def test_presence_and_absence() -> None:
    include = [{"class": "dog", "count": 1}]
    assert evaluate_geneval([det("dog")], include).correct
    assert not evaluate_geneval([det("cat")], include).correct
    assert evaluate_geneval([], []).correct and evaluate_geneval([], []).fraction == 1.0


def test_counting_exact_via_exclude() -> None:
    include, exclude = [{"class": "apple", "count": 3}], [{"class": "apple", "count": 4}]
    for n, expected in [(2, False), (3, True), (4, False)]:
        result = evaluate_geneval([det("apple", score=0.5 + i / 10) for i in range(n)], include, exclude)
        assert result.correct is expected, (n, result.reasons)
    four = evaluate_geneval([det("apple")] * 4, include, exclude)
    assert four.reasons == ["expected fewer than 4 apple, found 4"] and four.fraction == 0.5


def test_two_objects_partial_fraction() -> None:
    include = [{"class": "bench", "count": 1}, {"class": "zebra", "count": 1}]
    result = evaluate_geneval([det("bench")], include)
    assert (result.correct, result.satisfied, result.total, result.fraction) == (False, 1, 2, 0.5)


# -------------------------------------------------------------------------------------------------- colours


def test_color_requirement_counts_matching_objects() -> None:
    include = [{"class": "car", "count": 1, "color": "red"}]
    assert evaluate_geneval([det("car", color="red")], include).correct
    blue = evaluate_geneval([det("car", color="blue")], include)
    assert not blue.correct and blue.reasons == ["expected 1 red car, found 0"]
    # only the `count` most confident objects are looked at
    two = [det("car", score=0.9, color="blue"), det("car", score=0.4, color="red")]
    assert not evaluate_geneval(two, include).correct
    two_needed = [{"class": "car", "count": 2, "color": "red"}]
    assert evaluate_geneval([det("car", color="red"), det("car", color="red")], two_needed).correct


def test_color_and_position_combined() -> None:
    include = [
        {"class": "umbrella", "count": 1, "color": "purple"},
        {"class": "cup", "count": 1, "color": "yellow", "position": ["below", 0]},
    ]
    good = [det("umbrella", TOP, color="purple"), det("cup", BOTTOM, color="yellow")]
    assert evaluate_geneval(good, include).correct
    bad_color = [det("umbrella", TOP, color="green"), det("cup", BOTTOM, color="yellow")]
    result = evaluate_geneval(bad_color, include)
    assert not result.correct and "no object for cup to be below" in result.reasons


def test_tuple_detections_are_accepted() -> None:
    include = [
        {"class": "dog", "count": 1, "color": "white"},
        {"class": "cat", "count": 1, "position": ["right of", 0]},
    ]
    detections = [("dog", LEFT, None, "white"), ("cat", RIGHT)]
    assert evaluate_geneval(detections, include).correct


def solid_box_image(color: tuple[int, int, int], background=(255, 255, 255)) -> Image.Image:
    image = Image.new("RGB", (100, 100), background)
    ImageDraw.Draw(image).rectangle((20, 20, 79, 79), fill=color)
    return image


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((220, 20, 30), "red"),
        ((255, 140, 0), "orange"),
        ((250, 225, 30), "yellow"),
        ((30, 150, 40), "green"),
        ((20, 60, 230), "blue"),
        ((120, 40, 170), "purple"),
        ((255, 170, 200), "pink"),
        ((120, 75, 35), "brown"),
        ((10, 10, 10), "black"),
        ((250, 250, 250), "white"),
    ],
)
def test_classify_color(rgb, name: str) -> None:
    image = solid_box_image(rgb, background=(128, 128, 128) if name == "white" else (255, 255, 255))
    # the box is bigger than the square: the central half still lies inside it
    assert classify_color(image, (10, 10, 90, 90)) == name
    assert classify_color(np.asarray(image), (10, 10, 90, 90), method="mean") == name


def test_classify_color_mask_gray_and_empty() -> None:
    image = Image.new("RGB", (100, 100), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((45, 45, 55, 55), fill=(0, 0, 255))
    mask = np.zeros((100, 100), dtype=bool)
    mask[45:56, 45:56] = True
    assert classify_color(image, (0, 0, 100, 100)) == "white"  # the vote is mostly background
    assert classify_color(image, (0, 0, 100, 100), mask=mask) == "blue"
    assert classify_color(Image.new("RGB", (10, 10), (180, 180, 180)), (0, 0, 10, 10)) == "white"
    assert classify_color(Image.new("RGB", (10, 10), (70, 70, 70)), (0, 0, 10, 10)) == "black"
    assert classify_color(image, (50, 50, 50, 50)) is None


# ------------------------------------------------------------------------------------------------- metadata


def test_parse_metadata_variants() -> None:
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red", "position": None}]}
    parsed = parse_metadata(json.dumps(meta))
    assert parsed == {"include": [{"class": "car", "count": 1, "color": "red"}], "exclude": [], "tag": "colors"}
    with pytest.raises(UserInputError, match="needs a 'class'"):
        parse_metadata({"include": [{"count": 1}]})
    with pytest.raises(UserInputError, match="not valid JSON"):
        parse_metadata("{nope")


# ------------------------------------------------------------------------------------------------ detector


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> dict:
    cache: dict = {}
    monkeypatch.setattr(_common, "_CACHE", cache)
    return cache


def scene(seed: int, size=(48, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_detector_plumbing(tiny_owl_dir: Path, fresh_cache: dict) -> None:
    detector = OwlDetector(str(tiny_owl_dir), batch_size=2, max_objects=3)
    pictures = [scene(0), scene(1, (64, 32)), scene(2)]
    classes = [["dog", "cat"], ["car"], ["dog", "dog", "bird", "tree"]]
    results = detector(pictures, classes, min_score=0.0)
    assert len(results) == 3
    for picture, names, detections in zip(pictures, classes, results, strict=True):
        assert detections, "with min_score=0 every patch is a candidate"
        width, height = picture.size
        for d in detections:
            assert d.label in names and 0.0 <= d.score <= 1.0
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        for name in set(names):
            assert sum(d.label == name for d in detections) <= 3
    one_by_one = [detector([p], [c], min_score=0.0)[0] for p, c in zip(pictures, classes, strict=True)]
    for batched, single in zip(results, one_by_one, strict=True):
        assert [d.label for d in batched] == [d.label for d in single]
        np.testing.assert_allclose([d.box for d in batched], [d.box for d in single], atol=1e-3)
        np.testing.assert_allclose([d.score for d in batched], [d.score for d in single], atol=1e-5)


def test_geneval_reward_end_to_end_plumbing(tiny_owl_dir: Path, fresh_cache: dict) -> None:
    include = [
        [{"class": "dog", "count": 1}],
        [{"class": "car", "count": 2, "color": "red"}],
        [{"class": "cat", "count": 1}, {"class": "bird", "count": 1, "position": ["left of", 0]}],
    ]
    exclude = [None, [{"class": "car", "count": 3}], None]
    tags = ["single_object", "counting", "position"]
    pictures = [scene(0), Image.new("RGB", (48, 40), (20, 60, 230)), scene(2)]
    prompts = ["a photo of a dog", "a photo of two red cars", "a photo of a bird left of a cat"]
    extras = {"completion_ids": None, "trainer_state": None, "log_extra": print, "log_metric": print}

    everything = make_geneval(str(tiny_owl_dir), threshold=0.0, counting_threshold=0.0, max_objects=2)
    strict = everything(prompts, pictures, include=include, exclude=exclude, tag=tags, **extras)
    assert len(strict) == 3 and all(type(s) is float and s in (0.0, 1.0) for s in strict)
    assert strict[0] == 1.0  # threshold 0: some box is labelled dog
    assert strict[1] == 0.0  # every car found in a plain blue image is blue, not red

    nothing = make_geneval(str(tiny_owl_dir), threshold=1.01, counting_threshold=1.01, partial_credit=True)
    partial = nothing(prompts, pictures, include=include, exclude=exclude, tag=tags)
    assert partial == [0.0, 0.5, 0.0]  # no detections: only "fewer than 3 cars" holds

    as_metadata = [
        json.dumps({"include": i, "exclude": e or [], "tag": t}) for i, e, t in zip(include, exclude, tags, strict=True)
    ]
    assert nothing(prompts, pictures, metadata=as_metadata) == partial
    assert nothing(prompts, pictures, include=[[], [], []]) == [None, None, None]

    with pytest.raises(UserInputError, match="needs the dataset column 'include' or 'metadata'"):
        everything(prompts, pictures, tag=tags)


def test_geneval_rejects_non_owl_models(tiny_clip_dir: Path, fresh_cache: dict) -> None:
    with pytest.raises(UserInputError):
        make_geneval(str(tiny_clip_dir))(["a dog"], [scene(0)], include=[[{"class": "dog", "count": 1}]])
    with pytest.raises(UserInputError, match="color_method"):
        make_geneval(color_method="clip")
