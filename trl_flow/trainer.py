"""`FlowGRPOTrainer`: TRL's `GRPOTrainer` with SDE denoising rollouts in place of token sampling.

What is TRL's and stays TRL's: the training loop, the prompt sampler that repeats each prompt `num_generations`
times, buffering a generation batch over `steps_per_generation` micro-steps and `num_iterations` passes, reward
calling (`_calculate_rewards`), metric logging, callbacks, accelerate/DeepSpeed, PEFT, checkpoints.

What differs, and is overridden here:

* `_generate_and_score_completions`: a rollout is an SDE trajectory of the diffusers pipeline; its log-probs (the
  behaviour policy's) are stored per trained denoising step; completions handed to rewards are PIL images;
* `_compute_loss`: Flow-GRPO's loss per trained denoising step (see `trl_flow.sde`);
* `_save`: also writes the LoRA in diffusers' format, so `pipe.load_lora_weights(output_dir)` works;
* the lifecycle: checkpoints written under a temporary name and renamed when complete (`_save_checkpoint`); the
  state an exact resume needs beyond transformers' (TRL's buffered generation batch, its micro-step counter, the
  EMA) saved in each checkpoint and restored (`_load_optimizer_and_scheduler`); a train sampler whose shuffling
  depends on the epoch only (`_get_train_sampler`); EMA weights swapped in for evaluation (`evaluate`); evaluation
  samples collected for the image callbacks (`prediction_step`); a diffusers model card (`create_model_card`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate.utils import gather, gather_object
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from peft import PeftConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints
from trl import GRPOTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler, nanstd

from .callbacks import EMACallback, EvalSample, EvalSamplesCallback, ParameterEMA, RewardCurveCallback
from .config import FlowGRPOConfig
from .errors import UserInputError
from .guard import RewardHackingGuard
from .models import FlowModelAdapter, adapter_for_pipeline
from .policy import DiffusionPolicy
from .rewards import call_reward_func, resolve_reward_funcs, validate_rewards
from .sde import (
    SDEStepOutput,
    clipped_policy_loss,
    group_relative_advantages,
    kl_between_steps,
    sde_step_with_logprob,
)

_CONDITIONING_PREFIX = "cond_"
#: Where offloaded frozen parts (`offload_text_encoders`, `offload_vae`) wait between uses.
_OFFLOAD_DEVICE = torch.device("cpu")

logger = logging.getLogger(__name__)

#: A checkpoint is written as ``tmp-checkpoint-N`` and renamed to ``checkpoint-N`` once complete. transformers'
#: ``get_last_checkpoint`` (``^checkpoint-N$``) and checkpoint rotation (``checkpoint-*``) never see the temporary name.
CHECKPOINT_STAGING_PREFIX = "tmp-"
_STAGING_DIR = re.compile(rf"^{CHECKPOINT_STAGING_PREFIX}(old-)?{PREFIX_CHECKPOINT_DIR}-\d+$")
_CHECKPOINT_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
#: Files an exact resume needs beyond transformers' own: JSON state, per-process rollout buffers, the EMA.
FLOW_STATE_NAME = "flow_trainer_state.json"
ROLLOUT_BUFFER_NAME = "rollout_buffer-{process}.safetensors"
EMA_STATE_NAME = "ema_state.safetensors"
#: Sub-folder (of a checkpoint or the final output) with the EMA weights in diffusers format.
EMA_DIR = "ema"
_TRAINER_STATE_NAME = "trainer_state.json"


@contextlib.contextmanager
def _without_zero3_init():
    """Load whole (not ZeRO-3-partitioned) modules even when a ZeRO-3 TrainingArguments exists.

    transformers builds every `from_pretrained` model under `deepspeed.zero.Init` once ZeRO-3 is configured, which
    leaves the pipeline's frozen text encoders as empty shards outside any DeepSpeed engine. Only the denoiser goes
    through `deepspeed.initialize` (and is gathered for rollouts); the frozen parts stay whole on each process.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers always ships it
        yield
        return
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_pipeline(name_or_path: str, dtype: str | torch.dtype | None = None, **kwargs) -> DiffusionPipeline:
    """`DiffusionPipeline.from_pretrained` from a hub id or a local folder, with an actionable error."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        with _without_zero3_init():
            return DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype or torch.float32, **kwargs)
    except Exception as error:  # diffusers raises many types (OSError, ValueError, HF hub errors)
        raise UserInputError(
            f"could not load the diffusers pipeline {name_or_path!r}: {type(error).__name__}: {error}. Pass a "
            "local pipeline folder (with model_index.json) or a hub id that is cached or downloadable."
        ) from error


def check_hub_access(args) -> None:
    """With ``push_to_hub``, fail now (not after hours of training) if the Hub is unreachable or not logged in."""
    if not getattr(args, "push_to_hub", False):
        return
    from huggingface_hub import constants, whoami

    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    if offline:
        raise UserInputError(
            "push_to_hub needs the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE): unset it, or train "
            "without push_to_hub and upload the output folder later (`hf upload`)"
        )
    try:
        whoami(token=getattr(args, "hub_token", None))
    except Exception as error:  # network errors, 401s, missing token: all mean the push would fail at the end
        raise UserInputError(
            f"push_to_hub needs a reachable Hugging Face Hub and a login with write access ({type(error).__name__}: "
            f"{error}); log in with `hf auth login` or set HF_TOKEN, or train without push_to_hub"
        ) from error


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete ``checkpoint-N`` folder with the largest N in ``output_dir`` (None if there is none).

    Temporary folders of an interrupted save are ignored, and so is a ``checkpoint-N`` without a trainer state
    (e.g. written by a writer that was not atomic)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _CHECKPOINT_DIR.match(path.name)) and (path / _TRAINER_STATE_NAME).is_file()
    )
    return str(steps[-1][1]) if steps else None


def _remove_staging_dirs(run_dir: str) -> None:
    """Delete the temporary folders a save killed midway left behind."""
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if _STAGING_DIR.match(name):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def _publish_dir(staging_dir: str, final_dir: str) -> None:
    """Rename a finished ``staging_dir`` to ``final_dir`` (replacing an older ``final_dir`` of the same name)."""
    if os.path.exists(final_dir):
        parent, name = os.path.split(final_dir)
        old = os.path.join(parent, f"{CHECKPOINT_STAGING_PREFIX}old-{name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(staging_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging_dir, final_dir)
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows it
        fd = os.open(os.path.dirname(final_dir) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` whose shuffle for epoch ``e`` depends on the seed and ``e`` only.

    TRL's sampler draws each epoch's permutation from one generator that advances with every pass, so a run
    resumed in epoch ``e`` (a new sampler) would replay epoch 0's order. `set_epoch` (which the Trainer calls before
    every pass, resumed or not) rewinds the generator to its seeded state and advances it by ``e`` permutations:
    the order of an uninterrupted run is unchanged and a resumed run gets the same one.
    """

    @classmethod
    def from_sampler(cls, sampler: RepeatSampler) -> EpochSeededRepeatSampler:
        """Take over a freshly built `RepeatSampler` (same data, counts, seed)."""
        new = cls.__new__(cls)
        new.__dict__.update(sampler.__dict__)
        new._initial_generator_state = new.generator.get_state() if new.shuffle else None
        return new

    def set_epoch(self, epoch: int) -> None:
        """Put the generator where an uninterrupted run has it at the start of epoch ``epoch``."""
        if self._initial_generator_state is None:
            return
        self.generator.set_state(self._initial_generator_state)
        for _ in range(epoch):  # RepeatSampler.__iter__ draws exactly one permutation per pass
            torch.randperm(self.num_samples, generator=self.generator)


