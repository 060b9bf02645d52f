"""`FlowGRPOTrainer`: TRL's `GRPOTrainer` with SDE denoising rollouts of a diffusers pipeline in place of token
sampling.

What is TRL's and stays TRL's: the training loop, the prompt sampler that repeats each prompt `num_generations`
times, buffering a generation batch over `steps_per_generation` micro-steps and `num_iterations` passes, reward
calling (`_calculate_rewards`), metric logging, callbacks, accelerate/DeepSpeed, PEFT, checkpoints.

This file holds only the overrides, each saying which TRL (or transformers) method it replaces and why. The work
they delegate lives beside it: rollouts in `trl_flow.rollout`, the algorithm's loss in `trl_flow.algorithms`, the
model family's pipeline calls in `trl_flow.models`, checkpoint/resume state in `trl_flow.lifecycle`, the model card
in `trl_flow.model_card`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from accelerate.utils import gather, gather_object
from diffusers import DiffusionPipeline
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from peft import PeftConfig, get_peft_model_state_dict
from safetensors.torch import save_file
from trl import GRPOTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler

from .algorithms import CONDITIONING_PREFIX, Algorithm, build_algorithm
from .algorithms.advantages import group_relative_advantages, reward_metrics, weighted_rewards
from .allocator import release_free_heap_when_due, tune_malloc
from .callbacks import (
    AfterStepCallback,
    EMACallback,
    EvalSample,
    EvalSamplesCallback,
    ParameterEMA,
    RewardCurveCallback,
)
from .config import FlowGRPOConfig
from .data import SOURCE_IMAGES_COLUMN, require_source_images
from .errors import UserInputError
from .guard import RewardHackingGuard
from .lifecycle import (
    EMA_DIR,
    EpochSeededRepeatSampler,
    check_hub_access,
    load_flow_state,
    save_checkpoint_atomically,
    save_flow_state,
)
from .model_card import write_model_card
from .models import FlowModelAdapter, adapter_for_pipeline
from .models.loading import load_pipeline
from .offload import FrozenModules
from .policy import DiffusionPolicy
from .rewards import resolve_reward_funcs, validated_reward_func
from .rollout import RolloutSampler
from .sde import SDEStepOutput
from .trackers import check_trackers_installed


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
        args = args or FlowGRPOConfig(output_dir="flow-grpo")
        if not isinstance(args, FlowGRPOConfig):
            raise TypeError("FlowGRPOTrainer needs a FlowGRPOConfig, not a plain GRPOConfig")
        check_hub_access(args)
        check_trackers_installed(args.report_to)
        if args.tune_malloc:
            tune_malloc()  # before the weights and the first rollout are allocated
        if isinstance(model, (str, os.PathLike)):
            model = load_pipeline(os.fspath(model), **dict(args.model_init_kwargs or {}))
        self.pipeline = model
        self.adapter: FlowModelAdapter = adapter_for_pipeline(model, model_family, args)

        for module in self.adapter.frozen_modules().values():
            module.requires_grad_(False)
            module.eval()
        policy = DiffusionPolicy(self.adapter.denoiser, getattr(model, "name_or_path", "") or "")
        # Full fine-tuning trains every denoiser weight; with PEFT, get_peft_model freezes the base itself.
        policy.requires_grad_(peft_config is None)

        reward_funcs = [validated_reward_func(f, self.adapter) for f in resolve_reward_funcs(reward_funcs)]
        if self.adapter.takes_condition_images:  # editing: every row needs its source image
            train_dataset = require_source_images(train_dataset, "train_dataset")
            eval_dataset = require_source_images(eval_dataset, "eval_dataset")

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
        if self.args.train_micro_batch_size is not None and self.is_deepspeed_enabled:
            raise UserInputError(
                "train_micro_batch_size does not work with DeepSpeed (its engine steps the optimizer on every "
                "backward pass it is given): unset it and save memory with gradient_checkpointing or ZeRO instead"
            )

        self.frozen = FrozenModules(
            self.adapter.frozen_modules(), self.accelerator.device, args.offload_text_encoders, args.offload_vae
        )
        self.frozen.place()
        self.algorithm: Algorithm = build_algorithm(self.args, self.adapter)
        self.rollouts = RolloutSampler(
            self.adapter,
            self.args,
            self.frozen,
            self.accelerator.process_index,
            clock=lambda: (self.state.global_step, self._step),
        )
        self._setup_lifecycle()

    # ------------------------------------------------------------------------------------------------ rollouts
    def _denoiser_for_generation(self):
        """TRL's `unwrap_model_for_generation`: the policy's denoiser, gathered under ZeRO-3."""
        return unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
        )

    def generate_images(
        self,
        prompts: list[str],
        num_inference_steps: int | None = None,
        noise_level: float = 0.0,
        seed: int = 0,
        condition_images: list | None = None,
        guidance_scale: float | None = None,
        denoiser=None,
    ) -> list:
        """Sample images of the current policy (or of ``denoiser``) for ``prompts`` (ODE by default,
        ``eval_num_inference_steps``, CFG ``guidance_scale`` or the config's), with one source image per prompt for
        an image-editing family.

        Deterministic for a ``seed``: the same seed gives the same initial noise, so images before and after
        training can be compared one to one.
        """
        num_steps = num_inference_steps or self.args.eval_num_inference_steps
        rollout = functools.partial(
            self.rollouts.rollout, condition_images=condition_images, guidance_scale=guidance_scale
        )
        source = self._denoiser_for_generation if denoiser is None else lambda: contextlib.nullcontext(denoiser)
        images, _, _ = rollout(source, prompts, num_steps, noise_level, range(0), seed)
        return images

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict[str, torch.Tensor]:
        """Replaces TRL's token generation and scoring: an SDE rollout of the pipeline per prompt, images as the
        completions the rewards score, group advantages; returns the batch-first record the algorithm trains on."""
        mode = "train" if self.model.training else "eval"
        prompts = [example["prompt"] for example in inputs]
        args = self.args
        if args.tune_malloc:  # freed activations leave before the rollout allocates (when cheap enough: allocator)
            release_free_heap_when_due()
        if mode == "train":
            num_steps, noise_level = args.num_inference_steps, args.noise_level
            trained_steps = self.rollouts.trained_steps()
            if self.algorithm.deterministic_rollout:  # NFT/AWM: an ODE rollout, only its final latents kept
                noise_level, trained_steps = 0.0, range(0)
        else:
            num_steps, noise_level, trained_steps = args.eval_num_inference_steps, 0.0, range(0)
        rollout = functools.partial(
            self.rollouts.rollout,
            self._denoiser_for_generation,
            prompts,
            num_steps,
            noise_level,
            trained_steps,
            self.rollouts.seed(mode),
            sample_offset=self.rollouts.sample_offset(len(prompts)),
            antithetic=mode == "train" and args.antithetic_sampling,
            record=self.algorithm.rollout_record if mode == "train" else "trajectory",
            guidance_scale=self.algorithm.guidance_scale if mode == "train" else None,
            # Editing: each row's source image (a group repeats its row, so it shares one and is encoded once).
            condition_images=(
                [row[SOURCE_IMAGES_COLUMN] for row in inputs] if self.adapter.takes_condition_images else None
            ),
        )
        # Training rollouts sample the algorithm's sampling policy (DiffusionNFT: its old policy).
        sampling = self.algorithm.sampling_weights() if mode == "train" else contextlib.nullcontext()
        if args.async_rewards:
            # Score each chunk in a worker thread while the next chunk denoises (as the official code overlaps
            # rewards with sampling); one gather over processes at the end, as in the synchronous path.
            with ThreadPoolExecutor(max_workers=1) as executor:
                futures = []

                def score(start: int, chunk_images: list) -> None:
                    rows = inputs[start : start + len(chunk_images)]
                    futures.append(executor.submit(self._score_locally, rows, chunk_images))

                with sampling:
                    images, batch, conditioning = rollout(on_chunk_decoded=score)
                rewards_per_func = gather(torch.cat([future.result() for future in futures]))
        else:
            with sampling:
                images, batch, conditioning = rollout()
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

        batch.update({CONDITIONING_PREFIX + name: tensor for name, tensor in conditioning.items()})
        batch["advantages"] = advantages[process_slice].to(self.accelerator.device)
        if args.offload_rollouts and mode == "train":
            # TRL buffers this batch for steps_per_generation micro-steps; _compute_loss brings back each slice.
            batch = {name: tensor.cpu() for name, tensor in batch.items()}
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
        rewards = weighted_rewards(rewards_per_func, self.reward_weights)
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = group_relative_advantages(
            rewards, num_generations, self.scale_rewards, clip=self.args.advantage_clip
        )
        metrics = reward_metrics(rewards_per_func, rewards, self.reward_func_names, num_generations)
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
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
        """The ``k``-th trained denoising step of a rollout batch recomputed by ``denoiser`` (the training pass;
        `trl-flow doctor` checks the on-policy ratio with it)."""
        return self.algorithm.rescore_step(denoiser, inputs, k)

    def _compute_loss(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Replaces TRL's token-level GRPO loss with the algorithm's loss on the rollout record."""
        if self.algorithm.num_terms(inputs) == 0:  # evaluation batches carry no trained steps
            return torch.zeros((), device=self.accelerator.device)
        mode = "train" if self.model.training else "eval"
        if self.args.offload_rollouts:  # the rollout record waited on the CPU (see _generate_and_score_completions)
            inputs = {name: tensor.to(self.accelerator.device) for name, tensor in inputs.items()}
        # One backward per term (trained step) unless DeepSpeed, whose engine steps the optimizer at each backward.
        loss, metrics = self.algorithm.loss(
            model,
            inputs,
            self._reference_denoiser,
            self.accelerator,
            self.current_gradient_accumulation_steps,
            backward_per_term=not self.is_deepspeed_enabled,
        )
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
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
        # The algorithm's own copies of the weights (DiffusionNFT's old policy, AWM's KL-EMA), moved after updates.
        self.algorithm.bind(
            [(n, p) for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad]
        )
        self.add_callback(AfterStepCallback(self.algorithm.after_optimizer_step))
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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """transformers' save (PEFT adapter, args), then the weights in diffusers' format, and the EMA's in ``ema/``:
        TRL's PEFT files are not loadable by `pipe.load_lora_weights`."""
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
        elif state_dict:  # an empty one (DeepSpeed without gathered weights) saves as before
            # A state dict gathered for saving (FSDP's full state dict: the module's own weights are shards).
            prefix = "denoiser."
            weights = {name[len(prefix) :]: v.contiguous() for name, v in state_dict.items() if name.startswith(prefix)}
            folder = os.path.join(output_dir, "transformer")
            unwrapped.denoiser.save_config(folder)
            save_file(weights, os.path.join(folder, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        else:
            unwrapped.denoiser.save_pretrained(os.path.join(output_dir, "transformer"), safe_serialization=True)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint, made atomic and complete for an exact resume (`save_checkpoint_atomically`)."""
        save_checkpoint_atomically(self, trial)

    def _save_flow_state(self, checkpoint_dir: str) -> None:
        """TRL's micro-step counter, its buffered generation batch, the EMA and the algorithm's state
        (`trl_flow.lifecycle`)."""
        save_flow_state(
            checkpoint_dir,
            micro_step=self._step,
            buffered_inputs=self._buffered_inputs,
            generate_every=self.args.steps_per_generation * self.num_iterations,
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            should_save=self.args.should_save,
            ema=self.ema,
            algorithm=self.algorithm,
        )

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        """transformers' restore on resume (every backend calls it, after the weights), then our state."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        restored = load_flow_state(
            checkpoint,
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            device=self.accelerator.device,
            ema=self.ema,
            algorithm=self.algorithm,
        )
        if restored is not None:
            self._step, self._buffered_inputs = restored

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **kwargs):
        """Replaces TRL's LLM model card: ``README.md`` in ``output_dir`` with the base model, rewards, recipe, final
        metrics and how to load the weights in diffusers (pushed with the model by ``push_to_hub``)."""
        if not self.is_world_process_zero():
            return
        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        write_model_card(
            self.args.output_dir,
            base_model=getattr(self.pipeline, "name_or_path", None) or None,
            args=self.args,
            model=self.accelerator.unwrap_model(self.model),
            reward_weights=dict(zip(self.reward_func_names, self.reward_weights.tolist(), strict=True)),
            log_history=self.state.log_history,
            global_step=self.state.global_step,
            has_ema=self.ema is not None,
            repo_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            tags=sorted(set(self._tag_names) | set(extra_tags)),
        )
