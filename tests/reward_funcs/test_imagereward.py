"""Tests for the `imagereward` reward on a tiny random checkpoint saved in the original `ImageReward.pt` key layout.

The checkpoint (BLIP's timm ViT keys, BLIP's BERT keys, the `mlp.layers.*` head, plus the unused contrastive
projections and `position_ids` buffer the release also holds) is saved with `torch.save` and loaded through the
reward's real path: `torch.load(weights_only=True)`, key conversion, transformers' BLIP modules. The scores are
compared with an independent forward pass written here on the original-layout tensors, so a wrong rename, a
missing cross-attention or a wrong layer-norm epsilon fails.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reward_funcs import _common
from reward_funcs._imagereward_model import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    ImageRewardModel,
    convert_imagereward_state_dict,
    preprocess_images,
)
from reward_funcs.imagereward import make_imagereward
from trl_flow.errors import UserInputError

WORDS = ["a", "red", "blue", "green", "square", "circle", "tree", "cat", "dog", "on", "the", "grass", "photo", "of"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
MED = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": len(VOCAB) + 2,  # BLIP's [DEC] and [ENC]
    "max_position_embeddings": 40,
}
VISION = {"image_size": 32, "patch_size": 8, "width": 48, "layers": 2, "heads": 4}
PROMPTS = ["a red square", "a blue circle on the grass", "a green tree", "a red square"]
HEAD = (1024, 128, 64, 16, 1)


def _linear(state: dict, name: str, out: int, inp: int, gen: torch.Generator) -> None:
    state[name + ".weight"] = torch.randn(out, inp, generator=gen) / math.sqrt(inp)
    state[name + ".bias"] = 0.1 * torch.randn(out, generator=gen)


def _norm(state: dict, name: str, width: int, gen: torch.Generator) -> None:
    state[name + ".weight"] = 1 + 0.1 * torch.randn(width, generator=gen)
    state[name + ".bias"] = 0.1 * torch.randn(width, generator=gen)


def original_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the keys and shapes of `ImageReward.pt` (for the tiny configs above)."""
    gen = torch.Generator().manual_seed(seed)
    w, p, h, inter = VISION["width"], VISION["patch_size"], MED["hidden_size"], MED["intermediate_size"]
    tokens = (VISION["image_size"] // p) ** 2 + 1
    # The image tokens start tiny (about 1e-3), so the ViT's layer-norm epsilon (1e-6, not torch's 1e-5) matters.
    state: dict[str, torch.Tensor] = {
        "blip.visual_encoder.cls_token": 1e-3 * torch.randn(1, 1, w, generator=gen),
        "blip.visual_encoder.pos_embed": 1e-3 * torch.randn(1, tokens, w, generator=gen),
        "blip.visual_encoder.patch_embed.proj.weight": 1e-3 * torch.randn(w, 3, p, p, generator=gen) / p,
        "blip.visual_encoder.patch_embed.proj.bias": 1e-3 * torch.randn(w, generator=gen),
    }
    for i in range(VISION["layers"]):
        b = f"blip.visual_encoder.blocks.{i}."
        _norm(state, b + "norm1", w, gen)
        _linear(state, b + "attn.qkv", 3 * w, w, gen)
        _linear(state, b + "attn.proj", w, w, gen)
        _norm(state, b + "norm2", w, gen)
        _linear(state, b + "mlp.fc1", 4 * w, w, gen)
        _linear(state, b + "mlp.fc2", w, 4 * w, gen)
    _norm(state, "blip.visual_encoder.norm", w, gen)
    t = "blip.text_encoder."
    state[t + "embeddings.word_embeddings.weight"] = torch.randn(MED["vocab_size"], h, generator=gen)
    state[t + "embeddings.position_embeddings.weight"] = torch.randn(MED["max_position_embeddings"], h, generator=gen)
    state[t + "embeddings.position_ids"] = torch.arange(MED["max_position_embeddings"]).unsqueeze(0)
    _norm(state, t + "embeddings.LayerNorm", h, gen)
    for i in range(MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for part, source in (("attention", h), ("crossattention", w)):
            _linear(state, f"{b}{part}.self.query", h, h, gen)
            _linear(state, f"{b}{part}.self.key", h, source, gen)
            _linear(state, f"{b}{part}.self.value", h, source, gen)
            _linear(state, f"{b}{part}.output.dense", h, h, gen)
            _norm(state, f"{b}{part}.output.LayerNorm", h, gen)
        _linear(state, b + "intermediate.dense", inter, h, gen)
        _linear(state, b + "output.dense", h, inter, gen)
        _norm(state, b + "output.LayerNorm", h, gen)
    _linear(state, "blip.vision_proj", 256, w, gen)
    _linear(state, "blip.text_proj", 256, h, gen)
    sizes = (h, *HEAD)
    for index, (inp, out) in zip((0, 2, 4, 6, 7), zip(sizes[:-1], sizes[1:], strict=True), strict=True):
        _linear(state, f"mlp.layers.{index}", out, inp, gen)
    return state


def _attention(x, context, s: dict, prefix: str, heads: int, key_mask=None):
    """BERT / ViT multi-head attention on separate or fused projections (x: batch, tokens, width)."""
    if prefix + "qkv.weight" in s:
        q, k, v = (x @ s[prefix + "qkv.weight"].T + s[prefix + "qkv.bias"]).chunk(3, dim=-1)
    else:
        q = x @ s[prefix + "query.weight"].T + s[prefix + "query.bias"]
        k = context @ s[prefix + "key.weight"].T + s[prefix + "key.bias"]
        v = context @ s[prefix + "value.weight"].T + s[prefix + "value.bias"]
    batch, width = x.shape[0], q.shape[-1]
    q, k, v = (t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, -1, width)


def reference_imagereward(s: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """ImageReward's forward pass (timm ViT, BLIP BERT with cross-attention, linear head) on original keys."""
    ln, gelu = torch.nn.functional.layer_norm, torch.nn.functional.gelu
    w, h = VISION["width"], MED["hidden_size"]
    v = "blip.visual_encoder."
    x = torch.nn.functional.conv2d(
        pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=VISION["patch_size"]
    )
    x = torch.cat([s[v + "cls_token"].expand(len(pixels), 1, w), x.flatten(2).transpose(1, 2)], 1) + s[v + "pos_embed"]
    for i in range(VISION["layers"]):
        b = f"{v}blocks.{i}."
        y = _attention(ln(x, (w,), s[b + "norm1.weight"], s[b + "norm1.bias"], 1e-6), None, s, b + "attn.", 4)
        x = x + y @ s[b + "attn.proj.weight"].T + s[b + "attn.proj.bias"]
        y = ln(x, (w,), s[b + "norm2.weight"], s[b + "norm2.bias"], 1e-6)
        y = gelu(y @ s[b + "mlp.fc1.weight"].T + s[b + "mlp.fc1.bias"])
        x = x + y @ s[b + "mlp.fc2.weight"].T + s[b + "mlp.fc2.bias"]
    image = ln(x, (w,), s[v + "norm.weight"], s[v + "norm.bias"], 1e-6)
    t = "blip.text_encoder."
    e = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = ln(e, (h,), s[t + "embeddings.LayerNorm.weight"], s[t + "embeddings.LayerNorm.bias"], 1e-12)
    for i in range(MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for part, context, key_mask in (("attention", None, mask), ("crossattention", image, None)):
            y = _attention(x, x if context is None else context, s, f"{b}{part}.self.", 4, key_mask)
            y = y @ s[f"{b}{part}.output.dense.weight"].T + s[f"{b}{part}.output.dense.bias"]
            x = ln(x + y, (h,), s[f"{b}{part}.output.LayerNorm.weight"], s[f"{b}{part}.output.LayerNorm.bias"], 1e-12)
        y = gelu(x @ s[b + "intermediate.dense.weight"].T + s[b + "intermediate.dense.bias"])
        y = y @ s[b + "output.dense.weight"].T + s[b + "output.dense.bias"]
        x = ln(x + y, (h,), s[b + "output.LayerNorm.weight"], s[b + "output.LayerNorm.bias"], 1e-12)
    r = x[:, 0]
    for index in (0, 2, 4, 6, 7):
        r = r @ s[f"mlp.layers.{index}.weight"].T + s[f"mlp.layers.{index}.bias"]
    return ((r.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).numpy()


def pictures(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> dict:
    cache: dict = {}
    monkeypatch.setattr(_common, "_CACHE", cache)
    return cache


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level BERT tokenizer saved with `save_pretrained`, as a hub tokenizer directory."""
    from transformers import BertTokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    BertTokenizer(vocab={word: i for i, word in enumerate(VOCAB)}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny state dict saved like `ImageReward.pt` (a bare state dict in a torch.save file)."""
    state = original_state()
    path = tmp_path_factory.mktemp("tiny-imagereward") / "ImageReward.pt"
    torch.save(state, path)
    return path, state


def _reward(path: Path, tokenizer: Path, **kwargs):
    return make_imagereward(str(path), str(tokenizer), med_config=MED, vision_config=VISION, **kwargs)


def test_scores_match_the_original_forward_pass(checkpoint, tiny_bert_dir: Path, fresh_cache: dict) -> None:
    from transformers import AutoTokenizer

    path, state = checkpoint
    images = pictures(len(PROMPTS))
    reward = _reward(path, tiny_bert_dir, batch_size=3)
    assert fresh_cache == {}  # creating the reward loads nothing
    scores = reward(PROMPTS, images)
    assert len(scores) == len(PROMPTS) and all(type(s) is float and math.isfinite(s) for s in scores)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert (tokens["input_ids"][:, 0] == tokenizer.cls_token_id).all()  # the head reads the [CLS] position
    pixels = preprocess_images(images, VISION["image_size"])
    expected = reference_imagereward(state, pixels, tokens["input_ids"], tokens["attention_mask"])
    np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=1e-4)
    one_by_one = [reward([p], [im])[0] for p, im in zip(PROMPTS, images, strict=True)]
    np.testing.assert_allclose(scores, one_by_one, atol=1e-5)
    # the score depends on the prompt and on the image
    assert not np.isclose(reward(PROMPTS[1:2], images[:1])[0], scores[0], atol=1e-4)
    assert not np.isclose(reward(PROMPTS[:1], images[1:2])[0], scores[0], atol=1e-4)
    assert reward([], []) == []


def test_conversion_is_complete(checkpoint) -> None:
    from transformers import BlipTextConfig, BlipVisionConfig

    _, state = checkpoint
    converted = convert_imagereward_state_dict(state)
    vision = BlipVisionConfig(
        hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    model = ImageRewardModel(vision, BlipTextConfig(**MED, encoder_hidden_size=48, is_decoder=True))
    assert set(converted) == set(model.state_dict())  # every model tensor comes from the checkpoint
    unused = {k for k in state if k.startswith(("blip.vision_proj.", "blip.text_proj.")) or k.endswith("position_ids")}
    assert len(unused) == 5 and len(converted) == len(state) - len(unused)  # every other tensor is used
    for key, value in model.state_dict().items():
        assert converted[key].shape == value.shape, key


def test_bad_checkpoints_and_configs_raise_user_errors(
    checkpoint, tiny_bert_dir: Path, tmp_path: Path, fresh_cache: dict
) -> None:
    path, state = checkpoint
    image = pictures(1)
    with pytest.raises(UserInputError, match=r"unrecognised keys: blip\.itm_head\.weight"):
        convert_imagereward_state_dict({**state, "blip.itm_head.weight": torch.zeros(2, 2)})
    pickled = tmp_path / "evil.pt"
    torch.save({**state, "extra": Path("x")}, pickled)
    with pytest.raises(UserInputError, match="weights_only=True"):
        _reward(pickled, tiny_bert_dir)(["a cat"], image)
    with pytest.raises(UserInputError, match="does not fit the model config"):
        make_imagereward(str(path), str(tiny_bert_dir), med_config=MED, vision_config={**VISION, "width": 64})(
            ["a cat"], image
        )
    with pytest.raises(UserInputError, match=r"unsupported vision_config keys \['depth'\]"):
        make_imagereward(str(path), str(tiny_bert_dir), med_config=MED, vision_config={"depth": 2})(["a cat"], image)
    with pytest.raises(UserInputError, match="could not load the BERT tokenizer"):
        _reward(path, tmp_path / "no-such-tokenizer")(["a cat"], image)


def test_med_config_file_and_safetensors(checkpoint, tiny_bert_dir: Path, tmp_path: Path, fresh_cache: dict) -> None:
    import json

    from safetensors.torch import save_file

    path, state = checkpoint
    # a med_config.json as BLIP ships it, with BERT keys that do not change the network
    med_file = tmp_path / "med_config.json"
    med_file.write_text(json.dumps({**MED, "architectures": ["BertModel"], "encoder_width": 768}))
    safe = tmp_path / "imagereward.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, safe)
    images = pictures(2)
    a = _reward(path, tiny_bert_dir)(PROMPTS[:2], images)
    b = make_imagereward(str(safe), str(tiny_bert_dir), med_config=str(med_file), vision_config=VISION)(
        PROMPTS[:2], images
    )
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_preprocessing_resizes_the_short_side_and_crops_the_centre() -> None:
    # 96x48 image: left quarter black, middle half a colour, right quarter white; the crop keeps the middle
    pixels = np.zeros((48, 96, 3), dtype=np.uint8)
    pixels[:, 24:72] = (200, 100, 50)
    pixels[:, 72:] = 255
    out = preprocess_images([Image.fromarray(pixels)], 16)
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.float32
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    expected = (torch.tensor([200, 100, 50]) / 255 - mean) / std
    torch.testing.assert_close(out[0, :, 4:12, 4:12], expected[:, None, None].expand(3, 8, 8), atol=2e-2, rtol=0)
    grey = preprocess_images([Image.new("L", (20, 30), 128)], 8)  # grey-scale input is converted to RGB
    torch.testing.assert_close(grey[0], ((128 / 255 - mean) / std)[:, None, None].expand(3, 8, 8))
