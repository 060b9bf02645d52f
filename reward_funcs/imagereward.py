"""ImageReward: a human-preference reward model for text-to-image generation (Xu et al., 2023).

Source model: `THUDM/ImageReward` (`ImageReward-v1.0`: a BLIP backbone with an MLP head trained on 137k expert
comparisons), run through the optional package `image-reward` (import name `ImageReward`), which downloads and
loads the checkpoint itself (a `.pt` file read with `torch.load`; with torch >= 2.6 that defaults to
`weights_only=True`). Install it with `pip install 'trl-flow[imagereward]'`; it pulls heavy dependencies
(timm, fairscale, an older transformers pin on some versions), so trl-flow does not require it.

Measures: text-image preference, standardised so that a typical generated image scores about 0 (roughly -2..2).

Dataset columns: none beyond the prompt.

Batching: the package scores one prompt against a list of images, so images are grouped by prompt (a GRPO batch
has several images per prompt) and sent at most `batch_size` at a time. The package is imported, and the model
loaded, on the first call; a missing package raises a `UserInputError` naming the extra to install.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from reward_funcs._common import (
    cached,
    check_batch_size,
    check_lengths,
    check_text,
    missing_extra_error,
    resolve_device,
    to_pil_rgb,
)

if TYPE_CHECKING:
    import torch

__all__ = ["IMAGEREWARD_MODEL", "ImageRewardScore", "imagereward", "make_imagereward"]

IMAGEREWARD_MODEL = "ImageReward-v1.0"
"""Name of the checkpoint the `ImageReward` package loads (from the hub repo `THUDM/ImageReward`)."""


def _import_imagereward(reward: str) -> Any:
    try:
        import ImageReward
    except ImportError as e:
        raise missing_extra_error(reward, "image-reward", "imagereward", e) from e
    return ImageReward


class ImageRewardScore:
    """ImageReward reward callable; the package is imported and the model loaded on the first call.

    Args:
        model_name: checkpoint name or local path understood by `ImageReward.load`.
        device: where to run the model; None means the current CUDA device if any, else the CPU.
        batch_size: images per call of the package's scorer.
        download_root: where the package caches its checkpoint (None: its default, `~/.cache/ImageReward`).
        name: the reward's `__name__` (TRL logs `rewards/<name>/mean`).
    """

    def __init__(
        self,
        model_name: str = IMAGEREWARD_MODEL,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        download_root: str | None = None,
        name: str = "imagereward",
    ) -> None:
        self.__name__ = name
        self.model_name = model_name
        self.device = device
        self.batch_size = check_batch_size(batch_size, name)
        self.download_root = download_root

    def __repr__(self) -> str:
        return f"ImageRewardScore(name={self.__name__!r}, model={self.model_name!r}, batch_size={self.batch_size})"

    def _load(self) -> Any:
        package = _import_imagereward(self.__name__)
        device = resolve_device(self.device)

        def load() -> Any:
            model = package.load(self.model_name, device=str(device), download_root=self.download_root)
            return model.eval().requires_grad_(False)

        return cached(("ImageReward", self.model_name, str(device)), load)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Score each image against its prompt."""
        import torch

        from reward_funcs._grouping import score_by_prompt

        check_lengths(prompts, completions, self.__name__)
        texts = check_text(prompts, self.__name__)
        model = self._load()
        if not completions:
            return []
        images = [to_pil_rgb(image) for image in completions]
        with torch.no_grad():
            return list(score_by_prompt(texts, images, model.score, self.batch_size))


def make_imagereward(
    model_name: str = IMAGEREWARD_MODEL,
    device: str | torch.device | None = None,
    batch_size: int = 16,
    download_root: str | None = None,
    name: str = "imagereward",
) -> ImageRewardScore:
    """Create an ImageReward reward; nothing is imported or loaded until its first call. See [`ImageRewardScore`]."""
    return ImageRewardScore(
        model_name=model_name, device=device, batch_size=batch_size, download_root=download_root, name=name
    )


imagereward = make_imagereward()
"""The built-in `imagereward` reward: ImageReward-v1.0 (needs `pip install 'trl-flow[imagereward]'`)."""
