"""Loading a diffusers pipeline from a hub id or a local folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import DiffusionPipeline

from ..errors import UserInputError
from .image_processors import qwen2vl_processor_without_torchvision


@contextlib.contextmanager
def without_zero3_init() -> Iterator[None]:
    """Load whole (not ZeRO-3-partitioned) modules even when a ZeRO-3 TrainingArguments exists.

    transformers builds every `from_pretrained` model under `deepspeed.zero.Init` once ZeRO-3 is configured, which
    leaves the pipeline's frozen text encoders as empty shards outside any DeepSpeed engine. Only the denoiser goes
    through `deepspeed.initialize` (and is gathered for rollouts); the frozen parts stay whole on each process.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers always ships it
        yield
        return
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_pipeline(name_or_path: str, dtype: str | torch.dtype | None = None, **kwargs) -> DiffusionPipeline:
    """`DiffusionPipeline.from_pretrained` from a hub id or a local folder, with an actionable error."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        with without_zero3_init():
            # Qwen-Image-Edit's processor needs torchvision to load unless it is built here without its video part.
            kwargs = {**qwen2vl_processor_without_torchvision(name_or_path), **kwargs}
            return DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype or torch.float32, **kwargs)
    except Exception as error:  # diffusers raises many types (OSError, ValueError, HF hub errors)
        raise UserInputError(
            f"could not load the diffusers pipeline {name_or_path!r}: {type(error).__name__}: {error}. Pass a "
            "local pipeline folder (with model_index.json) or a hub id that is cached or downloadable."
        ) from error
