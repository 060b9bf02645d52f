"""The tiny edit Kontext (``trl-flow/tiny-edit-kontext``): the tiny FLUX.1 Kontext (:mod:`.flux_kontext`) with its
transformer pretrained offline to keep the source image's shape, in a colour that the prompt does not choose.

Why: the random tiny Kontext transformer does not pass its source through to its output, and RL alone cannot teach
it to in a CPU minute. A real edit model copies its source and reads instructions; this build gives the tiny one
that prior and leaves the tiny edit task (``recipes/tiny_edit.yaml``: ``recolor_shape`` on ``trl-flow/tiny-edit``)
for RL to learn:

* sources are synthetic light shapes on dark backgrounds (rectangles, half-images, discs: :func:`edit_pairs`);
* each target is its source's shape, on its source's background, painted in a colour;
* half of the pairs (``taught_fraction``) are painted in one of the palette's *other* colours (yellow, white, ...,
  pink) and prompted ``"make it <that colour>"``: the base learns to read colour words;
* the other half are painted red, green or blue uniformly at random and prompted ``"make it red / green / blue"``
  with a word drawn independently of the colour: the task's three words carry no information in pretraining.

The transformer (full weights, AdamW) learns the flow-matching objective on these pairs through the Kontext
adapter's own denoiser call (source tokens after the target's). So on the tiny edit set it keeps the source's shape
and paints it red, green or blue whatever the prompt says: its mean ``recolor_shape`` is about 0 (a colour that
ignores the prompt averages 0 over the three prompts), and RL has to tie each word to its colour. Both that mean and
a shape-preservation contrast (brightness inside the source's shape minus outside) are stored in the marker file
(key ``"edit"``); the build fails if the shape is not kept. The VAE, text encoders, tokenizers and scheduler are the
tiny Kontext's (seed 0: the cached tiny FLUX's; other seeds build fresh ones). ~50-75 s on one loaded core.

Usage::

    from diffusers import FluxKontextPipeline
    from trl_flow.offline_models.flux_kontext_edit import ensure_tiny_edit_kontext

    pipe = FluxKontextPipeline.from_pretrained(ensure_tiny_edit_kontext())
"""

from __future__ import annotations

import math
import os
import pathlib
import time
from dataclasses import asdict, dataclass

import torch

from .cache import SeededBuild
from .vae import PALETTE, TINY_IMAGE_SIZE, _random_colours

__all__ = [
    "TINY_EDIT_KONTEXT_VERSION",
    "EditPretraining",
    "build_tiny_edit_kontext",
    "edit_pairs",
    "ensure_tiny_edit_kontext",
]

TINY_EDIT_KONTEXT_VERSION: str = "1"
"""Version of the build recipe (part of the default cache dir); bump it with the recipe or the tiny Kontext's."""

#: The names of :data:`.vae.PALETTE`'s colours, in its order (all single tokens of the tiny tokenizers).
PALETTE_NAMES: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "white", "black", "magenta", "cyan", "orange", "purple", "gray", "brown", "pink",
)  # fmt: skip

#: The tiny edit task's colour words: their pretraining prompts never tell the target's colour.
TASK_COLOURS: tuple[str, ...] = ("red", "green", "blue")


@dataclass(frozen=True)
class EditPretraining:
    """The transformer's pretraining (values measured: see the module's marker metrics)."""

    pairs: int = 1024
    """Synthetic (source, target) pairs, VAE-encoded once."""
    steps: int = 500
    batch_size: int = 16
    lr: float = 2e-3
    taught_fraction: float = 0.5
    """The share of pairs whose prompt names their target's colour, one of the palette's colours other than
    :data:`TASK_COLOURS` (so the base reads colour words in general); the other pairs have a random colour and a
    prompt naming one of :data:`TASK_COLOURS`, drawn independently of it."""
    guidance_scale: float = 2.5
    """The guidance embedding's input during pretraining (the tiny edit recipe's value)."""
    min_shape_contrast: float = 0.25
    """Sanity check: mean brightness (max over RGB) inside the source's shape minus outside, on the tiny edit
    set's sources with 4 ODE steps, in [-1, 1]."""


