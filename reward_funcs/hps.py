"""HPS v2.1 (Human Preference Score v2.1): a human-preference reward model for text-to-image (Wu et al., 2023).

Source model: `xswu/HPSv2`, file `HPS_v2.1_compressed.pt` (an OpenCLIP ViT-H/14 fine-tuned on the HPD v2
preference dataset). The architecture comes from the optional package `hpsv2` (its bundled OpenCLIP); install
it with `pip install 'trl-flow[hps]'`. trl-flow builds the ViT-H/14 architecture without pretrained weights and
loads the HPS checkpoint into it once, with `torch.load(..., weights_only=True)` (tensors only), instead of the
package's `hpsv2.score`, which re-reads the 2 GB checkpoint on every call and ignores the device choice. Give
`checkpoint_path` (a local `.pt` file) to avoid the download from the hub; otherwise it is fetched with
`huggingface_hub` (from the cache when offline).

Measures: text-image preference, `score = scale * cos(image_embedding, text_embedding)`; with the default
`scale=1.0` this is the HPS as published (about 0.25-0.35 for typical generations).

Dataset columns: none beyond the prompt.

Known packaging issue: some `hpsv2` wheels miss OpenCLIP's `bpe_simple_vocab_16e6.txt.gz`; the tokenizer then
fails with FileNotFoundError, fixed by installing `hpsv2` from its git repository.
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
    missing_extra_error,
    resolve_device,
    resolve_dtype,
    to_pil_rgb,
)
from trl_flow.errors import UserInputError

if TYPE_CHECKING:
    import torch

__all__ = ["HPS_CHECKPOINT", "HPS_REPO", "HpsScore", "hps", "make_hps"]

HPS_REPO = "xswu/HPSv2"
"""Hub repository of the HPS checkpoints."""

HPS_CHECKPOINT = "HPS_v2.1_compressed.pt"
"""File name of the HPS v2.1 checkpoint in [`HPS_REPO`]."""


def _import_open_clip(reward: str) -> Any:
    try:
        from hpsv2.src import open_clip
    except ImportError as e:
        raise missing_extra_error(reward, "hpsv2", "hps", e) from e
    return open_clip


class _HpsModel:
    """The loaded HPS model, its image transform and its tokenizer (a plain holder object)."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype


class HpsScore:
    """HPS v2.1 reward callable; the package is imported and the model loaded on the first call.

    Args:
        checkpoint_path: local HPS checkpoint (`.pt` with a `state_dict`); None downloads
            [`HPS_CHECKPOINT`] from [`HPS_REPO`] through `huggingface_hub`.
        device: where to run the model; None means the current CUDA device if any, else the CPU.
        dtype: model dtype (`torch.dtype` or "float32" / "float16" / "bfloat16"); None means float32.
        batch_size: images (and prompts) per forward pass.
        scale: multiplier of the cosine similarity.
        name: the reward's `__name__` (TRL logs `rewards/<name>/mean`).
    """

    def __init__(
        self,
        checkpoint_path: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
        scale: float = 1.0,
        name: str = "hps",
    ) -> None:
        self.__name__ = name
        self.checkpoint_path = checkpoint_path
        self.device = device
        self.dtype = dtype
        self.batch_size = check_batch_size(batch_size, name)
        self.scale = float(scale)

    def __repr__(self) -> str:
        return f"HpsScore(name={self.__name__!r}, checkpoint={self.checkpoint_path or HPS_CHECKPOINT!r})"

    def _load(self) -> _HpsModel:
        open_clip = _import_open_clip(self.__name__)
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype)

        def load() -> _HpsModel:
            import torch

            path = self.checkpoint_path
            if path is None:
                import huggingface_hub

                path = huggingface_hub.hf_hub_download(HPS_REPO, HPS_CHECKPOINT)
            model, _, preprocess = open_clip.create_model_and_transforms(
                "ViT-H-14", pretrained=None, precision="fp32", device="cpu", output_dict=True
            )
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserInputError(
                    f"reward '{self.__name__}': could not read the HPS checkpoint '{path}' with weights_only=True: "
                    f"{type(e).__name__}: {e}"
                ) from e
            state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
            model.load_state_dict(state)
            model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
            return _HpsModel(model, preprocess, open_clip.get_tokenizer("ViT-H-14"), device, dtype)

        return cached(("HPS", self.checkpoint_path or HPS_CHECKPOINT, str(device), str(dtype)), load)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Score each image against its prompt."""
        import torch

        check_lengths(prompts, completions, self.__name__)
        texts = check_text(prompts, self.__name__)
        hps_model = self._load()
        if not completions:
            return []
        scores: list[float | None] = []
        with torch.no_grad():
            for batch in chunks(list(range(len(completions))), self.batch_size):
                pixels = torch.stack([hps_model.preprocess(to_pil_rgb(completions[i])) for i in batch])
                tokens = hps_model.tokenizer([texts[i] for i in batch])
                images = hps_model.model.encode_image(pixels.to(hps_model.device, hps_model.dtype))
                text = hps_model.model.encode_text(tokens.to(hps_model.device))
                images = torch.nn.functional.normalize(images.float(), dim=-1)
                text = torch.nn.functional.normalize(text.float(), dim=-1)
                scores.extend(float(s) for s in ((images * text).sum(-1) * self.scale).cpu().tolist())
        return scores


def make_hps(
    checkpoint_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
    scale: float = 1.0,
    name: str = "hps",
) -> HpsScore:
    """Create an HPS v2.1 reward; nothing is imported or loaded until its first call. See [`HpsScore`]."""
    return HpsScore(
        checkpoint_path=checkpoint_path, device=device, dtype=dtype, batch_size=batch_size, scale=scale, name=name
    )


hps = make_hps()
"""The built-in `hps` reward: HPS v2.1 (needs `pip install 'trl-flow[hps]'`)."""
