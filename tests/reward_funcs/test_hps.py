"""Tests for the `hps` reward on a tiny random OpenCLIP ViT checkpoint saved like `HPS_v2.1_compressed.pt`.

The checkpoint is written in OpenCLIP's key layout (`{"state_dict": ...}` in a `.pt` file) and loaded through the
reward's real path: `torch.load(weights_only=True)`, key conversion, `transformers.CLIPModel`. The scores are
compared with an independent forward pass written here directly on the OpenCLIP-layout tensors (fused attention
projections, `x @ proj` projections, pooling at the argmax token), so a wrong rename, split or transpose fails.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reward_funcs import _common
from reward_funcs.hps import clip_config_from_open_clip, convert_open_clip_state_dict, make_hps
from trl_flow.errors import UserInputError

TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 1091, "width": 32, "heads": 4, "layers": 2},
}
PROMPTS = ["a red square", "a blue circle", "a green tree", "a red square"]


def _blocks(prefix: str, width: int, layers: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for i in range(layers):
        p = f"{prefix}{i}."
        state |= {
            p + "ln_1.weight": 1 + 0.1 * torch.randn(width, generator=gen),
            p + "ln_1.bias": 0.1 * torch.randn(width, generator=gen),
            p + "attn.in_proj_weight": torch.randn(3 * width, width, generator=gen) / math.sqrt(width),
            p + "attn.in_proj_bias": 0.1 * torch.randn(3 * width, generator=gen),
            p + "attn.out_proj.weight": torch.randn(width, width, generator=gen) / math.sqrt(width),
            p + "attn.out_proj.bias": 0.1 * torch.randn(width, generator=gen),
            p + "ln_2.weight": 1 + 0.1 * torch.randn(width, generator=gen),
            p + "ln_2.bias": 0.1 * torch.randn(width, generator=gen),
            p + "mlp.c_fc.weight": torch.randn(4 * width, width, generator=gen) / math.sqrt(width),
            p + "mlp.c_fc.bias": 0.1 * torch.randn(4 * width, generator=gen),
            p + "mlp.c_proj.weight": torch.randn(width, 4 * width, generator=gen) / math.sqrt(4 * width),
            p + "mlp.c_proj.bias": 0.1 * torch.randn(width, generator=gen),
        }
    return state


def open_clip_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with exactly the keys and shapes of an OpenCLIP ViT CLIP (as in the HPS files)."""
    gen = torch.Generator().manual_seed(seed)
    vision, text, dim = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    vw, tw, patch = vision["width"], text["width"], vision["patch_size"]
    grid = vision["image_size"] // patch
    state = {
        "visual.class_embedding": torch.randn(vw, generator=gen),
        "visual.positional_embedding": torch.randn(grid * grid + 1, vw, generator=gen),
        "visual.conv1.weight": torch.randn(vw, 3, patch, patch, generator=gen) / patch,
        "visual.ln_pre.weight": 1 + 0.1 * torch.randn(vw, generator=gen),
        "visual.ln_pre.bias": 0.1 * torch.randn(vw, generator=gen),
        "visual.ln_post.weight": 1 + 0.1 * torch.randn(vw, generator=gen),
        "visual.ln_post.bias": 0.1 * torch.randn(vw, generator=gen),
        "visual.proj": torch.randn(vw, dim, generator=gen) / math.sqrt(vw),
        "token_embedding.weight": torch.randn(text["vocab_size"], tw, generator=gen),
        "positional_embedding": 0.1 * torch.randn(text["context_length"], tw, generator=gen),
        "ln_final.weight": 1 + 0.1 * torch.randn(tw, generator=gen),
        "ln_final.bias": 0.1 * torch.randn(tw, generator=gen),
        "text_projection": torch.randn(tw, dim, generator=gen) / math.sqrt(tw),
        "logit_scale": torch.tensor(math.log(100.0)),
    }
    state |= _blocks("visual.transformer.resblocks.", vw, vision["layers"], gen)
    state |= _blocks("transformer.resblocks.", tw, text["layers"], gen)
    return state


