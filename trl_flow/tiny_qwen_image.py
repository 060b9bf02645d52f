"""Build a tiny, random-but-useful Qwen-Image pipeline offline (a sibling of :mod:`trl_flow.tiny`'s tiny SD3).

The result is a directory that plain ``diffusers.QwenImagePipeline.from_pretrained(path)`` loads; nothing is
downloaded. It exercises what the Qwen-Image adapter must get right: the Qwen2.5-VL prompt template (whose first 34
tokens the pipeline drops), prompt embeddings of different lengths with their masks, true CFG with the pipeline's
norm rescaling, packed 2x2-patch latents, the per-channel latent normalisation and the single-frame 3D VAE.

What is inside:

* ``tokenizer``: a byte-level BPE :class:`~transformers.Qwen2Tokenizer` (Qwen2's pre-tokenizer) whose merges make
  every word of the tiny word list, with and without a leading space, a single token; the chat special tokens
  (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, vision markers) are added tokens. Other text falls back to
  bytes. The pipeline's prompt template prefix tokenizes to exactly 34 tokens, as with the real tokenizer, so the
  pipeline's ``prompt_template_encode_start_idx`` drops the template and keeps the prompt (checked at build time).
* ``text_encoder``: a 2-layer :class:`~transformers.Qwen2_5_VLForConditionalGeneration` (hidden size 64, M-RoPE,
  a 1-block vision tower that text-to-image never runs), randomly initialised.
* ``transformer``: a 2-block :class:`~diffusers.QwenImageTransformer2DModel` (inner dim 64), random, with the text
  stream's value projections scaled up so that the prompt moves the velocity as much as in the tiny FLUX (~5%).
* ``vae``: a small :class:`~diffusers.AutoencoderKLQwenImage` (4x spatial downsampling, no temporal downsampling,
  4 latent channels; the real one has 8x and 16), trained at build time to reconstruct the synthetic images of
  :func:`trl_flow.tiny.synthetic_images` (a random VAE paints every latent the same flat colour); its
  ``latents_mean``/``latents_std`` are then set per channel from latent statistics, as the real config does.
  This 3D VAE learns far more slowly per step than the 2D one of the tiny SD3, so it trains on 16x16 images (it is
  convolutional; it is used at 32x32) for 1200 small steps: ~40 s of CPU time on one core, most of the build.
* ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` configured as Qwen-Image's (dynamic
  exponential shifting, ``base_shift`` 0.5, ``max_shift`` 0.9, sequence lengths 256..8192, shift terminal 0.02).

Usage::

    from diffusers import QwenImagePipeline
    from trl_flow.tiny_qwen_image import ensure_tiny_qwen_image

    pipe = QwenImagePipeline.from_pretrained(ensure_tiny_qwen_image())
    image = pipe("a red square", negative_prompt=" ", true_cfg_scale=4.0, height=32, width=32,
                 num_inference_steps=4).images[0]
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import torch

from . import tiny

__all__ = [
    "TINY_QWEN_IMAGE_VERSION",
    "build_tiny_qwen_image",
    "default_qwen_image_cache_dir",
    "ensure_tiny_qwen_image",
]

TINY_QWEN_IMAGE_VERSION: str = "1"
"""Version of the build recipe. Bump it whenever the recipe changes; it is part of the default cache dir."""

_TEXT_DIM = 64
_HEADS, _HEAD_DIM = 4, 16
_ROPE_AXES = (4, 6, 6)  # sums to the head dim, as Qwen-Image's (16, 56, 56) sums to 128
_TEXT_VALUE_GAIN = 8.0  # see _build_transformer
_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Words of the pipeline's prompt template (with their casing) that are not in the tiny word list.
_TEMPLATE_WORDS = (
    "system user assistant Describe describe detailing size texture quantity text spatial relationships objects"
)

# VAE training recipe (see _train_vae). Smaller than the tiny SD3 one: 3D convolutions cost more on a CPU.
_VAE_BASE_DIM = 16
_VAE_RES_BLOCKS = 0
_VAE_TRAIN_STEPS = 1200  # 400 steps: solid-colour error ~0.2; 1200: ~0.06
_VAE_BATCH_SIZE = 8
_VAE_LR = 3e-3
_VAE_TRAIN_SIZE = 16
_VAE_KL_WEIGHT = 1e-3
# Sanity checks run at the end of every build (see tiny.py). Measured with seed 0: 0.062 and 0.23.
_MAX_SOLID_COLOUR_MAE = 0.2
_MIN_RANDOM_LATENT_DIFF = 0.05


def default_qwen_image_cache_dir() -> pathlib.Path:
    """``tiny-qwen-image-{version}`` next to the tiny SD3 build (under ``$TRL_FLOW_CACHE`` or ``~/.cache/trl_flow``)."""
    return tiny.default_cache_dir().parent / f"tiny-qwen-image-{TINY_QWEN_IMAGE_VERSION}"


# ---------------------------------------------------------------------------------------------------------
# tokenizer


def _greedy_merges(symbol_sequences: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    """Greedy BPE over the given symbol sequences (each counted once) until every sequence is one symbol.

    The most frequent adjacent pair is merged first, ties broken by the pair itself, so the merges are deterministic
    and re-applying them in rank order turns every training sequence into a single symbol.
    """
    seqs = [list(seq) for seq in symbol_sequences]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq[:-1], seq[1:], strict=True):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for i, seq in enumerate(seqs):
            merged: list[str] = []
            j = 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    merged.append(seq[j] + seq[j + 1])
                    j += 2
                else:
                    merged.append(seq[j])
                    j += 1
            seqs[i] = merged


def _build_tokenizer():
    """A byte-level BPE :class:`~transformers.Qwen2Tokenizer` over the tiny word list and the template words."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    words = sorted(set(tiny._vocab_words()) | set(_TEMPLATE_WORDS.split()))
    # Byte-level symbols: ASCII letters map to themselves, a leading space to "Ġ".
    forms = words + ["\u0120" + w for w in words]
    merges = _greedy_merges(forms)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    seen = set(tokens)
    for left, right in merges:
        if left + right not in seen:
            seen.add(left + right)
            tokens.append(left + right)
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(merges), model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIAL_TOKENS[1:])})
    tokenizer.padding_side = "right"
    bad = [w for w in forms if len(tokenizer(w.replace("\u0120", " "), add_special_tokens=False).input_ids) != 1]
    if bad:
        raise RuntimeError(f"tiny Qwen tokenizer splits vocabulary words: {bad[:10]}")
    return tokenizer


