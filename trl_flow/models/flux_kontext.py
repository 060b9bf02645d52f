"""FLUX.1 Kontext (diffusers ``FluxKontextPipeline``): FLUX.1 editing a source image given in the dataset.

What Kontext adds to FLUX.1 (``pipeline_flux_kontext.py``): the source image is VAE-encoded (argmax, so it is
deterministic) and normalised as ``(z - shift) * scale``, packed into 2x2-patch tokens like the target, and those
condition tokens are concatenated *after* the target tokens at every step. Their position ids are the target's grid
ids with the first coordinate set to 1 (the target's is 0); the transformer's output is cut back to the target
tokens. The schedule's ``mu`` comes from the target tokens only, and the text encoders never see the image.

Conditioning per sample: the text's (``prompt_embeds``, ``pooled_prompt_embeds``) and ``image_latents``, the source's
latents kept spatial ``(B, C, h, w)`` (packed at each call, so the condition's ids come from its shape). The trainer
encodes them once per (prompt, source image) group (``RolloutSampler.conditioning``).

Source size: as the pipeline with ``_auto_resize=False`` sizes a batch of source images, every source of one
``encode_conditioning`` call is resized to the first one's size floored to a multiple of ``vae_scale_factor * 2``
(16 for the real VAE). Prepare the sources at the training resolution (flow_grpo resizes them to the target size);
the pipeline's default ``_auto_resize`` would snap them to Kontext's preferred 672-1568 px resolutions instead.
Guidance: the guidance embedding (``guidance_scale``, 2.5 in flow_grpo's recipe); the pipeline's optional true CFG
(``true_cfg_scale`` with a negative prompt) is not used in rollouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ..errors import UserInputError
from .base import Conditioning, DenoiserCall
from .flux import FluxAdapter, flux_image_ids
from .packed import pack_latents, unpack_latents


def kontext_condition_ids(latent_height: int, latent_width: int, device, dtype) -> torch.Tensor:
    """Position ids of the source image's packed tokens: the target's grid ids with the first coordinate 1."""
    ids = flux_image_ids(latent_height, latent_width, device, dtype)
    ids[:, 0] = 1
    return ids


class FluxKontextAdapter(FluxAdapter):
    """FLUX.1 Kontext: the FLUX adapter with the source image's tokens appended to the target's at every step.

    LoRA targets, text encoding, guidance embedding and decoding are FLUX.1-dev's (:class:`FluxAdapter`).
    """

    pipeline_class_names = ("FluxKontextPipeline",)

    @torch.no_grad()
    def encode_conditioning(
        self,
        prompts: list[str],
        negative_prompt: str,
        guidance_scale: float,
        max_sequence_length: int,
        condition_images: Sequence[Any] | None = None,
    ) -> Conditioning:
        if condition_images is None or len(condition_images) != len(prompts):
            raise UserInputError(
                f"FLUX.1 Kontext edits a source image: give each of the {len(prompts)} prompts one (the dataset's "
                "image column)"
            )
        conditioning = self.encode_prompts(prompts, negative_prompt, guidance_scale, max_sequence_length)
        conditioning["image_latents"] = self.encode_source_images(condition_images, conditioning["prompt_embeds"].dtype)
        return conditioning

    @torch.no_grad()
    def encode_source_images(self, images: Sequence[Any], dtype: torch.dtype) -> torch.Tensor:
        """Source images -> normalised VAE latents ``(B, C, h, w)``, as ``FluxKontextPipeline`` preprocesses and
        encodes them (``_auto_resize=False``): one batched, deterministic (argmax) VAE call."""
        pipe = self.pipeline
        images = [image.convert("RGB") if isinstance(image, Image.Image) else image for image in images]
        multiple = pipe.vae_scale_factor * 2
        height, width = pipe.image_processor.get_default_height_width(images[0])
        height, width = height // multiple * multiple, width // multiple * multiple
        resized = [pipe.image_processor.resize(image, height, width) for image in images]
        pixels = pipe.image_processor.preprocess(resized, height, width)
        pixels = pixels.to(device=self.execution_device, dtype=dtype)
        return pipe._encode_vae_image(image=pixels, generator=None)

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The pipeline's initial noise: Kontext draws it after encoding the source, which takes no random numbers
        (argmax), so asking without an image draws the same values."""
        drawn = self.pipeline.prepare_latents(
            None,
            batch_size,
            self.denoiser.config.in_channels // 4,
            height,
            width,
            self.dtype,
            self.execution_device,
            generator,
        )
        return unpack_latents(drawn[0], *self.latent_size(height, width))

    def predict_velocity(
        self,
        denoiser: DenoiserCall,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        _, _, latent_height, latent_width = latents.shape
        target = pack_latents(latents.to(self.dtype))
        source = conditioning["image_latents"].to(self.dtype)
        _, _, source_height, source_width = source.shape
        hidden_states = torch.cat([target, pack_latents(source)], dim=1)
        image_ids = torch.cat(
            [
                flux_image_ids(latent_height, latent_width, latents.device, target.dtype),
                kontext_condition_ids(source_height, source_width, latents.device, target.dtype),
            ]
        )
        prediction = self._transformer(denoiser, hidden_states, image_ids, sigma, conditioning, guidance_scale)
        return unpack_latents(prediction[:, : target.shape[1]], latent_height, latent_width)

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
        """``FluxKontextPipeline`` itself on the source images, at ``height x width`` (``max_area`` set to it) and
        with the sources sized as the adapter sizes them (``_auto_resize=False``)."""
        return self.pipeline(
            prompt=prompts,
            image=list(condition_images) if condition_images is not None else None,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            max_area=height * width,
            _auto_resize=False,
            max_sequence_length=max_sequence_length,
            generator=torch.Generator().manual_seed(seed),
        ).images
