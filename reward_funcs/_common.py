"""Shared plumbing for the model-based rewards: device / dtype choice, a model cache, column access, batching.

Nothing here imports torch or transformers at module import time; the helpers import them when called, so
`import reward_funcs.<module>` stays cheap and a reward only pays for its model on its first call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl_flow.errors import UserInputError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

__all__ = [
    "cached",
    "check_batch_size",
    "check_lengths",
    "check_text",
    "chunks",
    "clear_model_cache",
    "get_column",
    "load_pretrained",
    "missing_extra_error",
    "resolve_device",
    "resolve_dtype",
    "to_pil_rgb",
    "to_rgb_array",
]

_CACHE: dict[tuple[Any, ...], Any] = {}
_CACHE_LOCK = threading.Lock()
_KEY_LOCKS: dict[tuple[Any, ...], threading.Lock] = {}

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run a reward model on.

    `None` means the current CUDA device when CUDA is available (under `accelerate`, each process's own GPU),
    else the CPU. Strings such as `"cuda:1"` or `"cpu"` are passed to `torch.device`.
    """
    import torch

    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserInputError(f"invalid device {device!r} for a reward model: {e}") from e


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype to hold a reward model in: `None` means float32 (scores then match across devices).

    Accepts a `torch.dtype` or one of the names float32 / fp32, float16 / fp16 / half, bfloat16 / bf16.
    """
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPE_NAMES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise UserInputError(f"invalid dtype {dtype!r} for a reward model; use float32, float16 or bfloat16.")
    return getattr(torch, name)


def cached(key: tuple[Any, ...], loader: Callable[[], Any]) -> Any:
    """Return the object cached under `key`, calling `loader()` to create it on first use.

    The cache is process-wide, so two rewards that need the same model (same id, device and dtype) share one
    copy. Concurrent first calls with the same key load once.
    """
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:
        with _CACHE_LOCK:
            if key in _CACHE:
                return _CACHE[key]
        value = loader()
        with _CACHE_LOCK:
            _CACHE[key] = value
        return value


def clear_model_cache() -> None:
    """Drop every cached reward model (they are freed once no reward holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _KEY_LOCKS.clear()


def load_pretrained(loader: Callable[..., Any], name_or_path: str, what: str, reward: str, **kwargs: Any) -> Any:
    """Call `loader(name_or_path, **kwargs)` (a `from_pretrained`), turning load failures into `UserInputError`.

    Remote code is never run (`trust_remote_code=False`); callers loading model weights pass
    `use_safetensors=True`, so pickled `.bin` checkpoints are refused.
    """
    try:
        return loader(name_or_path, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as e:
        local = os.path.isdir(name_or_path)
        if local:
            where = "local directory"
        elif os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
            where = "no such directory"
        else:
            where = "hub id; offline it must already be in the Hugging Face cache"
        detail = str(e).strip().rstrip(".")
        hint = ""
        if kwargs.get("use_safetensors") and (
            "safetensors" in detail.lower() or (local and not any(Path(name_or_path).glob("*.safetensors")))
        ):
            hint = (
                " trl-flow loads model weights from safetensors files only: load the checkpoint once yourself and "
                "re-save it with `model.save_pretrained(dir)` (which writes safetensors), then pass that directory."
            )
        raise UserInputError(
            f"reward '{reward}': could not load {what} from '{name_or_path}' ({where}): "
            f"{type(e).__name__}: {detail}.{hint}"
        ) from e


def missing_extra_error(reward: str, package: str, extra: str, cause: BaseException | None = None) -> UserInputError:
    """The error raised when an optional reward's package is not installed."""
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return UserInputError(
        f"reward '{reward}' needs the optional package '{package}', which is not installed{detail}. "
        f"Install it with: pip install 'trl-flow[{extra}]'"
    )


def get_column(
    kwargs: dict[str, Any], names: str | Sequence[str], num_samples: int, reward: str, required: bool = True
) -> list[Any] | None:
    """Return the first dataset column of `names` found in the reward's keyword arguments.

    Args:
        kwargs: the keyword arguments the reward received (dataset columns, one value per sample).
        names: column name(s) to look for, in order of preference.
        num_samples: the number of images; the column must have one value per image.
        reward: the reward's name, for error messages.
        required: raise when none of `names` is present; otherwise return None.

    Raises:
        UserInputError: the column is missing (when `required`) or has the wrong length.
    """
    if isinstance(names, str):
        names = [names]
    for name in names:
        if name in kwargs and kwargs[name] is not None:
            raw = kwargs[name]
            values = None if isinstance(raw, (str, bytes, dict)) or not hasattr(raw, "__len__") else list(raw)
            if values is None or len(values) != num_samples:
                got = type(raw).__name__ + (f" of length {len(values)}" if values is not None else "")
                raise UserInputError(
                    f"reward '{reward}': dataset column '{name}' must give one value per image "
                    f"({num_samples}), got {got}."
                )
            return values
    if not required:
        return None
    wanted = " or ".join(f"'{name}'" for name in names)
    available = sorted(k for k in kwargs if k not in {"completion_ids", "trainer_state", "log_extra", "log_metric"})
    raise UserInputError(
        f"reward '{reward}' needs the dataset column {wanted}, which the dataset does not have"
        + (f" (its other columns: {', '.join(available)})" if available else "")
        + ". Add the column to the dataset."
    )


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of `items` of at most `size` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_batch_size(batch_size: int, reward: str) -> int:
    """Validate a `batch_size` argument (a positive int)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"reward '{reward}': batch_size must be a positive integer, got {batch_size!r}.")
    return batch_size


def to_pil_rgb(image: Any) -> Image.Image:
    """A completion as an RGB `PIL.Image.Image` (PIL images of any mode and HxWx3 / HxW arrays are accepted)."""
    from reward_funcs.rules import _to_pil

    return _to_pil(image)


def to_rgb_array(image: Any) -> np.ndarray:
    """A completion as a float32 HxWx3 array in [0, 1] (PIL images of any mode, uint8 or float arrays)."""
    from reward_funcs.rules import _to_rgb_array

    return _to_rgb_array(image)


def check_lengths(prompts: Sequence[Any], completions: Sequence[Any], reward: str) -> None:
    """Raise if there is not one prompt per image."""
    if len(prompts) != len(completions):
        raise ValueError(f"reward '{reward}': got {len(prompts)} prompts for {len(completions)} images")


def check_text(values: Sequence[Any], reward: str, what: str = "prompt") -> list[str]:
    """The texts a reward scores against; each must be a string."""
    texts = []
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise UserInputError(
                f"reward '{reward}': {what} {i} is a {type(value).__name__}, not a string; this reward scores an "
                "image against plain text."
            )
        texts.append(value)
    return texts
