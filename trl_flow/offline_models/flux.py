"""Build a tiny, random-but-useful FLUX.1 pipeline offline (a sibling of :mod:`.sd3`'s tiny SD3).

The result is a directory that plain ``diffusers.FluxPipeline.from_pretrained(path)`` loads; nothing is downloaded.
It exercises everything the FLUX adapter must get right: packed 2x2-patch latents, the guidance embedding of
FLUX.1-dev, CLIP pooled + T5 sequence text conditioning, image/text position ids and the dynamically shifted
schedule.

What is inside:

* ``transformer``: a :class:`~diffusers.FluxTransformer2DModel` with 2 double-stream and 2 single-stream blocks
  (inner dim 64), ``guidance_embeds=True`` like FLUX.1-dev, randomly initialised from ``seed``.
* ``vae``: the tiny trained :class:`~diffusers.AutoencoderKL` recipe of the tiny SD3 (:func:`.trained_tiny_vae`: 4x
  downsampling, 4 latent channels; real FLUX has 8x and 16), so 32x32 images are 4x8x8 latents, i.e. 16 packed
  tokens of 16 channels. It is trained at build time (~10 s) so that latents reach pixels (a random VAE paints every
  latent the same flat colour).
* ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` configured as FLUX.1-dev's (dynamic shifting,
  ``base_shift`` 0.5, ``max_shift`` 1.15, sequence lengths 256..4096).
* ``text_encoder``: a small :class:`~transformers.CLIPTextModel` (hidden size 32; FLUX uses its pooled output) and
  ``text_encoder_2``: a small :class:`~transformers.T5EncoderModel` (d_model 64), with the word-level tokenizers of
  :mod:`.word_tokenizers`.

Usage::

    from diffusers import FluxPipeline
    from trl_flow.offline_models.flux import ensure_tiny_flux

    pipe = FluxPipeline.from_pretrained(ensure_tiny_flux())
    image = pipe("a red square", height=32, width=32, num_inference_steps=4, max_sequence_length=16).images[0]
"""

from __future__ import annotations

import os
import pathlib

import torch

from .cache import SeededBuild
from .schedulers import dynamic_shift_scheduler
from .text_encoders import clip_text_encoder, t5_encoder
from .vae import TINY_LATENT_CHANNELS, trained_tiny_vae
from .word_tokenizers import build_clip_tokenizer, build_t5_tokenizer

__all__ = ["TINY_FLUX_VERSION", "build_tiny_flux", "default_flux_cache_dir", "ensure_tiny_flux"]

TINY_FLUX_VERSION: str = "1"
"""Version of the build recipe. Bump it whenever the recipe changes; it is part of the default cache dir."""

_CLIP_DIM = 32
_T5_DIM = 64
_HEADS, _HEAD_DIM = 4, 16
_ROPE_AXES = (4, 6, 6)  # sums to the head dim, as FLUX's (16, 56, 56) sums to 128


def _build_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * TINY_LATENT_CHANNELS,  # one packed 2x2 patch of latent channels per token
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=_T5_DIM,
        pooled_projection_dim=_CLIP_DIM,
        guidance_embeds=True,
        axes_dims_rope=_ROPE_AXES,
    ).eval()


def _build_pipeline(seed: int):
    from diffusers import FluxPipeline

    torch.manual_seed(seed)  # the encoders, the transformer and the VAE are drawn in this order
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    text_encoder = clip_text_encoder(clip_tokenizer, _CLIP_DIM, with_projection=False)
    text_encoder_2 = t5_encoder(t5_tokenizer, _T5_DIM)
    transformer = _build_transformer()
    vae, metrics = trained_tiny_vae(seed, name="FLUX")
    scheduler = dynamic_shift_scheduler(shift=3.0, max_shift=1.15, max_image_seq_len=4096)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    return pipe, metrics


_BUILD = SeededBuild("tiny-flux", TINY_FLUX_VERSION, _build_pipeline)


def default_flux_cache_dir() -> pathlib.Path:
    """``tiny-flux-{version}`` under ``$TRL_FLOW_CACHE`` (or ``~/.cache/trl_flow``), next to the tiny SD3."""
    return _BUILD.default_dir()


def build_tiny_flux(output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny FLUX pipeline into ``output_dir`` and return the folder (:meth:`.SeededBuild.build`); ~15 s on
    2 CPU cores, mostly VAE training."""
    return _BUILD.build(output_dir, seed)


def ensure_tiny_flux(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder of a complete tiny FLUX build at ``path`` (default :func:`default_flux_cache_dir`), built (seed 0)
    if needed (:meth:`.SeededBuild.ensure`)."""
    return _BUILD.ensure(path)
