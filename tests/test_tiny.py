"""Tests for trl_flow.offline_models.sd3, the tiny SD3 builder (CPU, ~30 s: one build plus one rebuild)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from trl_flow.offline_models import sd3 as tiny
from trl_flow.offline_models.sd3 import (
    TINY_IMAGE_SIZE,
    TINY_LATENT_CHANNELS,
    TINY_MAX_SEQUENCE_LENGTH,
    TINY_SD3_VERSION,
    build_tiny_sd3,
    default_cache_dir,
    ensure_tiny_sd3,
)

# Measured on the seed-0 build (2 CPU cores): pairs of random unit-normal scaled latents decode to images whose
# mean absolute pixel difference (in [0, 1]) is ~0.16 (smallest of 8 pairs 0.14); adding 1 to every entry of
# a scaled latent changes its image by ~0.20. Over seeds 0-13 the mean pair difference was 0.15-0.24.
MIN_RANDOM_LATENT_DIFF = 0.07
# Solid-colour round trips have mean absolute error ~0.02-0.03 in [0, 1] (an untrained VAE: ~0.47, grey).
MAX_SOLID_MAE = 0.1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny") / "sd3", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return StableDiffusion3Pipeline.from_pretrained(tiny_dir)


def _generate(pipe, prompt, seed=0, **kwargs):
    return pipe(
        prompt,
        num_inference_steps=2,
        height=TINY_IMAGE_SIZE,
        width=TINY_IMAGE_SIZE,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images


def _decode01(vae, scaled_latents):
    """Decode latents in the diffusion model's space, as the SD3 pipeline does; pixels in [0, 1]."""
    latents = scaled_latents / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        return (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)


