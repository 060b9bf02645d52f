"""HPS v2.1 (Human Preference Score v2.1): a human-preference reward model for text-to-image (Wu et al., 2023).

Source model: `xswu/HPSv2`, file `HPS_v2.1_compressed.pt`: an OpenCLIP ViT-H/14 fine-tuned on the HPD v2
preference dataset, saved as an OpenCLIP state dict. trl-flow needs no extra package for it: the OpenCLIP weights
are renamed into a `transformers.CLIPModel` of the same architecture (ViT-H/14 is exactly the architecture of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, the OpenCLIP model HPS starts from), and the tokenizer and image
preprocessing are that model's `CLIPProcessor` (the one `pickscore` uses too; one copy is shared). The checkpoint
is read once with `torch.load(..., weights_only=True)` (tensors only) or, for a `.safetensors` file, with
safetensors. Give `checkpoint_path` (a local file) to skip the hub; otherwise it is fetched with
`huggingface_hub` (from the cache when offline).

Measures: text-image preference, `score = scale * cos(image_embedding, text_embedding)`; with the default
`scale=1.0` this is the HPS as published (about 0.25-0.35 for typical generations).

Dataset columns: none beyond the prompt.

Fidelity: the network computes what OpenCLIP computes (same layers, exact GELU, pooled at the end-of-text token).
Two small differences from the `hpsv2` package remain: its image transform resizes a float tensor where the
`CLIPProcessor` resizes the 8-bit PIL image (both bicubic, shortest side to 224, centre crop), and its
`hpsv2.score` runs the model under fp16 autocast, where trl-flow defaults to float32.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from reward_funcs._checkpoint import read_state_dict
from reward_funcs._common import (
    cached,
    check_batch_size,
    check_lengths,
    check_text,
    load_pretrained,
    resolve_device,
    resolve_dtype,
)
from trl_flow.errors import UserInputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "HPS_CHECKPOINT",
    "HPS_PROCESSOR",
    "HPS_REPO",
    "VIT_H_14_CONFIG",
    "HpsScore",
    "clip_config_from_open_clip",
    "convert_open_clip_state_dict",
    "hps",
    "make_hps",
]

HPS_REPO = "xswu/HPSv2"
"""Hub repository of the HPS checkpoints."""

HPS_CHECKPOINT = "HPS_v2.1_compressed.pt"
"""File name of the HPS v2.1 checkpoint in [`HPS_REPO`]."""

HPS_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
"""The `CLIPProcessor` (OpenCLIP's BPE tokenizer, 224 px bicubic resize and crop, OpenAI mean/std) of ViT-H/14."""

VIT_H_14_CONFIG: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
"""OpenCLIP's model config of ViT-H-14 (its `model_configs/ViT-H-14.json`), the architecture of HPS v2 / v2.1."""

# The OpenCLIP config keys the conversion understands; anything else (custom text towers, attentional pooling,
# layer scale, ...) changes the network and is refused rather than silently ignored.
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
_VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def _config_error(reward: str, message: str) -> UserInputError:
    return UserInputError(f"reward '{reward}': invalid OpenCLIP model_config: {message}")


def clip_config_from_open_clip(
    model_config: Mapping[str, Any],
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    reward: str = "hps",
) -> Any:
    """The `transformers.CLIPConfig` of an OpenCLIP ViT model config (the JSON format of OpenCLIP's model configs).

    Args:
        model_config: `embed_dim`, `vision_cfg` (`image_size`, `layers`, `width`, `head_width`, `patch_size`,
            optional `mlp_ratio`), `text_cfg` (`context_length`, `vocab_size`, `width`, `heads`, `layers`, optional
            `mlp_ratio`) and optional `quick_gelu`; OpenCLIP's defaults fill the optional keys.
        bos_token_id, eos_token_id, pad_token_id: the tokenizer's special tokens. The text is pooled at the first
            `eos_token_id`, which is OpenCLIP's argmax pooling when the end-of-text token has the largest id.
        reward: the reward's name, for error messages.

    Raises:
        UserInputError: a key is unknown or a value is not a positive number, or a width is not divisible by its
            number of heads.
    """
    from transformers import CLIPConfig

    if not isinstance(model_config, Mapping):
        raise _config_error(reward, f"expected a dict, got {type(model_config).__name__}")
    vision = model_config.get("vision_cfg")
    text = model_config.get("text_cfg")
    if not isinstance(vision, Mapping) or not isinstance(text, Mapping) or "embed_dim" not in model_config:
        raise _config_error(reward, "it needs 'embed_dim', a 'vision_cfg' dict and a 'text_cfg' dict")
    for keys, allowed, where in (
        (model_config, _TOP_KEYS, "the top level"),
        (vision, _VISION_KEYS, "vision_cfg"),
        (text, _TEXT_KEYS, "text_cfg"),
    ):
        unknown = sorted(set(keys) - allowed)
        if unknown:
            raise _config_error(
                reward,
                f"unsupported keys {unknown} in {where} (supported: {sorted(allowed)}); only plain ViT "
                "CLIP models such as ViT-H-14 can be converted",
            )

    def number(cfg: Mapping[str, Any], key: str, default: float | None = None, kind: type = int) -> Any:
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise _config_error(reward, f"'{key}' must be a positive number, got {value!r}")
        if kind is int and value != int(value):
            raise _config_error(reward, f"'{key}' must be an integer, got {value!r}")
        return kind(value)

    vision_width = number(vision, "width")
    head_width = number(vision, "head_width", 64)  # OpenCLIP's default
    text_width = number(text, "width")
    text_heads = number(text, "heads", 8)  # OpenCLIP's default
    if vision_width % head_width or text_width % text_heads:
        raise _config_error(reward, "each width must be divisible by its head width / number of heads")
    act = "quick_gelu" if model_config.get("quick_gelu", False) else "gelu"
    special = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    return CLIPConfig(
        projection_dim=number(model_config, "embed_dim"),
        text_config={
            "vocab_size": number(text, "vocab_size"),
            "hidden_size": text_width,
            "intermediate_size": int(text_width * number(text, "mlp_ratio", 4.0, float)),
            "num_hidden_layers": number(text, "layers"),
            "num_attention_heads": text_heads,
            "max_position_embeddings": number(text, "context_length", 77),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,  # torch's LayerNorm default, which OpenCLIP uses
            **{k: v for k, v in special.items() if v is not None},
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": int(vision_width * number(vision, "mlp_ratio", 4.0, float)),
            "num_hidden_layers": number(vision, "layers"),
            "num_attention_heads": vision_width // head_width,
            "image_size": number(vision, "image_size"),
            "patch_size": number(vision, "patch_size"),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
    )


# Per-block renames, OpenCLIP ResidualAttentionBlock -> transformers CLIPEncoderLayer (the fused attention
# projection is split separately).
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_TOWER_RENAMES = {
    # vision tower
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    # text tower
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# OpenCLIP stores the projections as (in, out) matrices used as `x @ proj`; nn.Linear wants (out, in).
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = {
    "visual.transformer.resblocks.": "vision_model.encoder.layers.",
    "transformer.resblocks.": "text_model.encoder.layers.",
}


def convert_open_clip_state_dict(state: Mapping[str, Any], reward: str = "hps") -> dict[str, Any]:
    """Rename an OpenCLIP ViT CLIP state dict (as in the HPS checkpoints) into `transformers.CLIPModel` keys.

    The fused attention input projection (`attn.in_proj_weight` / `attn.in_proj_bias`) is split into the query,
    key and value projections, and the two output projections are transposed. A leading `module.` (a checkpoint
    saved from DistributedDataParallel) is dropped. Every key must be recognised, so a checkpoint of another
    architecture fails here instead of loading partly.

    Raises:
        UserInputError: a key is not part of a plain OpenCLIP ViT CLIP model.
    """
    converted: dict[str, Any] = {}
    unknown: list[str] = []
    for raw_key, value in state.items():
        key = raw_key.removeprefix("module.")
        if key in _TOWER_RENAMES:
            converted[_TOWER_RENAMES[key]] = value
            continue
        if key in _PROJECTIONS:
            converted[_PROJECTIONS[key]] = value.t().contiguous()
            continue
        prefix = next((p for p in _TOWERS if key.startswith(p)), None)
        if prefix is None:
            unknown.append(raw_key)
            continue
        index, _, rest = key[len(prefix) :].partition(".")
        if not index.isdigit():
            unknown.append(raw_key)
            continue
        base = f"{_TOWERS[prefix]}{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            suffix = rest.rsplit("_", 1)[1]  # "weight" or "bias"
            query, key_part, value_part = value.chunk(3, dim=0)
            for name, part in (("q_proj", query), ("k_proj", key_part), ("v_proj", value_part)):
                converted[f"{base}self_attn.{name}.{suffix}"] = part.contiguous()
            continue
        module, _, param = rest.rpartition(".")
        if module not in _BLOCK_RENAMES:
            unknown.append(raw_key)
            continue
        converted[f"{base}{_BLOCK_RENAMES[module]}.{param}"] = value
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise UserInputError(
            f"reward '{reward}': the checkpoint is not a plain OpenCLIP ViT CLIP state dict (such as HPS v2.1); "
            f"unrecognised keys: {shown}"
        )
    return converted


class HpsScore:
    """HPS v2.1 reward callable; the model is loaded on the first call.

    Args:
        checkpoint_path: local HPS checkpoint (`.pt` holding a `state_dict`, or `.safetensors` with the same keys);
            None downloads [`HPS_CHECKPOINT`] from [`HPS_REPO`] through `huggingface_hub`.
        processor_name_or_path: hub id or local directory of the `CLIPProcessor` (tokenizer and image
            preprocessing); its tokenizer must match the checkpoint's vocabulary.
        model_config: the checkpoint's OpenCLIP model config (see [`clip_config_from_open_clip`]); None means
            [`VIT_H_14_CONFIG`], the architecture of every HPS v2 checkpoint.
        device: where to run the model; None means the current CUDA device if any, else the CPU.
        dtype: model dtype (`torch.dtype` or "float32" / "float16" / "bfloat16"); None means float32.
        batch_size: images (and prompts) per forward pass.
        scale: multiplier of the cosine similarity.
        name: the reward's `__name__` (TRL logs `rewards/<name>/mean`).
    """

    def __init__(
        self,
        checkpoint_path: str | None = None,
        processor_name_or_path: str = HPS_PROCESSOR,
        model_config: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
        scale: float = 1.0,
        name: str = "hps",
    ) -> None:
        self.__name__ = name
        self.checkpoint_path = None if checkpoint_path is None else str(checkpoint_path)
        self.processor_name_or_path = str(processor_name_or_path)
        self.model_config = dict(VIT_H_14_CONFIG if model_config is None else model_config)
        self.device = device
        self.dtype = dtype
        self.batch_size = check_batch_size(batch_size, name)
        self.scale = float(scale)

    def __repr__(self) -> str:
        return f"HpsScore(name={self.__name__!r}, checkpoint={self.checkpoint_path or HPS_CHECKPOINT!r})"

    def _load(self) -> Any:
        from reward_funcs._clip import ClipBackbone

        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype)

        def load_processor() -> Any:
            from transformers import CLIPProcessor

            return load_pretrained(
                CLIPProcessor.from_pretrained, self.processor_name_or_path, "the CLIP processor", self.__name__
            )

        # Same cache key as reward_funcs._clip.load_clip, so pickscore and hps share the ViT-H/14 processor.
        processor = cached(("CLIPProcessor", self.processor_name_or_path), load_processor)
        tokenizer = processor.tokenizer

        def load_model() -> Any:
            from transformers import CLIPModel

            config = clip_config_from_open_clip(
                self.model_config,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                reward=self.__name__,
            )
            path = self.checkpoint_path
            if path is None:
                import huggingface_hub

                path = huggingface_hub.hf_hub_download(HPS_REPO, HPS_CHECKPOINT)
            state = convert_open_clip_state_dict(read_state_dict(path, self.__name__), self.__name__)
            model = CLIPModel(config)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise UserInputError(
                    f"reward '{self.__name__}': the checkpoint '{path}' does not fit the OpenCLIP model_config "
                    f"{self.model_config}; pass the config it was trained with. {e}"
                ) from e
            return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

        key = (
            "HPS",
            self.checkpoint_path or HPS_CHECKPOINT,
            json.dumps(self.model_config, sort_keys=True),
            self.processor_name_or_path,
            str(device),
            str(dtype),
        )
        return ClipBackbone(cached(key, load_model), processor, device, dtype)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Score each image against its prompt."""
        check_lengths(prompts, completions, self.__name__)
        texts = check_text(prompts, self.__name__)
        if not completions:
            return []
        clip = self._load()
        images = clip.embed_images(completions, self.batch_size)
        text = clip.embed_texts(texts, self.batch_size)
        return [float(score) for score in ((images * text).sum(dim=-1) * self.scale).tolist()]


def make_hps(
    checkpoint_path: str | None = None,
    processor_name_or_path: str = HPS_PROCESSOR,
    model_config: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
    scale: float = 1.0,
    name: str = "hps",
) -> HpsScore:
    """Create an HPS v2.1 reward; nothing is imported or loaded until its first call. See [`HpsScore`]."""
    return HpsScore(
        checkpoint_path=checkpoint_path,
        processor_name_or_path=processor_name_or_path,
        model_config=model_config,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        scale=scale,
        name=name,
    )


hps = make_hps()
"""The built-in `hps` reward: HPS v2.1 on an OpenCLIP ViT-H/14, run as a `transformers.CLIPModel`."""
