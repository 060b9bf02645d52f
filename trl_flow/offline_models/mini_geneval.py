"""The mini SD3 pipeline: a tiny text-to-image model pretrained offline on the synthetic shapes of `trl_flow.mini`.

The result is a folder that plain ``diffusers.StableDiffusion3Pipeline.from_pretrained(path)`` loads:

* ``tokenizer`` / ``tokenizer_2`` / ``tokenizer_3`` and ``text_encoder`` / ``text_encoder_2`` / ``text_encoder_3``:
  the word-level tokenizers and frozen random CLIP x2 + T5 encoders of the tiny SD3 (:func:`.sd3_text_stack`; every
  word of the task's prompts is one token), except that CLIP prompts are padded to 16 tokens instead of 77 (the
  pipeline pads CLIP to ``tokenizer.model_max_length``), which keeps the joint attention short;
* ``vae``: an :class:`~diffusers.AutoencoderKL` (32x32x3 <-> 16x16x4, ~625k parameters) trained to reconstruct the
  task's images (the same mix of one- and two-object images the transformer sees); ``scaling_factor`` /
  ``shift_factor`` make the latents roughly zero-mean, unit-variance;
* ``transformer``: a :class:`~diffusers.SD3Transformer2DModel` (4 layers, width 128, patch 2: 64 image tokens;
  ~2.3M parameters) trained by the rectified-flow objective (logit-normal timesteps, as SD3) on train-split
  prompts only, with 10% caption dropout to the empty prompt so that classifier-free guidance works; the saved
  weights are an exponential moving average;
* ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with ``shift=1`` (the images are tiny).

Training stops after fixed step counts (not wall-clock), so a build is reproducible for a seed on a given machine
and thread count. Call the pipeline with ``max_sequence_length=MINI_MAX_SEQUENCE_LENGTH`` (16): T5 otherwise pads
prompts to 256 tokens.

The folder ships with trl-flow (``trl_flow/mini/pretrained``, see :data:`PRETRAINED_DIR`), because building it
takes minutes; ``python -m trl_flow.mini.build --output DIR`` rebuilds it.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from trl_flow.mini.data import BACKGROUND, IMAGE_SIZE, MAX_SEQUENCE_LENGTH, sample_images, split_prompts

from .cache import MARKER_FILE, absolute_path, cache_root, ensure_build, is_complete, save_build
from .sd3 import SD3TextStack, sd3_pipeline, sd3_text_stack, sd3_transformer
from .vae import autoencoder_kl, train_vae

__all__ = [
    "MARKER_FILE",
    "MINI_IMAGE_SIZE",
    "MINI_MAX_SEQUENCE_LENGTH",
    "MINI_SD3_VERSION",
    "PRETRAINED_DIR",
    "MiniBuildConfig",
    "build_mini_sd3",
    "default_cache_dir",
    "ensure_mini_sd3",
]

MINI_SD3_VERSION: str = "2"
"""Version of the build recipe; part of the default cache folder name. Bump it when the recipe changes."""

MINI_IMAGE_SIZE: int = IMAGE_SIZE
"""Image height and width in pixels (32)."""

MINI_MAX_SEQUENCE_LENGTH: int = MAX_SEQUENCE_LENGTH
"""``max_sequence_length`` to call the pipeline with (the longest prompt has 10 words)."""

PRETRAINED_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent.parent / "mini" / "pretrained"
"""The shipped build (seed 0, default :class:`MiniBuildConfig`): package data of :mod:`trl_flow.mini`."""

_CLIP_MAX_LENGTH = 16
_LATENT_CHANNELS = 4
_VAE_OBJECT_WEIGHT = 4.0
_VAE_KL_WEIGHT = 1e-6


@dataclass
class MiniBuildConfig:
    """Settings of a mini SD3 build (the defaults made the shipped model).

    Attributes:
        vae_steps / vae_batch_size / vae_lr: VAE training (Adam, one-cycle schedule).
        transformer_steps / transformer_batch_size / transformer_lr: rectified-flow pretraining (AdamW, warm-up then
            cosine decay to 10%).
        num_images: how many training images are drawn and encoded once (the transformer cycles over them).
        single_fraction: fraction of one-object images (the rest have two objects), for VAE and transformer.
        pretrain_on_held_out: draw pretraining images of every prompt, held-out ones included (RL still sees train
            prompts only). Off in the shipped build. Measured with it on, ``single_fraction`` 0.3 and the other
            defaults (1200 steps): held-out single objects 0.458, two objects 0.031 (ODE, CFG 4), no better than the
            shipped build's 0.58 / 0.03: two-object prompts need more pretraining than 1200 steps, whoever sees them.
        eval_every: every this many transformer steps and at the end, generate the held-out and train evaluation
            rows with the EMA weights (ODE, CFG 4) and log their per-tag scores; the final ones go into the build's
            metrics. 0: never.
        caption_dropout: probability of training on the empty prompt instead (for classifier-free guidance).
        position_noise: probability that an image's caption names another region / relation than the one drawn
            (a train prompt with the same objects), as unreliable web captions do. Off: at 0.25 / 0.5 the model
            got worse at everything, not just positions (held-out score 0.17 / 0.05 against 0.32 without).
        ema_decay: decay of the exponential moving average of the transformer weights that is saved.
        num_layers / width: transformer depth and width (heads of 32 channels).
    """

    vae_steps: int = 300
    vae_batch_size: int = 32
    vae_lr: float = 3e-3
    transformer_steps: int = 1200
    transformer_batch_size: int = 64
    transformer_lr: float = 1e-3
    num_images: int = 16384
    single_fraction: float = 0.5
    pretrain_on_held_out: bool = False
    eval_every: int = 0
    caption_dropout: float = 0.1
    position_noise: float = 0.0
    ema_decay: float = 0.995
    num_layers: int = 4
    width: int = 128


# ------------------------------------------------------------------------------------------------------ paths


def default_cache_dir() -> pathlib.Path:
    """``$TRL_FLOW_CACHE`` (default ``~/.cache/trl_flow``) / ``mini-sd3-{MINI_SD3_VERSION}``."""
    return cache_root() / f"mini-sd3-{MINI_SD3_VERSION}"


# ----------------------------------------------------------------------------------------------------- models


def _build_text_stack() -> SD3TextStack:
    """Tokenizers and frozen random text encoders of the tiny SD3 build, CLIP padded to 16 tokens."""
    text = sd3_text_stack(clip_max_length=_CLIP_MAX_LENGTH)
    for encoder in (text.text_encoder, text.text_encoder_2, text.text_encoder_3):
        encoder.requires_grad_(False)
    return text


def _build_vae():
    # A small posterior std from the start (autoencoder_kl does that) and a tiny KL weight: sampling noise would
    # teach the decoder to blur edges, and then squares come back with round corners.
    return autoencoder_kl(
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=MINI_IMAGE_SIZE,
        latent_channels=_LATENT_CHANNELS,
    )


def _build_transformer(config: MiniBuildConfig, text: SD3TextStack):
    head_dim = 32
    return sd3_transformer(
        text,
        sample_size=MINI_IMAGE_SIZE // 2,
        num_layers=config.num_layers,
        head_dim=head_dim,
        heads=config.width // head_dim,
        caption_projection_dim=config.width,
        latent_channels=_LATENT_CHANNELS,
    )


# ----------------------------------------------------------------------------------------------------- training


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _train_vae(vae, config: MiniBuildConfig, seed: int, log: Callable[[str], None]) -> dict[str, float]:
    """Train ``vae`` to reconstruct task images (train split); return metrics of its test-image reconstructions."""
    from reward_funcs.mini_geneval import mini_geneval

    _, test_specs = split_prompts()
    images, _, _ = sample_images(
        _pretraining_specs(config),
        config.vae_steps * config.vae_batch_size,
        seed + 11,
        single_fraction=config.single_fraction,
    )
    pixels = _to_tensor(images)
    background = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
    start = time.perf_counter()

    def object_weighted_loss(err: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Objects cover ~15% of an image: weigh their pixels (and a 1-pixel rim) 5x, or the shapes' corners and
        # tips are the last thing learnt. Measured (batch 32): reconstructions of test images pass the reward's
        # checks 79% / 97% of the time after 100 / 200 steps, against 2% / 83% unweighted.
        on_object = ((x - background).abs().sum(dim=1, keepdim=True) > 0.1).float()
        weight = 1 + _VAE_OBJECT_WEIGHT * torch.nn.functional.max_pool2d(on_object, 3, stride=1, padding=1)
        return (weight * (err.abs() + err.square())).mean()

    def progress(step: int, loss: torch.Tensor) -> None:
        if (step + 1) % 50 == 0 or step + 1 == config.vae_steps:
            log(f"vae step {step + 1}/{config.vae_steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")

    train_vae(
        vae,
        steps=config.vae_steps,
        lr=config.vae_lr,
        generator=torch.Generator().manual_seed(seed + 12),
        batch=lambda step: pixels[step * config.vae_batch_size : (step + 1) * config.vae_batch_size],
        reconstruction_loss=object_weighted_loss,
        kl_weight=_VAE_KL_WEIGHT,
        on_step=progress,
    )
    test_images, test_indices, _ = sample_images(test_specs, 256, seed + 13, single_fraction=config.single_fraction)
    with torch.no_grad():
        x = _to_tensor(test_images)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    mse = float((recon - x).square().mean())
    recon_uint8 = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    rows = [test_specs[i].metadata() for i in test_indices]
    scores = mini_geneval([row["prompt"] for row in rows], list(recon_uint8), include=[row["include"] for row in rows])
    log(f"vae test reconstructions: MSE {mse:.5f}, mini_geneval {np.mean(scores):.3f}")
    return {
        "vae_test_mse": mse,
        "vae_test_reconstruction_mini_geneval": float(np.mean(scores)),
        "vae_seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def _encode_prompts(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, pooled = [], []
    for start in range(0, len(prompts), 64):
        e, _, p, _ = pipe.encode_prompt(
            prompt=prompts[start : start + 64],
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=MINI_MAX_SEQUENCE_LENGTH,
        )
        embeds.append(e)
        pooled.append(p)
    return torch.cat(embeds), torch.cat(pooled)


def _wrong_position_captions(specs: list) -> list[list[int]]:
    """For each prompt, the indices of the other prompts in ``specs`` with the same objects (another region or
    relation)."""
    by_objects: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        by_objects.setdefault(spec.objects, []).append(i)
    return [[j for j in by_objects[spec.objects] if j != i] for i, spec in enumerate(specs)]


def _train_transformer(pipe, config: MiniBuildConfig, seed: int, log: Callable[[str], None]) -> dict[str, float]:
    """Rectified-flow pretraining of ``pipe.transformer`` (EMA weights are kept); returns its metrics, the
    per-tag scores of the last :func:`_evaluate` included."""
    train_specs = _pretraining_specs(config)
    start = time.perf_counter()
    images, indices, _ = sample_images(
        train_specs, config.num_images, seed + 21, single_fraction=config.single_fraction
    )
    vae = pipe.vae
    with torch.no_grad():
        chunks = [_to_tensor(images[i : i + 256]) for i in range(0, len(images), 256)]
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in chunks])
    shift, scale = float(latents.mean()), float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=round(scale, 6), shift_factor=round(shift, 6))
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    prompt_index = torch.tensor(indices)
    wrong_positions = _wrong_position_captions(train_specs)
    embeds, pooled = _encode_prompts(pipe, [spec.prompt for spec in train_specs] + [""])
    empty = len(train_specs)
    log(f"encoded {len(images)} images and {len(train_specs)} prompts ({time.perf_counter() - start:.0f} s)")

    transformer = pipe.transformer
    transformer.train().requires_grad_(True)
    ema = [p.detach().clone() for p in transformer.parameters()]
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.transformer_lr, weight_decay=0.0)
    warmup = max(config.transformer_steps // 20, 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(config.transformer_steps - warmup, 1)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed + 22)
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    losses: list[float] = []
    order = torch.randperm(len(latents), generator=generator)
    cursor = 0
    for step in range(config.transformer_steps):
        if cursor + config.transformer_batch_size > len(order):
            order, cursor = torch.randperm(len(latents), generator=generator), 0
        batch = order[cursor : cursor + config.transformer_batch_size]
        cursor += config.transformer_batch_size
        x0 = latents[batch]
        conditions = prompt_index[batch].clone()
        for i in torch.nonzero(torch.rand(len(batch), generator=generator) < config.position_noise).flatten():
            options = wrong_positions[int(conditions[i])]
            if options:
                conditions[i] = options[int(torch.randint(len(options), (1,), generator=generator))]
        conditions[torch.rand(len(batch), generator=generator) < config.caption_dropout] = empty
        sigma = torch.sigmoid(torch.randn(len(batch), generator=generator))  # logit-normal, as SD3
        noise = torch.randn(x0.shape, generator=generator)
        sigma_b = sigma[:, None, None, None]
        noisy = (1 - sigma_b) * x0 + sigma_b * noise
        velocity = transformer(
            hidden_states=noisy,
            timestep=sigma * num_train_timesteps,
            encoder_hidden_states=embeds[conditions],
            pooled_projections=pooled[conditions],
            return_dict=False,
        )[0]
        loss = (velocity - (noise - x0)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, p in zip(ema, transformer.parameters(), strict=True):
                average.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == config.transformer_steps:
            recent = sum(losses[-100:]) / len(losses[-100:])
            elapsed = time.perf_counter() - start
            log(f"transformer step {step + 1}/{config.transformer_steps} loss {recent:.4f} ({elapsed:.0f} s)")
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.transformer_steps:
            with _swapped_in(transformer, ema):
                _evaluate(pipe, step + 1, log)
    with torch.no_grad():
        for average, p in zip(ema, transformer.parameters(), strict=True):
            p.copy_(average)
    transformer.eval().requires_grad_(False)
    metrics = {
        "transformer_final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "transformer_seconds": time.perf_counter() - start,
    }
    if config.eval_every:
        metrics.update(_evaluate(pipe, config.transformer_steps, log))
    return metrics


def _pretraining_specs(config: MiniBuildConfig) -> list:
    """The prompts pretraining images are drawn for: the train split, or every prompt with
    ``pretrain_on_held_out``."""
    train_specs, test_specs = split_prompts()
    return train_specs + test_specs if config.pretrain_on_held_out else train_specs


@contextlib.contextmanager
def _swapped_in(transformer, weights: list[torch.Tensor]):
    """``transformer`` with ``weights`` (the EMA) in place of its own parameters, restored on exit."""
    saved = [p.detach().clone() for p in transformer.parameters()]
    with torch.no_grad():
        for p, w in zip(transformer.parameters(), weights, strict=True):
            p.copy_(w)
    transformer.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(transformer.parameters(), saved, strict=True):
                p.copy_(w)
        transformer.train()


@torch.no_grad()
def _evaluate(pipe, step: int, log: Callable[[str], None]) -> dict[str, float]:
    """Per-tag scores of held-out and train evaluation rows (ODE, CFG 4, fixed seed)."""
    from trl_flow.mini.evaluate import evaluation_rows, generate, score_images

    metrics = {}
    for split in ("test", "train"):
        rows = evaluation_rows(split, num_two_object=96, single_images=4)
        scores = score_images(generate(pipe, [row["prompt"] for row in rows], seed=4321), rows)
        for tag, value in scores["per_tag"].items():
            metrics[f"{split}_{tag}"] = value
        tags = ", ".join(f"{tag} {value:.3f}" for tag, value in scores["per_tag"].items())
        log(f"step {step}: {split} prompts ({len(rows)}): score {scores['score']:.3f} ({tags})")
    return metrics


def _build_pipeline(config: MiniBuildConfig, seed: int, log: Callable[[str], None]):
    torch.manual_seed(seed)  # the encoders, the transformer and the VAE are drawn in this order
    text = _build_text_stack()
    transformer = _build_transformer(config, text)
    vae = _build_vae()
    pipe = sd3_pipeline(text, transformer, vae, shift=1.0)
    metrics = _train_vae(vae, config, seed, log)
    metrics.update(_train_transformer(pipe, config, seed, log))
    return pipe, metrics


# ------------------------------------------------------------------------------------------------ build / cache


def _build_into(
    target: pathlib.Path, config: MiniBuildConfig, seed: int, keep_complete: bool, log: Callable[[str], None]
) -> pathlib.Path:
    def build():
        start = time.perf_counter()
        pipe, metrics = _build_pipeline(config, seed, log)
        metrics["build_seconds"] = time.perf_counter() - start
        return pipe, metrics

    marker = {"version": MINI_SD3_VERSION, "seed": seed, "torch_threads": torch.get_num_threads()}
    marker["config"] = asdict(config)
    return save_build(target, build, marker, keep_complete, metrics_key="metrics")


def build_mini_sd3(
    output_dir: str | os.PathLike,
    seed: int = 0,
    config: MiniBuildConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> pathlib.Path:
    """Build the mini SD3 pipeline into ``output_dir`` and return the folder.

    Written into a temporary folder next to ``output_dir`` and renamed into place once complete (marker file
    written last), like :func:`.build_tiny_sd3`; an existing previous build there is replaced. The
    caller's global torch RNG state is left untouched. ``log`` receives progress lines (default: none).
    """
    target = absolute_path(output_dir)
    return _build_into(target, config or MiniBuildConfig(), seed, keep_complete=False, log=log or (lambda _: None))


def ensure_mini_sd3(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder of a complete mini SD3 build.

    Without ``path``: the shipped build (:data:`PRETRAINED_DIR`) when it is present, else the cache folder
    :func:`default_cache_dir`, built there (seed 0, default settings; minutes) if needed. With ``path``: that folder,
    built if it holds no complete build. Concurrent callers are serialised by a lock file next to the folder.
    """
    if path is None and is_complete(PRETRAINED_DIR):
        return PRETRAINED_DIR
    target = absolute_path(path if path is not None else default_cache_dir())
    return ensure_build(
        target, lambda folder: _build_into(folder, MiniBuildConfig(), seed=0, keep_complete=True, log=lambda _: None)
    )
