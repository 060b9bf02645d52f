"""ImageReward: a human-preference reward model for text-to-image generation (Xu et al., 2023).

Source model: `THUDM/ImageReward`, file `ImageReward.pt` (`ImageReward-v1.0`: BLIP's ViT-L/16 image encoder and
its BERT text encoder with cross-attention to the image, plus an MLP head, trained on 137k expert comparisons).
trl-flow needs no extra package for it: the network is built from transformers' BLIP modules
(`reward_funcs._imagereward_model`), and the checkpoint's original keys are renamed into it. The checkpoint is read
with `torch.load(..., weights_only=True)` (tensors only) or, for a `.safetensors` file, with safetensors. The
tokenizer is BERT's (`bert-base-uncased`) with the two special tokens BLIP adds; prompts are cut at 35 tokens, as
in the original. Give `checkpoint_path` (a local file) to skip the hub; otherwise it is fetched with
`huggingface_hub` (from the cache when offline).

Measures: text-image preference, standardised with the release's constants so that a typical generated image
scores about 0 (roughly -2..2).

Dataset columns: none beyond the prompt.

Batching: image-prompt pairs are scored `batch_size` at a time (the original package scores one image per forward
pass; the prompt padding is masked, so the scores are the same).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reward_funcs._common import (
    cached,
    check_batch_size,
    check_lengths,
    check_text,
    chunks,
    load_pretrained,
    resolve_device,
    resolve_dtype,
    to_pil_rgb,
)
from trl_flow.errors import UserInputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BLIP_LARGE_VISION_CONFIG",
    "IMAGEREWARD_CHECKPOINT",
    "IMAGEREWARD_MED_CONFIG",
    "IMAGEREWARD_MODEL",
    "IMAGEREWARD_REPO",
    "IMAGEREWARD_TOKENIZER",
    "ImageRewardScore",
    "imagereward",
    "make_imagereward",
]

IMAGEREWARD_REPO = "THUDM/ImageReward"
"""Hub repository of the ImageReward checkpoint."""

IMAGEREWARD_CHECKPOINT = "ImageReward.pt"
"""File name of the ImageReward-v1.0 checkpoint in [`IMAGEREWARD_REPO`]."""

IMAGEREWARD_MODEL = "ImageReward-v1.0"
"""The release this module reproduces (the `ImageReward` package's name for [`IMAGEREWARD_CHECKPOINT`])."""

IMAGEREWARD_TOKENIZER = "google-bert/bert-base-uncased"
"""The BERT tokenizer ImageReward uses (BLIP adds `[DEC]` and `[ENC]` to it, giving 30524 tokens)."""

IMAGEREWARD_MED_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 30524,
    "max_position_embeddings": 512,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}
"""The text encoder's config (BLIP's `med_config.json`: BERT-base plus BLIP's two extra tokens)."""

BLIP_LARGE_VISION_CONFIG: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 16,
    "width": 1024,
    "layers": 24,
    "heads": 16,
    "mlp_ratio": 4.0,
}
"""BLIP's "large" ViT at 224 px, ImageReward's image encoder."""

MAX_PROMPT_TOKENS = 35
"""ImageReward pads and truncates prompts to 35 tokens."""

_VISION_KEYS = set(BLIP_LARGE_VISION_CONFIG)
# med_config.json files carry BERT keys that do not change the network (architectures, model_type, dropout, ...).
_MED_KEYS = set(IMAGEREWARD_MED_CONFIG) | {"encoder_width", "add_cross_attention", "initializer_range"}
_MED_IGNORED = {
    "architectures",
    "model_type",
    "type_vocab_size",
    "attention_probs_dropout_prob",
    "hidden_dropout_prob",
}


