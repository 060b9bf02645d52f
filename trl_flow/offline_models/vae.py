"""The VAEs of the offline models: construction, synthetic training images, training and latent calibration.

A randomly initialised VAE decodes nearly every latent to the same flat image, which would hide the policy from any
image reward, so every offline build trains its VAE briefly (seeded Adam steps on the CPU). The tiny SD3/FLUX and
Qwen-Image builds train on :func:`synthetic_images` (solid colours, two-colour gradients, coloured rectangles/discs
on coloured backgrounds), the mini-GenEval build on its task's drawings; all share :func:`train_vae`. Afterwards the
latent statistics set the VAE's normalisation so that the diffusion model works in a roughly zero-mean,
unit-variance latent space, as with the real models' VAEs, and a sanity check fails the build if latents do not
reach pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "PALETTE",
    "QWEN_VAE_RECIPE",
    "TINY_IMAGE_SIZE",
    "TINY_LATENT_CHANNELS",
    "TINY_VAE_DOWNSAMPLE",
    "TINY_VAE_RECIPE",
    "SyntheticVAERecipe",
    "autoencoder_kl",
    "l1_l2_coarse_loss",
    "synthetic_images",
    "train_vae",
    "trained_tiny_qwen_vae",
    "trained_tiny_vae",
]

TINY_IMAGE_SIZE: int = 32
"""Default (and training) image height and width of the tiny models, in pixels."""

TINY_LATENT_CHANNELS: int = 4
"""Channels of the tiny VAEs' latents (= in/out channels of the tiny SD3 transformer)."""

TINY_VAE_DOWNSAMPLE: int = 4
"""Spatial downsampling of the tiny VAEs (real SD3/FLUX/Qwen-Image VAEs have 8): 32x32 images are 8x8 latents."""

PALETTE: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0),  # red, green, blue, yellow
    (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0),  # white, black, magenta, cyan
    (1.0, 0.5, 0.0), (0.5, 0.0, 0.5), (0.5, 0.5, 0.5), (0.55, 0.27, 0.07),  # orange, purple, gray, brown
    (1.0, 0.75, 0.8),  # pink
)  # fmt: skip
"""Named colours: half of the synthetic images' colours, and the solid colours of the sanity check."""


@dataclass(frozen=True)
class SyntheticVAERecipe:
    """How a tiny VAE is trained on :func:`synthetic_images` and checked (values measured: see the recipes)."""

    steps: int
    batch_size: int
    lr: float
    train_size: int
    """Height and width of the training images (the VAEs are convolutional: they are used at 32x32)."""
    calibration_images: int
    """How many synthetic images set the latent statistics."""
    max_solid_colour_mae: float
    """Sanity check: mean |reconstruction - image| on the palette's solid colours, in [0, 1]."""
    min_random_latent_diff: float
    """Sanity check: mean |decode(z1) - decode(z2)| of random unit-normal latents, in [0, 1]."""
    kl_weight: float = 1e-3
    coarse_weight: float = 2.0


TINY_VAE_RECIPE = SyntheticVAERecipe(
    steps=400,
    batch_size=16,
    lr=2e-3,
    train_size=TINY_IMAGE_SIZE,
    calibration_images=512,
    max_solid_colour_mae=0.1,  # seeds 0-13: 0.019-0.030
    min_random_latent_diff=0.05,  # seeds 0-13: 0.15-0.24
)
"""The 2D VAE of the tiny SD3 and FLUX builds (~10 s on 2 CPU cores)."""

QWEN_VAE_RECIPE = SyntheticVAERecipe(
    # The 3D VAE learns far more slowly per step, and 3D convolutions cost more on a CPU: smaller images, more and
    # smaller steps (400 steps: solid-colour error ~0.2; 1200: ~0.06).
    steps=1200,
    batch_size=8,
    lr=3e-3,
    train_size=16,
    calibration_images=256,
    max_solid_colour_mae=0.2,  # seed 0: 0.062
    min_random_latent_diff=0.05,  # seed 0: 0.23
)
"""The single-frame 3D VAE of the tiny Qwen-Image build (~40 s of CPU time on one core)."""


# ---------------------------------------------------------------------------------------------------------
# synthetic images


