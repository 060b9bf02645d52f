"""Safe reading of `.pt` / `.safetensors` state dicts for the rewards whose checkpoints are not transformers folders.

Nothing here imports torch at module import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trl_flow.errors import UserInputError

__all__ = ["read_state_dict"]


def read_state_dict(path: str, reward: str) -> dict[str, Any]:
    """Read a checkpoint's tensors safely: safetensors, or `torch.load(..., weights_only=True)` for `.pt`/`.pth`.

    A checkpoint that is a dict holding a `state_dict` entry (as the HPS files are) is unwrapped.

    Raises:
        UserInputError: the file is missing, unreadable, or holds more than plain tensors.
    """
    import torch

    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            checkpoint: Any = load_file(path)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserInputError(
            f"reward '{reward}': could not read the checkpoint '{path}' (safetensors, or torch.load with "
            f"weights_only=True, which refuses anything but plain tensors): {type(e).__name__}: {e}"
        ) from e
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UserInputError(
            f"reward '{reward}': the checkpoint '{path}' is not a state dict (a dict of tensors, or a dict with a "
            "'state_dict' entry holding one)."
        )
    return dict(checkpoint)
