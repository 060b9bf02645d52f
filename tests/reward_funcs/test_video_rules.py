"""`color_transition`: a reward only a video that follows its prompt over time can earn."""

import numpy as np
import pytest
from PIL import Image

from reward_funcs import get_builtin_reward
from reward_funcs.video_rules import color_transition, parse_color_transition

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (128, 128, 128)


def video(*colors, frames_each=2):
    return [Image.new("RGB", (4, 4), color) for color in colors for _ in range(frames_each)]


def test_a_video_that_follows_the_prompt_scores_the_maximum_and_its_reverse_the_minimum():
    scores = color_transition(["red turning blue", "blue turning red"], [video(RED, BLUE), video(RED, BLUE)])
    assert scores == pytest.approx([1.5, -1.5])  # pure red then pure blue: (1 + 0.5 + 1 + 0.5) / 2


def test_any_fixed_video_scores_zero_over_both_directions():
    rng = np.random.default_rng(0)
    for _ in range(5):
        frames = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) for _ in range(3)]
        forward, backward = color_transition(["red turning blue", "blue turning red"], [frames, frames])
        assert forward == pytest.approx(-backward)
    assert color_transition(["red turning blue"], [video(RED, RED)]) == [0.0]  # a still video


def test_prompts_without_a_transition_and_single_frames_get_none():
    assert color_transition(
        ["a red image", "red turning red", "red turning blue"], [video(RED)] * 2 + [[video(RED)[0]]]
    ) == [None, None, None]
    assert parse_color_transition("A square fading to GREEN from... no: blue becoming green") == ("blue", "green")


def test_it_is_a_registered_builtin():
    assert get_builtin_reward("color_transition") is color_transition
    assert color_transition(["green turning grey"], [video(GREY, RED)]) == [None]