def _check_template(pipe) -> None:
    """The pipeline drops the first ``prompt_template_encode_start_idx`` tokens of its prompt template: with this
    tokenizer they must be exactly the template's prefix (34 tokens, as with the real Qwen2.5 tokenizer), or the
    prompt itself would be cut."""
    prefix = pipe.prompt_template_encode.split("{}")[0]
    count = len(pipe.tokenizer(prefix).input_ids)
    if count != pipe.prompt_template_encode_start_idx:
        raise RuntimeError(
            f"tiny Qwen tokenizer encodes the template prefix to {count} tokens, the pipeline drops "
            f"{pipe.prompt_template_encode_start_idx}"
        )


# ---------------------------------------------------------------------------------------------------------
# models


def _build_text_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": _TEXT_DIM,
            "intermediate_size": 2 * _TEXT_DIM,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6,
            # M-RoPE: the head dim's 8 rotary frequencies split over (time, height, width) positions
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": _TEXT_DIM,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _build_transformer():
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * tiny.TINY_LATENT_CHANNELS,  # one packed 2x2 patch of latent channels per token
        out_channels=tiny.TINY_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=_TEXT_DIM,
        axes_dims_rope=_ROPE_AXES,
    ).eval()
    with torch.no_grad():
        # Qwen-Image has no pooled-text path: the prompt reaches image tokens only through joint attention, and at
        # random init it moves the velocity by ~0.5%. Larger text values bring that to ~5%, as in the tiny FLUX.
        for block in transformer.transformer_blocks:
            block.attn.add_v_proj.weight.mul_(_TEXT_VALUE_GAIN)
    return transformer


def _build_vae():
    from diffusers import AutoencoderKLQwenImage

    channels = tiny.TINY_LATENT_CHANNELS
    vae = AutoencoderKLQwenImage(
        base_dim=_VAE_BASE_DIM,
        z_dim=channels,
        dim_mult=[1, 1, 1],  # two spatial downsamplings: 4x
        num_res_blocks=_VAE_RES_BLOCKS,
        attn_scales=[],
        temperal_downsample=[False, False],
        latents_mean=[0.0] * channels,
        latents_std=[1.0] * channels,
    )
    with torch.no_grad():
        # Start with a small posterior std so that sampling noise does not swamp the untrained latents.
        vae.quant_conv.weight[channels:].mul_(0.1)
        vae.quant_conv.bias[channels:].fill_(-6.0)
    return vae


