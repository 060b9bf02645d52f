"""CLIPScore: how well an image matches its prompt according to OpenAI CLIP (Hessel et al., 2021).

Source model: `openai/clip-vit-large-patch14` (CLIP ViT-L/14, loaded as `transformers.CLIPModel` from
safetensors, with its own processor).

Measures: text-image alignment, `score = scale * cos(image_embedding, text_embedding)` with `scale=100` by
default, so values read like the usual "CLIP score" (about 15-35 for real image/caption pairs). Unlike
torchmetrics' `CLIPScore`, negative similarities are not clipped to 0 (a clipped reward would give GRPO no
signal between two poor images). Pass `scale=1.0` for the raw cosine similarity. Texts longer than 77 tokens
are truncated.

Dataset columns: none beyond the prompt (or `text_column`, if given, instead of the prompt).

Usage: the registry name `clipscore` is [`clipscore`], configured with the defaults below; create others with
[`make_clipscore`] in a file of yours (`my_rewards.py:my_clipscore`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reward_funcs._clip import ClipSimilarityReward

if TYPE_CHECKING:
    import torch

__all__ = ["CLIPSCORE_MODEL", "ClipScore", "clipscore", "make_clipscore"]

CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"
"""Hub id of the CLIP model CLIPScore uses by default."""


class ClipScore(ClipSimilarityReward):
    """CLIPScore reward callable; the model loads on the first call. See the module docstring.

    Args:
        model_name_or_path: `CLIPModel` checkpoint (hub id or local directory, safetensors).
        processor_name_or_path: its `CLIPProcessor`; None means the model's own.
        device: where to run the model; None means the current CUDA device if any, else the CPU.
        dtype: model dtype (`torch.dtype` or "float32" / "float16" / "bfloat16"); None means float32.
        batch_size: images (and prompts) per forward pass.
        scale: multiplier of the cosine similarity (100 by default; 1.0 for the raw cosine).
        text_column: score against this dataset column instead of the prompt.
        name: the reward's `__name__` (TRL logs `rewards/<name>/mean`).
    """

    use_logit_scale = False

    def __init__(
        self,
        model_name_or_path: str = CLIPSCORE_MODEL,
        processor_name_or_path: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
        scale: float = 100.0,
        text_column: str | None = None,
        name: str = "clipscore",
    ) -> None:
        super().__init__(
            model_name_or_path, processor_name_or_path, device, dtype, batch_size, scale, text_column, name
        )


def make_clipscore(
    model_name_or_path: str = CLIPSCORE_MODEL,
    processor_name_or_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
    scale: float = 100.0,
    text_column: str | None = None,
    name: str = "clipscore",
) -> ClipScore:
    """Create a CLIPScore reward; nothing loads until its first call. Arguments: see [`ClipScore`]."""
    return ClipScore(
        model_name_or_path=model_name_or_path,
        processor_name_or_path=processor_name_or_path,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        scale=scale,
        text_column=text_column,
        name=name,
    )


clipscore = make_clipscore()
"""The built-in `clipscore` reward: CLIP ViT-L/14, 100 x cosine similarity, batch size 16, float32."""
