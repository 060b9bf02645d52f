"""What FLUX and Qwen-Image share: 2x2-patch "packed" latents and a resolution-shifted ``linspace`` schedule.

Both pipelines draw spatial noise ``(B, C, H, W)``, fold every 2x2 patch of it into one token of ``4 C`` channels
(``(B, H/2 * W/2, 4 C)``) and run their transformer on that sequence. Packing is a fixed permutation of elements,
so the trainer can keep its latents spatial: :class:`PackedLatentsAdapter` returns ``(B, C, H, W)`` latents from
``prepare_latents`` and packs/unpacks around each transformer call in ``predict_velocity``. That keeps the
per-resolution constants the transformers need (FLUX's image position ids, Qwen-Image's ``img_shapes``) derivable
from the latent shape alone, even for non-square images, and leaves the SDE step untouched: it is element-wise and
its per-sample log-prob is a mean over all non-batch elements, which no permutation changes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch

from .base import FlowModelAdapter


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4 C)``: each 2x2 patch becomes one token (channel-major within it)."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2)
    # token (row, col) gathers channel c, patch offsets (dy, dx) in the order c, dy, dx
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent grid of ``height x width``: ``(B, N, 4 C)`` -> ``(B, C, H, W)``."""
    batch, _, features = tokens.shape
    channels = features // 4
    patches = tokens.reshape(batch, height // 2, width // 2, channels, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


class PackedLatentsAdapter(FlowModelAdapter):
    """Base for families with packed latents (FLUX, Qwen-Image); subclasses add text encoding and the denoiser call.

    Subclasses set :attr:`calculate_shift` to their pipeline module's ``calculate_shift`` (the ``mu`` of dynamic
    shifting as a function of the image token count).
    """

    #: ``mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)`` of the family.
    calculate_shift: Callable[..., float]

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent grid ``(H, W)`` for an image of ``height x width`` pixels, as the pipeline rounds it (even sizes)."""
        multiple = self.pipeline.vae_scale_factor * 2
        return 2 * (int(height) // multiple), 2 * (int(width) // multiple)

    def image_seq_len(self, height: int, width: int) -> int:
        """Number of image tokens (2x2 patches) the transformer sees."""
        latent_height, latent_width = self.latent_size(height, width)
        return (latent_height // 2) * (latent_width // 2)

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        # The pipelines hand the scheduler linspace(1, 1/N, N) (unless it makes its own flow sigmas) and a `mu` from
        # the image token count; the scheduler shifts them (dynamically when configured) and appends a final 0.
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        config = scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if config.get("use_flow_sigmas", False):
            sigmas = None
        mu = type(self).calculate_shift(
            self.image_seq_len(height, width),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if sigmas is None:
            scheduler.set_timesteps(num_inference_steps, device="cpu", mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
        return scheduler.sigmas.float()

    def prepare_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The pipeline's own initial noise (drawn packed, as it draws it), on the spatial latent grid."""
        drawn = self.pipeline.prepare_latents(
            batch_size,
            self.denoiser.config.in_channels // 4,
            height,
            width,
            self.dtype,
            self.execution_device,
            generator,
        )
        packed = drawn[0] if isinstance(drawn, tuple) else drawn  # FLUX also returns its image position ids
        return unpack_latents(packed, *self.latent_size(height, width))

    def _timestep(self, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The transformer's ``timestep`` input for per-sample ``sigma``, computed as the pipelines compute it.

        The pipelines pass ``scheduler.timesteps[i]`` (``sigma * num_train_timesteps`` in float32), cast to the
        latents' dtype, divided by 1000.
        """
        num_train_timesteps = self.pipeline.scheduler.config.num_train_timesteps
        timestep = sigma.to(like.device, torch.float32) * num_train_timesteps
        return timestep.to(like.dtype) / 1000
