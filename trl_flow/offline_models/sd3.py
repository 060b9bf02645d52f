"""Build a tiny, random-but-useful Stable Diffusion 3 pipeline offline.

The result is a directory that plain ``diffusers.StableDiffusion3Pipeline.from_pretrained(path)`` loads. It
is meant for tests, examples and CPU smoke runs of the Flow-GRPO trainer; nothing is downloaded.

What is inside:

* ``transformer``: a 2-layer :class:`~diffusers.SD3Transformer2DModel` (inner dim 64), randomly initialised
  from ``seed``. The RL trainer trains LoRA adapters on it.
* ``vae``: a small :class:`~diffusers.AutoencoderKL` with 4x spatial downsampling (32x32 RGB images <-> 4x8x8
  latents), trained briefly at build time (a few hundred seeded Adam steps, ~10 s on 2 CPU cores) to reconstruct
  synthetic images, with ``scaling_factor``/``shift_factor`` set from the latent statistics (see :mod:`.vae`).
* ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with ``shift=3.0`` (as SD3.5).
* ``text_encoder``/``text_encoder_2``: two small :class:`~transformers.CLIPTextModelWithProjection`
  (hidden sizes 32 and 48, like CLIP-L/CLIP-G in miniature) with a word-level :class:`~transformers.CLIPTokenizer`.
* ``text_encoder_3``: a small :class:`~transformers.T5EncoderModel` with a word-level
  :class:`~transformers.T5Tokenizer` (see :mod:`.word_tokenizers`).

The shared SD3 pieces (:func:`sd3_text_stack`, :func:`sd3_transformer`, :func:`sd3_pipeline`) also make the
mini-GenEval model (:mod:`.mini_geneval`).

Usage::

    from diffusers import StableDiffusion3Pipeline
    from trl_flow.offline_models.sd3 import TINY_IMAGE_SIZE, TINY_MAX_SEQUENCE_LENGTH, ensure_tiny_sd3

    pipe = StableDiffusion3Pipeline.from_pretrained(ensure_tiny_sd3())
    image = pipe(
        "a red square",
        height=TINY_IMAGE_SIZE,
        width=TINY_IMAGE_SIZE,
        num_inference_steps=4,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
    ).images[0]
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from trl_flow.models.sd3 import SD3_ADALN_LORA_TARGETS, SD3Adapter

from .cache import MARKER_FILE, SeededBuild, absolute_path, ensure_build
from .cache import _install as _install  # re-exported: tests/test_tiny.py tests the install rules through here
from .text_encoders import clip_text_encoder, t5_encoder
from .vae import TINY_IMAGE_SIZE, TINY_LATENT_CHANNELS, TINY_VAE_DOWNSAMPLE, synthetic_images, trained_tiny_vae
from .word_tokenizers import build_clip_tokenizer, build_t5_tokenizer

__all__ = [
    "MARKER_FILE",
    "TINY_IMAGE_SIZE",
    "TINY_LATENT_CHANNELS",
    "TINY_MAX_SEQUENCE_LENGTH",
    "TINY_SD3_LORA_TARGETS",
    "TINY_SD3_VERSION",
    "SD3TextStack",
    "build_tiny_sd3",
    "default_cache_dir",
    "ensure_tiny_sd3",
    "sd3_pipeline",
    "sd3_text_stack",
    "sd3_transformer",
    "synthetic_images",
]

TINY_SD3_VERSION: str = "1"
"""Version of the build recipe. Bump it whenever the recipe changes; it is part of the default cache dir."""

TINY_MAX_SEQUENCE_LENGTH: int = 16
"""Recommended ``max_sequence_length`` (T5 tokens) for the tiny pipeline; the diffusers default is 256."""

TINY_SD3_LORA_TARGETS: tuple[str, ...] = (
    *SD3Adapter.default_lora_target_modules,
    *SD3_ADALN_LORA_TARGETS,
    "time_text_embed.text_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2",
)
"""LoRA targets of the tiny runs (recipes/tiny.yaml, tests, benchmarks): the paper's attention projections plus the
pooled-text -> AdaLN path, which carries the prompt most directly into a random tiny transformer (real SD3.5
recipes keep the attention-only targets)."""

# Text encoder sizes. The pipeline concatenates the two CLIP hidden states (32 + 48 = 80), zero-pads them to
# the T5 width (96) and concatenates the pooled CLIP projections (32 + 48 = 80).
_CLIP_DIMS = (32, 48)
_T5_DIM = 96


@dataclass
class SD3TextStack:
    """The tokenizers and frozen random text encoders of an SD3 pipeline (both CLIPs share one tokenizer)."""

    clip_tokenizer: Any
    t5_tokenizer: Any
    text_encoder: Any
    text_encoder_2: Any
    text_encoder_3: Any

    @property
    def joint_attention_dim(self) -> int:
        """Width of the prompt sequence the transformer attends to (T5's)."""
        return self.text_encoder_3.config.d_model

    @property
    def pooled_projection_dim(self) -> int:
        """Width of the pooled prompt embedding (both CLIP projections, concatenated)."""
        return self.text_encoder.config.projection_dim + self.text_encoder_2.config.projection_dim


def sd3_text_stack(clip_max_length: int | None = None) -> SD3TextStack:
    """Word-level tokenizers and random CLIP x2 (widths 32, 48) + T5 (width 96) encoders, from the global torch RNG.

    ``clip_max_length``: what the pipeline pads CLIP prompts to (its ``tokenizer.model_max_length``; default 77).
    """
    clip_tokenizer = build_clip_tokenizer()
    if clip_max_length is not None:
        clip_tokenizer.model_max_length = clip_max_length
    t5_tokenizer = build_t5_tokenizer()
    clip_l, clip_g = (clip_text_encoder(clip_tokenizer, dim, with_projection=True) for dim in _CLIP_DIMS)
    t5 = t5_encoder(t5_tokenizer, _T5_DIM)
    return SD3TextStack(clip_tokenizer, t5_tokenizer, clip_l, clip_g, t5)


def sd3_transformer(
    text: SD3TextStack,
    *,
    sample_size: int,
    num_layers: int,
    head_dim: int,
    heads: int,
    caption_projection_dim: int,
    latent_channels: int = TINY_LATENT_CHANNELS,
):
    """A random :class:`~diffusers.SD3Transformer2DModel` (patch 2, RMS QK-norm) sized to ``text``'s encoders, with
    positions for up to 16 patches per side."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text.joint_attention_dim,
        caption_projection_dim=caption_projection_dim,
        pooled_projection_dim=text.pooled_projection_dim,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
    )


def sd3_pipeline(text: SD3TextStack, transformer, vae, shift: float):
    """Assemble a :class:`~diffusers.StableDiffusion3Pipeline` with a ``FlowMatchEulerDiscreteScheduler(shift)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=text.text_encoder,
        tokenizer=text.clip_tokenizer,
        text_encoder_2=text.text_encoder_2,
        tokenizer_2=text.clip_tokenizer,
        text_encoder_3=text.text_encoder_3,
        tokenizer_3=text.t5_tokenizer,
    )


