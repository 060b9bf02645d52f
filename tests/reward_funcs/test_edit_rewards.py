"""The rewards that see the source image of an edit: recolor_shape (the tiny edit task), image_similarity (tiny
CLIP) and the counting / GenEval rules scoring the edited image, each given `source_images` as TRL passes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reward_funcs import _common, get_builtin_reward
from reward_funcs.edit_rules import recolor_shape, shape_mask
from reward_funcs.image_similarity import make_image_similarity
from reward_funcs.mini_geneval import mini_geneval
from trl_flow.data import DATA_DIR, SOURCE_IMAGES_COLUMN, load_prompt_dataset
from trl_flow.errors import UserInputError
from trl_flow.mini.data import PlacedObject, PromptSpec, render

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture(scope="module")
def tiny_edit():
    ds = load_prompt_dataset(str(DATA_DIR / "tiny_edit"))
    return list(ds["prompt"]), [image.convert("RGB") for image in ds[SOURCE_IMAGES_COLUMN]]


def painted(source: Image.Image, inside, outside=(128, 128, 128)) -> Image.Image:
    mask = shape_mask(source, source.size)
    pixels = np.empty((*mask.shape, 3), dtype=np.uint8)
    pixels[mask], pixels[~mask] = inside, outside
    return Image.fromarray(pixels)


def test_recolor_shape_scores_the_named_colour_inside_the_source_shape(tiny_edit):
    prompts, sources = tiny_edit
    assert len(prompts) == 12 and len({s.tobytes() for s in sources}) == 4  # 4 shapes x red/green/blue
    colour = [next(c for c in RGB if c in p) for p in prompts]
    perfect = [painted(s, RGB[c]) for s, c in zip(sources, colour, strict=True)]
    assert recolor_shape(prompts, perfect, source_images=sources) == pytest.approx([1.0] * 12)
    wrong = [painted(s, RGB["green" if c != "green" else "red"]) for s, c in zip(sources, colour, strict=True)]
    assert all(r == pytest.approx(-0.5) for r in recolor_shape(prompts, wrong, source_images=sources))
    assert get_builtin_reward("recolor_shape") is recolor_shape
    with pytest.raises(ValueError, match="source_images"):
        recolor_shape(prompts, perfect)


def test_recolor_shape_averages_zero_for_a_policy_ignoring_the_source_or_the_prompt(tiny_edit):
    prompts, sources = tiny_edit
    rng = np.random.default_rng(0)
    colour = [next(c for c in RGB if c in p) for p in prompts]
    # ignores both: one random image for every pair
    fixed = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    # ignores the prompt: the shape painted red, whatever colour is asked for
    shape_only = [painted(s, RGB["red"]) for s in sources]
    # ignores the source: the named colour painted on the left half, or everywhere
    left = [painted(sources[0], RGB[c], (0, 0, 0)) for c in colour]
    everywhere = [Image.new("RGB", (32, 32), RGB[c]) for c in colour]
    for images in ([fixed] * 12, shape_only, left, everywhere):
        assert np.mean(recolor_shape(prompts, images, source_images=sources)) == pytest.approx(0.0, abs=1e-6)


def test_image_similarity_is_the_clip_image_cosine_to_the_source(tiny_clip_dir: Path, monkeypatch) -> None:
    from transformers import CLIPModel, CLIPProcessor

    monkeypatch.setattr(_common, "_CACHE", {})
    rng = np.random.default_rng(0)
    sources = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    outputs = [sources[0], Image.new("RGB", (32, 32), (255, 0, 0)), sources[0]]
    reward = make_image_similarity(str(tiny_clip_dir), batch_size=2)
    scores = reward(["a", "b", "c"], outputs, source_images=sources, trainer_state=None)
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(tiny_clip_dir)

    def embed(images):  # transformers' own image features (the projected pooled output), normalised
        with torch.no_grad():
            output = model.get_image_features(**processor(images=images, return_tensors="pt"))
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        return torch.nn.functional.normalize(features, dim=-1)

    expected = (embed(outputs) * embed(sources)).sum(-1).tolist()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[2] < scores[0]
    assert reward(["a"], outputs[:1], source_images=[None]) == [None]
    with pytest.raises(UserInputError, match="source_images"):
        reward(["a"], outputs[:1])


def test_geneval_rules_score_the_edited_image_not_the_source() -> None:
    # flow_grpo's counting edits: the GenEval metadata describes the *edited* image; the source is only context.
    spec = PromptSpec((("red", "circle"), ("blue", "square")), relation="left of")
    row = spec.metadata()
    edited = render([PlacedObject("red", "circle", 8, 16, 6), PlacedObject("blue", "square", 24, 16, 6)])
    source = render([PlacedObject("blue", "square", 24, 16, 6)])
    scores = mini_geneval(
        [row["prompt"]] * 2,
        [edited, source],
        include=[row["include"]] * 2,
        source_images=[Image.fromarray(source)] * 2,
    )
    assert scores == [1.0, 0.0]
