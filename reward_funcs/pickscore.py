"""PickScore: how much people would prefer an image for its prompt (Kirstain et al., 2023, "Pick-a-Pic").

Source model: `yuvalkirstain/PickScore_v1` (a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences, loaded
as `transformers.CLIPModel`), with the processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`. Both must be
available as safetensors (in the Hugging Face cache when offline, or as local directories).

Measures: text-image preference, `score = scale * exp(logit_scale) * cos(image_embedding, text_embedding)`.
With the default `scale=1.0` this is the raw PickScore as reported in papers (exp(logit_scale) is about 100;
typical values are 18-24). The official Flow-GRPO scorer divides by 26 to bring it near [0, 1]; pass
`scale=1/26` to reproduce that. GRPO normalises rewards within each prompt group, so the scale only matters
for logging and for weighting PickScore against other rewards.

Dataset columns: none beyond the prompt (or `text_column`, if given, instead of the prompt).

Usage: the registry name `pickscore` is [`pickscore`], configured with the defaults below. For other settings,
create one with [`make_pickscore`] in a file of yours and point the recipe at it (`my_rewards.py:my_pickscore`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reward_funcs._clip import ClipSimilarityReward

if TYPE_CHECKING:
    import torch

__all__ = ["PICKSCORE_MODEL", "PICKSCORE_PROCESSOR", "PickScore", "make_pickscore", "pickscore"]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
"""Hub id of the PickScore model."""

PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
"""Hub id of the processor PickScore was trained with."""


class PickScore(ClipSimilarityReward):
    """PickScore reward callable; the model loads on the first call. See the module docstring.

    Args:
        model_name_or_path: `CLIPModel` checkpoint (hub id or local directory, safetensors).
        processor_name_or_path: its `CLIPProcessor`; None means the model's own.
        device: where to run the model; None means the current CUDA device if any, else the CPU.
        dtype: model dtype (`torch.dtype` or "float32" / "float16" / "bfloat16"); None means float32.
        batch_size: images (and prompts) per forward pass.
        scale: multiplier of the score (1.0: raw PickScore; 1/26: Flow-GRPO's normalisation).
        text_column: score against this dataset column instead of the prompt.
        name: the reward's `__name__` (TRL logs `rewards/<name>/mean`).
    """

    use_logit_scale = True

    def __init__(
        self,
        model_name_or_path: str = PICKSCORE_MODEL,
        processor_name_or_path: str | None = PICKSCORE_PROCESSOR,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
        scale: float = 1.0,
        text_column: str | None = None,
        name: str = "pickscore",
    ) -> None:
        super().__init__(
            model_name_or_path, processor_name_or_path, device, dtype, batch_size, scale, text_column, name
        )


def make_pickscore(
    model_name_or_path: str = PICKSCORE_MODEL,
    processor_name_or_path: str | None = PICKSCORE_PROCESSOR,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
    scale: float = 1.0,
    text_column: str | None = None,
    name: str = "pickscore",
) -> PickScore:
    """Create a PickScore reward; nothing loads until its first call. Arguments: see [`PickScore`]."""
    return PickScore(
        model_name_or_path=model_name_or_path,
        processor_name_or_path=processor_name_or_path,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        scale=scale,
        text_column=text_column,
        name=name,
    )


pickscore = make_pickscore()
"""The built-in `pickscore` reward: PickScore_v1, raw scale, batch size 16, float32."""