def _random_colours(n: int, generator: torch.Generator) -> torch.Tensor:
    palette = torch.tensor(PALETTE, dtype=torch.float32)
    from_palette = palette[torch.randint(0, len(PALETTE), (n,), generator=generator)]
    uniform = torch.rand(n, 3, generator=generator)
    use_palette = torch.rand(n, 1, generator=generator) < 0.5
    return torch.where(use_palette, from_palette, uniform)


def synthetic_images(n: int, generator: torch.Generator, size: int = TINY_IMAGE_SIZE) -> torch.Tensor:
    """Return ``n`` random synthetic RGB images in ``[0, 1]``, shape ``(n, 3, size, size)``.

    A quarter each: solid colours, linear two-colour gradients in a random direction, and a coloured
    rectangle or a coloured disc on a coloured background. These are the images the tiny VAEs learn.
    """
    c1 = _random_colours(n, generator)[:, :, None, None]
    c2 = _random_colours(n, generator)[:, :, None, None]
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    xs, ys = xs[None], ys[None]
    kind = torch.randint(0, 4, (n,), generator=generator)[:, None, None, None]

    angle = torch.rand(n, generator=generator)[:, None, None] * 2 * math.pi
    proj = (xs - 0.5) * torch.cos(angle) + (ys - 0.5) * torch.sin(angle)
    t = (proj / math.sqrt(2) + 0.5).clamp(0, 1)[:, None]
    gradient = c1 * (1 - t) + c2 * t

    lo = torch.rand(n, 2, generator=generator) * 0.6
    hi = lo + 0.2 + torch.rand(n, 2, generator=generator) * 0.4
    rect = (xs >= lo[:, 0, None, None]) & (xs <= hi[:, 0, None, None])
    rect = rect & (ys >= lo[:, 1, None, None]) & (ys <= hi[:, 1, None, None])
    centre = 0.25 + torch.rand(n, 2, generator=generator) * 0.5
    radius = 0.12 + torch.rand(n, generator=generator) * 0.25
    disc = (xs - centre[:, 0, None, None]) ** 2 + (ys - centre[:, 1, None, None]) ** 2 <= radius[:, None, None] ** 2

    solid = c1.expand(n, 3, size, size)
    shape = torch.where(kind == 2, rect[:, None], disc[:, None])
    shaped = torch.where(shape, c2, c1)
    return torch.where(kind == 0, solid, torch.where(kind == 1, gradient, shaped)).contiguous()


# ---------------------------------------------------------------------------------------------------------
# construction


def _narrow_posterior(conv_out: torch.nn.Conv2d | torch.nn.Conv3d, latent_channels: int) -> None:
    """Start with a small posterior std so that sampling noise does not swamp the untrained latents (the second
    half of the encoder's output channels are the log-variances)."""
    with torch.no_grad():
        conv_out.weight[latent_channels:].mul_(0.1)
        conv_out.bias[latent_channels:].fill_(-6.0)


