"""Wan text-to-video (diffusers ``WanPipeline``): Wan2.1, Wan2.2 A14B (two experts) and Wan2.2 TI2V-5B (text only).

The video family behind the one adapter interface: latents are 5-D, ``(B, C, F', H', W')`` with
``F' = (num_frames - 1) // 4 + 1`` (the VAE's causal temporal compression), and a completion is the list of a
sample's frames (PIL). The trainer, the SDE and the algorithms see nothing else of the time axis.

Wan2.2 A14B has two denoisers: ``transformer`` (high noise) for timesteps ``t >= boundary_ratio * 1000`` with
``guidance_scale``, ``transformer_2`` (low noise) below it with ``guidance_scale_2``. The adapter's `denoiser` is then
:class:`WanExperts`, one ``nn.Module`` holding the *trained* experts as submodules (the same objects as the
pipeline's, so LoRA injected into it is in the pipeline too): PEFT, the optimizer, DDP/DeepSpeed, the LoRA-disabled
reference and the EMA all see exactly the trained experts, and an untrained expert is held outside it (frozen, in
`frozen_modules`). Which expert ran each trained step is recorded in the rollout (``experts``: 0 = ``transformer``,
1 = ``transformer_2``); the training pass picks the same one from the same recorded sigma.

TI2V-5B (``expand_timesteps=True``, 48 latent channels, 16x VAE) is covered for text-to-video by the same adapter:
its per-token timestep is the step's timestep on every latent token (the pipeline's mask is all ones without an
image), and its channels and compression come from the configs. Its image-to-video mode (a first-frame latent held
at t = 0) is not implemented.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from ..errors import UserInputError
from .base import Conditioning, DenoiserCall, FlowModelAdapter

EXPERTS: tuple[str, ...] = ("transformer", "transformer_2")
"""Wan2.2's expert names, as pipeline attributes: high-noise first. The rollout record's ``experts`` indexes them."""

DEFAULT_FPS: float = 16.0
"""Frame rate of Wan2.1 / Wan2.2 A14B videos (the diffusers Wan examples export at 16 fps)."""


class WanExperts(nn.Module):
    """Wan2.2's experts as one trainable module: ``forward(expert=name, **kwargs)`` runs that expert.

    Args:
        trained: the experts to train, by pipeline attribute name; registered as submodules (so parameter names are
            ``transformer.blocks...`` / ``transformer_2.blocks...``).
        frozen: the other experts, held by reference only: no parameters of theirs are in this module.
    """

    def __init__(self, trained: dict[str, nn.Module], frozen: dict[str, nn.Module]) -> None:
        super().__init__()
        if not trained:
            raise UserInputError("trained_experts: train at least one of the Wan2.2 experts")
        for name, module in trained.items():
            self.add_module(name, module)
        self.trained_names = tuple(trained)
        self._frozen = dict(frozen)  # a plain dict: not registered, not trained, not copied (see __deepcopy__)

    def expert(self, name: str) -> nn.Module:
        """The expert called ``name``, trained or not."""
        return getattr(self, name) if name in self.trained_names else self._frozen[name]

    def forward(self, expert: str, return_dict: bool = False, **kwargs) -> Any:
        return self.expert(expert)(**kwargs, return_dict=return_dict)

    def __deepcopy__(self, memo: dict) -> WanExperts:
        # The full-fine-tuning reference is a deep copy of the denoiser: copy the trained experts, share the
        # frozen one (it never changes, and a second 14B copy would not fit).
        trained = {name: copy.deepcopy(getattr(self, name), memo) for name in self.trained_names}
        return WanExperts(trained, self._frozen)

    @property
    def _first(self) -> nn.Module:
        return getattr(self, self.trained_names[0])

    @property
    def dtype(self) -> torch.dtype:
        return self._first.dtype

    @property
    def device(self) -> torch.device:
        return self._first.device

    @property
    def config(self):
        return self._first.config

    @property
    def gradient_checkpointing(self) -> bool:
        return any(getattr(self, name).gradient_checkpointing for name in self.trained_names)

    def enable_gradient_checkpointing(self) -> None:
        for name in self.trained_names:
            getattr(self, name).enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        for name in self.trained_names:
            getattr(self, name).disable_gradient_checkpointing()

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Each trained expert in the pipeline's layout: the trainer asks for ``<dir>/transformer``; experts go to
        ``<dir>/transformer`` and ``<dir>/transformer_2`` (``WanPipeline.from_pretrained(base, transformer=...,
        transformer_2=...)`` loads them)."""
        parent = os.path.dirname(os.path.normpath(save_directory))
        for name in self.trained_names:
            getattr(self, name).save_pretrained(os.path.join(parent, name), **kwargs)


