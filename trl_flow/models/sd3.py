"""Stable Diffusion 3 / 3.5 (diffusers ``StableDiffusion3Pipeline``)."""

from __future__ import annotations

import copy

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from PIL import Image

from .base import Conditioning, DenoiserCall, FlowModelAdapter

SD3_ADALN_LORA_TARGETS: tuple[str, ...] = ("norm1.linear", "norm1_context.linear", "norm_out.linear")
"""The AdaLN modulation layers of SD3's transformer blocks and output norm (timestep + pooled text conditioning):
extra LoRA targets for small models, where the attention projections alone learn slowly."""


class SD3Adapter(FlowModelAdapter):
    """SD3/SD3.5: MMDiT transformer, CLIP-L + CLIP-G + T5 text encoders, 16-channel VAE, true CFG.

    LoRA targets are the attention projections of both streams (image: ``to_q/k/v``, ``to_out.0``; text:
    ``add_q/k/v_proj``, ``to_add_out``), as in the Flow-GRPO SD3.5 recipes.
    """

    pipeline_class_names = ("StableDiffusion3Pipeline",)
    default_lora_target_modules = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    )

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        return {name: getattr(self.pipeline, name) for name in names if getattr(self.pipeline, name) is not None}

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str, guidance_scale: float, max_sequence_length: int
    ) -> Conditioning:
        use_cfg = guidance_scale > 1
        device = self.execution_device
        prompt_embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=use_cfg,
            negative_prompt=[negative_prompt] * len(prompts) if use_cfg else None,
            max_sequence_length=max_sequence_length,
        )
        conditioning = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
        if use_cfg:
            conditioning["negative_prompt_embeds"] = negative_embeds
            conditioning["negative_pooled_prompt_embeds"] = negative_pooled
        return conditioning

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        return self.pipeline.prepare_latents(
            batch_size,
            self.denoiser.config.in_channels,
            height,
            width,
            self.dtype,
            self.execution_device,
            generator,
        )

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        # A copy, so that the pipeline's own scheduler state is never touched by training.
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = self.denoiser.config.patch_size
            scale = self.pipeline.vae_scale_factor
            image_seq_len = (height // scale // patch) * (width // scale // patch)
            kwargs["mu"] = calculate_shift(
                image_seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_inference_steps, device="cpu", **kwargs)
        return scheduler.sigmas.float()

    def predict_velocity(
        self,
        denoiser: DenoiserCall,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        latents = latents.to(self.dtype)
        # SD3's transformer takes the scheduler's timestep, sigma * num_train_timesteps.
        timestep = sigma.to(latents.device, torch.float32) * self.pipeline.scheduler.config.num_train_timesteps
        if guidance_scale > 1:
            prediction = denoiser(
                hidden_states=torch.cat([latents, latents]),
                timestep=torch.cat([timestep, timestep]),
                encoder_hidden_states=torch.cat(
                    [conditioning["negative_prompt_embeds"], conditioning["prompt_embeds"]]
                ),
                pooled_projections=torch.cat(
                    [conditioning["negative_pooled_prompt_embeds"], conditioning["pooled_prompt_embeds"]]
                ),
            )
            uncond, cond = prediction.chunk(2)
            return uncond + guidance_scale * (cond - uncond)
        return denoiser(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=conditioning["prompt_embeds"],
            pooled_projections=conditioning["pooled_prompt_embeds"],
        )

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pil")
