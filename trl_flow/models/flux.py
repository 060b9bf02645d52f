"""FLUX.1 (diffusers ``FluxPipeline``): dev (guidance-distilled) and schnell."""

from __future__ import annotations

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from PIL import Image

from .base import Conditioning, DenoiserCall
from .packed import PackedLatentsAdapter, pack_latents, unpack_latents


def flux_image_ids(latent_height: int, latent_width: int, device, dtype) -> torch.Tensor:
    """FLUX's position ids of the packed image tokens: ``(0, row, col)`` per 2x2 patch, row-major, ``(N, 3)``."""
    rows, cols = torch.meshgrid(torch.arange(latent_height // 2), torch.arange(latent_width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxAdapter(PackedLatentsAdapter):
    """FLUX.1: MMDiT with double- and single-stream blocks, CLIP-L (pooled) + T5 text encoders, packed latents.

    Guidance: FLUX.1-dev is guidance-distilled, so ``guidance_scale`` is fed to the transformer's guidance embedding
    (``transformer.config.guidance_embeds``) and there is no CFG batch; ``negative_prompt`` is not used. FLUX.1-schnell
    has no guidance embedding and ignores ``guidance_scale``, as ``FluxPipeline`` does.

    Default LoRA targets are the official Flow-GRPO FLUX ones (``scripts/train_flux.py``): the attention projections
    ``attn.to_q/k/v`` (double *and* single blocks: PEFT matches name suffixes), ``attn.to_out.0``,
    ``attn.add_q/k/v_proj``, ``attn.to_add_out`` (double blocks' image output and text stream) and the double blocks'
    feed-forwards (``ff.net.0.proj``, ``ff.net.2``, ``ff_context.net.0.proj``, ``ff_context.net.2``). The single
    blocks' fused ``proj_mlp``/``proj_out`` are left out there too; note that a bare ``proj_out`` target would also
    match the transformer's final output layer.
    """

    pipeline_class_names = ("FluxPipeline",)
    default_lora_target_modules = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    calculate_shift = staticmethod(calculate_shift)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        names = ("vae", "text_encoder", "text_encoder_2")
        return {name: getattr(self.pipeline, name) for name in names if getattr(self.pipeline, name, None) is not None}

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str, guidance_scale: float, max_sequence_length: int
    ) -> Conditioning:
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.execution_device,
            max_sequence_length=max_sequence_length,
        )
        # The text position ids are all zeros of the embeddings' length: rebuilt per call, not stored per sample.
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def predict_velocity(
        self,
        denoiser: DenoiserCall,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        _, _, latent_height, latent_width = latents.shape
        hidden_states = pack_latents(latents.to(self.dtype))
        image_ids = flux_image_ids(latent_height, latent_width, latents.device, hidden_states.dtype)
        prediction = self._transformer(denoiser, hidden_states, image_ids, sigma, conditioning, guidance_scale)
        return unpack_latents(prediction, latent_height, latent_width)

    def _transformer(
        self,
        denoiser: DenoiserCall,
        hidden_states: torch.Tensor,
        image_ids: torch.Tensor,
        sigma: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The FLUX transformer on a packed token sequence with its position ids (shared with FLUX.1 Kontext, whose
        sequence also holds the source image's tokens)."""
        prompt_embeds = conditioning["prompt_embeds"]
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((hidden_states.shape[0],), float(guidance_scale), device=hidden_states.device)
        return denoiser(
            hidden_states=hidden_states,
            timestep=self._timestep(sigma, hidden_states),
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=hidden_states.device, dtype=prompt_embeds.dtype),
            img_ids=image_ids,
        )

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pil")
