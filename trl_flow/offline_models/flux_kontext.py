"""A tiny FLUX.1 Kontext pipeline built offline: the tiny FLUX's components (:mod:`.flux`) in a
``diffusers.FluxKontextPipeline``.

Kontext is FLUX.1-dev's architecture with the source image's tokens appended to the sequence, so the tiny FLUX's
transformer (guidance embedding, 16 packed channels), trained tiny VAE, text encoders, tokenizers and dynamically
shifted scheduler serve it unchanged; only the pipeline class (and its ``model_index.json``) differ. Built with seed 0
it reuses the cached tiny FLUX (no extra VAE training); other seeds build fresh FLUX components.

Usage::

    from diffusers import FluxKontextPipeline
    from trl_flow.offline_models.flux_kontext import ensure_tiny_flux_kontext

    pipe = FluxKontextPipeline.from_pretrained(ensure_tiny_flux_kontext())
    image = pipe("make it red", image=source, height=32, width=32, max_area=32 * 32, _auto_resize=False).images[0]
"""

from __future__ import annotations

import os
import pathlib

from .cache import SeededBuild

__all__ = ["TINY_FLUX_KONTEXT_VERSION", "build_tiny_flux_kontext", "ensure_tiny_flux_kontext"]

TINY_FLUX_KONTEXT_VERSION: str = "1"
"""Version of the build recipe (part of the default cache dir); bump it with the recipe or the tiny FLUX's."""


def _build_pipeline(seed: int):
    from diffusers import FluxKontextPipeline, FluxPipeline

    from . import flux

    if seed == 0:
        source, metrics = FluxPipeline.from_pretrained(flux.ensure_tiny_flux()), {"from": "tiny-flux (cached)"}
    else:
        source, metrics = flux._build_pipeline(seed)
    names = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
    pipe = FluxKontextPipeline(**{name: getattr(source, name) for name in names})
    return pipe, metrics


_BUILD = SeededBuild("tiny-flux-kontext", TINY_FLUX_KONTEXT_VERSION, _build_pipeline)


def build_tiny_flux_kontext(output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny FLUX.1 Kontext pipeline into ``output_dir`` and return the folder (:meth:`.SeededBuild.build`)."""
    return _BUILD.build(output_dir, seed)


def ensure_tiny_flux_kontext(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder of a complete tiny Kontext build at ``path`` (default ``~/.cache/trl_flow/tiny-flux-kontext-1``),
    built (seed 0) if needed."""
    return _BUILD.ensure(path)
