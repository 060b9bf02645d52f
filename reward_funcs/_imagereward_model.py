"""The ImageReward network on transformers' BLIP modules, and the renaming of the original checkpoint's keys.

ImageReward (THUDM) is BLIP's ViT image encoder, BLIP's BERT text encoder with cross-attention to the image
tokens, and a five-layer linear head on the text encoder's first ([CLS]) token, standardised by fixed constants.
transformers ships the same two encoders (`BlipVisionModel`, `BlipTextModel`), so the reward needs neither the
`image-reward` package nor timm / fairscale. This module imports torch; `reward_funcs.imagereward` imports it
only when the model is first loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from trl_flow.errors import UserInputError

__all__ = [
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "ImageRewardModel",
    "convert_imagereward_state_dict",
    "preprocess_images",
]

IMAGEREWARD_MEAN = 0.16717362830052426
"""Mean of the head's raw output that ImageReward subtracts (a constant of the release, not in the checkpoint)."""

IMAGEREWARD_STD = 1.0333394966054072
"""Standard deviation ImageReward divides by (a constant of the release, not in the checkpoint)."""

HEAD_SIZES = (1024, 128, 64, 16, 1)
"""Output sizes of the head's linear layers (no activations between them, as released)."""

# The original head is an nn.Sequential with dropouts between the linear layers; these are its linear indices.
_HEAD_INDICES = {0: 0, 2: 1, 4: 2, 6: 3, 7: 4}

# Checkpoint entries the scorer does not use: BLIP's contrastive projections and a non-parameter buffer.
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
_UNUSED_KEYS = {"blip.text_encoder.embeddings.position_ids"}

# timm ViT block -> transformers BlipEncoderLayer.
_VISION_BLOCK_RENAMES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VISION_RENAMES = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageRewardModel(torch.nn.Module):
    """BLIP image encoder + cross-attending BLIP text encoder + linear head, scoring (image, prompt) pairs.

    Args:
        vision_config: a `transformers.BlipVisionConfig`.
        text_config: a `transformers.BlipTextConfig` whose `encoder_hidden_size` is the vision width; its layers
            have cross-attention (`is_decoder=True` is how transformers builds those), and the model runs it as
            a bidirectional encoder.
    """

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        sizes = (text_config.hidden_size, *HEAD_SIZES)
        self.head = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Standardised rewards, shape (batch,), float32."""
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state[:, 0]
        for layer in self.head:
            text = layer(text)
        return (text.float().squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def convert_imagereward_state_dict(state: Mapping[str, torch.Tensor], reward: str = "imagereward") -> dict:
    """Rename the original `ImageReward.pt` state dict into [`ImageRewardModel`] keys.

    `blip.visual_encoder.*` (timm ViT) becomes `visual_encoder.*`, `blip.text_encoder.*` (BLIP's BERT, whose
    names transformers kept) becomes `text_encoder.*`, and `mlp.layers.{0,2,4,6,7}.*` becomes `head.{0..4}.*`.
    BLIP's contrastive projections and the `position_ids` buffer are dropped: the score does not use them.

    Raises:
        UserInputError: a key is not part of an ImageReward checkpoint (so a wrong file fails here instead of
            loading partly).
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for raw_key, value in state.items():
        key = raw_key.removeprefix("module.")
        if key in _UNUSED_KEYS or key.startswith(_UNUSED_PREFIXES):
            continue
        if key.startswith("blip.text_encoder."):
            converted["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            if rest in _VISION_RENAMES:
                converted["visual_encoder." + _VISION_RENAMES[rest]] = value
                continue
            index, _, tail = rest.removeprefix("blocks.").partition(".")
            module, _, param = tail.rpartition(".")
            if not rest.startswith("blocks.") or not index.isdigit() or module not in _VISION_BLOCK_RENAMES:
                unknown.append(raw_key)
                continue
            converted[f"visual_encoder.encoder.layers.{index}.{_VISION_BLOCK_RENAMES[module]}.{param}"] = value
        elif key.startswith("mlp.layers."):
            index, _, param = key.removeprefix("mlp.layers.").partition(".")
            if not index.isdigit() or int(index) not in _HEAD_INDICES:
                unknown.append(raw_key)
                continue
            converted[f"head.{_HEAD_INDICES[int(index)]}.{param}"] = value
        else:
            unknown.append(raw_key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise UserInputError(
            f"reward '{reward}': the checkpoint is not an ImageReward state dict; unrecognised keys: {shown}"
        )
    return converted


def _resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    # ImageReward's transform: bicubic resize of the shorter side to `size` (the longer side truncated, as
    # torchvision computes it), then a centred square crop with torchvision's rounding.
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short != size:
        new_short, new_long = size, int(size * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    width, height = image.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def preprocess_images(images: list[Image.Image], size: int) -> torch.Tensor:
    """ImageReward's image transform, shape (len(images), 3, size, size), float32.

    RGB, bicubic resize of the shorter side to `size`, centre crop, scaling to [0, 1] and normalisation with
    CLIP's mean and std (what the original does with torchvision, written with PIL and numpy).
    """
    mean = np.asarray(_CLIP_MEAN, dtype=np.float32)
    std = np.asarray(_CLIP_STD, dtype=np.float32)
    arrays = []
    for image in images:
        pixels = np.asarray(_resize_and_crop(image.convert("RGB"), size), dtype=np.float32) / 255.0
        arrays.append(((pixels - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))
