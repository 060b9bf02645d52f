"""`@frames`: any image reward applied to videos by frame pooling, and its spec form in `reward_funcs`."""

from __future__ import annotations

import pytest
from PIL import Image

from reward_funcs.frames import FramePooled
from trl_flow.errors import UserInputError
from trl_flow.rewards import resolve_reward_func, resolve_reward_funcs


def grey_video(levels: list[int]) -> list[Image.Image]:
    return [Image.new("RGB", (4, 4), (level,) * 3) for level in levels]


VIDEOS = [grey_video([0, 51, 102, 153, 204]), grey_video([255, 0, 255, 0, 255])]


def test_pooling_modes_and_frame_stride_on_brightness():
    def spec(options: str) -> list[float]:
        return resolve_reward_func(f"brightness@frames{options}")(["a", "b"], VIDEOS)

    assert spec("") == pytest.approx([0.4, 0.6])  # mean of every frame
    assert spec("(every=2)") == pytest.approx([0.4, 1.0])  # frames 0, 2, 4
    assert spec("(every=2, pool=min)") == pytest.approx([0.0, 1.0])
    assert spec("(pool=max)") == pytest.approx([0.8, 1.0])
    assert spec("(pool=first)") == pytest.approx([0.0, 1.0])
    # An image is a one-frame video: the same recipe runs on an image family.
    assert resolve_reward_func("brightness@frames")(["a"], [Image.new("RGB", (2, 2), "white")]) == [1.0]


def test_columns_are_repeated_per_frame_and_chunks_bound_each_call():
    calls = []

    def reward(prompts, completions, color, fps, trainer_state=None, **kwargs):
        calls.append((list(prompts), list(color), fps, len(completions)))
        return [None if c == "skip" else float(i) for i, c in enumerate(color)]

    pooled = FramePooled(reward, every=2, chunk=2, name="mine")
    values = pooled(["p0", "p1"], VIDEOS, color=["red", "skip"], fps=16.0, trainer_state=object())
    # Frames 0, 2, 4 of each video: 6 frames in 3 calls of at most 2; per-frame columns, fps as it is.
    assert calls == [
        (["p0", "p0"], ["red", "red"], 16.0, 2),
        (["p0", "p1"], ["red", "skip"], 16.0, 2),
        (["p1", "p1"], ["skip", "skip"], 16.0, 2),
    ]
    assert values == [pytest.approx((0 + 1 + 0) / 3), None]  # frames scored None are left out; none left: None
    assert pooled.__name__ == "mine"


def test_spec_names_and_inner_specs():
    (plain, tuned, from_file) = resolve_reward_funcs(
        ["prompt_color@frames", "brightness@frames( every=4 , pool=min )", "reward_funcs.rules:mid_grey@frames"]
    )
    assert plain.__name__ == "prompt_color@frames"
    assert tuned.__name__ == "brightness@frames(every=4,pool=min)" and (tuned.every, tuned.pool) == (4, "min")
    assert from_file.__name__ == "mid_grey@frames"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("brightness@frame", "unknown modifier '@frame'"),
        ("brightness@frames(every=0)", "every must be a positive integer, got '0'"),
        ("brightness@frames(every=two)", "every must be a positive integer"),
        ("brightness@frames(pool=median)", "pool must be one of mean, min, max, first, got 'median'"),
        ("brightness@frames(stride=2)", "unknown @frames option 'stride'"),
        ("brightness@frames(every)", "option 'every' of @frames is not KEY=VALUE"),
        ("brightness@frames(every=2,every=3)", "option 'every' of @frames is given twice"),
        ("brightness@frames(every=2", "is malformed"),
        ("@frames", "nothing before '@frames'"),
        ("brightnes@frames", "unknown reward 'brightnes'"),
    ],
)
def test_bad_frames_specs_name_the_problem(spec, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_reward_func(spec)


def test_python_form_checks_its_options():
    with pytest.raises(UserInputError, match="chunk must be a positive integer"):
        FramePooled(lambda prompts, completions, **kw: [], chunk=0)
    with pytest.raises(UserInputError, match="pool must be one of"):
        FramePooled(lambda prompts, completions, **kw: [], pool="median")
