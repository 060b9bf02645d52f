"""Build a tiny, random-but-useful FLUX.1 pipeline offline (a sibling of :mod:`trl_flow.tiny`'s tiny SD3).

The result is a directory that plain ``diffusers.FluxPipeline.from_pretrained(path)`` loads; nothing is downloaded.
It exercises everything the FLUX adapter must get right: packed 2x2-patch latents, the guidance embedding of
FLUX.1-dev, CLIP pooled + T5 sequence text conditioning, image/text position ids and the dynamically shifted
schedule.

What is inside:

* ``transformer``: a :class:`~diffusers.FluxTransformer2DModel` with 2 double-stream and 2 single-stream blocks
  (inner dim 64), ``guidance_embeds=True`` like FLUX.1-dev, randomly initialised from ``seed``.
* ``vae``: the tiny trained :class:`~diffusers.AutoencoderKL` recipe of :mod:`trl_flow.tiny` (4x downsampling, 4
  latent channels; real FLUX has 8x and 16), so 32x32 images are 4x8x8 latents, i.e. 16 packed tokens of 16
  channels. It is trained at build time (~10 s) so that latents reach pixels (a random VAE paints every latent the
  same flat colour).
* ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` configured as FLUX.1-dev's (dynamic shifting,
  ``base_shift`` 0.5, ``max_shift`` 1.15, sequence lengths 256..4096).
* ``text_encoder``: a small :class:`~transformers.CLIPTextModel` (hidden size 32; FLUX uses its pooled output) and
  ``text_encoder_2``: a small :class:`~transformers.T5EncoderModel` (d_model 64), with the word-list tokenizers of
  :mod:`trl_flow.tiny`.

Usage::

    from diffusers import FluxPipeline
    from trl_flow.tiny_flux import ensure_tiny_flux

    pipe = FluxPipeline.from_pretrained(ensure_tiny_flux())
    image = pipe("a red square", height=32, width=32, num_inference_steps=4, max_sequence_length=16).images[0]
"""

from __future__ import annotations

import os
import pathlib

import torch

from . import tiny

__all__ = ["TINY_FLUX_VERSION", "build_tiny_flux", "default_flux_cache_dir", "ensure_tiny_flux"]

TINY_FLUX_VERSION: str = "1"
"""Version of the build recipe. Bump it whenever the recipe changes; it is part of the default cache dir."""

_CLIP_DIM = 32
_T5_DIM = 64
_HEADS, _HEAD_DIM = 4, 16
_ROPE_AXES = (4, 6, 6)  # sums to the head dim, as FLUX's (16, 56, 56) sums to 128


def default_flux_cache_dir() -> pathlib.Path:
    """``tiny-flux-{TINY_FLUX_VERSION}`` next to the tiny SD3 build (``$TRL_FLOW_CACHE`` or ``~/.cache/trl_flow``)."""
    return tiny.default_cache_dir().parent / f"tiny-flux-{TINY_FLUX_VERSION}"


def _build_text_encoders(clip_tokenizer, t5_tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=_CLIP_DIM,
            intermediate_size=2 * _CLIP_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=clip_tokenizer.model_max_length,
            hidden_act="gelu",
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=_T5_DIM,
            d_kv=16,
            d_ff=2 * _T5_DIM,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
        )
    ).eval()
    return clip, t5


def _build_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * tiny.TINY_LATENT_CHANNELS,  # one packed 2x2 patch of latent channels per token
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
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(seed)
    clip_tokenizer = tiny._build_clip_tokenizer()
    t5_tokenizer = tiny._build_t5_tokenizer()
    text_encoder, text_encoder_2 = _build_text_encoders(clip_tokenizer, t5_tokenizer)
    transformer = _build_transformer()
    vae = tiny._build_vae()
    tiny._train_vae(vae, seed)
    metrics = tiny._calibrate_vae(vae, seed)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
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


def _build_into(target: pathlib.Path, seed: int, keep_complete: bool) -> pathlib.Path:
    marker = {"version": TINY_FLUX_VERSION, "seed": seed}
    return tiny.save_build(target, lambda: _build_pipeline(seed), marker, keep_complete)


def build_tiny_flux(output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny FLUX pipeline and save it to ``output_dir``; return the directory as a path.

    Deterministic for a ``seed`` (on a given machine/thread count); ~15 s on 2 CPU cores, mostly VAE training.
    Written to a temporary sibling directory and renamed into place once complete (marker file last), so readers
    never see a partial build; the caller's global torch RNG state is left untouched. Replacement rules are those
    of :func:`trl_flow.tiny.build_tiny_sd3`.
    """
    target = pathlib.Path(output_dir).expanduser().absolute()
    return _build_into(target, seed, keep_complete=False)


def ensure_tiny_flux(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the directory of a complete tiny FLUX build at ``path`` (default :func:`default_flux_cache_dir`),
    building it (seed 0) if needed; concurrent callers are serialised by a lock file next to it."""
    target = pathlib.Path(path if path is not None else default_flux_cache_dir()).expanduser().absolute()
    return tiny.ensure_build(target, lambda folder: _build_into(folder, seed=0, keep_complete=True))