def edit_pairs(
    n: int, generator: torch.Generator, size: int = TINY_IMAGE_SIZE, colours: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic (source, target) image pairs in ``[0, 1]``, each ``(n, 3, size, size)``.

    A source is a light near-grey shape (a third each: a rectangle, a half of the image, a disc) on a dark near-grey
    background; its target is the same shape on the same background in ``colours`` (``(n, 3)``; default random:
    half from the palette, half uniform, as the VAE's training images).
    """
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    xs, ys = xs[None], ys[None]
    kind = torch.randint(0, 3, (n,), generator=generator)[:, None, None]
    lo = torch.rand(n, 2, generator=generator) * 0.6
    hi = lo + 0.25 + torch.rand(n, 2, generator=generator) * 0.4
    rect = (xs >= lo[:, 0, None, None]) & (xs <= hi[:, 0, None, None])
    rect = rect & (ys >= lo[:, 1, None, None]) & (ys <= hi[:, 1, None, None])
    side = torch.randint(0, 4, (n,), generator=generator)[:, None, None]
    half = torch.where(
        side == 0, xs < 0.5, torch.where(side == 1, xs >= 0.5, torch.where(side == 2, ys < 0.5, ys >= 0.5))
    )
    centre = 0.3 + torch.rand(n, 2, generator=generator) * 0.4
    radius = 0.18 + torch.rand(n, generator=generator) * 0.2
    disc = (xs - centre[:, 0, None, None]) ** 2 + (ys - centre[:, 1, None, None]) ** 2 <= radius[:, None, None] ** 2
    mask = torch.where(kind == 0, rect, torch.where(kind == 1, half, disc))[:, None]
    light = (
        0.7 + 0.3 * torch.rand(n, 1, 1, 1, generator=generator) + 0.05 * torch.randn(n, 3, 1, 1, generator=generator)
    )
    background = (0.15 * torch.rand(n, 1, 1, 1, generator=generator)).expand(n, 3, 1, 1)
    colour = (_random_colours(n, generator) if colours is None else colours)[:, :, None, None]
    source = torch.where(mask, light.clamp(0, 1), background)
    target = torch.where(mask, colour, background)
    return source.contiguous(), target.contiguous()


def _pairs_and_prompts(config: EditPretraining, generator: torch.Generator):
    """The pretraining pairs, and per pair the prompts it may be shown with: ``(sources, targets, words)``, where
    ``words[i]`` is the colour-word index (into :data:`PALETTE_NAMES`) of a taught pair, or -1 for a pair shown with
    a random one of :data:`TASK_COLOURS`."""
    taught = [i for i, name in enumerate(PALETTE_NAMES) if name not in TASK_COLOURS]
    words = torch.tensor(taught)[torch.randint(0, len(taught), (config.pairs,), generator=generator)]
    words = torch.where(torch.rand(config.pairs, generator=generator) < config.taught_fraction, words, -1)
    palette = torch.tensor(PALETTE, dtype=torch.float32)
    task = torch.tensor([PALETTE_NAMES.index(name) for name in TASK_COLOURS])
    # An untaught pair's colour: one of the task's colours, uniformly, whatever its prompt names.
    random_task_colour = palette[task[torch.randint(0, len(task), (config.pairs,), generator=generator)]]
    colours = torch.where((words >= 0)[:, None], palette[words.clamp(min=0)], random_task_colour)
    sources, targets = edit_pairs(config.pairs, generator, colours=colours)
    return sources, targets, words


def _pretrain(pipe, seed: int, config: EditPretraining) -> dict:
    """Train ``pipe.transformer`` in place on :func:`edit_pairs` (rectified flow, logit-normal noise levels), then
    freeze it; returns the final loss and the time taken."""
    from ..models.flux_kontext import FluxKontextAdapter

    adapter = FluxKontextAdapter(pipe)
    generator = torch.Generator().manual_seed(seed + 101)
    sources, targets, pair_words = _pairs_and_prompts(config, generator)
    task_words = torch.tensor([PALETTE_NAMES.index(name) for name in TASK_COLOURS])
    with torch.no_grad():
        source_latents = pipe._encode_vae_image(sources * 2 - 1, generator=None)
        target_latents = pipe._encode_vae_image(targets * 2 - 1, generator=None)
        prompts = [f"make it {colour}" for colour in PALETTE_NAMES]
        text = adapter.encode_prompts(prompts, "", config.guidance_scale, 16)
    transformer = pipe.transformer
    transformer.train()
    transformer.requires_grad_(True)

    def denoiser(**inputs) -> torch.Tensor:  # the adapter's denoiser call returns the prediction tensor
        return transformer(**inputs, return_dict=False)[0]

    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = max(config.steps // 20, 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(config.steps - warmup, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start, losses = time.perf_counter(), []
    with torch.enable_grad():
        for _ in range(config.steps):
            index = torch.randint(0, config.pairs, (config.batch_size,), generator=generator)
            random_word = task_words[torch.randint(0, len(task_words), (config.batch_size,), generator=generator)]
            words = torch.where(pair_words[index] >= 0, pair_words[index], random_word)
            x0 = target_latents[index]
            noise = torch.randn(x0.shape, generator=generator)
            sigma = torch.sigmoid(torch.randn(config.batch_size, generator=generator))
            noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
            conditioning = {
                "prompt_embeds": text["prompt_embeds"][words],
                "pooled_prompt_embeds": text["pooled_prompt_embeds"][words],
                "image_latents": source_latents[index],
            }
            velocity = adapter.predict_velocity(denoiser, noisy, sigma, conditioning, config.guidance_scale)
            loss = (velocity.float() - (noise - x0)).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    transformer.eval()
    transformer.requires_grad_(False)
    tail = losses[-50:]
    return {"final_loss": sum(tail) / len(tail), "pretrain_seconds": round(time.perf_counter() - start, 1)}


def _edit_metrics(pipe, guidance_scale: float) -> dict:
    """The base's ``recolor_shape`` mean on the tiny edit set (4 ODE steps, 4 seeds) and its shape contrast."""
    import numpy as np
    from PIL import Image

    from reward_funcs.edit_rules import recolor_shape, shape_mask

    from ..data import TINY_EDIT_DIR

    names = ("left", "right", "top", "bottom")
    pipe.set_progress_bar_config(disable=True)  # a build log, not four progress bars
    sources = [Image.open(TINY_EDIT_DIR / f"{name}.png").convert("RGB") for name in names]
    prompts, images, sources_used = [], [], []
    for seed in range(4):
        batch_prompts = [f"make it {colour}" for _ in sources for colour in ("red", "green", "blue")]
        batch_sources = [source for source in sources for _ in range(3)]
        images += pipe(
            prompt=batch_prompts,
            image=batch_sources,
            num_inference_steps=4,
            guidance_scale=guidance_scale,
            height=TINY_IMAGE_SIZE,
            width=TINY_IMAGE_SIZE,
            max_area=TINY_IMAGE_SIZE**2,
            _auto_resize=False,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(seed),
        ).images
        prompts += batch_prompts
        sources_used += batch_sources
    rewards = recolor_shape(prompts, images, source_images=sources_used)
    contrasts = []
    for image, source in zip(images, sources_used, strict=True):
        brightness = np.asarray(image.convert("RGB"), dtype=np.float32).max(axis=-1) / 255
        mask = shape_mask(source, image.size)
        contrasts.append(float(brightness[mask].mean() - brightness[~mask].mean()))
    return {"recolor_shape_mean": float(np.mean(rewards)), "shape_contrast": float(np.mean(contrasts))}


def _build_pipeline(seed: int, config: EditPretraining = EditPretraining()):
    from . import flux_kontext

    pipe, vae_metrics = flux_kontext._build_pipeline(seed)
    torch.manual_seed(seed)
    metrics = {"vae": vae_metrics, "pretraining": asdict(config), **_pretrain(pipe, seed, config)}
    metrics.update(_edit_metrics(pipe, config.guidance_scale))
    if metrics["shape_contrast"] < config.min_shape_contrast:
        raise RuntimeError(
            f"tiny edit Kontext build failed its sanity check (the source's shape is not kept): {metrics}"
        )
    return pipe, metrics


_BUILD = SeededBuild("tiny-edit-kontext", TINY_EDIT_KONTEXT_VERSION, _build_pipeline, metrics_key="edit")


def build_tiny_edit_kontext(output_dir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the tiny edit Kontext into ``output_dir`` and return the folder (:meth:`.SeededBuild.build`)."""
    return _BUILD.build(output_dir, seed)


def ensure_tiny_edit_kontext(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder of a complete tiny edit Kontext build at ``path`` (default
    ``~/.cache/trl_flow/tiny-edit-kontext-1``), built (seed 0) if needed."""
    return _BUILD.ensure(path)
