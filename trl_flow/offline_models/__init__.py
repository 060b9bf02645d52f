"""Offline builds: small diffusers pipelines made on the CPU from a seed, with nothing downloaded.

* :mod:`.sd3`, :mod:`.flux`, :mod:`.flux_kontext`, :mod:`.qwen_image`, :mod:`.qwen_image_edit`, :mod:`.wan`: tiny
  random-but-useful SD3 / FLUX.1 / FLUX.1 Kontext / Qwen-Image / Qwen-Image-Edit / Wan2.1 and two-expert Wan2.2
  pipelines for tests, examples and CPU smoke runs (``ensure_tiny_*`` builds one into the cache on first use);
* :mod:`.flux_kontext_edit`: the tiny FLUX.1 Kontext with its transformer pretrained to keep its source's shape
  in a colour the prompt does not choose (the base of the tiny edit task);
* :mod:`.mini_geneval`: the mini-GenEval SD3, pretrained on synthetic shapes (it ships built in
  ``trl_flow/mini/pretrained``; ``ensure_mini_sd3()`` returns that folder);

and the pieces they share: :mod:`.cache` (cache folder, completeness marker, lock, atomic install),
:mod:`.word_tokenizers` and :mod:`.text_encoders` (word-level tokenizers, small random CLIP/T5/Qwen2.5-VL encoders),
:mod:`.vae` (VAE construction, synthetic images, training, calibration), :mod:`.schedulers` (the dynamically
shifted flow-matching scheduler of FLUX and Qwen-Image).

The names below are importable from this package too; each loads its module (and diffusers) on first use only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "build_tiny_sd3": "sd3",
    "ensure_tiny_sd3": "sd3",
    "build_tiny_flux": "flux",
    "ensure_tiny_flux": "flux",
    "build_tiny_flux_kontext": "flux_kontext",
    "ensure_tiny_flux_kontext": "flux_kontext",
    "build_tiny_edit_kontext": "flux_kontext_edit",
    "ensure_tiny_edit_kontext": "flux_kontext_edit",
    "build_tiny_qwen_image": "qwen_image",
    "ensure_tiny_qwen_image": "qwen_image",
    "build_tiny_qwen_image_edit": "qwen_image_edit",
    "ensure_tiny_qwen_image_edit": "qwen_image_edit",
    "build_tiny_wan": "wan",
    "ensure_tiny_wan": "wan",
    "build_tiny_wan22": "wan",
    "ensure_tiny_wan22": "wan",
    "MiniBuildConfig": "mini_geneval",
    "build_mini_sd3": "mini_geneval",
    "ensure_mini_sd3": "mini_geneval",
}

__all__ = [
    "MiniBuildConfig",
    "build_mini_sd3",
    "build_tiny_edit_kontext",
    "build_tiny_flux",
    "build_tiny_flux_kontext",
    "build_tiny_qwen_image",
    "build_tiny_qwen_image_edit",
    "build_tiny_sd3",
    "build_tiny_wan",
    "build_tiny_wan22",
    "ensure_mini_sd3",
    "ensure_tiny_edit_kontext",
    "ensure_tiny_flux",
    "ensure_tiny_flux_kontext",
    "ensure_tiny_qwen_image",
    "ensure_tiny_qwen_image_edit",
    "ensure_tiny_sd3",
    "ensure_tiny_wan",
    "ensure_tiny_wan22",
]

if TYPE_CHECKING:
    from .flux import build_tiny_flux, ensure_tiny_flux
    from .flux_kontext import build_tiny_flux_kontext, ensure_tiny_flux_kontext
    from .flux_kontext_edit import build_tiny_edit_kontext, ensure_tiny_edit_kontext
    from .mini_geneval import MiniBuildConfig, build_mini_sd3, ensure_mini_sd3
    from .qwen_image import build_tiny_qwen_image, ensure_tiny_qwen_image
    from .qwen_image_edit import build_tiny_qwen_image_edit, ensure_tiny_qwen_image_edit
    from .sd3 import build_tiny_sd3, ensure_tiny_sd3
    from .wan import build_tiny_wan, build_tiny_wan22, ensure_tiny_wan, ensure_tiny_wan22


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
