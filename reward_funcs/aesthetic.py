"""LAION aesthetic score: how beautiful an image looks, on a 1-10 scale (LAION "improved aesthetic predictor" v2).

Source models: the image tower of `openai/clip-vit-large-patch14` (`transformers.CLIPModel`, safetensors) and
the LAION aesthetic predictor v2 head `sac+logos+ava1-l14-linearMSE.pth`, published at
https://github.com/christophschuhmann/improved-aesthetic-predictor (trained on SAC, LAION-Logos and AVA
ratings). The head is a stack of linear layers (768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout between the first
ones and no non-linearity) applied to the L2-normalised CLIP image embedding.

Measures: predicted mean human aesthetic rating; typical images score 4-7. No text is involved.

Dataset columns: none.

Weights of the head: the original file is a pickled PyTorch state dict. trl-flow never downloads it and only
opens it from a local path you give, with `torch.load(..., weights_only=True)` (tensors only, no code); a
`.safetensors` file with the same keys (`layers.0.weight`, `layers.0.bias`, ..., `layers.7.bias`) works too.
Give the path with `make_aesthetic(predictor_path=...)` or, for the registry name `aesthetic`, with the
environment variable `TRL_FLOW_AESTHETIC_PREDICTOR`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reward_funcs._checkpoint import read_state_dict
from reward_funcs._common import cached, check_batch_size, check_lengths, resolve_device
from trl_flow.errors import UserInputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "AESTHETIC_CLIP_MODEL",
    "AESTHETIC_PREDICTOR_ENV",
    "AestheticScore",
    "LinearHead",
    "aesthetic",
    "load_linear_head",
    "make_aesthetic",
]

AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"
"""Hub id of the CLIP model whose image embeddings the aesthetic head reads."""

AESTHETIC_PREDICTOR_ENV = "TRL_FLOW_AESTHETIC_PREDICTOR"
"""Environment variable holding the local path of the aesthetic head's weights (used when no path is given)."""

