"""Tests for the CLIP-based rewards (pickscore, clipscore, aesthetic) on a tiny random CLIP checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reward_funcs import _common
from reward_funcs.aesthetic import AESTHETIC_PREDICTOR_ENV, load_linear_head, make_aesthetic
from reward_funcs.clipscore import make_clipscore
from reward_funcs.pickscore import make_pickscore
from trl_flow.errors import UserInputError
from trl_flow.rewards import call_reward_func, validate_rewards

PROMPTS = ["a red square", "a blue circle", "a green tree", "a yellow sun", "a dog on the grass"]
TRL_EXTRAS = {"completion_ids": None, "trainer_state": object(), "log_extra": print, "log_metric": print}


def images(n: int = len(PROMPTS), size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8)) for i in range(n)]


def reference_similarity(path: Path, prompts: list[str], pictures: list[Image.Image]) -> tuple[np.ndarray, float]:
    """Cosine similarities and exp(logit_scale), computed directly with transformers."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path).eval()
    processor = CLIPProcessor.from_pretrained(path)
    with torch.no_grad():
        inputs = processor(text=prompts, images=pictures, return_tensors="pt", padding=True)
        out = model(**inputs)
    image = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    text = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    return (image * text).sum(-1).numpy(), float(model.logit_scale.detach().exp())


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> dict:
    cache: dict = {}
    monkeypatch.setattr(_common, "_CACHE", cache)
    return cache


# --------------------------------------------------------------------------------------- pickscore / clip


def test_pickscore_formula_batching_and_types(tiny_clip_dir: Path, fresh_cache: dict) -> None:
    pictures = images()
    cosine, logit_scale = reference_similarity(tiny_clip_dir, PROMPTS, pictures)
    reward = make_pickscore(str(tiny_clip_dir), str(tiny_clip_dir), batch_size=2)
    assert reward.__name__ == "pickscore" and not isinstance(reward, torch.nn.Module)
    scores = reward(PROMPTS, pictures, **TRL_EXTRAS)
    assert len(scores) == len(PROMPTS) and all(type(s) is float for s in scores)
    np.testing.assert_allclose(scores, logit_scale * cosine, rtol=1e-4, atol=1e-4)
    one_by_one = [reward([p], [im])[0] for p, im in zip(PROMPTS, pictures, strict=True)]
    np.testing.assert_allclose(scores, one_by_one, rtol=1e-5, atol=1e-5)
    whole = make_pickscore(str(tiny_clip_dir), None, batch_size=16)(PROMPTS, pictures)
    np.testing.assert_allclose(scores, whole, rtol=1e-5, atol=1e-5)
    # Flow-GRPO's normalisation is a plain scale factor
    scaled = make_pickscore(str(tiny_clip_dir), str(tiny_clip_dir), scale=1 / 26)(PROMPTS, pictures)
    np.testing.assert_allclose(scaled, np.array(scores) / 26, rtol=1e-5)
    assert validate_rewards("pickscore", scores, len(pictures)) == scores


def test_model_is_cached_per_id_device_dtype(tiny_clip_dir: Path, fresh_cache: dict) -> None:
    a = make_pickscore(str(tiny_clip_dir), str(tiny_clip_dir))
    b = make_clipscore(str(tiny_clip_dir))
    assert fresh_cache == {}  # nothing loads at creation
    a(PROMPTS[:1], images(1))
    b(PROMPTS[:1], images(1))
    models = [key for key in fresh_cache if key[0] == "CLIPModel"]
    assert models == [("CLIPModel", str(tiny_clip_dir), "cpu", "torch.float32")]  # shared by both rewards
    make_clipscore(str(tiny_clip_dir), dtype="bf16")(PROMPTS[:1], images(1))
    assert ("CLIPModel", str(tiny_clip_dir), "cpu", "torch.bfloat16") in fresh_cache


def test_clipscore_is_scaled_cosine(tiny_clip_dir: Path, fresh_cache: dict) -> None:
    pictures = images()
    cosine, _ = reference_similarity(tiny_clip_dir, PROMPTS, pictures)
    scores = make_clipscore(str(tiny_clip_dir), batch_size=3)(PROMPTS, pictures)
    np.testing.assert_allclose(scores, 100 * cosine, rtol=1e-4, atol=1e-3)
    raw = make_clipscore(str(tiny_clip_dir), scale=1.0, batch_size=1)(PROMPTS, pictures)
    np.testing.assert_allclose(raw, cosine, atol=1e-5)


def test_bfloat16_scores_close_to_float32(tiny_clip_dir: Path, fresh_cache: dict) -> None:
    pictures = images(3)
    full = make_clipscore(str(tiny_clip_dir))(PROMPTS[:3], pictures)
    half = make_clipscore(str(tiny_clip_dir), dtype=torch.bfloat16)(PROMPTS[:3], pictures)
    np.testing.assert_allclose(half, full, atol=3.0)  # 100 x cosine; bf16 keeps ~2-3 significant digits


def test_text_column_instead_of_prompt(tiny_clip_dir: Path, fresh_cache: dict) -> None:
    pictures = images(2)
    reward = make_clipscore(str(tiny_clip_dir), text_column="caption")
    by_column = reward(["ignored", "ignored"], pictures, caption=PROMPTS[:2])
    by_prompt = make_clipscore(str(tiny_clip_dir))(PROMPTS[:2], pictures)
    np.testing.assert_allclose(by_column, by_prompt, atol=1e-5)
    with pytest.raises(UserInputError, match="needs the dataset column 'caption'.*other columns: tag"):
        reward(PROMPTS[:2], pictures, tag=["a", "b"], **TRL_EXTRAS)
    with pytest.raises(UserInputError, match="'caption' must give one value per image"):
        reward(PROMPTS[:2], pictures, caption=["only one"])


