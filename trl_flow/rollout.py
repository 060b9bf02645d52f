"""Rollouts: the denoising chain of a diffusers pipeline run as a stochastic policy, in place of token sampling.

One rollout batch: prompts are encoded once per distinct prompt (groups repeat each prompt), initial noise is drawn
as the family's pipeline draws it, and each denoising step is an SDE step (`trl_flow.sde`) whose inputs and log-prob
are recorded for the trained steps; the final latents are decoded to the completions the rewards score.

Seeds are functions of the trainer's counters, never of a running generator, so that a resumed run draws the same
rollouts as an uninterrupted one, and (with recipes in global quantities) so that every image's noise is the same
whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from typing import Any, Literal

import torch
from diffusers.utils.torch_utils import randn_tensor

from .models import Conditioning, FlowModelAdapter
from .offload import FrozenModules
from .sde import sde_step_with_logprob

#: ``clock()`` -> (optimizer steps done, TRL's micro-step counter ``_step``): what a rollout's seed depends on.
TrainerClock = Callable[[], tuple[int, int]]
#: ``denoiser_for_generation()`` is a context manager yielding the policy's denoiser for sampling (gathered under
#: ZeRO-3, unwrapped from DDP).
GenerationDenoiser = Callable[[], contextlib.AbstractContextManager]
#: What a training rollout records per sample: the trained steps' trajectory (``latents``, ``next_latents``,
#: ``old_log_probs``, ``sigmas``, ``sigmas_next``), that plus each step's mean ``old_means`` (algorithms that compare
#: step means, GRPO-Guard), or only the final latents.
RolloutRecord = Literal["trajectory", "trajectory_with_means", "final_latents"]

_STEP_SEED_STRIDE = 104729
_PROCESS_SEED_STRIDE = 7919


def _image_key(image: Any) -> Any:
    """What identifies a source image across the samples of a group: TRL's sampler repeats the dataset row, but a
    dataset decodes a new PIL object at every access, so the pixels (or the path) are the key, not the object."""
    if isinstance(image, (str, bytes)):
        return image
    if hasattr(image, "tobytes"):  # PIL images, numpy arrays
        return (getattr(image, "size", None), getattr(image, "mode", None), hashlib.sha1(image.tobytes()).hexdigest())
    if isinstance(image, torch.Tensor):
        return (tuple(image.shape), hashlib.sha1(image.detach().cpu().numpy().tobytes()).hexdigest())
    return id(image)


class RolloutSampler:
    """Rollouts of one model family's pipeline for a run's config.

    Args:
        adapter: the family's adapter.
        args: the run's `FlowGRPOConfig`.
        frozen: the frozen pipeline parts (brought to the accelerator while they are used).
        process_index: this process's rank.
        clock: the trainer's counters (see `TrainerClock`).
    """

    def __init__(
        self, adapter: FlowModelAdapter, args: Any, frozen: FrozenModules, process_index: int, clock: TrainerClock
    ) -> None:
        self.adapter = adapter
        self.args = args
        self.frozen = frozen
        self.process_index = process_index
        self.clock = clock

    # ------------------------------------------------------------------------------------------------- seeds
    def _micro_step(self) -> int:
        """The optimizer-step-based micro-step: the same in a resumed run as in an uninterrupted one."""
        global_step, step = self.clock()
        accumulation = self.args.gradient_accumulation_steps
        return global_step * accumulation + (step % accumulation)

    def seed(self, mode: str) -> int:
        """Seed of a rollout batch: fixed for evaluation (comparable across evaluations); for training, a function
        of the optimizer step and micro-step."""
        args = self.args
        if args.prompts_per_step is not None:
            # A recipe in global quantities means the same on any number of processes: the seed depends on the
            # generation batch only, and `rollout` draws each image's noise from its index in the global batch.
            _, step = self.clock()
            generate_every = args.steps_per_generation * args.num_iterations
            return args.seed + (_STEP_SEED_STRIDE * (step // generate_every + 1) if mode == "train" else 0)
        seed = args.seed + _PROCESS_SEED_STRIDE * self.process_index
        if mode == "train":
            seed += _STEP_SEED_STRIDE * (self._micro_step() + 1)
        return seed

    def sample_offset(self, local_batch_size: int) -> int | None:
        """Index of this process's first image in the global rollout batch, when noise is drawn per image (recipes
        in global quantities, `prompts_per_step`); None otherwise (one generator per process)."""
        if self.args.prompts_per_step is None:
            return None
        return self.process_index * local_batch_size

    def trained_steps(self) -> range:
        """Which denoising steps of this rollout batch are trained: the first `num_trained_steps` (the paper), or in
        fast mode a window of `sde_window_size` steps whose start lies in `sde_window_range`. With
        `sde_window_schedule` "random" (Flow-GRPO-Fast) the start is drawn anew for each batch; with "progressive"
        (MixGRPO) it starts at the range's low end and moves by `sde_window_stride` every `sde_window_move_every`
        optimizer updates, wrapping back to the low end. Either way it is the same on every process and a function
        of the seed and the trainer's counters only, so a resumed run keeps the schedule."""
        args = self.args
        if not args.sde_window_size:
            return range(args.num_trained_steps)
        low, high = args.sde_window_range or (0, args.num_inference_steps // 2)
        high = max(min(high, args.num_inference_steps - args.sde_window_size + 1), low + 1)
        if args.sde_window_schedule == "progressive":
            global_step, _ = self.clock()
            starts = range(low, high, args.sde_window_stride)
            start = starts[(global_step // args.sde_window_move_every) % len(starts)]
        else:
            generator = torch.Generator().manual_seed(args.seed + _STEP_SEED_STRIDE * (self._micro_step() + 1))
            start = int(torch.randint(low, high, (1,), generator=generator))
        return range(start, start + args.sde_window_size)

    # ------------------------------------------------------------------------------------------- sampling
    def conditioning(
        self, prompts: list[str], condition_images: list | None = None, guidance_scale: float | None = None
    ) -> Conditioning:
        """Conditioning for each sample, encoded once per distinct prompt (groups repeat each prompt), or once per
        distinct (prompt, source image) pair for image-conditioned families; for CFG at ``guidance_scale`` (default
        the config's)."""
        keys = (
            list(prompts)
            if condition_images is None
            else list(zip(prompts, map(_image_key, condition_images), strict=True))
        )
        first = {key: i for i, key in reversed(list(enumerate(keys)))}  # each key's first sample
        unique = list(dict.fromkeys(keys))
        images = None if condition_images is None else [condition_images[first[key]] for key in unique]
        # A source image is encoded by the VAE too (editing); text alone needs only the text encoders.
        with self.frozen.in_use(*(("text_encoder",) if condition_images is None else ("text_encoder", "vae"))):
            encoded = self.adapter.encode_conditioning(
                [prompts[first[key]] for key in unique],
                self.args.negative_prompt,
                self.args.guidance_scale if guidance_scale is None else guidance_scale,
                self.args.max_sequence_length,
                condition_images=images,
            )
        position = {key: i for i, key in enumerate(unique)}
        index = torch.tensor([position[key] for key in keys], device=next(iter(encoded.values())).device)
        return {name: tensor.index_select(0, index) for name, tensor in encoded.items()}

    @torch.no_grad()
    def denoise(
        self,
        denoiser: Any,
        conditioning: Conditioning,
        num_steps: int,
        noise_level: float,
        trained_steps: range,
        generator: torch.Generator | list[torch.Generator],
        antithetic: bool = False,
        with_means: bool = False,
        guidance_scale: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Denoise one batch; return the final latents and, per trained step, what the loss needs. ``generator`` may
        be one generator per image (noise independent of how the batch is split over processes and chunks).
        ``antithetic``: images 2k and 2k+1 start from the same noise and take mirrored SDE noise (eps, -eps).
        ``with_means``: also record each trained step's mean as ``old_means``. ``guidance_scale``: the CFG scale
        (default the config's)."""
        args = self.args
        guidance_scale = args.guidance_scale if guidance_scale is None else guidance_scale
        sigmas = self.adapter.sigmas(num_steps, args.height, args.width)
        batch_size = next(iter(conditioning.values())).shape[0]
        if antithetic:
            # The pair's first image draws for both (its generator when there is one per image).
            lead = generator[0::2] if isinstance(generator, list) else generator
            latents = self.adapter.prepare_latents(batch_size // 2, args.height, args.width, lead).float()
            latents = latents.repeat_interleave(2, dim=0)
        else:
            latents = self.adapter.prepare_latents(batch_size, args.height, args.width, generator).float()
        record: dict[str, list[torch.Tensor]] = {"latents": [], "next_latents": [], "old_log_probs": []}
        if with_means:
            record["old_means"] = []
        for i in range(num_steps):
            velocity = self._velocity(denoiser, latents, sigmas[i].expand(batch_size), conditioning, guidance_scale)
            # Fast mode (sde_window_size > 0): the SDE only inside the trained window, the ODE elsewhere.
            step_noise = noise_level if (i in trained_steps or not args.sde_window_size) else 0.0
            eps = None
            if antithetic and step_noise > 0:
                half = randn_tensor((batch_size // 2, *latents.shape[1:]), generator=lead, dtype=torch.float32)
                eps = torch.stack([half, -half], dim=1).flatten(0, 1).to(latents.device)
            step = sde_step_with_logprob(
                velocity,
                sigmas[i],
                sigmas[i + 1],
                latents,
                noise_level=step_noise,
                generator=generator,
                noise=eps,
                sde_type=args.sde_type,
            )
            if i in trained_steps:
                record["latents"].append(latents)
                record["next_latents"].append(step.prev_sample)
                record["old_log_probs"].append(step.log_prob)
                if with_means:
                    record["old_means"].append(step.mean)
            latents = step.prev_sample

        trajectory = {}
        if record["latents"]:
            trajectory = {name: torch.stack(values, dim=1) for name, values in record.items()}
            steps = torch.tensor(list(trained_steps))
            trajectory["sigmas"] = sigmas[steps].expand(batch_size, -1).to(latents.device)
            trajectory["sigmas_next"] = sigmas[steps + 1].expand(batch_size, -1).to(latents.device)
            trajectory.update(self.adapter.step_record(trajectory["sigmas"]))  # e.g. Wan2.2's expert per step
        return latents, trajectory

    def _velocity(
        self,
        denoiser: Any,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        conditioning: Conditioning,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The batch's velocity, predicted ``per_device_train_batch_size`` samples at a time.

        Only the forward pass is sliced; the SDE step (and so every random draw) still takes the whole batch, so the
        images are those of one forward over the batch. The training pass holds a micro-batch of that size with its
        autograd graph anyway, so the rollout's no-grad forward of the same size never sets the peak; unsliced, a
        64-image rollout with CFG ran the transformer on 128 samples at once."""
        batch_size = latents.shape[0]
        size = max(1, getattr(self.args, "per_device_train_batch_size", None) or batch_size)
        if size >= batch_size:
            return self.adapter.predict_velocity(denoiser, latents, sigma, conditioning, guidance_scale)
        parts = [
            self.adapter.predict_velocity(
                denoiser,
                latents[start : start + size],
                sigma[start : start + size],
                {name: tensor[start : start + size] for name, tensor in conditioning.items()},
                guidance_scale,
            )
            for start in range(0, batch_size, size)
        ]
        return torch.cat(parts)

    def decode(self, latents: torch.Tensor) -> list:
        """The completions of final ``latents``, decoded ``per_device_train_batch_size`` samples at a time: the VAE's
        activations at full resolution dwarf the denoiser's (64 images at 128 px: 0.5 GB per decoder feature map), and
        decoding is per sample, so slicing changes no image while bounding the peak by the training micro-batch's."""
        size = max(1, getattr(self.args, "per_device_train_batch_size", None) or latents.shape[0])
        completions: list = []
        for start in range(0, latents.shape[0], size):
            completions.extend(self.adapter.decode_latents(latents[start : start + size]))
        return completions

    def rollout(
        self,
        denoiser_for_generation: GenerationDenoiser,
        prompts: list[str],
        num_steps: int,
        noise_level: float,
        trained_steps: range,
        seed: int,
        on_chunk_decoded: Callable[[int, list], None] | None = None,
        sample_offset: int | None = None,
        antithetic: bool = False,
        record: RolloutRecord = "trajectory",
        condition_images: list | None = None,
        guidance_scale: float | None = None,
    ) -> tuple[list, dict[str, torch.Tensor], Conditioning]:
        """Completions, the per-sample record (see `RolloutRecord`) and conditioning for ``prompts``, in chunks of
        ``rollout_batch_size``.

        ``on_chunk_decoded(start, completions)`` is called as soon as a chunk's completions exist (to score them
        while the next chunk denoises). With ``sample_offset`` (the index of ``prompts[0]`` in the global batch),
        image ``i`` draws its noise from its own generator seeded ``seed + sample_offset + i``. ``condition_images``:
        one source image per prompt, for image-conditioned families. ``guidance_scale``: the CFG scale of the
        rollout (default the config's ``guidance_scale``; the trainer passes the algorithm's for training)."""
        conditioning = self.conditioning(prompts, condition_images, guidance_scale)
        chunk = self.args.rollout_batch_size or len(prompts)
        if sample_offset is None:
            generator = torch.Generator().manual_seed(seed)
        else:
            generator = [torch.Generator().manual_seed(seed + sample_offset + i) for i in range(len(prompts))]
        completions, records = [], []
        with denoiser_for_generation() as denoiser, self.frozen.in_use("vae"):
            for start in range(0, len(prompts), chunk):
                part = {name: tensor[start : start + chunk] for name, tensor in conditioning.items()}
                generators = generator[start : start + chunk] if isinstance(generator, list) else generator
                final_latents, trajectory = self.denoise(
                    denoiser,
                    part,
                    num_steps,
                    noise_level,
                    trained_steps,
                    generators,
                    antithetic,
                    with_means=record == "trajectory_with_means",
                    guidance_scale=guidance_scale,
                )
                chunk_completions = self.decode(final_latents)
                if on_chunk_decoded is not None:
                    on_chunk_decoded(start, chunk_completions)
                completions.extend(chunk_completions)
                records.append({"final_latents": final_latents} if record == "final_latents" else trajectory)
        batch = {name: torch.cat([r[name] for r in records]) for name in records[0]}
        return completions, batch, conditioning
