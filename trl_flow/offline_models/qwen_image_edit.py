"""Build a tiny Qwen-Image-Edit pipeline offline, on top of the tiny Qwen-Image (:mod:`.qwen_image`).

The result is a directory that ``diffusers.QwenImageEditPipeline.from_pretrained(path)`` loads (without torchvision,
pass ``processor=`` as :func:`trl_flow.models.loading.load_pipeline` does, see
:func:`trl_flow.models.image_processors.qwen2vl_processor_without_torchvision`); nothing is downloaded. It exercises
what the Qwen-Image-Edit adapter must get right: the source image entering twice (its VAE latents as condition
tokens after the target's, and its Qwen2.5-VL vision tokens inside the prompt embeddings), the edit prompt template
whose first 64 tokens the pipeline drops, two ``img_shapes`` per sample and true CFG with the image in the negative
prompt too.

What is inside:

* ``transformer``, ``vae``, ``scheduler``: the tiny Qwen-Image's (:func:`.ensure_tiny_qwen_image`; its VAE is the
  trained one, so building this costs seconds once that build is cached). The same ``QwenImageTransformer2DModel``
  class serves the edit pipelines; the extra ``img_shapes`` entry gives the condition tokens their own RoPE frame.
* ``tokenizer``: :func:`.build_qwen_tokenizer` with every pre-token of the edit template's prefix (and a few edit
  words) made one token, so the prefix is exactly 64 tokens as with the real tokenizer (checked at build time): the
  pipeline's ``prompt_template_encode_start_idx`` then drops the system prompt and keeps the image and the prompt.
* ``processor``: a ``Qwen2VLProcessor`` of that tokenizer and the PIL ``Qwen2VLImageProcessor`` (real defaults:
  14-pixel patches, 2x2 merge, at least 56x56 pixels), saved as a standard processor folder.
* ``text_encoder``: :func:`.qwen_text_encoder`, a random 2-layer Qwen2.5-VL of width 64 whose 1-block vision tower
  now runs: the image's merged patch tokens replace the ``<|image_pad|>`` run, so the embeddings depend on it.

Usage::

    from diffusers import QwenImageEditPipeline
    from PIL import Image
    from trl_flow.models.loading import load_pipeline
    from trl_flow.offline_models.qwen_image_edit import ensure_tiny_qwen_image_edit

    pipe = load_pipeline(str(ensure_tiny_qwen_image_edit()))
    image = pipe(image=Image.new("RGB", (32, 32), "red"), prompt="make it blue", negative_prompt=" ",
                 true_cfg_scale=4.0, height=32, width=32, num_inference_steps=4).images[0]
"""

from __future__ import annotations

import json
import os
import pathlib

import torch

from .cache import MARKER_FILE, SeededBuild
from .qwen_image import TINY_QWEN_IMAGE_VERSION, ensure_tiny_qwen_image
from .text_encoders import qwen_text_encoder
from .word_tokenizers import build_qwen_tokenizer

__all__ = [
    "TINY_QWEN_IMAGE_EDIT_VERSION",
    "build_tiny_qwen_image_edit",
    "default_qwen_image_edit_cache_dir",
    "ensure_tiny_qwen_image_edit",
]

TINY_QWEN_IMAGE_EDIT_VERSION: str = f"1-base{TINY_QWEN_IMAGE_VERSION}"
"""Version of the build recipe, with the tiny Qwen-Image's it builds on. Bump the first part whenever this recipe
changes; it is part of the default cache dir."""

_TEXT_DIM = 64  # the tiny Qwen-Image transformer's joint_attention_dim
# Words of edit instructions, one token each beside the word list's colours and shapes.
_EDIT_WORDS = "Picture 1: make turn change add remove replace paint recolor keep into it them same"


def _check_template(pipe) -> None:
    """The pipeline drops its template's first ``prompt_template_encode_start_idx`` tokens (64): with this tokenizer
    they must be exactly the system prompt and the user header, or the image tokens and the prompt would be cut."""
    prefix = pipe.prompt_template_encode.split("<|vision_start|>")[0]
    count = len(pipe.tokenizer(prefix).input_ids)
    if count != pipe.prompt_template_encode_start_idx:
        raise RuntimeError(
            f"tiny Qwen tokenizer encodes the edit template prefix to {count} tokens, the pipeline drops "
            f"{pipe.prompt_template_encode_start_idx}"
        )


def _build_pipeline(seed: int):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2VLImageProcessorPil

    from ..models.image_processors import qwen2vl_image_processor

    base = ensure_tiny_qwen_image()
    transformer = QwenImageTransformer2DModel.from_pretrained(base, subfolder="transformer").eval()
    vae = AutoencoderKLQwenImage.from_pretrained(base, subfolder="vae").eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    metrics = json.loads((base / MARKER_FILE).read_text()).get("vae", {})

    # The pipeline sets its prompt template in __init__: read the real one off a pipeline without text parts.
    template = QwenImageEditPipeline(scheduler, vae, None, None, None, transformer).prompt_template_encode
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer([template.split("<|vision_start|>")[0], _EDIT_WORDS])
    text_encoder = qwen_text_encoder(tokenizer, _TEXT_DIM)
    processor = qwen2vl_image_processor(Qwen2VLImageProcessorPil(), tokenizer)
    pipe = QwenImageEditPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )
    # Saved as the standard class, so that the folder is a plain Qwen-Image-Edit one (see image_processors.py).
    pipe.register_to_config(processor=("transformers", "Qwen2VLProcessor"))
    _check_template(pipe)
    return pipe, {"base": str(base), **metrics}


_BUILD = SeededBuild("tiny-qwen-image-edit", TINY_QWEN_IMAGE_EDIT_VERSION, _build_pipeline)


def default_qwen_image_edit_cache_dir() -> pathlib.Path:
    """``tiny-qwen-image-edit-{version}`` under ``$TRL_FLOW_CACHE`` (or ``~/.cache/trl_flow``)."""
    return _BUILD.default_dir()


def build_tiny_qwen_image_edit(output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny Qwen-Image-Edit pipeline into ``output_dir`` and return the folder (:meth:`.SeededBuild.build`);
    a few seconds once the tiny Qwen-Image is cached (it is built first if not, ~45 s)."""
    return _BUILD.build(output_dir, seed)


def ensure_tiny_qwen_image_edit(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder of a complete tiny Qwen-Image-Edit build at ``path`` (default
    :func:`default_qwen_image_edit_cache_dir`), built (seed 0) if needed (:meth:`.SeededBuild.ensure`)."""
    return _BUILD.ensure(path)
