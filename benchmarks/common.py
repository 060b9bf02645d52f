"""Shared pieces of the benchmarks: an SD3-shaped pipeline big enough that model compute dominates, and timers.

The pipeline reuses the tiny offline model's tokenizers and text encoders and swaps in a random transformer and
VAE of the sizes of the performance anchor in the project notes (the official loop measured on this machine):
"small" = 2 layers, width 32, 64 px; "medium" = 4 layers, width 192, 128 px; VAE 8x down, 16 latent channels.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable

import torch

SIZES = {
    "small": dict(layers=2, heads=2, head_dim=16, resolution=64),
    "medium": dict(layers=4, heads=4, head_dim=48, resolution=128),
}


def build_pipeline(size: str = "medium", seed: int = 0):
    """A StableDiffusion3Pipeline with a random transformer/VAE of the given size (nothing is downloaded)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    from trl_flow.offline_models.sd3 import ensure_tiny_sd3

    spec = SIZES[size]
    torch.manual_seed(seed)
    tiny = StableDiffusion3Pipeline.from_pretrained(ensure_tiny_sd3())
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        sample_size=spec["resolution"],
        scaling_factor=1.5,
        shift_factor=0.06,
    ).eval()
    transformer = SD3Transformer2DModel(
        sample_size=spec["resolution"] // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=spec["layers"],
        attention_head_dim=spec["head_dim"],
        num_attention_heads=spec["heads"],
        joint_attention_dim=tiny.transformer.config.joint_attention_dim,
        caption_projection_dim=spec["heads"] * spec["head_dim"],
        pooled_projection_dim=tiny.transformer.config.pooled_projection_dim,
        pos_embed_max_size=32,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=tiny.scheduler,
        vae=vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        text_encoder_2=tiny.text_encoder_2,
        tokenizer_2=tiny.tokenizer_2,
        text_encoder_3=tiny.text_encoder_3,
        tokenizer_3=tiny.tokenizer_3,
    ), spec["resolution"]


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Minimum wall time of ``repeats`` calls (the least disturbed by other work on the machine), seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
