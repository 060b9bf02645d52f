"""The one interface between the Flow-GRPO trainer and a model family.

An adapter knows how a family's pipeline encodes prompts, shapes latents, schedules sigmas, calls its denoiser
(with classifier-free guidance) and decodes latents to images. The trainer knows the algorithm. Adding a family
means one file under ``trl_flow/models/`` with a subclass of :class:`FlowModelAdapter`, registered in
``trl_flow/models/__init__.py``.

The consistency contract: :meth:`FlowModelAdapter.predict_velocity` is the only place a denoiser is called, both
in rollouts and in training passes, with the same conditioning tensors (stored per sample), so a rollout's log-prob
and the first training pass's log-prob are computed from the same numbers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

# Per-sample conditioning tensors, all batch-first, produced by `encode_prompts` and consumed by
# `predict_velocity`. Batch-first matters: TRL shuffles and splits every tensor of a rollout batch along dim 0.
Conditioning = dict[str, torch.Tensor]

# What rewards score: one per sample, a PIL image, or for a video family the list of its frames.
Completion = Any

# Anything that runs the denoiser: the trainer passes its (possibly DDP/DeepSpeed-wrapped, PEFT-wrapped)
# `DiffusionPolicy`, whose forward takes the denoiser's keyword arguments and returns its prediction tensor.
DenoiserCall = Callable[..., torch.Tensor]


class FlowModelAdapter(ABC):
    """What the trainer needs from a flow-matching text-to-image family.

    Args:
        pipeline: a loaded diffusers pipeline of the family.
    """

    #: diffusers pipeline class names this adapter serves (used for automatic selection).
    pipeline_class_names: tuple[str, ...] = ()
    #: module names PEFT's LoRA targets by default for this family's denoiser.
    default_lora_target_modules: tuple[str, ...] = ()

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def configure(self, args: Any) -> None:
        """Read the family's own keys from the run's `FlowGRPOConfig` (a video family's frame count, ...) and check
        them against the pipeline; called once, before the trainer wraps `denoiser`. Image families need none."""
        return None

    def step_record(self, sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra tensors of the rollout record, each (B, K) for the trained steps' noise levels ``sigmas`` (B, K):
        what a family wants kept about each trained step (Wan2.2: which expert ran it). None by default."""
        return {}

    @property
    def denoiser(self) -> torch.nn.Module:
        """The trainable network (a diffusers transformer)."""
        return self.pipeline.transformer

    @property
    def execution_device(self) -> torch.device:
        """Where the denoiser runs. Frozen parts are used here too, but may live on the CPU between uses (offload),
        so their own device is not a guide."""
        return self.denoiser.device

    @abstractmethod
    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The pipeline parts that are never trained (VAE, text encoders), by attribute name."""

    @abstractmethod
    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str, guidance_scale: float, max_sequence_length: int
    ) -> Conditioning:
        """Text conditioning for each prompt (and the negative prompt when guidance is on), batch-first."""

    def encode_conditioning(
        self,
        prompts: list[str],
        negative_prompt: str,
        guidance_scale: float,
        max_sequence_length: int,
        condition_images: Sequence[Any] | None = None,
    ) -> Conditioning:
        """All conditioning for each sample: the text's, and for image-conditioned families (editing) whatever the
        source image adds (its latents, image-aware prompt embeddings), batch-first like the text's.

        Text-to-image families take no source image; they return `encode_prompts`."""
        if condition_images is not None:
            raise TypeError(f"{type(self).__name__} is text-to-image: it takes no condition image")
        return self.encode_prompts(prompts, negative_prompt, guidance_scale, max_sequence_length)

    @property
    def takes_condition_images(self) -> bool:
        """Whether the family edits a source image (its ``encode_conditioning`` takes ``condition_images``): the
        trainer then needs a `source_images` dataset column and hands those images to every rollout."""
        return type(self).encode_conditioning is not FlowModelAdapter.encode_conditioning

    @abstractmethod
    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Initial noise, drawn exactly as the family's pipeline draws it (same generator calls, same values).

        The layout and rank are the adapter's choice (a video family adds a frame axis, and takes its frame count
        as a constructor argument): the trainer only needs it batch-first, passes it back unchanged to
        ``predict_velocity``/``decode_latents`` and treats the SDE step element-wise. Packed-latent families (FLUX,
        Qwen-Image) keep it spatial, ``(B, C, H, W)``, and pack it for their transformer (see ``packed.py``).
        """

    @abstractmethod
    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """The sampling schedule as the pipeline builds it: ``num_inference_steps + 1`` sigmas from ~1 to 0."""

    @abstractmethod
    def predict_velocity(
        self,
        denoiser: DenoiserCall,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The (guided) velocity ``v(x, sigma)`` for a batch of latents at per-sample noise levels ``sigma`` (B,)."""

    @abstractmethod
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Completion]:
        """Latents at sigma 0 to completions, as the pipeline's ``output_type="pil"`` returns them: one RGB PIL image
        per sample, or for a video family the list of the sample's frames."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the denoiser runs in."""
        # diffusers walks every submodule to answer this, twice per denoising step here; its answer only changes
        # when the weights are cast or moved (e.g. by DeepSpeed), which changes the first parameter too.
        first = next(self.denoiser.parameters())
        key = (first.dtype, first.data_ptr())
        if getattr(self, "_dtype_key", None) != key:
            self._dtype_key, self._dtype = key, self.denoiser.dtype
        return self._dtype

    def save_lora_weights(self, output_dir: str, lora_state_dict: dict, lora_config: dict) -> None:
        """Write the denoiser's LoRA in the family's diffusers format (``pipe.load_lora_weights(dir)`` loads it).

        The PEFT config goes in as metadata: without it diffusers assumes ``lora_alpha == r`` and a LoRA trained
        with another alpha comes back with the wrong scale.
        """
        type(self.pipeline).save_lora_weights(
            output_dir,
            transformer_lora_layers=lora_state_dict,
            transformer_lora_adapter_metadata=lora_config,
            safe_serialization=True,
        )

    def reference_images(
        self,
        prompts: list[str],
        num_inference_steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        max_sequence_length: int,
        seed: int,
        condition_images: list | None = None,
    ) -> list[Image.Image]:
        """The family's own pipeline call (deterministic sampler), which noise-level-0 rollouts must reproduce; an
        image-editing family overrides it to pass ``condition_images`` (one source image per prompt)."""
        if condition_images is not None:
            raise TypeError(f"{type(self).__name__} is text-to-image: it takes no condition image")
        return self.pipeline(
            prompts,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            max_sequence_length=max_sequence_length,
            generator=torch.Generator().manual_seed(seed),
        ).images
