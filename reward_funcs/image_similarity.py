"""image_similarity: how much an edited image still looks like its source, by CLIP image-image cosine similarity.

The preservation term of flow_grpo's editing recipes (its `counting_flux_kontext` weights it 0.5 next to GenEval's
0.5): ``score = scale * cos(clip_image_embedding(output), clip_image_embedding(source))``, in [-1, 1] for the default
``scale=1``. It needs an editing dataset: the source images arrive as the keyword argument `source_images` (one per
sample; `trl_flow.data.SOURCE_IMAGES_COLUMN`). Samples without a source score None.

Source model: `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (transformers `CLIPModel`, safetensors), the ViT-H-14 that
flow_grpo's CLIP scorers use; that its image-similarity scorer uses this same checkpoint is not verified here. Any
`CLIPModel` checkpoint works ([`make_image_similarity`]).

Usage: the registry name `image_similarity` is [`image_similarity`]; create others with [`make_image_similarity`].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from reward_funcs._clip import load_clip
from reward_funcs._common import check_batch_size, check_lengths, get_column

if TYPE_CHECKING:
    import torch

__all__ = ["IMAGE_SIMILARITY_MODEL", "ImageSimilarity", "image_similarity", "make_image_similarity"]

IMAGE_SIMILARITY_MODEL = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
"""Hub id of the CLIP model image_similarity uses by default."""


class ImageSimilarity:
    """CLIP image-image cosine between each output and its source image; the model loads on the first call.

    Args:
        model_name_or_path: `CLIPModel` checkpoint (hub id or local directory, safetensors).
        processor_name_or_path: its `CLIPProcessor`; None means the model's own.
        device: where to run the model; None means the current CUDA device if any, else the CPU.
        dtype: model dtype; None means float32.
        batch_size: images per forward pass.
        scale: multiplier of the cosine similarity.
        name: the reward's `__name__` (TRL logs `rewards/<name>/mean`).
    """

    def __init__(
        self,
        model_name_or_path: str = IMAGE_SIMILARITY_MODEL,
        processor_name_or_path: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
        scale: float = 1.0,
        name: str = "image_similarity",
    ) -> None:
        self.__name__ = name
        self.model_name_or_path = model_name_or_path
        self.processor_name_or_path = processor_name_or_path
        self.device = device
        self.dtype = dtype
        self.batch_size = check_batch_size(batch_size, name)
        self.scale = float(scale)

    def __repr__(self) -> str:
        return f"ImageSimilarity(name={self.__name__!r}, model={self.model_name_or_path!r}, scale={self.scale})"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Score each image against its source image (the `source_images` keyword argument)."""
        check_lengths(prompts, completions, self.__name__)
        sources = get_column(kwargs, "source_images", len(completions), self.__name__)
        if not completions:
            return []
        present = [i for i, source in enumerate(sources) if source is not None]
        scores: list[float | None] = [None] * len(completions)
        if not present:
            return scores
        clip = load_clip(self.model_name_or_path, self.processor_name_or_path, self.device, self.dtype, self.__name__)
        outputs = clip.embed_images([completions[i] for i in present], self.batch_size)
        originals = clip.embed_images([sources[i] for i in present], self.batch_size)
        for i, score in zip(present, ((outputs * originals).sum(dim=-1) * self.scale).tolist(), strict=True):
            scores[i] = float(score)
        return scores


def make_image_similarity(
    model_name_or_path: str = IMAGE_SIMILARITY_MODEL,
    processor_name_or_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
    scale: float = 1.0,
    name: str = "image_similarity",
) -> ImageSimilarity:
    """Create an image_similarity reward; nothing loads until its first call. Arguments: see [`ImageSimilarity`]."""
    return ImageSimilarity(model_name_or_path, processor_name_or_path, device, dtype, batch_size, scale, name)


image_similarity = make_image_similarity()
"""The built-in `image_similarity` reward: CLIP ViT-H-14 (LAION-2B), raw cosine, batch size 16, float32."""