def _encode_scaled(vae, images01):
    with torch.no_grad():
        latents = vae.encode(images01 * 2 - 1).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def test_build_layout(tiny_dir):
    marker = json.loads((tiny_dir / tiny.MARKER_FILE).read_text())
    assert marker["version"] == TINY_SD3_VERSION
    model_index = json.loads((tiny_dir / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusion3Pipeline"
    assert model_index["tokenizer_3"] == ["transformers", "T5Tokenizer"]
    size = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert size < 10 * 2**20, size
    # the installed directory has the usual umask-derived mode (not a private 0o700 temp-dir mode)
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    # nothing left behind next to it but the build itself
    leftovers = [p.name for p in tiny_dir.parent.iterdir() if p.name.startswith(f".{tiny_dir.name}.tmp-")]
    assert leftovers == []


def test_pipeline_generates_deterministic_images(pipe):
    assert pipe.vae_scale_factor == 4
    (image,) = _generate(pipe, "a red image", output_type="pil")
    assert image.size == (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    (again,) = _generate(pipe, "a red image", output_type="pil")
    assert np.array_equal(np.asarray(image), np.asarray(again))
    (other_seed,) = _generate(pipe, "a red image", seed=1, output_type="pil")
    assert not np.array_equal(np.asarray(image), np.asarray(other_seed))


def test_pipeline_default_size_is_tiny(pipe):
    images = pipe(
        "a blue square",
        num_inference_steps=1,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        output_type="pt",
    ).images
    assert tuple(images.shape) == (1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)


def test_vae_decodes_different_latents_to_different_images(pipe):
    vae = pipe.vae
    shape = (16, TINY_LATENT_CHANNELS, TINY_IMAGE_SIZE // 4, TINY_IMAGE_SIZE // 4)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    decoded = _decode01(vae, noise)
    assert decoded.shape == (16, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    pair_diffs = (decoded[::2] - decoded[1::2]).abs().mean(dim=(1, 2, 3))
    assert pair_diffs.min() > MIN_RANDOM_LATENT_DIFF, pair_diffs
    # a shifted latent is a visibly different image too
    shifted = _decode01(vae, noise + 1.0)
    assert (shifted - decoded).abs().mean() > MIN_RANDOM_LATENT_DIFF


def test_vae_scaled_latents_are_roughly_unit_variance(pipe):
    images = tiny.synthetic_images(128, torch.Generator().manual_seed(7))
    scaled = _encode_scaled(pipe.vae, images)
    assert abs(float(scaled.mean())) < 0.25
    assert 0.6 < float(scaled.std()) < 1.6


def test_vae_keeps_colours(pipe):
    vae = pipe.vae
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    solids = colours[:, :, None, None].expand(-1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE).contiguous()
    latents = _encode_scaled(vae, solids)
    red_blue_latent_diff = (latents[0] - latents[2]).abs().mean()
    assert red_blue_latent_diff > 0.3, red_blue_latent_diff
    recon = _decode01(vae, latents)
    assert (recon - solids).abs().mean() < MAX_SOLID_MAE
    mean_rgb = recon.mean(dim=(2, 3))
    red, green, blue = mean_rgb[0], mean_rgb[1], mean_rgb[2]
    assert red[0] > red[1] + 0.5 and red[0] > red[2] + 0.5, red
    assert green[1] > green[0] + 0.5 and green[1] > green[2] + 0.5, green
    assert blue[2] > blue[0] + 0.5 and blue[2] > blue[1] + 0.5, blue


def test_prompt_embeddings_depend_on_prompt(pipe):
    prompts = ["a red image", "a photo of a blue square", "a red image"]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH
        )
    assert embeds.shape == (3, 77 + TINY_MAX_SEQUENCE_LENGTH, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (3, pipe.transformer.config.pooled_projection_dim)
    assert torch.equal(embeds[0], embeds[2]) and torch.equal(pooled[0], pooled[2])
    assert (embeds[0] - embeds[1]).abs().mean() > 1e-3
    assert (pooled[0] - pooled[1]).abs().mean() > 1e-2
    # each of the three encoders sees the difference: CLIP-L, CLIP-G (hidden 32 + 48) and T5 tokens
    clip_l, clip_g, t5 = embeds[:, :77, :32], embeds[:, :77, 32:80], embeds[:, 77:]
    for part in (clip_l, clip_g, t5):
        assert not torch.allclose(part[0], part[1])


def test_tokenizers_cover_prompt_words_and_tolerate_unknown_text(pipe):
    for word in ["red", "green", "yellow", "white", "black", "bright", "dark", "photo", "square", "blue"]:
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
        assert pipe.tokenizer_3.convert_ids_to_tokens(pipe.tokenizer_3(word).input_ids) == [f"\u2581{word}", "</s>"]
    odd = "Zebra xylophone 42 \u00e9t\u00e9 \U0001f993!"
    clip_ids = pipe.tokenizer(odd).input_ids
    t5_ids = pipe.tokenizer_3(odd).input_ids
    assert max(clip_ids) < pipe.text_encoder.config.vocab_size
    assert max(t5_ids) < pipe.text_encoder_3.config.vocab_size
    assert pipe.tokenizer_3.unk_token_id in t5_ids  # the emoji
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            [odd, "a " * 100], None, None, do_classifier_free_guidance=False, max_sequence_length=8
        )
    assert torch.isfinite(embeds).all() and torch.isfinite(pooled).all()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_FLOW_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / f"tiny-sd3-{TINY_SD3_VERSION}"
    monkeypatch.delenv("TRL_FLOW_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "trl_flow" / f"tiny-sd3-{TINY_SD3_VERSION}"


def test_ensure_keeps_complete_build(tiny_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("ensure_tiny_sd3 rebuilt a complete build")

    monkeypatch.setattr(tiny, "_build_into", fail)
    weights = tiny_dir / "vae" / "diffusion_pytorch_model.safetensors"
    before = (weights.stat().st_mtime_ns, (tiny_dir / tiny.MARKER_FILE).stat().st_mtime_ns)
    start = time.perf_counter()
    assert ensure_tiny_sd3(tiny_dir) == tiny_dir
    assert time.perf_counter() - start < 1.0
    assert (weights.stat().st_mtime_ns, (tiny_dir / tiny.MARKER_FILE).stat().st_mtime_ns) == before


def test_ensure_rebuilds_incomplete_dir_deterministically(tiny_dir, tmp_path):
    threads = torch.get_num_threads()
    target = tmp_path / "incomplete"
    shutil.copytree(tiny_dir, target)
    (target / tiny.MARKER_FILE).unlink()
    (target / "stale.txt").write_text("left over from an interrupted copy")
    caller_threads = 1 if threads > 1 else 2  # not the fixture's count
    torch.set_num_threads(caller_threads)
    try:
        assert ensure_tiny_sd3(target) == target
        assert torch.get_num_threads() == caller_threads  # restored after the build
    finally:
        torch.set_num_threads(threads)
    assert (target / tiny.MARKER_FILE).is_file()
    assert not (target / "stale.txt").exists()
    # same seed, same machine, any thread count of the caller -> the same weights (a VAE trained on two threads
    # differs from one trained on one)
    for rel in ["vae/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors"]:
        assert (target / rel).read_bytes() == (tiny_dir / rel).read_bytes(), rel
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["incomplete"]


def _fake_build(path, name):
    path.mkdir()
    (path / "model_index.json").write_text("{}")
    (path / "who").write_text(name)


def test_install_loser_of_race_uses_complete_target(tmp_path):
    target = tmp_path / "sd3"
    _fake_build(target, "winner")
    (target / tiny.MARKER_FILE).write_text("{}")
    tmp = tmp_path / "tmp-build"
    _fake_build(tmp, "loser")
    tiny._install(tmp, target, keep_complete=True)
    assert (target / "who").read_text() == "winner"
    assert not tmp.exists()
    # an explicit build replaces it
    _fake_build(tmp, "new")
    tiny._install(tmp, target, keep_complete=False)
    assert (target / "who").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd3"]


def test_install_refuses_to_replace_unrelated_directory(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("do not delete")
    tmp = tmp_path / "tmp-build"
    _fake_build(tmp, "new")
    with pytest.raises(FileExistsError):
        tiny._install(tmp, target, keep_complete=True)
    assert (target / "thesis.tex").read_text() == "do not delete"
    assert not tmp.exists()


def test_a_build_on_a_nonzero_rank_writes_every_component(tmp_path, monkeypatch):
    """Under `accelerate launch` whichever rank takes the lock builds; transformers (>= 5.25) writes a model's weights
    only on rank 0 unless told otherwise, which left rank 1's tiny builds without a text encoder."""
    from transformers import AutoModel

    from trl_flow.offline_models.wan import build_tiny_wan

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: 1)
    path = build_tiny_wan(tmp_path / "wan")
    monkeypatch.undo()
    assert (path / "text_encoder" / "model.safetensors").is_file()
    AutoModel.from_pretrained(path / "text_encoder")
