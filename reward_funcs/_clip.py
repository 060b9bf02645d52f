"""A CLIP model plus processor, loaded lazily and shared by the CLIP-based rewards (pickscore, clipscore, aesthetic).

[`load_clip`] returns a cached [`ClipBackbone`] per (model id, processor id, device, dtype): `transformers.CLIPModel`
loaded from safetensors only, without remote code, in eval mode on the requested device. Its `embed_images` /
`embed_texts` return L2-normalised float32 embeddings, computed in batches under `torch.no_grad()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from reward_funcs._common import (
    cached,
    check_batch_size,
    check_lengths,
    check_text,
    chunks,
    get_column,
    load_pretrained,
    resolve_device,
    resolve_dtype,
    to_pil_rgb,
)

if TYPE_CHECKING:
    import torch

__all__ = ["ClipBackbone", "ClipSimilarityReward", "load_clip"]


class ClipBackbone:
    """A loaded CLIP model and its processor on one device (a plain object, not a `torch.nn.Module`)."""

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype
        tokenizer_max = getattr(processor.tokenizer, "model_max_length", None) or 77
        positions = getattr(model.config.text_config, "max_position_embeddings", None) or tokenizer_max
        # Some tokenizers report a huge model_max_length ("no limit"); the position table is the real bound.
        self.max_text_length = int(min(tokenizer_max, positions))

    @property
    def logit_scale(self) -> float:
        """`exp(logit_scale)`: the temperature CLIP (and PickScore) multiply cosine similarities by."""
        return float(self.model.logit_scale.detach().float().exp())

    @staticmethod
    def _features(output: Any) -> torch.Tensor:
        # transformers >= 5 returns a model output whose pooler_output holds the projected features;
        # earlier versions return the tensor itself.
        import torch

        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def embed_images(self, images: Sequence[Any], batch_size: int) -> torch.Tensor:
        """L2-normalised image embeddings, shape (len(images), projection_dim), float32 on the CPU."""
        import torch

        parts = []
        with torch.no_grad():
            for batch in chunks(list(images), batch_size):
                pixels = self.processor.image_processor(
                    images=[to_pil_rgb(image) for image in batch], return_tensors="pt"
                )["pixel_values"]
                features = self._features(
                    self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
                )
                parts.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(parts) if parts else torch.zeros(0)

    def embed_texts(self, texts: Sequence[str], batch_size: int) -> torch.Tensor:
        """L2-normalised text embeddings, shape (len(texts), projection_dim), float32 on the CPU.

        Texts longer than the model's context (77 tokens for CLIP) are truncated.
        """
        import torch

        parts = []
        with torch.no_grad():
            for batch in chunks(list(texts), batch_size):
                tokens = self.processor.tokenizer(
                    list(batch),
                    padding=True,
                    truncation=True,
                    max_length=self.max_text_length,
                    return_tensors="pt",
                )
                features = self._features(
                    self.model.get_text_features(
                        input_ids=tokens["input_ids"].to(self.device),
                        attention_mask=tokens["attention_mask"].to(self.device),
                    )
                )
                parts.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(parts) if parts else torch.zeros(0)


def load_clip(
    model_name_or_path: str,
    processor_name_or_path: str | None,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    reward: str,
) -> ClipBackbone:
    """Load (once per process) a CLIP model and processor and return them as a [`ClipBackbone`].

    Args:
        model_name_or_path: hub id or local directory of a `CLIPModel` checkpoint in safetensors format.
        processor_name_or_path: hub id or local directory of its `CLIPProcessor`; None means the model's own.
        device: see `resolve_device` (None: current CUDA device, else CPU).
        dtype: see `resolve_dtype` (None: float32).
        reward: the reward's name, for error messages.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    processor_id = processor_name_or_path or model_name_or_path

    def load_model() -> Any:
        from transformers import CLIPModel

        model = load_pretrained(
            CLIPModel.from_pretrained,
            model_name_or_path,
            "the CLIP model",
            reward,
            use_safetensors=True,
            dtype=torch_dtype,
        )
        return model.to(torch_device).eval().requires_grad_(False)

    def load_processor() -> Any:
        from transformers import CLIPProcessor

        return load_pretrained(CLIPProcessor.from_pretrained, processor_id, "the CLIP processor", reward)

    model = cached(("CLIPModel", model_name_or_path, str(torch_device), str(torch_dtype)), load_model)
    processor = cached(("CLIPProcessor", processor_id), load_processor)
    return ClipBackbone(model, processor, torch_device, torch_dtype)


class ClipSimilarityReward:
    """Base of the rewards that score an image by its CLIP-space cosine similarity to a text.

    `score = scale * cos(image_embedding, text_embedding)`, times `exp(logit_scale)` when `use_logit_scale`.
    Subclasses set the defaults; see [`reward_funcs.pickscore.PickScore`] and
    [`reward_funcs.clipscore.ClipScore`] for the arguments.
    """

    use_logit_scale: bool = False

    def __init__(
        self,
        model_name_or_path: str,
        processor_name_or_path: str | None,
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        batch_size: int,
        scale: float,
        text_column: str | None,
        name: str,
    ) -> None:
        self.__name__ = name
        self.model_name_or_path = model_name_or_path
        self.processor_name_or_path = processor_name_or_path
        self.device = device
        self.dtype = dtype
        self.batch_size = check_batch_size(batch_size, name)
        self.scale = float(scale)
        self.text_column = text_column

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.__name__!r}, model={self.model_name_or_path!r}, "
            f"scale={self.scale}, batch_size={self.batch_size})"
        )

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Score each image against its prompt (or against its value in `text_column`)."""
        check_lengths(prompts, completions, self.__name__)
        if self.text_column is not None:
            column = get_column(kwargs, self.text_column, len(completions), self.__name__)
            texts = check_text(column, self.__name__, f"'{self.text_column}' value")
        else:
            texts = check_text(prompts, self.__name__)
        if not completions:
            return []
        clip = load_clip(self.model_name_or_path, self.processor_name_or_path, self.device, self.dtype, self.__name__)
        images = clip.embed_images(completions, self.batch_size)
        text = clip.embed_texts(texts, self.batch_size)
        factor = self.scale * (clip.logit_scale if self.use_logit_scale else 1.0)
        return [float(score) for score in ((images * text).sum(dim=-1) * factor).tolist()]