def autoencoder_kl(
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    norm_num_groups: int,
    sample_size: int,
    latent_channels: int = TINY_LATENT_CHANNELS,
):
    """A small random :class:`~diffusers.AutoencoderKL` (downsampling ``2 ** (len(block_out_channels) - 1)``) with
    a narrow initial posterior, neutral ``scaling_factor``/``shift_factor`` and no quant convs or attention."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        act_fn="silu",
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=1.0,
        shift_factor=0.0,
        force_upcast=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    _narrow_posterior(vae.encoder.conv_out, latent_channels)
    return vae


def _tiny_qwen_autoencoder():
    """A small :class:`~diffusers.AutoencoderKLQwenImage`: 4x spatial, no temporal downsampling, 4 latent channels
    (the real one has 8x and 16), latent normalisation neutral until :func:`trained_tiny_qwen_vae` sets it."""
    from diffusers import AutoencoderKLQwenImage

    channels = TINY_LATENT_CHANNELS
    vae = AutoencoderKLQwenImage(
        base_dim=16,
        z_dim=channels,
        dim_mult=[1, 1, 1],  # two spatial downsamplings: 4x
        num_res_blocks=0,
        attn_scales=[],
        temperal_downsample=[False, False],
        latents_mean=[0.0] * channels,
        latents_std=[1.0] * channels,
    )
    _narrow_posterior(vae.quant_conv, channels)
    return vae


# ---------------------------------------------------------------------------------------------------------
# training


def l1_l2_coarse_loss(err: torch.Tensor, coarse_weight: float = 2.0) -> torch.Tensor:
    """Mean absolute plus mean squared reconstruction error, plus ``coarse_weight`` times the squared error of 8x8-pixel
    averages, which pulls every colour channel into place early. ``err``: ``(N, C, H, W)``, or ``(N, C, 1, H, W)``
    for a single-frame video VAE."""
    coarse = torch.nn.functional.avg_pool2d(err[:, :, 0] if err.dim() == 5 else err, 8).square().mean()
    return err.abs().mean() + err.square().mean() + coarse_weight * coarse


def train_vae(
    vae,
    *,
    steps: int,
    lr: float,
    generator: torch.Generator,
    batch: Callable[[int], torch.Tensor],
    reconstruction_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    kl_weight: float,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> None:
    """Train ``vae`` in place to reconstruct its input (Adam, one-cycle schedule, gradients clipped to norm 1), then
    freeze it in eval mode.

    Args:
        batch: step -> input pixels in ``[-1, 1]`` (it may draw from ``generator``: that happens before the posterior
            sample of the same step).
        reconstruction_loss: ``(recon - x, x)`` -> loss; the KL term (per latent element) is added with ``kl_weight``.
        generator: draws the posterior samples.
        decode: latents -> reconstruction, default ``vae.decode(z).sample``.
        on_step: called with the step index and the loss after every step (progress logs).
    """
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    if decode is None:

        def decode(latents: torch.Tensor) -> torch.Tensor:
            return vae.decode(latents).sample

    vae.train()
    with torch.enable_grad():
        for step in range(steps):
            x = batch(step)
            posterior = vae.encode(x).latent_dist
            latents = posterior.sample(generator=generator)
            err = decode(latents) - x
            kl = posterior.kl().mean() / latents[0].numel()
            loss = reconstruction_loss(err, x) + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if on_step is not None:
                on_step(step, loss)
    vae.eval()
    vae.requires_grad_(False)


def _train_on_synthetic_images(vae, seed: int, recipe: SyntheticVAERecipe, single_frame: bool, decode=None) -> None:
    generator = torch.Generator().manual_seed(seed)

    def batch(_: int) -> torch.Tensor:
        images = synthetic_images(recipe.batch_size, generator, size=recipe.train_size) * 2 - 1
        return images.unsqueeze(2) if single_frame else images

    train_vae(
        vae,
        steps=recipe.steps,
        lr=recipe.lr,
        generator=generator,
        batch=batch,
        reconstruction_loss=lambda err, _: l1_l2_coarse_loss(err, recipe.coarse_weight),
        kl_weight=recipe.kl_weight,
        decode=decode,
    )


# ---------------------------------------------------------------------------------------------------------
# calibration and sanity check


def _check(
    recipe: SyntheticVAERecipe,
    generator: torch.Generator,
    latent_shape: torch.Size,
    encode: Callable[[torch.Tensor], torch.Tensor],
    decode01: Callable[[torch.Tensor], torch.Tensor],
    metrics: dict[str, float],
    name: str,
) -> dict[str, float]:
    """Add the sanity metrics to ``metrics`` and return them; raise if they fail ``recipe``'s bounds.

    ``encode``: pixels in ``[-1, 1]`` -> normalised latents; ``decode01``: normalised latents -> pixels in ``[0, 1]``.
    A VAE that does not carry latents to pixels defeats the purpose of the offline builds, hence the error.
    """
    palette = torch.tensor(PALETTE, dtype=torch.float32)[:, :, None, None]
    solids = palette.expand(-1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    solid_mae = float((decode01(encode(solids * 2 - 1)) - solids).abs().mean())
    noise = torch.randn(32, *latent_shape, generator=generator)
    decoded = decode01(noise)
    random_diff = float((decoded[::2] - decoded[1::2]).abs().mean())
    metrics = {**metrics, "solid_colour_mae": solid_mae, "random_latent_diff": random_diff}
    if solid_mae > recipe.max_solid_colour_mae or random_diff < recipe.min_random_latent_diff:
        raise RuntimeError(f"tiny {name} VAE training failed its sanity check: {metrics}")
    return metrics


@torch.no_grad()
def _calibrate_scale_shift(vae, seed: int, recipe: SyntheticVAERecipe, name: str) -> dict[str, float]:
    """Set ``scaling_factor``/``shift_factor`` so that ``(latents - shift_factor) * scaling_factor`` is roughly
    zero-mean, unit-variance (as SD3's VAE); check the VAE; return the metrics."""
    generator = torch.Generator().manual_seed(seed + 1)
    images = synthetic_images(recipe.calibration_images, generator) * 2 - 1
    latents = vae.encode(images).latent_dist.mode()
    shift = float(latents.mean())
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=round(scale, 6), shift_factor=round(shift, 6))
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor

    def encode(x: torch.Tensor) -> torch.Tensor:
        return (vae.encode(x).latent_dist.mode() - shift) * scale

    def decode01(z: torch.Tensor) -> torch.Tensor:
        return (vae.decode(z / scale + shift).sample / 2 + 0.5).clamp(0, 1)

    metrics = {"scaling_factor": scale, "shift_factor": shift}
    return _check(recipe, generator, latents.shape[1:], encode, decode01, metrics, name)


