"""`FlowGRPOConfig`: TRL's `GRPOConfig` plus the fields a flow-matching rollout needs."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from .errors import UserInputError
from .global_batch import derive_batch_from_global_quantities, launched_world_size

# GRPOConfig fields that only make sense for token sampling. A non-default value would silently do nothing for a
# diffusion model, so it is refused. The value is the reason shown to the user.
LLM_ONLY_FIELDS: dict[str, str] = {
    "max_completion_length": "images have no completion length; set height/width",
    "temperature": "use noise_level for the SDE's exploration noise",
    "top_p": "there is no token sampling",
    "top_k": "there is no token sampling",
    "min_p": "there is no token sampling",
    "repetition_penalty": "there is no token sampling",
    "generation_kwargs": "set num_inference_steps, guidance_scale, noise_level, height and width instead",
    "chat_template_kwargs": "prompts are plain text",
    "cache_implementation": "there is no KV cache",
    "pad_to_multiple_of": "there are no token sequences",
    "use_vllm": "rollouts run the diffusers pipeline",
    "use_transformers_continuous_batching": "rollouts run the diffusers pipeline",
    "loss_type": "the loss is Flow-GRPO's per-denoising-step PPO-clip loss",
    "importance_sampling_level": "ratios are per denoising step",
    "mask_truncated_completions": "images are never truncated",
    "top_entropy_quantile": "there are no token entropies",
    "entropy_coef": "there are no token entropies",
    "use_adaptive_entropy": "there are no token entropies",
    "max_tool_calling_iterations": "there are no tool calls",
    "use_liger_kernel": "there is no LM head",
    "cast_lm_head_to_fp32": "there is no LM head; SDE log-probs are always computed in float32",
    "off_policy_mask_threshold": "not implemented for diffusion",
    "delta": "two-sided clipping is not implemented for diffusion",
    "sync_ref_model": "not implemented for diffusion",
    "multi_objective_aggregation": "only 'sum_then_normalize' is implemented",
}


logger = logging.getLogger(__name__)


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


@dataclass
class FlowGRPOConfig(GRPOConfig):
    r"""Configuration for [`FlowGRPOTrainer`]: every [`trl.GRPOConfig`] field, plus the diffusion ones.

    Fields shared with GRPO keep their meaning: `num_generations` is the group size (images per prompt), `beta` the
    KL weight, `epsilon`/`epsilon_high` the clip range (per denoising step, so tiny), `scale_rewards`
    (`"batch"` = Flow-GRPO's `global_std`), `num_iterations`, `reward_weights`, `learning_rate`, `report_to`, ...
    Defaults of the diffusion fields and of the overridden GRPO fields are the paper's SD3.5-Medium setup; token-only
    fields (`temperature`, `max_completion_length`, vLLM, ...) are refused when set.
    """

    algorithm: str = field(
        default="flow_grpo",
        metadata={
            "help": "flow_grpo (Flow-GRPO), grpo_guard (GRPO-Guard, clip ~2e-6), nft (DiffusionNFT) or awm "
            "(Advantage Weighted Matching): see trl_flow/algorithms and docs/algorithms.md."
        },
    )
    train_guidance_scale: float | None = field(
        default=None,
        metadata={
            "help": "CFG of training rollouts and training passes. None: guidance_scale for flow_grpo/grpo_guard, "
            "1.0 (CFG-free, as their papers) for nft/awm. guidance_scale stays the evaluation's."
        },
    )
    # DiffusionNFT / AWM (forward-process algorithms: ODE rollouts, loss on re-noised final samples)
    train_timesteps: int | None = field(
        default=None,
        metadata={
            "help": "nft/awm: training timesteps per sample. None: nft int(T * timestep_fraction) of the T grid "
            "steps; awm every grid index in [1, int(T * timestep_fraction))."
        },
    )
    policy_ema_decay_rate: float | None = field(
        default=None,
        metadata={"help": "nft old policy / awm KL-EMA: decay = min(max, rate * (step - delay)). None: 0.001."},
    )
    policy_ema_decay_max: float | None = field(
        default=None, metadata={"help": "The schedule's cap. None: nft 0.5 (decay_type 1), awm 0.3."}
    )
    policy_ema_decay_delay: int = field(
        default=0, metadata={"help": "Optimizer steps with decay 0 first (nft OCR: 75, rate 0.0075, max 0.999)."}
    )
    nft_beta: float = field(
        default=1.0,
        metadata={"help": "DiffusionNFT's implicit-policy mix beta (not the KL weight `beta`): 1.0; OCR 0.1."},
    )
    awm_weighting: str = field(
        default="ghuber",
        metadata={"help": "AWM's surrogate -log p = w(l, t): ghuber (default), huber, uniform, t or t2."},
    )
    awm_ghuber_power: float = field(default=0.25, metadata={"help": "AWM's generalised-Huber power p (0.25)."})
    awm_ema_kl_beta: float = field(
        default=1.0, metadata={"help": "AWM: weight of mean((v - v_ema)^2) to the KL-EMA of the weights (1.0)."}
    )
    awm_advantage_max: float = field(
        default=1.0, metadata={"help": "AWM: advantages scaled to clip(A, +-advantage_clip) / advantage_clip * this."}
    )
    sde_type: str = field(
        default="flow_sde",
        metadata={
            "help": "Rollout SDE step, also used to rescore it (trl_flow/sde.py): flow_sde (Flow-GRPO, noise_level "
            "0.7), dance_sde (DanceGRPO, constant coefficient; 0.3) or cps (coefficients-preserving; (0, 1], 0.8; "
            "log-prob -mean((x_next - mean)^2), not a density: log-ratios 2 std^2 x Gaussian; epsilon 1e-5)."
        },
    )
    # Rollouts
    num_inference_steps: int = field(
        default=10,
        metadata={"help": "Denoising steps of a training rollout (the paper's denoising reduction: 10)."},
    )
    eval_num_inference_steps: int = field(
        default=40, metadata={"help": "Denoising steps of evaluation sampling (ODE, no noise)."}
    )
    noise_level: float = field(
        default=0.7,
        metadata={"help": "a in s_t = a * sqrt(t / (1 - t)): the SDE's exploration noise. 0 = deterministic ODE."},
    )
    guidance_scale: float = field(
        default=4.5,
        metadata={"help": "Classifier-free guidance scale, used identically in rollouts and training passes."},
    )
    height: int = field(default=512, metadata={"help": "Image height in pixels."})
    width: int = field(default=512, metadata={"help": "Image width in pixels."})
    max_sequence_length: int = field(
        default=256, metadata={"help": "Maximum prompt length in tokens for the T5-style text encoder."}
    )
    negative_prompt: str = field(default="", metadata={"help": "Negative prompt for classifier-free guidance."})
    timestep_fraction: float = field(
        default=0.99,
        metadata={
            "help": "Fraction of a rollout's denoising steps that are trained; the first "
            "max(1, int(num_inference_steps * timestep_fraction)) steps are (0.99 of 10 -> 9, as the paper)."
        },
    )
    sde_window_size: int = field(
        default=0,
        metadata={
            "help": "Fast mode (as Flow-GRPO-Fast / MixGRPO): 0 = SDE on every step and train the first "
            "num_trained_steps (the paper); k > 0 = SDE and training only on a window of k consecutive steps, "
            "ODE elsewhere; the window start slides over sde_window_range."
        },
    )
    sde_window_range: list[int] | None = field(
        default=None,
        metadata={
            "help": "[low, high): where a fast-mode window may start. Default [0, num_inference_steps // 2] "
            "(the high-noise half of the schedule, where the official fast recipes put it)."
        },
    )
    sde_window_schedule: str = field(
        default="random",
        metadata={
            "help": "How the fast-mode window moves: random (Flow-GRPO-Fast: a new start per rollout batch) or "
            "progressive (MixGRPO: starts at the range's low end, moves by sde_window_stride every "
            "sde_window_move_every optimizer updates, wraps back)."
        },
    )
    sde_window_move_every: int = field(
        default=25, metadata={"help": "progressive: optimizer updates per window position (MixGRPO: 25)."}
    )
    sde_window_stride: int = field(default=1, metadata={"help": "progressive: steps the window moves by (MixGRPO: 1)."})
    antithetic_sampling: bool = field(
        default=False,
        metadata={
            "help": "Draw each group's training images in mirrored pairs: the same initial noise and opposite SDE "
            "noise (eps, -eps). Each image is still an exact sample of the policy, but reward variation that does "
            "not flip with the noise (the initial noise's, even terms) cancels in the pair, so the policy gradient "
            "is less noisy at small batches. Needs an even num_generations and an even number of images per "
            "process and rollout chunk."
        },
    )
    rollout_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images denoised together in one rollout forward pass on each device (memory knob). "
            "None = the whole local generation batch at once."
        },
    )
    train_micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Memory saver: run the training forward/backward passes one trained denoising step and at most "
            "this many samples at a time (gradients accumulate), so only one micro-batch's activations are alive. "
            "None = one backward pass over all trained steps of per_device_train_batch_size samples."
        },
    )
    offload_text_encoders: bool = field(
        default=False,
        metadata={
            "help": "Memory saver: keep the text encoders on the CPU and move them to the accelerator only to encode "
            "prompts (once per rollout batch)."
        },
    )
    offload_vae: bool = field(
        default=False,
        metadata={
            "help": "Memory saver: keep the VAE on the CPU and move it to the accelerator only to decode rollouts."
        },
    )
    tune_malloc: bool = field(
        default=True,
        metadata={
            "help": "Memory: fix glibc malloc's mmap (1 MiB) and trim (4 MiB) thresholds when the trainer starts, so "
            "that freed activations leave the process instead of staying resident in the heap (CPU peak memory "
            "stops climbing over the first epochs), and before a rollout batch collect garbage cycles and return "
            "the heap's free pages (malloc_trim), so it does not creep up over a long run; a release is skipped "
            "while its cost would exceed 5 percent of the time since the last one. Process-wide; no effect where the "
            "C library is not glibc."
        },
    )
    offload_rollouts: bool = field(
        default=False,
        metadata={
            "help": "Memory saver for video: keep the rollout record of the trained steps (latents, log-probs, "
            "conditioning) on the CPU between the rollout and the training passes; each micro-batch is moved to the "
            "accelerator when it is trained."
        },
    )
    vae_tiling: bool = field(
        default=False, metadata={"help": "Memory saver: decode with the VAE's spatial tiling (vae.enable_tiling())."}
    )
    vae_slicing: bool = field(
        default=False,
        metadata={"help": "Memory saver: decode one sample at a time (vae.enable_slicing())."},
    )
    # Video families (Wan): read by the adapter (FlowModelAdapter.configure); image families ignore them
    num_frames: int | None = field(
        default=None,
        metadata={
            "help": "Video: frames per sample, 4k + 1 for Wan (81, 33, 9, ...); None = the pipeline's default (81)."
        },
    )
    fps: float | None = field(
        default=None,
        metadata={"help": "Video: frames per second (rewards and exported videos); None = the family's (Wan: 16)."},
    )
    guidance_scale_2: float | None = field(
        default=None,
        metadata={
            "help": "Wan2.2 A14B: CFG scale of the low-noise expert (transformer_2); None = guidance_scale, as "
            "WanPipeline."
        },
    )
    trained_experts: list[str] | None = field(
        default=None,
        metadata={
            "help": "Wan2.2 A14B: which experts are trained (LoRA or full), of transformer (high noise) and "
            "transformer_2 (low noise); None = both. An untrained expert stays frozen."
        },
    )
    async_rewards: bool = field(
        default=False,
        metadata={
            "help": "Score each rollout chunk (rollout_batch_size) in a worker thread while the next chunk denoises. "
            "Pays off when rewards wait on a server or another device; see benchmarks/async_rewards.py."
        },
    )
    advantage_clip: float | None = field(
        default=5.0, metadata={"help": "Clip advantages to [-advantage_clip, advantage_clip] (Flow-GRPO: 5)."}
    )

    # Lifecycle: evaluation samples, EMA
    eval_images_to_log: int = field(
        default=16,
        metadata={
            "help": "At each evaluation, how many evaluation samples (image, prompt, rewards) are saved as a grid in "
            "output_dir/samples/ and logged to the image-capable trackers of report_to. 0 = none."
        },
    )
    ema: bool = field(
        default=False,
        metadata={
            "help": "Keep an exponential moving average of the trained weights (as the official Flow-GRPO code): "
            "evaluation uses it, and checkpoints and the final output hold it in ema/ beside the raw weights."
        },
    )
    ema_decay: float = field(default=0.9, metadata={"help": "EMA decay (Flow-GRPO: 0.9)."})
    ema_update_every: int = field(
        default=8, metadata={"help": "Update the EMA every N optimizer steps (Flow-GRPO: 8)."}
    )

    # Reward-hacking guard (trl_flow.guard.RewardHackingGuard): held-out rewards, never used for advantages
    guard_reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Guard rewards (same forms as reward_funcs), scored on the evaluation images with image statistics "
            "(saturation, edge density, within-group diversity) and logged under guard/...; never trained on. "
            "Setting it turns the guard on (it needs eval_strategy and an evaluation set)."
        },
    )
    guard_tolerance: float = field(
        default=0.1,
        metadata={
            "help": "Relative fall of a guard reward or of the diversity from its first evaluation that counts as a "
            "breach: (baseline - value) / |baseline| > guard_tolerance."
        },
    )
    guard_patience: int = field(
        default=2,
        metadata={
            "help": "The guard fires after this many consecutive evaluations where the training reward rose while a "
            "guarded quantity was breached."
        },
    )
    guard_action: str = field(
        default="warn",
        metadata={
            "help": "When the guard fires: 'warn', or 'stop' training. Either way "
            "output_dir/guard_best_checkpoint.json names the best checkpoint by guard score."
        },
    )
    guard_on_rollouts: int = field(
        default=0,
        metadata={
            "help": "Also score up to this many images of each training rollout batch (per process) with the guard, "
            "logged as guard/rollouts/... (0 = off)."
        },
    )

    # Global batch quantities: a recipe that means the same on any number of processes
    prompts_per_step: int | None = field(
        default=None,
        metadata={
            "help": "Unique prompts per rollout (generation) batch over all processes. With num_generations, it fixes "
            "the global rollout batch; steps_per_generation and gradient_accumulation_steps are then derived from "
            "the number of processes and per_device_train_batch_size (leave them unset)."
        },
    )
    updates_per_generation: int | None = field(
        default=None,
        metadata={
            "help": "With prompts_per_step: optimizer updates per rollout batch (per pass, see num_iterations); "
            "default 1. gradient_accumulation_steps = steps_per_generation / updates_per_generation."
        },
    )

    # GRPO / Trainer fields whose defaults change for flow models
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate (Flow-GRPO LoRA recipes: 3e-4)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (Flow-GRPO: 1e-4)."})
    beta: float = field(
        default=0.04, metadata={"help": "KL weight to the reference model (Flow-GRPO GenEval/OCR: 0.04)."}
    )
    epsilon: float = field(
        default=1e-4,
        metadata={"help": "PPO clip range per denoising step. Log-probs are per-element means, hence 1e-4."},
    )
    scale_rewards: str = field(
        default="batch",
        metadata={"help": "Advantage normalisation: 'group' std, 'batch' std (Flow-GRPO's global_std), or 'none'."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Dropout makes rollout and training log-probs disagree, so it is off by default."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute transformer activations in the backward pass to save memory."},
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps."})

    def __post_init__(self):
        grpo_defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
        for name, reason in LLM_ONLY_FIELDS.items():
            value = getattr(self, name)
            if value != grpo_defaults[name]:
                raise UserInputError(
                    f"`{name}` = {value!r} has no meaning for a diffusion model ({reason}); remove it from the "
                    "recipe or command line."
                )
        checks = [
            (self.num_inference_steps >= 1, "num_inference_steps must be >= 1"),
            (self.eval_num_inference_steps >= 1, "eval_num_inference_steps must be >= 1"),
            (self.noise_level > 0, "noise_level must be > 0: training needs a stochastic (SDE) rollout"),
            (0 < self.timestep_fraction <= 1, "timestep_fraction must be in (0, 1]"),
            (self.height > 0 and self.width > 0, "height and width must be positive"),
            (self.guidance_scale >= 0, "guidance_scale must be >= 0"),
            (self.scale_rewards in ("group", "batch", "none"), "scale_rewards must be 'group', 'batch' or 'none'"),
            (self.rollout_batch_size is None or self.rollout_batch_size >= 1, "rollout_batch_size must be >= 1"),
            (
                self.train_micro_batch_size is None or self.train_micro_batch_size >= 1,
                "train_micro_batch_size must be >= 1 (or unset)",
            ),
            (self.eval_images_to_log >= 0, "eval_images_to_log must be >= 0"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.ema_update_every >= 1, "ema_update_every must be >= 1"),
            (self.num_frames is None or self.num_frames >= 1, "num_frames must be >= 1 (or unset)"),
            (self.fps is None or self.fps > 0, "fps must be > 0 (or unset)"),
            (
                self.sde_window_schedule in ("random", "progressive"),
                f"sde_window_schedule {self.sde_window_schedule!r}: use 'random' or 'progressive'",
            ),
            (self.sde_window_move_every >= 1, "sde_window_move_every must be >= 1"),
            (self.sde_window_stride >= 1, "sde_window_stride must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserInputError(message)
        self._check_guard()
        from .algorithms import check_algorithm_args  # not at import: `trl-flow --help` must not load diffusers

        check_algorithm_args(self)
        self._warn_unused_save_keys()
        if self.prompts_per_step is not None or self.updates_per_generation is not None:
            derive_batch_from_global_quantities(self, launched_world_size())
        if self.bf16 is None and not self.fp16:
            # TRL turns bf16 on whenever it is unset, which transformers refuses on a machine without a GPU.
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if not self.use_cpu and not _has_accelerator():
            # On a CPU-only machine, a Trainer without use_cpu does not join the gloo process group that
            # `accelerate launch` set up: each process would run alone and write the same output_dir.
            self.use_cpu = True
        try:
            super().__post_init__()
        except ValueError:
            self._check_derived_world_size()  # TRL's batch checks fail first when the process count was misread
            raise
        self._check_derived_world_size()
        if self.antithetic_sampling:
            self._check_antithetic_pairs()

    def _warn_unused_save_keys(self) -> None:
        """``save_steps`` / ``save_total_limit`` do nothing while ``save_strategy`` is "no": say so once."""
        defaults = {f.name: f.default for f in dataclasses.fields(type(self))}
        if str(getattr(self.save_strategy, "value", self.save_strategy)) != "no":
            return
        ignored = [
            f"{name} = {getattr(self, name)!r}"
            for name in ("save_steps", "save_total_limit")
            if getattr(self, name) != defaults[name]
        ]
        if ignored:
            verb = "is" if len(ignored) == 1 else "are"
            logger.warning(
                f"{' and '.join(ignored)} {verb} ignored because save_strategy is 'no': no checkpoint will be "
                "written; set save_strategy: steps to save checkpoints"
            )

    def _check_antithetic_pairs(self) -> None:
        """Mirrored pairs must not straddle a group, a process or a rollout chunk."""
        local = self.per_device_train_batch_size * self.steps_per_generation
        for name, value in (
            ("num_generations", self.num_generations),
            ("per_device_train_batch_size x steps_per_generation", local),
            ("rollout_batch_size", self.rollout_batch_size or 2),
        ):
            if value % 2:
                raise UserInputError(
                    f"antithetic_sampling draws images in mirrored pairs, but {name} = {value} is odd: make it even "
                    "or turn antithetic_sampling off"
                )

    def _check_derived_world_size(self) -> None:
        """prompts_per_step's derivation must have used the number of processes this run really has."""
        derived_for = getattr(self, "_derived_for_world_size", None)
        if derived_for is not None and derived_for != self.world_size:
            raise UserInputError(
                f"prompts_per_step: the batch was derived for {derived_for} process(es) (from the launcher's "
                f"environment) but this run has {self.world_size}; launch with torchrun / accelerate launch, or set "
                "steps_per_generation and gradient_accumulation_steps instead of prompts_per_step"
            )

    def _check_guard(self) -> None:
        """The guard_* keys: valid values, and an evaluation for the guard to score."""
        if self.guard_action not in ("warn", "stop"):
            raise UserInputError(f"guard_action = {self.guard_action!r}: use 'warn' or 'stop'")
        if not self.guard_tolerance > 0:
            raise UserInputError(f"guard_tolerance = {self.guard_tolerance!r}: use a relative fall > 0, e.g. 0.1")
        if self.guard_patience < 1:
            raise UserInputError(f"guard_patience = {self.guard_patience!r}: use a number of evaluations >= 1")
        if self.guard_on_rollouts < 0:
            raise UserInputError(f"guard_on_rollouts = {self.guard_on_rollouts!r}: use 0 (off) or a number >= 1")
        strategy = str(getattr(self.eval_strategy, "value", self.eval_strategy))
        if self.guard_reward_funcs and strategy == "no":
            raise UserInputError(
                "guard_reward_funcs are scored on evaluation images, but eval_strategy is 'no': set eval_strategy "
                "'steps' with eval_steps N (and eval_on_start true for a baseline before training), and give an "
                "evaluation set (dataset_test_split)"
            )

    @property
    def num_trained_steps(self) -> int:
        """How many denoising steps of each rollout are trained."""
        if self.sde_window_size:
            return self.sde_window_size
        return max(1, int(self.num_inference_steps * self.timestep_fraction))
