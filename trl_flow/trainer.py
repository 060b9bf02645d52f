"""`FlowGRPOTrainer`: TRL's `GRPOTrainer` with SDE denoising rollouts in place of token sampling.

What is TRL's and stays TRL's: the training loop, the prompt sampler that repeats each prompt `num_generations`
times, buffering a generation batch over `steps_per_generation` micro-steps and `num_iterations` passes, reward
calling (`_calculate_rewards`), metric logging, callbacks, accelerate/DeepSpeed, PEFT, checkpoints.

What differs, and is overridden here:

* `_generate_and_score_completions`: a rollout is an SDE trajectory of the diffusers pipeline; its log-probs (the
  behaviour policy's) are stored per trained denoising step; completions handed to rewards are PIL images;
* `_compute_loss`: Flow-GRPO's loss per trained denoising step (see `trl_flow.sde`);
* `_save`: also writes the LoRA in diffusers' format, so `pipe.load_lora_weights(output_dir)` works.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from accelerate.utils import gather, gather_object
from diffusers import DiffusionPipeline
from peft import PeftConfig, get_peft_model_state_dict
from trl import GRPOTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import nanstd

from .config import FlowGRPOConfig
from .errors import UserInputError
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

        for module in self.adapter.frozen_modules().values():
            module.to(self.accelerator.device)

    # ------------------------------------------------------------------------------------------------ rollouts
    def _conditioning(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning for each prompt, encoded once per distinct prompt (groups repeat each prompt)."""
        unique = list(dict.fromkeys(prompts))
        encoded = self.adapter.encode_prompts(
            unique, self.args.negative_prompt, self.args.guidance_scale, self.args.max_sequence_length
        )
        index = torch.tensor([unique.index(p) for p in prompts], device=next(iter(encoded.values())).device)
        return {name: tensor.index_select(0, index) for name, tensor in encoded.items()}

    def _rollout_seed(self, mode: str) -> int:
        """Seed of a rollout batch: fixed for evaluation (comparable across evaluations); for training, a function
        of the optimizer step and micro-step, so a resumed run draws the same rollouts as an uninterrupted one."""
        seed = self.args.seed + 7919 * self.accelerator.process_index
        if mode == "train":
            micro_step = self.state.global_step * self.args.gradient_accumulation_steps + (
                self._step % self.args.gradient_accumulation_steps
            )
            seed += 104729 * (micro_step + 1)
        return seed

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
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Denoise one batch; return the final latents and, per trained step, what the loss needs."""
        args = self.args
        sigmas = self.adapter.sigmas(num_steps, args.height, args.width)
        batch_size = next(iter(conditioning.values())).shape[0]
        latents = self.adapter.prepare_latents(batch_size, args.height, args.width, generator).float()
        record: dict[str, list[torch.Tensor]] = {"latents": [], "next_latents": [], "old_log_probs": []}
        for i in range(num_steps):
            sigma = sigmas[i].expand(batch_size)
            velocity = self.adapter.predict_velocity(denoiser, latents, sigma, conditioning, args.guidance_scale)
            # Fast mode (sde_window_size > 0): the SDE only inside the trained window, the ODE elsewhere.
            step_noise = noise_level if (i in trained_steps or not args.sde_window_size) else 0.0
            step = sde_step_with_logprob(
                velocity, sigmas[i], sigmas[i + 1], latents, noise_level=step_noise, generator=generator
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
    ) -> tuple[list, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Images, per-step trajectories and conditioning for ``prompts``, in chunks of ``rollout_batch_size``.

        ``on_chunk_decoded(start, images)`` is called as soon as a chunk's images exist (to score them while the
        next chunk denoises)."""
        conditioning = self._conditioning(prompts)
        chunk = self.args.rollout_batch_size or len(prompts)
        generator = torch.Generator().manual_seed(seed)
        images, trajectories = [], []
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
        ) as denoiser:
            for start in range(0, len(prompts), chunk):
                part = {name: tensor[start : start + chunk] for name, tensor in conditioning.items()}
                final_latents, trajectory = self._denoise(
                    denoiser, part, num_steps, noise_level, trained_steps, generator
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
        if args.async_rewards:
            # Score each chunk in a worker thread while the next chunk denoises (as the official code overlaps
            # rewards with sampling); one gather over processes at the end, as in the synchronous path.
            with ThreadPoolExecutor(max_workers=1) as executor:
                futures = []

                def score(start: int, chunk_images: list) -> None:
                    rows = inputs[start : start + len(chunk_images)]
                    futures.append(executor.submit(self._score_locally, rows, chunk_images))

                images, batch, conditioning = self._rollout(
                    prompts, num_steps, noise_level, trained_steps, seed, on_chunk_decoded=score
                )
                rewards_per_func = gather(torch.cat([future.result() for future in futures]))
        else:
            images, batch, conditioning = self._rollout(prompts, num_steps, noise_level, trained_steps, seed)
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

    def _compute_loss(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        old_log_probs = inputs.get("old_log_probs")
        if old_log_probs is None:  # evaluation batches carry no trained steps
            return torch.zeros((), device=self.accelerator.device)
        advantages = inputs["advantages"]
        num_steps = old_log_probs.shape[1]

        total_loss = 0.0
        kls, low_clipped, high_clipped, ratio_deviation = [], [], [], []
        for k in range(num_steps):
            step = self.rescore_step(model, inputs, k)
            clipped = clipped_policy_loss(
                step.log_prob, old_log_probs[:, k], advantages, self.epsilon_low, self.epsilon_high
            )
            step_loss = clipped.loss.mean()
            if self.beta != 0.0:
                with torch.no_grad(), self._reference_denoiser(model) as reference:
                    ref_mean = self.rescore_step(reference, inputs, k).mean
                kl = kl_between_steps(step.mean, ref_mean, step.std)
                step_loss = step_loss + self.beta * kl.mean()
                kls.append(kl.detach())
            total_loss = total_loss + step_loss
            low_clipped.append(clipped.is_low_clipped.float())
            high_clipped.append(clipped.is_high_clipped.float())
            ratio_deviation.append((clipped.ratio.detach() - 1).abs())

        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        if kls:
            metrics["kl"].append(gather(torch.stack(kls).mean()).nanmean().item())
        low, high = gather(torch.stack(low_clipped).mean()), gather(torch.stack(high_clipped).mean())
        metrics["clip_ratio/low_mean"].append(low.nanmean().item())
        metrics["clip_ratio/high_mean"].append(high.nanmean().item())
        metrics["clip_ratio/region_mean"].append((low + high).nanmean().item())
        metrics["ratio/max_abs_deviation"].append(gather(torch.stack(ratio_deviation).max()).max().item())
        # GRPOTrainer.loss_is_scaled_for_ga: the loss divides itself for gradient accumulation.
        return total_loss / num_steps / self.current_gradient_accumulation_steps

    # ---------------------------------------------------------------------------------------------------- save
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir or self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        if hasattr(unwrapped, "peft_config"):
            lora = get_peft_model_state_dict(unwrapped, state_dict=state_dict)
            prefix = "base_model.model.denoiser."
            lora = {name[len(prefix) :]: value for name, value in lora.items() if name.startswith(prefix)}
            config = unwrapped.peft_config["default"].to_dict()
            self.adapter.save_lora_weights(output_dir, lora, config)
        else:
            unwrapped.denoiser.save_pretrained(os.path.join(output_dir, "transformer"), safe_serialization=True)