class WanAdapter(FlowModelAdapter):
    """Wan2.1 / Wan2.2: UMT5 text encoder, ``WanTransformer3DModel`` (one or two experts), ``AutoencoderKLWan``.

    Conditioning is the pipeline's: UMT5 states cut to each prompt's length and zero-padded to
    ``max_sequence_length``, no mask; CFG is two transformer passes (conditional, then the negative prompt) combined
    as ``uncond + g (cond - uncond)``. The timestep is the scheduler's, ``sigma * 1000`` (no /1000 as in FLUX). The
    sigma grid is the scheduler's static flow shift (UniPC's or Euler's; the trainer's SDE steps on it, UniPC's
    multistep history is not replayed). Decoding un-normalises with the VAE's per-channel ``latents_mean`` /
    ``latents_std``.

    Family options come from the run's config in `configure`: ``num_frames`` (4k + 1), ``fps``,
    ``guidance_scale_2`` and ``trained_experts`` (Wan2.2), ``vae_tiling`` / ``vae_slicing``.

    Default LoRA targets: self- and cross-attention projections (``to_q/k/v``, ``to_out.0`` of ``attn1`` and
    ``attn2``) and the feed-forward layers (``ffn.net.0.proj``, ``ffn.net.2``), in every trained expert.
    """

    pipeline_class_names = ("WanPipeline",)
    default_lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")

    def __init__(self, pipeline) -> None:
        super().__init__(pipeline)
        self.num_frames = 81  # WanPipeline's default
        self.guidance_scale_2: float | None = None
        self._fps: float | None = None
        self._denoiser: nn.Module | None = None
        self.trained_experts = tuple(name for name in EXPERTS if getattr(pipeline, name, None) is not None)

    # ------------------------------------------------------------------------------------------------ options
    @property
    def is_two_expert(self) -> bool:
        """Wan2.2 A14B: a ``boundary_ratio`` and both experts."""
        return (
            self.pipeline.config.get("boundary_ratio", None) is not None
            and getattr(self.pipeline, "transformer_2", None) is not None
        )

    @property
    def fps(self) -> float:
        """Frames per second of the videos: the config's ``fps``, else the Wan default (16; 24 for TI2V-5B). Not
        stored in diffusers' Wan configs; rewards and video export get it from here."""
        if self._fps is not None:
            return float(self._fps)
        return 24.0 if self.pipeline.config.get("expand_timesteps", False) else DEFAULT_FPS

    def configure(self, args: Any) -> None:
        """Read and check the Wan keys of the run's config (see the class docstring); bad values are a
        `UserInputError` naming the key, raised before any weight is wrapped or any output written."""
        temporal = self.pipeline.vae_scale_factor_temporal
        num_frames = getattr(args, "num_frames", None) or self.num_frames
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise UserInputError(
                f"num_frames = {num_frames}: Wan's VAE compresses time {temporal}x causally, so the frame count must "
                f"be {temporal}k + 1 (e.g. 81, 33, 9, 5 or 1)"
            )
        self.num_frames = num_frames
        multiple = self.pipeline.vae_scale_factor_spatial * self._patch_size[1]
        for key in ("height", "width"):
            value = getattr(args, key)
            if value % multiple or value % 16:
                raise UserInputError(
                    f"{key} = {value}: Wan needs sizes that are multiples of {max(multiple, 16)} (the VAE's "
                    f"{self.pipeline.vae_scale_factor_spatial}x compression times the transformer's 2x2 patches)"
                )
        self._fps = getattr(args, "fps", None)
        self.guidance_scale_2 = getattr(args, "guidance_scale_2", None)
        if self.guidance_scale_2 is not None and not self.is_two_expert:
            raise UserInputError(
                "guidance_scale_2 is the low-noise expert's guidance scale of Wan2.2 A14B; this pipeline has one "
                "transformer (no boundary_ratio): remove guidance_scale_2"
            )
        trained = getattr(args, "trained_experts", None)
        if trained is not None:
            available = [name for name in EXPERTS if getattr(self.pipeline, name, None) is not None]
            unknown = [name for name in trained if name not in available] or ([] if trained else ["(none)"])
            if unknown or not self.is_two_expert:
                raise UserInputError(
                    f"trained_experts = {list(trained)}: this pipeline's experts are {available}; choose one or "
                    "more of them (only Wan2.2 A14B has two)"
                )
            self.trained_experts = tuple(name for name in EXPERTS if name in trained)
        vae = self.pipeline.vae
        if getattr(args, "vae_tiling", False):
            vae.enable_tiling()
        if getattr(args, "vae_slicing", False):
            vae.enable_slicing()
        self._denoiser = None

    # ------------------------------------------------------------------------------------------------ modules
    @property
    def _patch_size(self) -> tuple[int, int, int]:
        transformer = self.pipeline.transformer or self.pipeline.transformer_2
        return tuple(transformer.config.patch_size)

    @property
    def denoiser(self) -> nn.Module:
        """The pipeline's ``transformer`` (Wan2.1, TI2V-5B), or :class:`WanExperts` of the trained experts."""
        if not self.is_two_expert:
            return self.pipeline.transformer
        if self._denoiser is None:
            trained = {name: getattr(self.pipeline, name) for name in self.trained_experts}
            frozen = {name: getattr(self.pipeline, name) for name in EXPERTS if name not in self.trained_experts}
            self._denoiser = WanExperts(trained, frozen)
        return self._denoiser

    def frozen_modules(self) -> dict[str, nn.Module]:
        names = ["vae", "text_encoder"]
        if self.is_two_expert:
            names += [name for name in EXPERTS if name not in self.trained_experts]
        return {name: getattr(self.pipeline, name) for name in names if getattr(self.pipeline, name, None) is not None}

    # ------------------------------------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str, guidance_scale: float, max_sequence_length: int
    ) -> Conditioning:
        # CFG is on when either expert guides (WanPipeline decides it from guidance_scale alone; so do we).
        use_cfg = guidance_scale > 1
        prompt_embeds, negative_embeds = self.pipeline.encode_prompt(
            prompt=prompts,
            negative_prompt=[negative_prompt] * len(prompts) if use_cfg else None,
            do_classifier_free_guidance=use_cfg,
            max_sequence_length=max_sequence_length,
            device=self.execution_device,
        )
        conditioning = {"prompt_embeds": prompt_embeds}
        if use_cfg:
            conditioning["negative_prompt_embeds"] = negative_embeds
        return conditioning

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        transformer = self.pipeline.transformer or self.pipeline.transformer_2
        return self.pipeline.prepare_latents(
            batch_size,
            transformer.config.in_channels,
            height,
            width,
            self.num_frames,
            torch.float32,  # as WanPipeline: float32 latents whatever the transformer's dtype
            self.execution_device,
            generator,
        )

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        # A copy, so that the pipeline's own scheduler state is never touched. Wan's shift is static: no mu.
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        scheduler.set_timesteps(num_inference_steps, device="cpu")
        return scheduler.sigmas.float()

    # ----------------------------------------------------------------------------------------------- velocity
    def expert_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """Which expert runs at each noise level: 0 (``transformer``) where ``t >= boundary_ratio * 1000``, else 1
        (``transformer_2``); all 0 for a one-transformer pipeline. Any shape; long."""
        if not self.is_two_expert:
            return torch.zeros_like(sigma, dtype=torch.long)
        train_timesteps = self.pipeline.scheduler.config.num_train_timesteps
        timestep = sigma.float() * train_timesteps
        return (timestep < self.pipeline.config.boundary_ratio * train_timesteps).long()

    def step_record(self, sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rollout record's ``experts`` (B, K): the expert each trained step ran (Wan2.2 only)."""
        return {"experts": self.expert_of(sigmas)} if self.is_two_expert else {}

    def _guided(
        self,
        denoiser: DenoiserCall,
        expert: int | None,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """One expert's prediction with two-pass CFG, as WanPipeline computes it (conditional pass first)."""
        kwargs = {} if expert is None else {"expert": EXPERTS[expert]}
        if self.pipeline.config.get("expand_timesteps", False):
            # TI2V-5B: one timestep per latent token (all equal in text-to-video: the pipeline's mask is all ones).
            _, p_h, p_w = self._patch_size
            frames, height, width = latents.shape[2:]
            timestep = timestep[:, None].expand(-1, frames * (height // p_h) * (width // p_w))

        def run(embeds: torch.Tensor) -> torch.Tensor:
            return denoiser(
                hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds.to(self.dtype), **kwargs
            )

        prediction = run(conditioning["prompt_embeds"])
        if guidance_scale > 1:
            uncond = run(conditioning["negative_prompt_embeds"])
            prediction = uncond + guidance_scale * (prediction - uncond)
        return prediction

    def predict_velocity(
        self,
        denoiser: DenoiserCall,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        latents = latents.to(self.dtype)
        timestep = sigma.to(latents.device, torch.float32) * self.pipeline.scheduler.config.num_train_timesteps
        if not self.is_two_expert:
            return self._guided(denoiser, None, latents, timestep, conditioning, guidance_scale)
        experts = self.expert_of(sigma).to(latents.device)
        scales = (guidance_scale, guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2)
        if bool((experts == experts[0]).all()):  # one expert for the whole batch: the rollout's case
            expert = int(experts[0])
            return self._guided(denoiser, expert, latents, timestep, conditioning, scales[expert])
        # A batch mixing noise levels on both sides of the boundary: each expert on its samples.
        velocity = torch.empty_like(latents)
        for expert in (0, 1):
            rows = (experts == expert).nonzero().flatten()
            part = {name: tensor.index_select(0, rows) for name, tensor in conditioning.items()}
            velocity[rows] = self._guided(denoiser, expert, latents[rows], timestep[rows], part, scales[expert]).to(
                velocity.dtype
            )
        return velocity

    # ------------------------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[list]:
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        return self.pipeline.video_processor.postprocess_video(video, output_type="pil")

    # ----------------------------------------------------------------------------------------------- weights
    def save_lora_weights(self, output_dir: str, lora_state_dict: dict, lora_config: dict) -> None:
        """Wan2.1: the LoRA in ``output_dir`` (``pipe.load_lora_weights(output_dir)``). Wan2.2: the high-noise
        expert's in ``output_dir`` and the low-noise expert's in ``output_dir/transformer_2``
        (``pipe.load_lora_weights(output_dir + "/transformer_2", load_into_transformer_2=True)``), each where it
        was trained; diffusers' Wan LoRA format holds one transformer per file."""
        if not self.is_two_expert:
            return super().save_lora_weights(output_dir, lora_state_dict, lora_config)
        for name in self.trained_experts:
            prefix = name + "."
            layers = {key[len(prefix) :]: value for key, value in lora_state_dict.items() if key.startswith(prefix)}
            folder = output_dir if name == "transformer" else os.path.join(output_dir, name)
            super().save_lora_weights(folder, layers, lora_config)

    def reference_images(
        self,
        prompts: list[str],
        num_inference_steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        max_sequence_length: int,
        seed: int,
    ) -> list[list]:
        """``WanPipeline(...).frames``: per prompt, the list of its frames (PIL)."""
        extra = {"guidance_scale_2": self.guidance_scale_2} if self.is_two_expert else {}
        return self.pipeline(
            prompts,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            num_frames=self.num_frames,
            max_sequence_length=max_sequence_length,
            generator=torch.Generator().manual_seed(seed),
            output_type="pil",
            **extra,
        ).frames
