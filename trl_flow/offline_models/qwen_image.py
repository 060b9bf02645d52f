"""Build a tiny, random-but-useful Qwen-Image pipeline offline (a sibling of :mod:`.sd3`'s tiny SD3).

The result is a directory that plain ``diffusers.QwenImagePipeline.from_pretrained(path)`` loads; nothing is
downloaded. It exercises what the Qwen-Image adapter must get right: the Qwen2.5-VL prompt template (whose first 34
tokens the pipeline drops), prompt embeddings of different lengths with their masks, true CFG with the pipeline's
norm rescaling, packed 2x2-patch latents, the per-channel latent normalisation and the single-frame 3D VAE.

What is inside:

* ``tokenizer``: a byte-level BPE :class:`~transformers.Qwen2Tokenizer` (:func:`.build_qwen_tokenizer`) whose merges
  make every word of the tiny word list, with and without a leading space, a single token; the chat special tokens
  (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, vision markers) are added tokens. Other text falls back to
  bytes. The pipeline's prompt template prefix tokenizes to exactly 34 tokens, as with the real tokenizer, so the
  pipeline's ``prompt_template_encode_start_idx`` drops the template and keeps the prompt (checked at build time).
* ``text_encoder``: a 2-layer :class:`~transformers.Qwen2_5_VLForConditionalGeneration` (hidden size 64, M-RoPE,
  a 1-block vision tower that text-to-image never runs), randomly initialised.
* ``transformer``: a 2-block :class:`~diffusers.QwenImageTransformer2DModel` (inner dim 64), random, with the text
  stream's value projections scaled up so that the prompt moves the velocity as much as in the tiny FLUX (~5%).
* ``vae``: a small :class:`~diffusers.AutoencoderKLQwenImage` (4x spatial downsampling, no temporal downsampling,
  4 latent channels; the real one has 8x and 16), trained at build time to reconstruct the synthetic images of
  :func:`.synthetic_images` (a random VAE paints every latent the same flat colour); its
  ``latents_mean``/``latents_std`` are then set per channel from latent statistics, as the real config does.
  This 3D VAE learns far more slowly per step than the 2D one of the tiny SD3, so it trains on 16x16 images (it is
  convolutional; it is used at 32x32) for 1200 small steps: ~40 s of CPU time on one core, most of the build
  (:data:`.QWEN_VAE_RECIPE`).
* ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` configured as Qwen-Image's (dynamic
  exponential shifting, ``base_shift`` 0.5, ``max_shift`` 0.9, sequence lengths 256..8192, shift terminal 0.02).

Usage::

    from diffusers import QwenImagePipeline
    from trl_flow.offline_models.qwen_image import ensure_tiny_qwen_image

    pipe = QwenImagePipeline.from_pretrained(ensure_tiny_qwen_image())
    image = pipe("a red square", negative_prompt=" ", true_cfg_scale=4.0, height=32, width=32,
                 num_inference_steps=4).images[0]
"""

from __future__ import annotations

import os
import pathlib

import torch

from .cache import SeededBuild
from .schedulers import dynamic_shift_scheduler
from .text_encoders import qwen_text_encoder
from .vae import TINY_LATENT_CHANNELS, trained_tiny_qwen_vae
from .word_tokenizers import build_qwen_tokenizer

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


def _build_transformer():
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * TINY_LATENT_CHANNELS,  # one packed 2x2 patch of latent channels per token
        out_channels=TINY_LATENT_CHANNELS,
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


def _build_pipeline(seed: int):
    from diffusers import QwenImagePipeline

    torch.manual_seed(seed)  # the text encoder, the transformer and the VAE are drawn in this order
    tokenizer = build_qwen_tokenizer()
    text_encoder = qwen_text_encoder(tokenizer, _TEXT_DIM)
    transformer = _build_transformer()
    vae, metrics = trained_tiny_qwen_vae(seed)
    scheduler = dynamic_shift_scheduler(
        shift=1.0, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential"
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    _check_template(pipe)
    return pipe, metrics


_BUILD = SeededBuild("tiny-qwen-image", TINY_QWEN_IMAGE_VERSION, _build_pipeline)


def default_qwen_image_cache_dir() -> pathlib.Path:
    """``tiny-qwen-image-{version}`` under ``$TRL_FLOW_CACHE`` (or ``~/.cache/trl_flow``), next to the tiny SD3."""
    return _BUILD.default_dir()


def build_tiny_qwen_image(output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny Qwen-Image pipeline into ``output_dir`` and return the folder (:meth:`.SeededBuild.build`); ~45 s
    on 2 CPU cores, mostly VAE training."""
    return _BUILD.build(output_dir, seed)


def ensure_tiny_qwen_image(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder of a complete tiny Qwen-Image build at ``path`` (default :func:`default_qwen_image_cache_dir`),
    built (seed 0) if needed (:meth:`.SeededBuild.ensure`)."""
    return _BUILD.ensure(path)
