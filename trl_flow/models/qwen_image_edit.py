"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (diffusers ``QwenImageEditPipeline``, ``QwenImageEditPlusPipeline``).

The source image enters twice, as in the pipelines: its Qwen2.5-VL vision tokens sit inside the prompt embeddings
(the positive and the negative prompt are both encoded with the image), and its VAE latents are condition tokens
appended after the target's on the transformer's image stream, with a second ``img_shapes`` entry. Everything else
(schedule from the target's size, true CFG with norm rescaling, packed latents, decoding) is Qwen-Image's, so this
adapter extends :class:`~trl_flow.models.qwen_image.QwenImageAdapter`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
from PIL import Image

from ..errors import UserInputError
from .base import Conditioning
from .packed import pack_latents, unpack_latents
from .qwen_image import QwenImageAdapter, _pad_to

#: The pipelines' condition sizes (pixel areas; the side lengths follow the source's aspect ratio, multiples of 32):
#: both pipelines VAE-encode the source at about 1024x1024 whatever the output size; Edit shows the VL encoder the
#: same image, Edit-Plus a 384x384-area one ([D] pipeline_qwenimage_edit.py, pipeline_qwenimage_edit_plus.py).
PIPELINE_CONDITION_AREA = 1024 * 1024
PLUS_PROMPT_IMAGE_AREA = 384 * 384


def _as_rgb(image: Any) -> Image.Image:
    """A source image as the pipeline takes it: a PIL image (a path or an HWC uint8 array is opened/converted)."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise UserInputError(f"a source image must be a PIL image, an image array or a file path, not {type(image)}")


class QwenImageEditAdapter(QwenImageAdapter):
    """Qwen-Image-Edit(-Plus): Qwen-Image with the source image as VAE condition tokens and inside the VL prompt.

    One adapter serves both pipelines; the class of the pipeline is the switch. Edit-Plus differs in its prompt
    (``"Picture 1: <image>"`` before the instruction) and in showing the VL encoder a smaller copy of the source
    (``prompt_image_area``, default 384x384); it takes several source images in the pipeline, one per sample here,
    and its pipeline encodes one prompt per call, so this adapter does too.

    Args:
        pipeline: a loaded ``QwenImageEditPipeline`` or ``QwenImageEditPlusPipeline``.
        condition_area: pixel area the source is resized to for the VAE (and, for Edit, the VL encoder): the
            pipelines' 1024x1024 by default (about 4096 condition tokens); flow_grpo trains at 512x512.
        prompt_image_area: pixel area of the VL encoder's copy of the source; default ``condition_area`` for Edit,
            384x384 for Edit-Plus.

    A batch's sources must resolve to one condition size (the same aspect ratio), since the condition tokens of
    all samples are stacked.
    """

    pipeline_class_names = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")

    def __init__(self, pipeline, condition_area: int | None = None, prompt_image_area: int | None = None) -> None:
        super().__init__(pipeline)
        self.plus = any(cls.__name__ == "QwenImageEditPlusPipeline" for cls in type(pipeline).__mro__)
        self.condition_area = condition_area or PIPELINE_CONDITION_AREA
        default_prompt_area = PLUS_PROMPT_IMAGE_AREA if self.plus else self.condition_area
        self.prompt_image_area = prompt_image_area or default_prompt_area

    def condition_size(self, image: Image.Image, area: int) -> tuple[int, int]:
        """``(height, width)`` the pipeline resizes ``image`` to for a target pixel ``area``."""
        width, height = calculate_dimensions(area, image.size[0] / image.size[1])[:2]
        return int(height), int(width)

    def _source_tensors(self, images: list[Image.Image]) -> tuple[list[Image.Image], torch.Tensor]:
        """The VL encoder's copies of the sources and the VAE's input ``(B, 3, 1, H, W)``, as the pipelines make
        them (Edit preprocesses its resized copy, Edit-Plus the original)."""
        processor = self.pipeline.image_processor
        sizes = {self.condition_size(image, self.condition_area) for image in images}
        if len(sizes) > 1:
            raise UserInputError(
                f"the source images of one batch resolve to different condition sizes {sorted(sizes)}: give them one "
                "aspect ratio (their condition tokens are stacked)"
            )
        height, width = sizes.pop()
        if self.plus:
            prompt_images = [
                processor.resize(image, *self.condition_size(image, self.prompt_image_area)) for image in images
            ]
            vae_input = torch.cat([processor.preprocess(image, height, width) for image in images])
        else:
            prompt_images = [processor.resize(image, height, width) for image in images]
            vae_input = processor.preprocess(prompt_images, height, width)
        return prompt_images, vae_input.unsqueeze(2)

    def _encode_with_images(self, prompts: list[str], images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-aware prompt embeddings and masks, padded to one length: Edit encodes the batch in one call (the
        pipeline's batched call), Edit-Plus one ``(prompt, image)`` per call (its pipeline's only mode)."""
        calls = [(prompts, images)] if not self.plus else [([p], [i]) for p, i in zip(prompts, images, strict=True)]
        parts = []
        for call_prompts, call_images in calls:
            embeds, mask = self.pipeline.encode_prompt(
                prompt=call_prompts, image=call_images, device=self.execution_device
            )
            if mask is None:  # the pipeline drops a mask of all ones
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            parts.append((embeds, mask))
        length = max(embeds.shape[1] for embeds, _ in parts)
        return (
            torch.cat([_pad_to(embeds, length) for embeds, _ in parts]),
            torch.cat([_pad_to(mask, length) for _, mask in parts]),
        )

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], negative_prompt: str, guidance_scale: float, max_sequence_length: int
    ) -> Conditioning:
        raise UserInputError("Qwen-Image-Edit edits a source image: give each prompt one (the dataset's image column)")

    @torch.no_grad()
    def encode_conditioning(
        self,
        prompts: list[str],
        negative_prompt: str,
        guidance_scale: float,
        max_sequence_length: int,
        condition_images: Sequence[Any] | None = None,
    ) -> Conditioning:
        """Prompt embeddings that include the source image (and the negative prompt's, with the same image, when
        guidance is on), padded to one length with their masks, and the source's normalised VAE latents
        ``image_latents`` ``(B, C, h, w)``. The pipelines ignore ``max_sequence_length`` here (the prompt holds the
        image's tokens), and so does this."""
        if condition_images is None:
            return self.encode_prompts(prompts, negative_prompt, guidance_scale, max_sequence_length)
        if len(condition_images) != len(prompts):
            raise UserInputError(f"{len(prompts)} prompts but {len(condition_images)} source images: give one each")
        images = [_as_rgb(image) for image in condition_images]
        prompt_images, vae_input = self._source_tensors(images)
        embeds, mask = self._encode_with_images(prompts, prompt_images)
        conditioning = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if guidance_scale > 1:
            negative, negative_mask = self._encode_with_images([negative_prompt] * len(prompts), prompt_images)
            conditioning["negative_prompt_embeds"] = negative
            conditioning["negative_prompt_embeds_mask"] = negative_mask
        length = max(tensor.shape[1] for tensor in conditioning.values())
        conditioning = {name: _pad_to(tensor, length) for name, tensor in conditioning.items()}
        # Deterministic (argmax) encoding in the prompt embeddings' dtype, as the pipelines' prepare_latents.
        vae_input = vae_input.to(self.execution_device, embeds.dtype)
        conditioning["image_latents"] = self.pipeline._encode_vae_image(vae_input, generator=None)[:, :, 0]
        return conditioning

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The pipeline's own initial noise; its ``prepare_latents`` takes the source first (here none: the source
        is conditioning, encoded once per group)."""
        drawn, _ = self.pipeline.prepare_latents(
            None,
            batch_size,
            self.denoiser.config.in_channels // 4,
            height,
            width,
            self.dtype,
            self.execution_device,
            generator,
        )
        return unpack_latents(drawn, *self.latent_size(height, width))

    def _image_tokens(self, latents: torch.Tensor, conditioning: Conditioning) -> tuple[torch.Tensor, list]:
        """The target's tokens, then the source's (``cat`` on the token axis), with one ``img_shapes`` entry each."""
        batch_size, _, latent_height, latent_width = latents.shape
        source = conditioning["image_latents"]
        hidden_states = torch.cat([pack_latents(latents.to(self.dtype)), pack_latents(source.to(self.dtype))], dim=1)
        shapes = [(1, latent_height // 2, latent_width // 2), (1, source.shape[2] // 2, source.shape[3] // 2)]
        return hidden_states, [shapes] * batch_size

    def reference_images(
        self,
        prompts: list[str],
        num_inference_steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        max_sequence_length: int,
        seed: int,
        condition_images: Sequence[Any] | None = None,
        negative_prompt: str = " ",
    ) -> list[Image.Image]:
        """The pipeline's own edit of ``condition_images`` (true CFG when ``guidance_scale`` > 1), one call for the
        batch (Edit) or one per prompt (Edit-Plus, seeded ``seed + i``). It resizes the sources to its fixed
        condition areas, which equal this adapter's only with the defaults."""
        if condition_images is None:
            raise UserInputError("Qwen-Image-Edit's reference images need the source images (condition_images)")
        images = [_as_rgb(image) for image in condition_images]

        def call(call_prompts, call_images, call_seed):
            return self.pipeline(
                image=call_images,
                prompt=call_prompts,
                negative_prompt=[negative_prompt] * len(call_prompts) if guidance_scale > 1 else None,
                true_cfg_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                height=height,
                width=width,
                max_sequence_length=max_sequence_length,
                generator=torch.Generator().manual_seed(call_seed),
            ).images

        if not self.plus:
            return call(prompts, images, seed)
        return [call([p], [i], seed + k)[0] for k, (p, i) in enumerate(zip(prompts, images, strict=True))]