def _reference_blocks(x: torch.Tensor, state: dict, prefix: str, layers: int, heads: int, causal: bool):
    """OpenCLIP's residual attention blocks, computed from the OpenCLIP-layout tensors. x: (batch, tokens, width)."""
    ln = torch.nn.functional.layer_norm
    batch, tokens, width = x.shape
    mask = torch.full((tokens, tokens), float("-inf")).triu(1) if causal else torch.zeros(tokens, tokens)
    for i in range(layers):
        p = f"{prefix}{i}."
        h = ln(x, (width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        q, k, v = (h @ state[p + "attn.in_proj_weight"].T + state[p + "attn.in_proj_bias"]).split(width, dim=-1)
        q, k, v = (t.reshape(batch, tokens, heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads) + mask, dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + attended @ state[p + "attn.out_proj.weight"].T + state[p + "attn.out_proj.bias"]
        h = ln(x, (width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = torch.nn.functional.gelu(h @ state[p + "mlp.c_fc.weight"].T + state[p + "mlp.c_fc.bias"])
        x = x + h @ state[p + "mlp.c_proj.weight"].T + state[p + "mlp.c_proj.bias"]
    return x


def reference_hps(state: dict, config: dict, processor_dir: Path, prompts: list[str], pictures: list) -> np.ndarray:
    """HPS = cos(image, text) computed the OpenCLIP way on the raw checkpoint tensors."""
    from transformers import CLIPProcessor

    processor = CLIPProcessor.from_pretrained(processor_dir)
    vision, text = config["vision_cfg"], config["text_cfg"]
    vw, tw = vision["width"], text["width"]
    ln = torch.nn.functional.layer_norm
    pixels = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
    x = torch.nn.functional.conv2d(pixels, state["visual.conv1.weight"], stride=vision["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(len(pictures), 1, vw), x], dim=1)
    x = ln(x + state["visual.positional_embedding"], (vw,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    x = _reference_blocks(
        x, state, "visual.transformer.resblocks.", vision["layers"], vw // vision["head_width"], False
    )
    image = ln(x[:, 0], (vw,), state["visual.ln_post.weight"], state["visual.ln_post.bias"]) @ state["visual.proj"]
    # OpenCLIP pads every prompt to the full context; the causal mask keeps padding out of the end-of-text token.
    ids = processor.tokenizer(prompts, padding="max_length", max_length=text["context_length"], return_tensors="pt")
    ids = ids["input_ids"]
    t = state["token_embedding.weight"][ids] + state["positional_embedding"]
    t = _reference_blocks(t, state, "transformer.resblocks.", text["layers"], text["heads"], True)
    t = ln(t, (tw,), state["ln_final.weight"], state["ln_final.bias"])
    text_features = t[torch.arange(len(prompts)), ids.argmax(dim=-1)] @ state["text_projection"]
    cos = torch.nn.functional.cosine_similarity(image, text_features, dim=-1)
    return cos.numpy()


def pictures(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 40 + 8 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> dict:
    cache: dict = {}
    monkeypatch.setattr(_common, "_CACHE", cache)
    return cache


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny OpenCLIP checkpoint saved as HPS saves it: `torch.save({"state_dict": ...})`."""
    state = open_clip_state(TINY_CONFIG)
    path = tmp_path_factory.mktemp("tiny-hps") / "HPS_tiny.pt"
    torch.save({"state_dict": state}, path)
    return path, state


def test_scores_match_an_open_clip_forward_pass(hps_checkpoint, tiny_clip_dir: Path, fresh_cache: dict) -> None:
    path, state = hps_checkpoint
    images = pictures(len(PROMPTS))
    reward = make_hps(str(path), str(tiny_clip_dir), model_config=TINY_CONFIG, batch_size=3)
    assert fresh_cache == {}  # creating the reward loads nothing
    scores = reward(PROMPTS, images)
    assert len(scores) == len(PROMPTS) and all(type(s) is float and math.isfinite(s) for s in scores)
    np.testing.assert_allclose(scores, reference_hps(state, TINY_CONFIG, tiny_clip_dir, PROMPTS, images), atol=2e-5)
    one_by_one = [reward([p], [im])[0] for p, im in zip(PROMPTS, images, strict=True)]
    np.testing.assert_allclose(scores, one_by_one, atol=1e-5)
    # the score depends on the prompt: the same images scored against the prompts in reverse order differ, and
    # still match the reference pair by pair
    swapped = reward(PROMPTS[::-1], images)
    np.testing.assert_allclose(
        swapped, reference_hps(state, TINY_CONFIG, tiny_clip_dir, PROMPTS[::-1], images), atol=2e-5
    )
    assert not np.allclose(swapped[:2], scores[:2], atol=1e-3)
    assert make_hps(str(path), str(tiny_clip_dir), model_config=TINY_CONFIG, scale=2.0)(PROMPTS, images) == (
        pytest.approx([2 * s for s in scores], abs=1e-5)
    )
    assert reward([], []) == []


def test_conversion_is_complete_and_safetensors_also_load(
    hps_checkpoint, tiny_clip_dir: Path, tmp_path: Path, fresh_cache: dict
) -> None:
    from safetensors.torch import save_file
    from transformers import CLIPModel

    path, state = hps_checkpoint
    converted = convert_open_clip_state_dict(state)
    model = CLIPModel(clip_config_from_open_clip(TINY_CONFIG, 1089, 1090, 1090))
    assert set(converted) == set(model.state_dict())  # every model tensor comes from the checkpoint
    # every checkpoint tensor is used: 3 per fused attention projection pair after the q/k/v split
    fused = sum(1 for k in state if "in_proj" in k)
    assert len(converted) == len(state) + 2 * fused
    for key, value in model.state_dict().items():
        assert converted[key].shape == value.shape, key
    # a DDP-prefixed safetensors file with the same tensors gives the same scores
    safe = tmp_path / "hps.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, safe)
    images = pictures(2)
    a = make_hps(str(path), str(tiny_clip_dir), model_config=TINY_CONFIG)(PROMPTS[:2], images)
    b = make_hps(str(safe), str(tiny_clip_dir), model_config=TINY_CONFIG)(PROMPTS[:2], images)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bad_checkpoints_and_configs_raise_user_errors(
    hps_checkpoint, tiny_clip_dir: Path, tmp_path: Path, fresh_cache: dict
) -> None:
    path, state = hps_checkpoint
    image = pictures(1)
    with pytest.raises(UserInputError, match="unrecognised keys: visual.attn_pool.query"):
        convert_open_clip_state_dict({**state, "visual.attn_pool.query": torch.zeros(1)})
    # the pickled file must hold tensors only: weights_only=True refuses an arbitrary object
    pickled = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "extra": Path("x")}, pickled)
    with pytest.raises(UserInputError, match="weights_only=True"):
        make_hps(str(pickled), str(tiny_clip_dir), model_config=TINY_CONFIG)(["a cat"], image)
    with pytest.raises(UserInputError, match="does not fit the OpenCLIP model_config"):
        wrong = {**TINY_CONFIG, "embed_dim": 8}
        make_hps(str(path), str(tiny_clip_dir), model_config=wrong)(["a cat"], image)
    with pytest.raises(UserInputError, match=r"unsupported keys \['attentional_pool'\]"):
        bad = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "attentional_pool": True}}
        make_hps(str(path), str(tiny_clip_dir), model_config=bad)(["a cat"], image)
    with pytest.raises(UserInputError, match="could not read the checkpoint"):
        make_hps(str(tmp_path / "missing.pt"), str(tiny_clip_dir), model_config=TINY_CONFIG)(["a cat"], image)


def test_default_config_is_vit_h_14() -> None:
    config = clip_config_from_open_clip(make_hps().model_config, 49406, 49407, 49407)
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size) == (
        1280,
        32,
        16,
        14,
    )
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, config.projection_dim) == (
        1024,
        24,
        16,
        1024,
    )
    assert vision.intermediate_size == 5120 and text.intermediate_size == 4096 and vision.hidden_act == "gelu"
