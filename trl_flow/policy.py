"""`DiffusionPolicy`: how a diffusers denoiser presents itself to TRL's `GRPOTrainer` as its `model`."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationConfig, PretrainedConfig


class DiffusionPolicy(nn.Module):
    """Holds the pipeline's denoiser (the *same* module object, so LoRA injected here is in the pipeline too).

    `GRPOTrainer.__init__` and `transformers.Trainer` read a few attributes of a causal LM (`config`,
    `generation_config`, output embeddings, gradient-checkpointing switches, model tags); this class provides them
    and nothing else. Only the denoiser is inside, so only it reaches the optimizer, DDP/DeepSpeed and checkpoints;
    the VAE and text encoders stay frozen outside.

    Args:
        denoiser: the diffusers transformer (e.g. ``SD3Transformer2DModel``).
        name_or_path: hub id or folder the pipeline came from (shown in model cards).
    """

    supports_gradient_checkpointing = True

    def __init__(self, denoiser: nn.Module, name_or_path: str = "") -> None:
        super().__init__()
        self.denoiser = denoiser
        self.config = PretrainedConfig(name_or_path=name_or_path)
        self.generation_config = GenerationConfig()

    def forward(self, **denoiser_kwargs) -> torch.Tensor:
        """Run the denoiser on its own keyword arguments and return its prediction tensor."""
        return self.denoiser(**denoiser_kwargs, return_dict=False)[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    # Attributes and hooks TRL/transformers call on an LLM; meaningless or trivial for a denoiser.
    def get_output_embeddings(self) -> None:
        return None

    def add_model_tags(self, tags) -> None:
        pass

    def enable_input_require_grads(self) -> None:
        # diffusers checkpoints with use_reentrant=False, which needs no input requiring grad.
        pass

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """What `transformers.Trainer` calls for `gradient_checkpointing=True`: diffusers' own block checkpointing
        (non-reentrant). `every_n_layers`/`offload` have no diffusers equivalent and are refused when changed."""
        if every_n_layers != 1 or offload:
            raise ValueError(
                "diffusers checkpoints every transformer block, on the device: leave every_n_layers and "
                "offload at their defaults"
            )
        self.denoiser.enable_gradient_checkpointing()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.denoiser.disable_gradient_checkpointing()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.denoiser, "gradient_checkpointing", False))