def _train_vae(vae, seed: int, steps: int = _VAE_TRAIN_STEPS) -> None:
    """Train ``vae`` in place to reconstruct single-frame :func:`trl_flow.tiny.synthetic_images` in ``[-1, 1]``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=_VAE_LR, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=_VAE_LR, total_steps=steps, pct_start=0.1)
    vae.train()
    with torch.enable_grad():
        for _ in range(steps):
            images = (tiny.synthetic_images(_VAE_BATCH_SIZE, generator, size=_VAE_TRAIN_SIZE) * 2 - 1).unsqueeze(2)
            posterior = vae.encode(images).latent_dist
            latents = posterior.sample(generator=generator)
            # The decoder clamps to [-1, 1]; train on the unclamped output so saturated pixels still get gradients.
            recon = vae.decoder(vae.post_quant_conv(latents))
            err = recon - images
            kl = posterior.kl().mean() / latents[0].numel()
            coarse = torch.nn.functional.avg_pool2d(err[:, :, 0], 8).square().mean()
            loss = err.abs().mean() + err.square().mean() + 2.0 * coarse + _VAE_KL_WEIGHT * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
    vae.eval()
    vae.requires_grad_(False)


@torch.no_grad()
def _calibrate_vae(vae, seed: int) -> dict[str, float]:
    """Set per-channel ``latents_mean``/``latents_std`` from latent statistics; check the VAE; return the metrics."""
    generator = torch.Generator().manual_seed(seed + 1)
    images = (tiny.synthetic_images(256, generator) * 2 - 1).unsqueeze(2)
    latents = vae.encode(images).latent_dist.mode()
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(
        latents_mean=[round(float(m), 6) for m in mean], latents_std=[round(float(s), 6) for s in std]
    )
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)

    def decode01(z: torch.Tensor) -> torch.Tensor:
        return (vae.decode(z * std + mean).sample[:, :, 0] / 2 + 0.5).clamp(0, 1)

    palette = torch.tensor(tiny._PALETTE, dtype=torch.float32)[:, :, None, None]
    solids = palette.expand(-1, 3, tiny.TINY_IMAGE_SIZE, tiny.TINY_IMAGE_SIZE)
    solid_latents = (vae.encode((solids * 2 - 1).unsqueeze(2)).latent_dist.mode() - mean) / std
    solid_mae = float((decode01(solid_latents) - solids).abs().mean())
    noise = torch.randn(32, *latents.shape[1:], generator=generator)
    decoded = decode01(noise)
    random_diff = float((decoded[::2] - decoded[1::2]).abs().mean())
    metrics = {"solid_colour_mae": solid_mae, "random_latent_diff": random_diff}
    if solid_mae > _MAX_SOLID_COLOUR_MAE or random_diff < _MIN_RANDOM_LATENT_DIFF:
        raise RuntimeError(f"tiny Qwen-Image VAE training failed its sanity check: {metrics}")
    return metrics


# ---------------------------------------------------------------------------------------------------------
# build / install


def _build_pipeline(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    torch.manual_seed(seed)
    tokenizer = _build_tokenizer()
    text_encoder = _build_text_encoder(tokenizer)
    transformer = _build_transformer()
    vae = _build_vae()
    _train_vae(vae, seed)
    metrics = _calibrate_vae(vae, seed)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    _check_template(pipe)
    return pipe, metrics


def _build_into(target: pathlib.Path, seed: int, keep_complete: bool) -> pathlib.Path:
    marker = {"version": TINY_QWEN_IMAGE_VERSION, "seed": seed}
    return tiny.save_build(target, lambda: _build_pipeline(seed), marker, keep_complete)


def build_tiny_qwen_image(output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny Qwen-Image pipeline and save it to ``output_dir``; return the directory as a path.

    Deterministic for a ``seed`` (on a given machine/thread count); ~45 s on 2 CPU cores, mostly VAE training.
    Written to a temporary sibling directory and renamed into place once complete (marker file last), so readers
    never see a partial build; the caller's global torch RNG state is left untouched. Replacement rules are those
    of :func:`trl_flow.tiny.build_tiny_sd3`.
    """
    target = pathlib.Path(output_dir).expanduser().absolute()
    return _build_into(target, seed, keep_complete=False)


def ensure_tiny_qwen_image(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the directory of a complete tiny Qwen-Image build at ``path`` (default
    :func:`default_qwen_image_cache_dir`), building it (seed 0) if needed; concurrent callers are serialised by a
    lock file next to it."""
    target = pathlib.Path(path if path is not None else default_qwen_image_cache_dir()).expanduser().absolute()
    return tiny.ensure_build(target, lambda folder: _build_into(folder, seed=0, keep_complete=True))