def test_through_trl_style_call(tiny_clip_dir: Path, fresh_cache: dict) -> None:
    reward = make_pickscore(str(tiny_clip_dir), str(tiny_clip_dir))
    raw = call_reward_func(reward, PROMPTS[:2], images(2), **TRL_EXTRAS)
    assert len(validate_rewards("pickscore", raw, 2)) == 2
    assert reward([], []) == []


def test_bad_inputs(tiny_clip_dir: Path, fresh_cache: dict) -> None:
    reward = make_clipscore(str(tiny_clip_dir))
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        reward(PROMPTS[:2], images(1))
    with pytest.raises(UserInputError, match="prompt 0 is a list"):
        reward([[{"role": "user", "content": "x"}]], images(1))
    with pytest.raises(UserInputError, match="batch_size must be a positive integer"):
        make_clipscore(batch_size=0)
    with pytest.raises(UserInputError, match="invalid dtype"):
        make_clipscore(str(tiny_clip_dir), dtype="float8")(PROMPTS[:1], images(1))


def test_load_errors_are_clear_and_lazy(tmp_path: Path, tiny_clip_dir: Path, fresh_cache: dict) -> None:
    missing = tmp_path / "nope"
    reward = make_pickscore(str(missing), str(missing))  # creating it loads nothing, so cannot fail
    with pytest.raises(UserInputError, match=r"could not load the CLIP model from '.*nope' \(no such directory\)"):
        reward(PROMPTS[:1], images(1))

    # A checkpoint with only a pickled state dict is refused: weights are read from safetensors only.
    from transformers import CLIPModel

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    (pickled / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UserInputError, match="local directory.*from safetensors files only") as info:
        make_clipscore(str(pickled), processor_name_or_path=str(tiny_clip_dir))(PROMPTS[:1], images(1))
    assert "pytorch_model.bin" in str(info.value) or "model.safetensors" in str(info.value)


# ------------------------------------------------------------------------------------------------ aesthetic


def random_head(in_features: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict shaped like LAION's head (linear layers at indices 0, 2, 4, 6, 7), smaller."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [in_features, 24, 12, 8, 4, 1]
    state = {}
    for index, (fan_in, fan_out) in zip([0, 2, 4, 6, 7], zip(sizes[:-1], sizes[1:], strict=True), strict=True):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=generator)
    return state


def test_aesthetic_pth_and_safetensors_agree_with_manual(
    tiny_clip_dir: Path, tmp_path: Path, fresh_cache: dict
) -> None:
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPProcessor

    state = random_head(16)
    torch.save(state, tmp_path / "head.pth")
    save_file(state, str(tmp_path / "head.safetensors"))
    pictures = images()
    by_pth = make_aesthetic(tmp_path / "head.pth", str(tiny_clip_dir), batch_size=2)(PROMPTS, pictures)
    by_st = make_aesthetic(str(tmp_path / "head.safetensors"), str(tiny_clip_dir), batch_size=5)(PROMPTS, pictures)
    assert len(by_pth) == len(pictures) and all(type(s) is float for s in by_pth)
    np.testing.assert_allclose(by_pth, by_st, atol=1e-5)

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        features = model.get_image_features(**processor(images=pictures, return_tensors="pt"))
    x = torch.nn.functional.normalize(getattr(features, "pooler_output", features), dim=-1)
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    np.testing.assert_allclose(by_pth, x.squeeze(-1).numpy(), atol=1e-4)
    one_by_one = [
        make_aesthetic(tmp_path / "head.pth", str(tiny_clip_dir))([p], [im])[0]
        for p, im in zip(PROMPTS, pictures, strict=True)
    ]
    np.testing.assert_allclose(by_pth, one_by_one, atol=1e-5)


def test_aesthetic_path_from_environment(
    tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: dict
) -> None:
    torch.save(random_head(16), tmp_path / "head.pth")
    reward = make_aesthetic(clip_model_name_or_path=str(tiny_clip_dir))
    monkeypatch.delenv(AESTHETIC_PREDICTOR_ENV, raising=False)
    with pytest.raises(UserInputError, match=f"sac\\+logos\\+ava1-l14-linearMSE.pth.*{AESTHETIC_PREDICTOR_ENV}"):
        reward(PROMPTS[:1], images(1))
    monkeypatch.setenv(AESTHETIC_PREDICTOR_ENV, str(tmp_path / "head.pth"))
    assert len(reward(PROMPTS[:2], images(2))) == 2


def test_aesthetic_head_errors(tiny_clip_dir: Path, tmp_path: Path, fresh_cache: dict) -> None:
    with pytest.raises(UserInputError, match="do not exist"):
        load_linear_head(tmp_path / "missing.pth")
    (tmp_path / "head.onnx").write_bytes(b"x")
    with pytest.raises(UserInputError, match=r"must be a \.safetensors file"):
        load_linear_head(tmp_path / "head.onnx")
    torch.save({"weight": torch.zeros(1, 16)}, tmp_path / "other.pth")
    with pytest.raises(UserInputError, match="not an aesthetic predictor state dict"):
        load_linear_head(tmp_path / "other.pth")
    # a pickle holding an arbitrary object is refused by weights_only=True
    torch.save(
        {"layers.0.weight": torch.zeros(1, 16), "layers.0.bias": torch.zeros(1), "x": Path("/")}, tmp_path / "obj.pth"
    )
    with pytest.raises(UserInputError, match="weights_only=True"):
        load_linear_head(tmp_path / "obj.pth")
    torch.save(random_head(768), tmp_path / "head768.pth")
    with pytest.raises(UserInputError, match="expects 768-d embeddings"):
        make_aesthetic(tmp_path / "head768.pth", str(tiny_clip_dir))(PROMPTS[:1], images(1))