_LAYER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(weight|bias)$")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class LinearHead:
    """A chain of linear layers `x -> W_k(...W_1 x + b_1...) + b_k` without activations (a plain object).

    Built from a state dict whose keys end in `layers.<index>.weight` / `layers.<index>.bias`, applied in
    increasing index order (the indices of dropout layers are simply absent).
    """

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> None:
        self.weights = weights
        self.biases = biases

    @property
    def in_features(self) -> int:
        """Size of the input vector."""
        return int(self.weights[0].shape[1])

    def to(self, device: torch.device) -> LinearHead:
        """A copy on `device` (float32)."""
        return LinearHead([w.float().to(device) for w in self.weights], [b.float().to(device) for b in self.biases])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layers to a (batch, in_features) tensor; returns shape (batch,)."""
        for weight, bias in zip(self.weights, self.biases, strict=True):
            x = x @ weight.T + bias
        return x.squeeze(-1)


def load_linear_head(path: str | os.PathLike[str], reward: str = "aesthetic") -> LinearHead:
    """Load the aesthetic head from a local `.safetensors` file or a pickled state dict (`weights_only=True`).

    Raises:
        UserInputError: missing file, unsupported extension, unreadable file, or keys / shapes that do not form
            a chain of linear layers ending in one output.
    """
    import torch

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserInputError(f"reward '{reward}': aesthetic predictor weights '{file}' do not exist.")
    if file.suffix != ".safetensors" and file.suffix not in _PICKLE_SUFFIXES:
        raise UserInputError(
            f"reward '{reward}': aesthetic predictor weights must be a .safetensors file or a PyTorch state "
            f"dict ({', '.join(_PICKLE_SUFFIXES)}), got '{file.name}'."
        )
    state = read_state_dict(str(file), reward)
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _LAYER_KEY.match(str(key))
        if match and isinstance(value, torch.Tensor):
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
    problem = None
    if not layers:
        problem = "no 'layers.<i>.weight' tensors found"
    elif any(set(parts) != {"weight", "bias"} for parts in layers.values()):
        problem = "every layer needs a weight and a bias"
    else:
        ordered = [layers[i] for i in sorted(layers)]
        for previous, current in zip(ordered[:-1], ordered[1:], strict=True):
            if current["weight"].ndim != 2 or previous["weight"].shape[0] != current["weight"].shape[1]:
                problem = "layer shapes do not chain"
        if ordered[-1]["weight"].shape[0] != 1:
            problem = "the last layer must have one output"
    if problem is not None:
        raise UserInputError(
            f"reward '{reward}': '{file}' is not an aesthetic predictor state dict ({problem}); expected the LAION "
            "improved-aesthetic-predictor keys layers.0.weight ... layers.7.bias."
        )
    return LinearHead([part["weight"] for part in ordered], [part["bias"] for part in ordered])


class AestheticScore:
    """LAION aesthetic predictor v2 reward callable; models load on the first call. See the module docstring.

    Args:
        predictor_path: local path of the head's weights (`.pth` / `.pt` state dict or `.safetensors`);
            None means the path in `$TRL_FLOW_AESTHETIC_PREDICTOR`.
        clip_model_name_or_path: `CLIPModel` checkpoint providing the image embeddings (ViT-L/14 for the
            original head; the head's input size must equal the model's projection size).
        processor_name_or_path: its `CLIPProcessor`; None means the model's own.
        device: where to run the models; None means the current CUDA device if any, else the CPU.
        dtype: CLIP dtype (`torch.dtype` or "float32" / "float16" / "bfloat16"); None means float32. The head
            always runs in float32.
        batch_size: images per forward pass.
        name: the reward's `__name__` (TRL logs `rewards/<name>/mean`).
    """

    def __init__(
        self,
        predictor_path: str | os.PathLike[str] | None = None,
        clip_model_name_or_path: str = AESTHETIC_CLIP_MODEL,
        processor_name_or_path: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
        name: str = "aesthetic",
    ) -> None:
        self.__name__ = name
        self.predictor_path = predictor_path
        self.clip_model_name_or_path = clip_model_name_or_path
        self.processor_name_or_path = processor_name_or_path
        self.device = device
        self.dtype = dtype
        self.batch_size = check_batch_size(batch_size, name)

    def __repr__(self) -> str:
        return (
            f"AestheticScore(name={self.__name__!r}, predictor_path={self.predictor_path!r}, "
            f"clip={self.clip_model_name_or_path!r}, batch_size={self.batch_size})"
        )

    def _predictor_path(self) -> Path:
        path = self.predictor_path if self.predictor_path is not None else os.environ.get(AESTHETIC_PREDICTOR_ENV)
        if not path:
            raise UserInputError(
                f"reward '{self.__name__}' needs the LAION aesthetic predictor weights, which trl-flow does not "
                "download: get sac+logos+ava1-l14-linearMSE.pth from "
                "https://github.com/christophschuhmann/improved-aesthetic-predictor and set "
                f"{AESTHETIC_PREDICTOR_ENV}=/path/to/it (or use make_aesthetic(predictor_path=...))."
            )
        return Path(path).expanduser().resolve()

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Predict the aesthetic rating of each image (prompts are ignored)."""
        from reward_funcs._clip import load_clip

        check_lengths(prompts, completions, self.__name__)
        path = self._predictor_path()
        if not completions:
            return []
        device = resolve_device(self.device)
        head = cached(
            ("AestheticHead", str(path), str(device)), lambda: load_linear_head(path, self.__name__).to(device)
        )
        clip = load_clip(
            self.clip_model_name_or_path, self.processor_name_or_path, self.device, self.dtype, self.__name__
        )
        embeddings = clip.embed_images(completions, self.batch_size)
        if embeddings.shape[-1] != head.in_features:
            raise UserInputError(
                f"reward '{self.__name__}': the aesthetic head expects {head.in_features}-d embeddings but "
                f"'{self.clip_model_name_or_path}' gives {embeddings.shape[-1]}-d ones; use the CLIP model the "
                "head was trained on (openai/clip-vit-large-patch14 for the LAION head)."
            )
        import torch

        with torch.no_grad():
            scores = head(embeddings.to(device))
        return [float(score) for score in scores.cpu().tolist()]


def make_aesthetic(
    predictor_path: str | os.PathLike[str] | None = None,
    clip_model_name_or_path: str = AESTHETIC_CLIP_MODEL,
    processor_name_or_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
    name: str = "aesthetic",
) -> AestheticScore:
    """Create an aesthetic reward; nothing loads until its first call. Arguments: see [`AestheticScore`]."""
    return AestheticScore(
        predictor_path=predictor_path,
        clip_model_name_or_path=clip_model_name_or_path,
        processor_name_or_path=processor_name_or_path,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        name=name,
    )


aesthetic = make_aesthetic()
"""The built-in `aesthetic` reward: CLIP ViT-L/14 + LAION head from `$TRL_FLOW_AESTHETIC_PREDICTOR`."""
