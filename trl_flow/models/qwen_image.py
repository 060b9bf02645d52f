"""Qwen-Image (diffusers ``QwenImagePipeline``)."""

from __future__ import annotations

import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from PIL import Image

from ..errors import UserInputError
from .base import Conditioning, DenoiserCall
from .packed import PackedLatentsAdapter, pack_latents, unpack_latents


def _pad_to(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 (the token axis) of ``tensor`` to ``length``."""
    missing = length - tensor.shape[1]
    if missing <= 0:
        return tensor
    padding = tensor.new_zeros(tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([tensor, padding], dim=1)


def _trim(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the padding columns no sample in the batch uses; ``None`` for a mask that masks nothing.

    That is what ``QwenImagePipeline.encode_prompt`` hands its transformer for the same prompts (embeddings padded
    to the longest prompt of the batch, mask dropped when all ones), so a batch computes exactly as in the pipeline.
    """
    valid = mask.bool()
    length = int(valid.any(dim=0).nonzero().max()) + 1 if valid.any() else mask.shape[1]
    embeds, mask = embeds[:, :length], mask[:, :length]
    return embeds, (None if bool(mask.bool().all()) else mask)


class QwenImageAdapter(PackedLatentsAdapter):
    """Qwen-Image: MMDiT over a Qwen2.5-VL text encoder's last hidden states, packed latents, true CFG.

    Guidance is true classifier-free guidance, as ``QwenImagePipeline(true_cfg_scale=..., negative_prompt=...)``: the
    trainer's ``guidance_scale`` is the pipeline's ``true_cfg_scale`` and is on when > 1; the conditional and the
    negative prompt run as two transformer calls (their text lengths differ), and the combination is rescaled per
    token to the conditional prediction's norm, as the pipeline does. (The pipeline's separate ``guidance_scale``
    exists for guidance-distilled variants, of which none is released; those are refused.)

    Prompt embeddings have one length per prompt. ``encode_prompts`` pads them (and the negative prompt's) to a
    common length with a mask, so every tensor is batch-first and can be stacked, shuffled and split by TRL;
    ``predict_velocity`` trims a batch back to its longest prompt, which is what the pipeline computes.

    Default LoRA targets are the official Flow-GRPO Qwen-Image ones: the attention projections of both streams
    (``attn.to_q/k/v``, ``attn.to_out.0``, ``attn.add_q/k/v_proj``, ``attn.to_add_out``) and both streams' MLPs
    (``img_mlp.net.0.proj``, ``img_mlp.net.2``, ``txt_mlp.net.0.proj``, ``txt_mlp.net.2``).
    """

    pipeline_class_names = ("QwenImagePipeline",)
    default_lora_target_modules = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    )
    calculate_shift = staticmethod(calculate_shift)

    def __init__(self, pipeline) -> None:
        super().__init__(pipeline)
        transformer = getattr(pipeline, "transformer", None)
        if transformer is not None and transformer.config.get("guidance_embeds", False):
            raise UserInputError(
                "guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported: the trainer's "
                "guidance_scale is Qwen-Image's true_cfg_scale"
            )

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        names = ("vae", "text_encoder")
        return {name: getattr(self.pipeline, name) for name in names if getattr(self.pipeline, name, None) is not None}

    def _encode(self, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = self.pipeline.encode_prompt(
            prompt=prompts, device=self.execution_device, max_sequence_length=max_sequence_length
        )
        if mask is None:  # the pipeline drops a mask of all ones
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str, guidance_scale: float, max_sequence_length: int
    ) -> Conditioning:
        embeds, mask = self._encode(prompts, max_sequence_length)
        conditioning = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if guidance_scale > 1:
            # Encoded once per prompt, like the pipeline with negative_prompt=[negative_prompt] * batch_size.
            negative, negative_mask = self._encode([negative_prompt] * len(prompts), max_sequence_length)
            conditioning["negative_prompt_embeds"] = negative
            conditioning["negative_prompt_embeds_mask"] = negative_mask
        # One common length for every tensor of the batch (masked padding changes nothing, see _trim).
        length = max(tensor.shape[1] for tensor in conditioning.values())
        return {name: _pad_to(tensor, length) for name, tensor in conditioning.items()}

    def predict_velocity(
        self,
        denoiser: DenoiserCall,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        _, _, latent_height, latent_width = latents.shape
        target_tokens = (latent_height // 2) * (latent_width // 2)
        hidden_states, img_shapes = self._image_tokens(latents, conditioning)
        timestep = self._timestep(sigma, hidden_states)

        def run(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            embeds, mask = _trim(embeds, mask)
            return denoiser(
                hidden_states=hidden_states,
                timestep=timestep,
                guidance=None,
                encoder_hidden_states_mask=mask,
                encoder_hidden_states=embeds,
                img_shapes=img_shapes,
            )[:, :target_tokens]  # the target's tokens come first (edit families append condition tokens)

        prediction = run(conditioning["prompt_embeds"], conditioning["prompt_embeds_mask"])
        if guidance_scale > 1:
            negative = run(conditioning["negative_prompt_embeds"], conditioning["negative_prompt_embeds_mask"])
            combined = negative + guidance_scale * (prediction - negative)
            # Rescaled per token to the conditional prediction's norm, as QwenImagePipeline does.
            conditional_norm = torch.norm(prediction, dim=-1, keepdim=True)
            combined_norm = torch.norm(combined, dim=-1, keepdim=True)
            prediction = combined * (conditional_norm / combined_norm)
        return unpack_latents(prediction, latent_height, latent_width)

    def _image_tokens(self, latents: torch.Tensor, conditioning: Conditioning) -> tuple[torch.Tensor, list]:
        """The transformer's image stream for spatial ``latents`` and its ``img_shapes`` (one ``(frames, rows,
        columns)`` per image per sample): here the packed target alone."""
        batch_size, _, latent_height, latent_width = latents.shape
        return pack_latents(latents.to(self.dtype)), [[(1, latent_height // 2, latent_width // 2)]] * batch_size

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        latents = latents.unsqueeze(2).to(vae.dtype)  # one frame: (B, C, 1, H, W)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents / inverse_std + mean
        images = vae.decode(latents, return_dict=False)[0][:, :, 0]
        return self.pipeline.image_processor.postprocess(images, output_type="pil")