def _read_med_config(med_config: Mapping[str, Any] | str | Path | None, reward: str) -> dict[str, Any]:
    if med_config is None:
        return dict(IMAGEREWARD_MED_CONFIG)
    if isinstance(med_config, (str, Path)):
        try:
            med_config = json.loads(Path(med_config).read_text())
        except (OSError, ValueError) as e:
            raise UserInputError(f"reward '{reward}': could not read med_config '{med_config}': {e}") from e
    if not isinstance(med_config, Mapping):
        raise UserInputError(f"reward '{reward}': med_config must be a dict or a JSON file, got {med_config!r}")
    unknown = sorted(set(med_config) - _MED_KEYS - _MED_IGNORED)
    if unknown:
        raise UserInputError(
            f"reward '{reward}': unsupported med_config keys {unknown} (supported: {sorted(_MED_KEYS)})"
        )
    config = dict(IMAGEREWARD_MED_CONFIG)
    config.update({k: v for k, v in med_config.items() if k in IMAGEREWARD_MED_CONFIG})
    return config


def _check_vision_config(vision_config: Mapping[str, Any] | None, reward: str) -> dict[str, Any]:
    if vision_config is None:
        return dict(BLIP_LARGE_VISION_CONFIG)
    if not isinstance(vision_config, Mapping):
        raise UserInputError(f"reward '{reward}': vision_config must be a dict, got {vision_config!r}")
    unknown = sorted(set(vision_config) - _VISION_KEYS)
    if unknown:
        raise UserInputError(
            f"reward '{reward}': unsupported vision_config keys {unknown} (supported: {sorted(_VISION_KEYS)})"
        )
    config = {**BLIP_LARGE_VISION_CONFIG, **vision_config}
    if config["width"] % config["heads"]:
        raise UserInputError(f"reward '{reward}': vision_config width must be divisible by heads")
    return config