@torch.no_grad()
def _calibrate_mean_std(vae, seed: int, recipe: SyntheticVAERecipe, name: str) -> dict[str, float]:
    """Set per-channel ``latents_mean``/``latents_std`` from latent statistics (as the real Qwen-Image config has
    them); check the VAE; return the metrics."""
    generator = torch.Generator().manual_seed(seed + 1)
    images = (synthetic_images(recipe.calibration_images, generator) * 2 - 1).unsqueeze(2)
    latents = vae.encode(images).latent_dist.mode()
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(
        latents_mean=[round(float(m), 6) for m in mean], latents_std=[round(float(s), 6) for s in std]
    )
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return (vae.encode(x.unsqueeze(2)).latent_dist.mode() - mean) / std

    def decode01(z: torch.Tensor) -> torch.Tensor:
        return (vae.decode(z * std + mean).sample[:, :, 0] / 2 + 0.5).clamp(0, 1)

    return _check(recipe, generator, latents.shape[1:], encode, decode01, {}, name)


# ---------------------------------------------------------------------------------------------------------
# the tiny recipes


def trained_tiny_vae(seed: int, recipe: SyntheticVAERecipe = TINY_VAE_RECIPE, name: str = "SD3"):
    """The tiny SD3/FLUX VAE (32x32 RGB <-> 4x8x8 latents), built from the global torch RNG, trained (generators
    seeded from ``seed``) and calibrated; returns ``(vae, metrics)``. ``name`` labels a failed sanity check."""
    vae = autoencoder_kl(
        block_out_channels=(16, 16, 16),
        layers_per_block=0,  # the mid blocks and decoder still have residual blocks
        # One group: per-channel group norm would erase the (spatially constant) colour of flat images.
        norm_num_groups=1,
        sample_size=TINY_IMAGE_SIZE,
    )
    _train_on_synthetic_images(vae, seed, recipe, single_frame=False)
    return vae, _calibrate_scale_shift(vae, seed, recipe, name)


def trained_tiny_qwen_vae(seed: int, recipe: SyntheticVAERecipe = QWEN_VAE_RECIPE):
    """The tiny Qwen-Image VAE (single-frame 3D, 4 latent channels), built from the global torch RNG, trained on
    16x16 images (generators seeded from ``seed``) and calibrated per channel; returns ``(vae, metrics)``."""
    vae = _tiny_qwen_autoencoder()

    def decode(latents: torch.Tensor) -> torch.Tensor:
        # The decoder clamps to [-1, 1]; train on the unclamped output so saturated pixels still get gradients.
        return vae.decoder(vae.post_quant_conv(latents))

    _train_on_synthetic_images(vae, seed, recipe, single_frame=True, decode=decode)
    return vae, _calibrate_mean_std(vae, seed, recipe, "Qwen-Image")
