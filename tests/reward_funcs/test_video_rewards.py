"""`temporal_consistency` (tiny random CLIP, offline) and `motion` on videos given as lists of frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reward_funcs import _common, get_builtin_reward
from reward_funcs.video import make_motion, make_temporal_consistency
from trl_flow.errors import UserInputError


def noise_video(num_frames: int, seed: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(num_frames)]


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> dict:
    cache: dict = {}
    monkeypatch.setattr(_common, "_CACHE", cache)
    return cache


def test_temporal_consistency_is_the_mean_cosine_of_consecutive_clip_embeddings(tiny_clip_dir: Path, fresh_cache):
    from transformers import CLIPModel, CLIPProcessor

    changing, still = noise_video(4, seed=0), [noise_video(1, seed=1)[0]] * 3
    reward = make_temporal_consistency(str(tiny_clip_dir), batch_size=3)
    scores = reward(["a", "b", "c"], [changing, still, changing[:1]], fps=16.0)

    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        features = model.get_image_features(**processor(images=changing, return_tensors="pt"))
    features = getattr(features, "pooler_output", features)
    embeddings = torch.nn.functional.normalize(features, dim=-1)
    expected = float((embeddings[1:] * embeddings[:-1]).sum(-1).mean())
    assert scores[0] == pytest.approx(expected, abs=1e-5) and scores[0] < 0.999
    assert scores[1] == pytest.approx(1.0, abs=1e-5)  # a still video
    assert scores[2] is None  # one frame: no consecutive pair
    assert make_temporal_consistency(str(tiny_clip_dir), every=3)(["a"], [changing])[0] == pytest.approx(
        float((embeddings[3] * embeddings[0]).sum()), abs=1e-5
    )


def test_motion_is_the_mean_absolute_frame_difference():
    black, white = Image.new("RGB", (4, 4), "black"), Image.new("RGB", (4, 4), "white")
    half = Image.new("RGB", (4, 4), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 2, 4))  # half the pixels white
    motion = get_builtin_reward("motion")
    videos = [[black, white, black], [black, black, black], [black, half], [black]]
    assert motion(["p"] * 4, videos) == [pytest.approx(1.0), 0.0, pytest.approx(0.5), None]
    assert make_motion(every=2)(["p"], [[black, white, black]]) == [0.0]  # frames 0 and 2 only
    assert make_motion(target=0.5)(["p", "p"], [[black, half], [black, white]]) == [
        pytest.approx(0.0),
        pytest.approx(-0.5),
    ]
    with pytest.raises(UserInputError, match="target must lie in"):
        make_motion(target=2.0)
    with pytest.raises(UserInputError, match="every must be a positive integer"):
        make_motion(every=0)