def _validated_reward(func):
    """Wrap a reward function so that a crash, a wrong count or a NaN is a clear error, never a silent 0."""

    @functools.wraps(func)
    def reward(prompts, completions, **kwargs):
        values = call_reward_func(func, prompts, completions, **kwargs)
        return validate_rewards(func.__name__, values, len(completions))

    return reward


class FlowGRPOTrainer(GRPOTrainer):
    """Flow-GRPO trainer for flow-matching text-to-image pipelines (a `trl.GRPOTrainer` subclass).

    Args:
        model: a diffusers pipeline, or its hub id / local folder (loaded with `DiffusionPipeline.from_pretrained`,
            dtype from `args.model_init_kwargs["dtype"]`, default float32).
        reward_funcs: TRL reward functions `fn(prompts, completions, **columns) -> list[float | None]`, where
            `completions` are PIL images; or names of built-in rewards, `module:function` or `file.py:function`.
        args: a `FlowGRPOConfig`.
        train_dataset / eval_dataset: datasets with a `prompt` column; other columns reach the reward functions.
        callbacks / optimizers: as in `transformers.Trainer`.
        peft_config: a `peft.LoraConfig` for the denoiser (recommended); None trains the full denoiser.
        model_family: force an adapter ("sd3", ...) instead of choosing it from the pipeline's class.
    """

    _tag_names = ["trl", "trl-flow", "flow-grpo", "diffusers"]
    _name = "Flow-GRPO"

    def __init__(
        self,
        model: str | os.PathLike | DiffusionPipeline,
        reward_funcs,
        args: FlowGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config: PeftConfig | None = None,
        model_family: str | None = None,
    ) -> None:
        if args is None:
            args = FlowGRPOConfig(output_dir="flow-grpo")
        if not isinstance(args, FlowGRPOConfig):
            raise TypeError("FlowGRPOTrainer needs a FlowGRPOConfig, not a plain GRPOConfig")
        check_hub_access(args)
        if isinstance(model, (str, os.PathLike)):
            model_kwargs = dict(args.model_init_kwargs or {})
            model = load_pipeline(os.fspath(model), **model_kwargs)
        self.pipeline = model
        self.adapter: FlowModelAdapter = adapter_for_pipeline(model, model_family)

        for module in self.adapter.frozen_modules().values():
            module.requires_grad_(False)
            module.eval()
        policy = DiffusionPolicy(self.adapter.denoiser, getattr(model, "name_or_path", "") or "")
        # Full fine-tuning trains every denoiser weight; with PEFT, get_peft_model freezes the base itself.
        policy.requires_grad_(peft_config is None)

        reward_funcs = [_validated_reward(f) for f in resolve_reward_funcs(reward_funcs)]

        # GRPOTrainer rebuilds a full-fine-tuning reference from config._name_or_path, which is no LM here: keep a
        # frozen copy of the denoiser ourselves and let the parent believe beta is 0 while it sets up.
        reference = None
        if peft_config is None and args.beta != 0:
            reference = DiffusionPolicy(copy.deepcopy(self.adapter.denoiser)).requires_grad_(False).eval()
        beta = args.beta
        if reference is not None:
            args.beta = 0.0
        try:
            super().__init__(
                model=policy,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=model.tokenizer,
                callbacks=callbacks,
                optimizers=optimizers,
                peft_config=peft_config,
            )
        finally:
            args.beta = beta
        self.beta = beta
        if reference is not None:
            self.ref_model = self.accelerator.prepare_model(reference, evaluation_mode=True)

        offloaded = self._offloaded_module_names()
        for name, module in self.adapter.frozen_modules().items():
            module.to(_OFFLOAD_DEVICE if name in offloaded else self.accelerator.device)
        if self.args.train_micro_batch_size is not None and self.is_deepspeed_enabled:
            raise UserInputError(
                "train_micro_batch_size does not work with DeepSpeed (its engine steps the optimizer on every "
                "backward pass it is given): unset it and save memory with gradient_checkpointing or ZeRO instead"
            )

        self._setup_lifecycle()

    # ---------------------------------------------------------------------------------------------- memory
    def _offloaded_module_names(self) -> set[str]:
        """Frozen parts kept on the CPU between uses (`offload_text_encoders`, `offload_vae`)."""
        names = set()
        for name in self.adapter.frozen_modules():
            if (self.args.offload_text_encoders and name.startswith("text_encoder")) or (
                self.args.offload_vae and name == "vae"
            ):
                names.add(name)
        return names

    @contextlib.contextmanager
    def frozen_modules_in_use(self, *prefixes: str):
        """Within the block, the offloaded frozen parts whose names start with one of ``prefixes`` (all of them when
        none is given) sit on the accelerator; they go back to the CPU after it."""
        wanted = [
            module
            for name, module in self.adapter.frozen_modules().items()
            if name in self._offloaded_module_names() and (not prefixes or name.startswith(prefixes))
        ]
        for module in wanted:
            module.to(self.accelerator.device)
        try:
            yield
        finally:
            for module in wanted:
                module.to(_OFFLOAD_DEVICE)

    # ------------------------------------------------------------------------------------------------ rollouts
    def _conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for each prompt, encoded once per distinct prompt (groups repeat each prompt)."""
        unique = list(dict.fromkeys(prompts))
        with self.frozen_modules_in_use("text_encoder"):
            encoded = self.adapter.encode_prompts(
                unique, self.args.negative_prompt, self.args.guidance_scale, self.args.max_sequence_length
            )
        index = torch.tensor([unique.index(p) for p in prompts], device=next(iter(encoded.values())).device)
        return {name: tensor.index_select(0, index) for name, tensor in encoded.items()}

    def _rollout_seed(self, mode: str) -> int:
        """Seed of a rollout batch: fixed for evaluation (comparable across evaluations); for training, a function
        of the optimizer step and micro-step, so a resumed run draws the same rollouts as an uninterrupted one."""
        if self.args.prompts_per_step is not None:
            # A recipe in global quantities means the same on any number of processes: the seed depends on the
            # generation batch only, and `_rollout` draws each image's noise from its index in the global batch.
            generate_every = self.args.steps_per_generation * self.num_iterations
            return self.args.seed + (104729 * (self._step // generate_every + 1) if mode == "train" else 0)
        seed = self.args.seed + 7919 * self.accelerator.process_index
        if mode == "train":
            micro_step = self.state.global_step * self.args.gradient_accumulation_steps + (
                self._step % self.args.gradient_accumulation_steps
            )
            seed += 104729 * (micro_step + 1)
        return seed

    def _sample_offset(self, local_batch_size: int) -> int | None:
        """Index of this process's first image in the global rollout batch, when noise is drawn per image (recipes
        in global quantities, `prompts_per_step`); None otherwise (one generator per process, as before)."""
        if self.args.prompts_per_step is None:
            return None
        return self.accelerator.process_index * local_batch_size

    def _trained_steps(self) -> range:
        """Which denoising steps of this rollout batch are trained: the first `num_trained_steps` (the paper), or in
        fast mode a window of `sde_window_size` steps whose start slides over `sde_window_range` from batch to batch
        (the same on every process, reproducible from the seed and the step)."""
        args = self.args
        if not args.sde_window_size:
            return range(args.num_trained_steps)
        low, high = args.sde_window_range or (0, args.num_inference_steps // 2)
        high = min(high, args.num_inference_steps - args.sde_window_size + 1)
        micro_step = self.state.global_step * args.gradient_accumulation_steps + (
            self._step % args.gradient_accumulation_steps
        )
        generator = torch.Generator().manual_seed(args.seed + 104729 * (micro_step + 1))
        start = int(torch.randint(low, max(high, low + 1), (1,), generator=generator))
        return range(start, start + args.sde_window_size)

    @torch.no_grad()
    def _denoise(
        self,
        denoiser,
        conditioning: dict[str, torch.Tensor],
        num_steps: int,
        noise_level: float,
        trained_steps: range,
        generator: torch.Generator | list[torch.Generator],
        antithetic: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Denoise one batch; return the final latents and, per trained step, what the loss needs. ``generator`` may
        be one generator per image (noise independent of how the batch is split over processes and chunks).
        ``antithetic``: images 2k and 2k+1 start from the same noise and take mirrored SDE noise (eps, -eps)."""
        args = self.args
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
        for i in range(num_steps):
            sigma = sigmas[i].expand(batch_size)
            velocity = self.adapter.predict_velocity(denoiser, latents, sigma, conditioning, args.guidance_scale)
            # Fast mode (sde_window_size > 0): the SDE only inside the trained window, the ODE elsewhere.
            step_noise = noise_level if (i in trained_steps or not args.sde_window_size) else 0.0
            eps = None
            if antithetic and step_noise > 0:
                half = randn_tensor((batch_size // 2, *latents.shape[1:]), generator=lead, dtype=torch.float32)
                eps = torch.stack([half, -half], dim=1).flatten(0, 1).to(latents.device)
            step = sde_step_with_logprob(
                velocity, sigmas[i], sigmas[i + 1], latents, noise_level=step_noise, generator=generator, noise=eps
            )
            if i in trained_steps:
                record["latents"].append(latents)
                record["next_latents"].append(step.prev_sample)
                record["old_log_probs"].append(step.log_prob)
            latents = step.prev_sample

        trajectory = {}
        if record["latents"]:
            trajectory = {name: torch.stack(values, dim=1) for name, values in record.items()}
            steps = torch.tensor(list(trained_steps))
            trajectory["sigmas"] = sigmas[steps].expand(batch_size, -1).to(latents.device)
            trajectory["sigmas_next"] = sigmas[steps + 1].expand(batch_size, -1).to(latents.device)
        return latents, trajectory

    def _rollout(
        self,
        prompts: list[str],
        num_steps: int,
        noise_level: float,
        trained_steps: range,
        seed: int,
        on_chunk_decoded: Callable[[int, list], None] | None = None,
        sample_offset: int | None = None,
        antithetic: bool = False,
    ) -> tuple[list, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Images, per-step trajectories and conditioning for ``prompts``, in chunks of ``rollout_batch_size``.

        ``on_chunk_decoded(start, images)`` is called as soon as a chunk's images exist (to score them while the
        next chunk denoises). With ``sample_offset`` (the index of ``prompts[0]`` in the global batch), image ``i``
        draws its noise from its own generator seeded ``seed + sample_offset + i``."""
        conditioning = self._conditioning(prompts)
        chunk = self.args.rollout_batch_size or len(prompts)
        if sample_offset is None:
            generator = torch.Generator().manual_seed(seed)
        else:
            generator = [torch.Generator().manual_seed(seed + sample_offset + i) for i in range(len(prompts))]
        images, trajectories = [], []
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
            ) as denoiser,
            self.frozen_modules_in_use("vae"),
        ):
            for start in range(0, len(prompts), chunk):
                part = {name: tensor[start : start + chunk] for name, tensor in conditioning.items()}
                generators = generator[start : start + chunk] if isinstance(generator, list) else generator
                final_latents, trajectory = self._denoise(
                    denoiser, part, num_steps, noise_level, trained_steps, generators, antithetic
                )
                chunk_images = self.adapter.decode_latents(final_latents)
                if on_chunk_decoded is not None:
                    on_chunk_decoded(start, chunk_images)
                images.extend(chunk_images)
                trajectories.append(trajectory)
        steps = {name: torch.cat([t[name] for t in trajectories]) for name in trajectories[0]}
        return images, steps, conditioning

    def generate_images(
        self, prompts: list[str], num_inference_steps: int | None = None, noise_level: float = 0.0, seed: int = 0
    ) -> list:
        """Sample images of the current policy for ``prompts`` (ODE by default, ``eval_num_inference_steps``).

        Deterministic for a ``seed``: the same seed gives the same initial noise, so images before and after
        training can be compared one to one.
        """
        num_steps = num_inference_steps or self.args.eval_num_inference_steps
        images, _, _ = self._rollout(prompts, num_steps, noise_level, range(0), seed)
        return images

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict[str, torch.Tensor]:
        mode = "train" if self.model.training else "eval"
        prompts = [example["prompt"] for example in inputs]
        args = self.args
        seed = self._rollout_seed(mode)
        if mode == "train":
            num_steps, noise_level, trained_steps = args.num_inference_steps, args.noise_level, self._trained_steps()
        else:
            num_steps, noise_level, trained_steps = args.eval_num_inference_steps, 0.0, range(0)
        antithetic = mode == "train" and args.antithetic_sampling
        offset = self._sample_offset(len(prompts))
        if args.async_rewards:
            # Score each chunk in a worker thread while the next chunk denoises (as the official code overlaps
            # rewards with sampling); one gather over processes at the end, as in the synchronous path.
            with ThreadPoolExecutor(max_workers=1) as executor:
                futures = []

                def score(start: int, chunk_images: list) -> None:
                    rows = inputs[start : start + len(chunk_images)]
                    futures.append(executor.submit(self._score_locally, rows, chunk_images))

                images, batch, conditioning = self._rollout(
                    prompts, num_steps, noise_level, trained_steps, seed, score, offset, antithetic
                )
                rewards_per_func = gather(torch.cat([future.result() for future in futures]))
        else:
            images, batch, conditioning = self._rollout(
                prompts, num_steps, noise_level, trained_steps, seed, sample_offset=offset, antithetic=antithetic
            )
            rewards_per_func = self._calculate_rewards(inputs, prompts, images, [None] * len(prompts))
        advantages = self._advantages_and_reward_metrics(rewards_per_func, mode)
        process_slice = slice(
            self.accelerator.process_index * len(prompts), (self.accelerator.process_index + 1) * len(prompts)
        )
        all_prompts = gather_object(prompts)
        self._logs["prompt"].extend(all_prompts)
        self._logs["completion"].extend(["<image>"] * len(all_prompts))
        self._logs["advantages"].extend(advantages.tolist())
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        if self.log_multimodal:
            self._logs["images"].extend([[image] for image in gather_object(images)])
        self._last_images = images
        self._last_inputs = inputs  # the rows behind _last_images, for callbacks (RewardHackingGuard)
        self._last_rewards_per_func = rewards_per_func[process_slice].detach().cpu()

        batch.update({_CONDITIONING_PREFIX + name: tensor for name, tensor in conditioning.items()})
        batch["advantages"] = advantages[process_slice].to(self.accelerator.device)
        return batch

    def _score_locally(self, inputs: list[dict], images: list) -> torch.Tensor:
        """Rewards of this process's images, (n, num_reward_funcs), not gathered; TRL's calling convention (dataset
        columns and trainer_state as keywords, None -> NaN). Our reward functions are always validated plain
        callables, so TRL's reward-model and event-loop branches do not apply here."""
        prompts = [row["prompt"] for row in inputs]
        columns = {key: [row[key] for row in inputs] for key in inputs[0] if key not in ("prompt", "completion")}
        scores = torch.zeros(len(images), len(self.reward_funcs))
        for i, func in enumerate(self.reward_funcs):
            values = func(
                prompts=prompts,
                completions=images,
                completion_ids=[None] * len(images),
                trainer_state=self.state,
                log_extra=self._log_completion_extra,
                log_metric=self._log_metric,
                **columns,
            )
            scores[:, i] = torch.tensor([torch.nan if v is None else v for v in values], dtype=torch.float32)
        return scores.to(self.accelerator.device)

    def _advantages_and_reward_metrics(self, rewards_per_func: torch.Tensor, mode: str) -> torch.Tensor:
        """Group-relative advantages of the gathered rewards (all processes), and TRL's reward metrics."""
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        rewards = (rewards_per_func * weights).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = group_relative_advantages(
            rewards, num_generations, self.scale_rewards, clip=self.args.advantage_clip
        )

        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, i]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        group_std = nanstd(rewards.view(-1, num_generations), dim=1)
        metrics["frac_reward_zero_std"].append(
            torch.isclose(group_std, torch.zeros_like(group_std)).float().mean().item()
        )
        return advantages

    def sample_images(self) -> list:
        """The images of the most recent rollout on this process (PIL), e.g. for a sample grid."""
        return list(getattr(self, "_last_images", []))

    # ---------------------------------------------------------------------------------------------------- loss
    @contextlib.contextmanager
    def _reference_denoiser(self, model):
        """The reference policy: the LoRA model with adapters disabled, or the frozen copy (full fine-tuning)."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        unwrapped = self.accelerator.unwrap_model(model)
        with unwrapped.disable_adapter():
            yield unwrapped

    def rescore_step(self, denoiser, inputs: dict[str, torch.Tensor], k: int) -> SDEStepOutput:
        """The ``k``-th trained denoising step of a rollout batch, recomputed by ``denoiser``: its mean, std and the
        log-prob of the recorded next latent (the training pass; also used by `trl-flow doctor`)."""
        conditioning = {
            name[len(_CONDITIONING_PREFIX) :]: tensor
            for name, tensor in inputs.items()
            if name.startswith(_CONDITIONING_PREFIX)
        }
        latents, sigma = inputs["latents"][:, k], inputs["sigmas"][:, k]
        velocity = self.adapter.predict_velocity(denoiser, latents, sigma, conditioning, self.args.guidance_scale)
        return sde_step_with_logprob(
            velocity,
            sigma,
            inputs["sigmas_next"][:, k],
            latents,
            self.args.noise_level,
            prev_sample=inputs["next_latents"][:, k],
        )

    @torch.no_grad()
    def _reference_means(self, model, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
        """The reference policy's step means for every trained step of the batch (None when beta is 0), in one
        switch to the reference: toggling PEFT's adapters walks the whole model, so it is not done per step."""
        if self.beta == 0.0:
            return None
        with self._reference_denoiser(model) as reference:
            return [self.rescore_step(reference, inputs, k).mean for k in range(inputs["old_log_probs"].shape[1])]

    def _step_loss(
        self,
        model,
        inputs: dict[str, torch.Tensor],
        k: int,
        ref_mean: torch.Tensor | None,
        stats: dict[str, list],
    ) -> torch.Tensor:
        """Flow-GRPO's loss of the ``k``-th trained denoising step, averaged over the samples of ``inputs``
        (``ref_mean``: the reference's mean of that step, for the KL term); diagnostics are appended to ``stats``."""
        step = self.rescore_step(model, inputs, k)
        clipped = clipped_policy_loss(
            step.log_prob, inputs["old_log_probs"][:, k], inputs["advantages"], self.epsilon_low, self.epsilon_high
        )
        loss = clipped.loss.mean()
        if ref_mean is not None:
            kl = kl_between_steps(step.mean, ref_mean, step.std)
            loss = loss + self.beta * kl.mean()
            stats["kl"].append(kl.detach())
        stats["low_clipped"].append(clipped.is_low_clipped.float())
        stats["high_clipped"].append(clipped.is_high_clipped.float())
        stats["ratio_deviation"].append((clipped.ratio.detach() - 1).abs())
        return loss

    def _compute_loss(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        old_log_probs = inputs.get("old_log_probs")
        if old_log_probs is None:  # evaluation batches carry no trained steps
            return torch.zeros((), device=self.accelerator.device)
        batch_size, num_steps = old_log_probs.shape[:2]
        # GRPOTrainer.loss_is_scaled_for_ga: the loss divides itself for gradient accumulation.
        scale = 1.0 / num_steps / self.current_gradient_accumulation_steps
        stats: dict[str, list] = {"kl": [], "low_clipped": [], "high_clipped": [], "ratio_deviation": []}

        ref_means = self._reference_means(model, inputs)
        micro_batch_size = self.args.train_micro_batch_size
        if micro_batch_size is None or not torch.is_grad_enabled():
            loss = sum(
                self._step_loss(model, inputs, k, ref_means[k] if ref_means else None, stats) for k in range(num_steps)
            )
            loss = loss * scale
        else:
            # Memory saver: backpropagate each (step, micro-batch) part as soon as it is computed, so that only its
            # activations are alive; the last part is returned for the Trainer's own backward pass. Each part is
            # weighted by its share of the batch, so gradients and loss equal those of the single pass.
            parts = [
                (k, slice(start, start + micro_batch_size))
                for k in range(num_steps)
                for start in range(0, batch_size, micro_batch_size)
            ]
            done = torch.zeros((), device=self.accelerator.device)
            for index, (k, rows) in enumerate(parts):
                part_inputs = {name: tensor[rows] for name, tensor in inputs.items()}
                part_size = part_inputs["advantages"].shape[0]
                is_last = index == len(parts) - 1
                with contextlib.nullcontext() if is_last else self.accelerator.no_sync(model):
                    ref_mean = ref_means[k][rows] if ref_means else None
                    part_loss = self._step_loss(model, part_inputs, k, ref_mean, stats)
                    part_loss = part_loss * (part_size / batch_size * scale)
                    if not is_last:
                        self.accelerator.backward(part_loss)
                        done = done + part_loss.detach()
            loss = part_loss + done  # the value of the whole loss; its gradient is the last part's

        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        if stats["kl"]:
            metrics["kl"].append(gather(torch.cat([kl.flatten() for kl in stats["kl"]]).mean()).nanmean().item())
        low = gather(torch.cat(stats["low_clipped"]).mean())
        high = gather(torch.cat(stats["high_clipped"]).mean())
        metrics["clip_ratio/low_mean"].append(low.nanmean().item())
        metrics["clip_ratio/high_mean"].append(high.nanmean().item())
        metrics["clip_ratio/region_mean"].append((low + high).nanmean().item())
        metrics["ratio/max_abs_deviation"].append(gather(torch.cat(stats["ratio_deviation"]).max()).max().item())
        return loss

    # ----------------------------------------------------------------------------------------------- lifecycle
    def _setup_lifecycle(self) -> None:
        """EMA of the trained weights (if `args.ema`) and the lifecycle callbacks."""
        self.eval_samples: list[EvalSample] = []
        self._collecting_eval_samples = False
        self.ema: ParameterEMA | None = None
        if self.args.ema:
            plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
            if self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3:
                raise UserInputError("ema does not work with DeepSpeed ZeRO-3 (the weights are sharded); use ZeRO-2")
            trainable = [
                (n, p) for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad
            ]
            self.ema = ParameterEMA(trainable, self.args.ema_decay, self.args.ema_update_every)
            self.add_callback(EMACallback(self.ema))
        self.add_callback(EvalSamplesCallback(self))
        self.add_callback(RewardCurveCallback())
        # The reward-hacking guard: added when the config asks for it, and bound to this trainer (whose images it
        # scores) whether added here or passed in `callbacks=`.
        if self.args.guard_reward_funcs and not any(
            isinstance(callback, RewardHackingGuard) for callback in self.callback_handler.callbacks
        ):
            self.add_callback(RewardHackingGuard.from_args(self.args))
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, RewardHackingGuard):
                callback.bind(self)

    @contextlib.contextmanager
    def ema_weights(self):
        """Within the block the model holds the EMA weights (no-op without `args.ema`); restored exactly after."""
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            yield

    def _get_train_sampler(self, dataset=None):
        """TRL's sampler, made resumable across epochs (see `EpochSeededRepeatSampler`)."""
        sampler = super()._get_train_sampler(dataset)
        return EpochSeededRepeatSampler.from_sampler(sampler) if type(sampler) is RepeatSampler else sampler

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """TRL's evaluation (ODE rollouts, fixed seeds), run with the EMA weights when `args.ema`; up to
        `args.eval_images_to_log` samples are kept in `self.eval_samples` for `EvalSamplesCallback`."""
        self.eval_samples = []
        self._collecting_eval_samples = self.args.eval_images_to_log > 0
        try:
            with self.ema_weights():
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._collecting_eval_samples = False

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """TRL's evaluation step (rollout, rewards, loss), then the batch's samples kept for the image callbacks."""
        output = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        wanted = self.args.eval_images_to_log - len(self.eval_samples)
        if self._collecting_eval_samples and wanted > 0:  # the same on every process: the gather is collective
            self.eval_samples.extend(gather_object(self._local_eval_samples(inputs))[:wanted])
        return output

    def _local_eval_samples(self, inputs: list[dict]) -> list[EvalSample]:
        """This process's samples of the evaluation batch just rolled out."""
        weights = self.reward_weights.detach().cpu()
        samples = []
        for row, image, scores in zip(inputs, self._last_images, self._last_rewards_per_func, strict=True):
            total = math.nan if torch.isnan(scores).all() else float((scores * weights).nansum())
            per_func = dict(zip(self.reward_func_names, scores.tolist(), strict=True))
            samples.append(EvalSample(prompt=row["prompt"], image=image, reward=total, rewards=per_func))
        return samples

    # ---------------------------------------------------------------------------------------------------- save
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:  # the Trainer calls _save on every process; one writes
            return
        output_dir = output_dir or self.args.output_dir
        self._save_diffusers_weights(output_dir, state_dict)
        if self.ema is not None:
            with self.ema.applied():
                self._save_diffusers_weights(os.path.join(output_dir, EMA_DIR))

    def _save_diffusers_weights(self, output_dir: str, state_dict=None) -> None:
        """The trained weights in diffusers' format: the LoRA (`pipe.load_lora_weights(output_dir)`), or the full
        denoiser in ``transformer/`` (`save_pretrained`, safetensors)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        if hasattr(unwrapped, "peft_config"):
            lora = get_peft_model_state_dict(unwrapped, state_dict=state_dict)
            prefix = "base_model.model.denoiser."
            lora = {name[len(prefix) :]: value for name, value in lora.items() if name.startswith(prefix)}
            config = unwrapped.peft_config["default"].to_dict()
            self.adapter.save_lora_weights(output_dir, lora, config)
        else:
            unwrapped.denoiser.save_pretrained(os.path.join(output_dir, "transformer"), safe_serialization=True)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint, written to ``tmp-checkpoint-N`` and renamed to ``checkpoint-N`` when complete.

        A run killed while saving leaves only the temporary folder, which resuming ignores (and the next save
        deletes); the previous checkpoint stays the latest complete one. Besides the weights (with the diffusers
        LoRA and the EMA in ``ema/``), optimizer, scheduler, RNG and trainer state, a checkpoint holds what an exact
        resume also needs: TRL's micro-step counter, its buffered generation batch when the checkpoint falls inside
        one, and the EMA state.
        """
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final_dir = os.path.join(run_dir, name)
        staging_dir = os.path.join(run_dir, CHECKPOINT_STAGING_PREFIX + name)
        if self.args.should_save:
            _remove_staging_dirs(run_dir)
        self.accelerator.wait_for_everyone()

        self.save_model(staging_dir, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging_dir)
            self._save_scaler(staging_dir)
            self._save_rng_state(staging_dir)
            self._save_flow_state(staging_dir)
        best_step = self.state.best_global_step
        if best_step and self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST):
            best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
            if best_step == self.state.global_step or os.path.isdir(best_dir):
                self.state.best_model_checkpoint = best_dir
        if self.args.should_save:
            for callback in [*self.callback_handler.callbacks, self.control]:
                if isinstance(callback, ExportableState):
                    callback_name = type(callback).__name__
                    if isinstance(self.state.stateful_callbacks.get(callback_name), list):
                        self.state.stateful_callbacks[callback_name].append(callback.state())
                    else:
                        self.state.stateful_callbacks[callback_name] = callback.state()
            self.state.save_to_json(os.path.join(staging_dir, _TRAINER_STATE_NAME))

        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            _publish_dir(staging_dir, final_dir)
        self.accelerator.wait_for_everyone()

        if self.args.push_to_hub:
            self.create_model_card()
            self._push_from_checkpoint(final_dir)
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _save_flow_state(self, checkpoint_dir: str) -> None:
        """TRL's micro-step counter, the buffered generation batch (mid-buffer only; tensors as safetensors, one
        file per process) and the EMA state."""
        os.makedirs(checkpoint_dir, exist_ok=True)
        generate_every = self.args.steps_per_generation * self.num_iterations
        buffered = self._buffered_inputs is not None and self._step % generate_every != 0
        if buffered:
            buffer = self._pack_buffer(self._buffered_inputs)
            if buffer is None:
                buffered = False
            else:
                path = os.path.join(checkpoint_dir, ROLLOUT_BUFFER_NAME.format(process=self.accelerator.process_index))
                save_file(buffer[0], path, metadata=buffer[1])
        if self.args.should_save:
            state = {
                "format": 1,
                "micro_step": self._step,
                "buffered_generation_batch": buffered,
                "num_processes": self.accelerator.num_processes,
                "ema_num_updates": self.ema.num_updates if self.ema is not None else None,
            }
            if self.ema is not None:
                save_file(self.ema.state_dict(), os.path.join(checkpoint_dir, EMA_STATE_NAME))
            Path(checkpoint_dir, FLOW_STATE_NAME).write_text(json.dumps(state, indent=1))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        """transformers' restore on resume (every backend calls it, after the weights), then `_load_flow_state`."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_flow_state(checkpoint)

    def _load_flow_state(self, checkpoint: str) -> None:
        """Restore what `_save_flow_state` wrote (called on resume, after the weights are loaded)."""
        path = Path(checkpoint, FLOW_STATE_NAME)
        if not path.is_file():
            logger.warning(
                f"{checkpoint} has no {FLOW_STATE_NAME}: TRL's buffered generation batch and the EMA are not restored, "
                "so the resumed run may differ from an uninterrupted one"
            )
            if self.ema is not None:
                self.ema.reset()
            return
        state = json.loads(path.read_text())
        self._step = state["micro_step"]
        self._buffered_inputs = None
        if state["buffered_generation_batch"]:
            buffer_path = Path(checkpoint, ROLLOUT_BUFFER_NAME.format(process=self.accelerator.process_index))
            if state["num_processes"] != self.accelerator.num_processes or not buffer_path.is_file():
                logger.warning(
                    f"{checkpoint} was saved inside a generation batch by {state['num_processes']} processes; with "
                    f"{self.accelerator.num_processes} now, the batch is regenerated and the run is not exact"
                )
            else:
                self._buffered_inputs = self._read_buffer(buffer_path)
        if self.ema is not None:
            ema_path = Path(checkpoint, EMA_STATE_NAME)
            if ema_path.is_file():
                self.ema.load_state_dict(load_file(str(ema_path)), state.get("ema_num_updates") or 0)
            else:
                logger.warning(f"{checkpoint} has no EMA state: the EMA restarts from the loaded weights")
                self.ema.reset()

    @staticmethod
    def _pack_buffer(batches: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """TRL's buffered generation batch (its ``steps_per_generation`` slices) as safetensors tensors + metadata.

        Slices are concatenated back into one tensor per key, so that `_unpack_buffer` can rebuild them as views of
        one tensor at the same offsets as TRL's split: CPU kernels may round differently for differently aligned
        inputs, and an exact resume needs the very same bits."""
        tensors, kinds = {}, {}
        for name in batches[0]:
            values = [batch[name] for batch in batches]
            if all(value is None for value in values):
                kinds[name] = "none"
            elif all(isinstance(value, torch.Tensor) and value.ndim == 0 for value in values):
                kinds[name], tensors[name] = "scalar", values[0].detach().cpu().clone()
            elif all(isinstance(value, torch.Tensor) and value.ndim > 0 for value in values):
                kinds[name], tensors[name] = "split", torch.cat([value.detach().cpu() for value in values])
            else:
                logger.warning(
                    f"the buffered generation batch holds {name!r} of a type that is not saved: a run resumed from "
                    "this checkpoint regenerates the batch and is not exact"
                )
                return None
        metadata = {"num_batches": str(len(batches)), "kinds": json.dumps(kinds)}
        return tensors, metadata

    def _read_buffer(self, path: Path) -> list[dict]:
        """The buffered generation batch written by `_pack_buffer`, on this process's device."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        num_batches = int(metadata["num_batches"])
        batches: list[dict] = [{} for _ in range(num_batches)]
        for name, kind in json.loads(metadata["kinds"]).items():
            if kind == "none":
                parts = [None] * num_batches
            elif kind == "scalar":
                parts = [tensors[name].to(self.accelerator.device, copy=True)] * num_batches
            else:  # a fresh allocation: tensors read by safetensors may sit at any alignment
                whole = tensors[name].to(self.accelerator.device, copy=True)
                size = whole.shape[0] // num_batches
                parts = [whole[i * size : (i + 1) * size] for i in range(num_batches)]
            for batch, part in zip(batches, parts, strict=True):
                batch[name] = part
        return batches

    # ------------------------------------------------------------------------------------------------ model card
    def _recipe(self) -> dict:
        """The run's settings that differ from `FlowGRPOConfig`'s defaults (no paths, tokens or hub settings)."""
        defaults = {}
        for config_field in dataclasses.fields(FlowGRPOConfig):
            if config_field.default is not dataclasses.MISSING:
                defaults[config_field.name] = config_field.default
            elif config_field.default_factory is not dataclasses.MISSING:
                defaults[config_field.name] = config_field.default_factory()
        housekeeping = {
            "accelerator_config",
            "dataloader_pin_memory",
            "disable_tqdm",
            "do_eval",
            "do_predict",
            "do_train",
            "generation_batch_size",  # derived from the batch sizes
            "resume_from_checkpoint",
            "use_cpu",
        }
        recipe = {}
        for name, value in self.args.to_dict().items():
            if name.startswith("_") or name in housekeeping or any(word in name for word in ("token", "hub", "_dir")):
                continue
            default = defaults.get(name, None)
            default = getattr(default, "value", default)
            if value is not None and value != default and value != [] and value != {}:
                recipe[name] = value
        unwrapped = self.accelerator.unwrap_model(self.model)
        if hasattr(unwrapped, "peft_config"):
            lora = unwrapped.peft_config["default"]
            recipe["lora"] = {
                "r": lora.r,
                "lora_alpha": lora.lora_alpha,
                "target_modules": sorted(lora.target_modules) if lora.target_modules else None,
            }
        return json.loads(json.dumps(recipe, default=str))

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **kwargs):
        """Write ``README.md`` in ``output_dir``: the base model, rewards, recipe, final metrics and how to load the
        weights in diffusers (pushed with the model by ``push_to_hub``)."""
        from .reporting import model_card_markdown

        if not self.is_world_process_zero():
            return
        base_model = getattr(self.pipeline, "name_or_path", None) or None
        if base_model and os.path.isdir(base_model):
            base_model = None
        history = self.state.log_history
        train = next((entry for entry in reversed(history) if "reward" in entry), {})
        evaluation = next((entry for entry in reversed(history) if "eval_reward" in entry), {})

        def pick(entry: dict, prefixes: tuple[str, ...]) -> dict[str, float]:
            return {
                key: value
                for key, value in entry.items()
                if key.startswith(prefixes) and isinstance(value, (int, float)) and not isinstance(value, bool)
            }

        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        text = model_card_markdown(
            base_model=base_model,
            reward_weights=dict(zip(self.reward_func_names, self.reward_weights.tolist(), strict=True)),
            recipe=self._recipe(),
            final_metrics=pick(train, ("reward", "kl", "loss", "clip_ratio/region_mean")),
            eval_metrics=pick(evaluation, ("eval_reward",)),
            global_step=self.state.global_step,
            is_lora=hasattr(self.accelerator.unwrap_model(self.model), "peft_config"),
            has_ema=self.ema is not None,
            repo_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            tags=sorted(set(self._tag_names) | set(extra_tags)),
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        Path(self.args.output_dir, "README.md").write_text(text)