class _LoadedImageReward:
    """The loaded network, its tokenizer, and where it runs (a plain holder object)."""

    def __init__(self, model: Any, tokenizer: Any, image_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.device = device
        self.dtype = dtype


class ImageRewardScore:
    """ImageReward reward callable; the model is loaded on the first call.

    Args:
        checkpoint_path: local checkpoint with the original `ImageReward.pt` keys (`.pt` read with
            `weights_only=True`, or `.safetensors`); None downloads [`IMAGEREWARD_CHECKPOINT`] from
            [`IMAGEREWARD_REPO`] through `huggingface_hub`.
        tokenizer_name_or_path: hub id or local directory of the BERT tokenizer.
        med_config: the text encoder's config (a dict or a `med_config.json` path); None means
            [`IMAGEREWARD_MED_CONFIG`].
        vision_config: the image encoder's `image_size`, `patch_size`, `width`, `layers`, `heads`, `mlp_ratio`;
            None means [`BLIP_LARGE_VISION_CONFIG`].
        device: where to run the model; None means the current CUDA device if any, else the CPU.
        dtype: model dtype (`torch.dtype` or "float32" / "float16" / "bfloat16"); None means float32.
        batch_size: image-prompt pairs per forward pass.
        name: the reward's `__name__` (TRL logs `rewards/<name>/mean`).
    """

    def __init__(
        self,
        checkpoint_path: str | None = None,
        tokenizer_name_or_path: str = IMAGEREWARD_TOKENIZER,
        med_config: Mapping[str, Any] | str | None = None,
        vision_config: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
        name: str = "imagereward",
    ) -> None:
        self.__name__ = name
        self.checkpoint_path = None if checkpoint_path is None else str(checkpoint_path)
        self.tokenizer_name_or_path = str(tokenizer_name_or_path)
        self.med_config = med_config
        self.vision_config = vision_config
        self.device = device
        self.dtype = dtype
        self.batch_size = check_batch_size(batch_size, name)

    def __repr__(self) -> str:
        return (
            f"ImageRewardScore(name={self.__name__!r}, checkpoint={self.checkpoint_path or IMAGEREWARD_CHECKPOINT!r}, "
            f"batch_size={self.batch_size})"
        )

    def _load(self) -> _LoadedImageReward:
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype)
        med = _read_med_config(self.med_config, self.__name__)
        vision = _check_vision_config(self.vision_config, self.__name__)

        def load_tokenizer() -> Any:
            from transformers import AutoTokenizer

            tokenizer = load_pretrained(
                AutoTokenizer.from_pretrained, self.tokenizer_name_or_path, "the BERT tokenizer", self.__name__
            )
            # BLIP's init_tokenizer adds these; they only matter for prompts that contain them literally.
            tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
            return tokenizer

        def load_model() -> Any:
            from transformers import BlipTextConfig, BlipVisionConfig

            from reward_funcs._checkpoint import read_state_dict
            from reward_funcs._imagereward_model import ImageRewardModel, convert_imagereward_state_dict

            path = self.checkpoint_path
            if path is None:
                import huggingface_hub

                path = huggingface_hub.hf_hub_download(IMAGEREWARD_REPO, IMAGEREWARD_CHECKPOINT)
            state = convert_imagereward_state_dict(read_state_dict(path, self.__name__), self.__name__)
            vision_config = BlipVisionConfig(
                hidden_size=vision["width"],
                intermediate_size=int(vision["width"] * vision["mlp_ratio"]),
                num_hidden_layers=vision["layers"],
                num_attention_heads=vision["heads"],
                image_size=vision["image_size"],
                patch_size=vision["patch_size"],
                hidden_act="gelu",
                layer_norm_eps=1e-6,  # BLIP's ViT uses eps 1e-6, transformers' default is 1e-5
            )
            text_config = BlipTextConfig(
                **med,
                encoder_hidden_size=vision["width"],
                is_decoder=True,  # builds the cross-attention layers; forward runs them as an encoder
                bos_token_id=None,
                eos_token_id=None,
                sep_token_id=None,
            )
            model = ImageRewardModel(vision_config, text_config)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise UserInputError(
                    f"reward '{self.__name__}': the checkpoint '{path}' does not fit the model config (med_config "
                    f"{med}, vision_config {vision}); pass the configs it was trained with. {e}"
                ) from e
            return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

        tokenizer = cached(("ImageRewardTokenizer", self.tokenizer_name_or_path), load_tokenizer)
        key = (
            "ImageReward",
            self.checkpoint_path or IMAGEREWARD_CHECKPOINT,
            json.dumps(med, sort_keys=True),
            json.dumps(vision, sort_keys=True),
            str(device),
            str(dtype),
        )
        return _LoadedImageReward(cached(key, load_model), tokenizer, vision["image_size"], device, dtype)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Score each image against its prompt."""
        import torch

        from reward_funcs._imagereward_model import preprocess_images

        check_lengths(prompts, completions, self.__name__)
        texts = check_text(prompts, self.__name__)
        if not completions:
            return []
        loaded = self._load()
        scores: list[float | None] = []
        with torch.no_grad():
            for batch in chunks(list(range(len(completions))), self.batch_size):
                pixels = preprocess_images([to_pil_rgb(completions[i]) for i in batch], loaded.image_size)
                tokens = loaded.tokenizer(
                    [texts[i] for i in batch],
                    padding="max_length",
                    truncation=True,
                    max_length=MAX_PROMPT_TOKENS,
                    return_tensors="pt",
                )
                rewards = loaded.model(
                    pixels.to(loaded.device, loaded.dtype),
                    tokens["input_ids"].to(loaded.device),
                    tokens["attention_mask"].to(loaded.device),
                )
                scores.extend(float(r) for r in rewards.cpu().tolist())
        return scores


def make_imagereward(
    checkpoint_path: str | None = None,
    tokenizer_name_or_path: str = IMAGEREWARD_TOKENIZER,
    med_config: Mapping[str, Any] | str | None = None,
    vision_config: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
    name: str = "imagereward",
) -> ImageRewardScore:
    """Create an ImageReward reward; nothing is imported or loaded until its first call. See [`ImageRewardScore`]."""
    return ImageRewardScore(
        checkpoint_path=checkpoint_path,
        tokenizer_name_or_path=tokenizer_name_or_path,
        med_config=med_config,
        vision_config=vision_config,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        name=name,
    )


imagereward = make_imagereward()
"""The built-in `imagereward` reward: ImageReward-v1.0 on transformers' BLIP modules."""