def _build_pipeline(seed: int):
    torch.manual_seed(seed)  # the encoders, the transformer and the VAE are drawn in this order
    text = sd3_text_stack()
    heads, head_dim = 4, 16
    transformer = sd3_transformer(
        text,
        sample_size=TINY_IMAGE_SIZE // TINY_VAE_DOWNSAMPLE,
        num_layers=2,
        head_dim=head_dim,
        heads=heads,
        caption_projection_dim=heads * head_dim,
    ).eval()
    vae, metrics = trained_tiny_vae(seed)
    return sd3_pipeline(text, transformer, vae, shift=3.0), metrics


_BUILD = SeededBuild("tiny-sd3", TINY_SD3_VERSION, _build_pipeline)


def default_cache_dir() -> pathlib.Path:
    """Return the default location of the tiny SD3 build.

    ``$TRL_FLOW_CACHE`` (or ``~/.cache/trl_flow`` when unset) joined with ``tiny-sd3-{TINY_SD3_VERSION}``.
    """
    return _BUILD.default_dir()


def _build_into(target: pathlib.Path, seed: int, keep_complete: bool) -> pathlib.Path:
    # A module-level name that both entry points go through: tests replace it to see that a complete build is kept.
    return _BUILD.build_into(target, seed, keep_complete)


def build_tiny_sd3(output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny SD3 pipeline and save it to ``output_dir``; return the directory as a path.

    The build is deterministic for a given ``seed`` (on a given machine/thread count), takes ~15 s on 2 CPU
    cores (mostly VAE training) and occupies ~3 MB. It is written into a temporary directory next to
    ``output_dir`` and renamed into place once complete, with the marker file :data:`MARKER_FILE` written
    last, so readers never see a partial build. An existing previous build (or empty directory) at
    ``output_dir`` is replaced; any other non-empty directory raises :class:`FileExistsError`. The caller's
    global torch RNG state is left untouched.
    """
    return _build_into(absolute_path(output_dir), seed, keep_complete=False)


def ensure_tiny_sd3(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the directory of a complete tiny SD3 build at ``path``, building it (seed 0) if needed.

    ``path`` defaults to :func:`default_cache_dir`. A directory counts as complete when it contains the marker
    file; one without it is rebuilt. Concurrent callers are serialised by a lock file next to the directory
    where ``fcntl`` is available; without it they may build in parallel but never corrupt the result (the
    loser of the final rename uses the winner's build).
    """
    target = absolute_path(path if path is not None else default_cache_dir())
    return ensure_build(target, lambda folder: _build_into(folder, seed=0, keep_complete=True))
