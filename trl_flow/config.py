"""`FlowGRPOConfig`: TRL's `GRPOConfig` plus the fields a flow-matching rollout needs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from .errors import UserInputError

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
    rollout_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Images denoised together in one rollout forward pass on each device (memory knob). "
            "None = the whole local generation batch at once."
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
            (
                self.scale_rewards in ("group", "batch", "none"),
                "scale_rewards must be 'group', 'batch' or 'none'",
            ),
            (
                self.rollout_batch_size is None or self.rollout_batch_size >= 1,
                "rollout_batch_size must be >= 1",
            ),
            (self.eval_images_to_log >= 0, "eval_images_to_log must be >= 0"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.ema_update_every >= 1, "ema_update_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserInputError(message)
        if self.bf16 is None and not self.fp16:
            # TRL turns bf16 on whenever it is unset, which transformers refuses on a machine without a GPU.
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if not self.use_cpu and not _has_accelerator():
            # On a CPU-only machine, a Trainer without use_cpu does not join the gloo process group that
            # `accelerate launch` set up: each process would run alone and write the same output_dir.
            self.use_cpu = True
        super().__post_init__()

    @property
    def num_trained_steps(self) -> int:
        """How many denoising steps of each rollout are trained."""
        if self.sde_window_size:
            return self.sde_window_size
        return max(1, int(self.num_inference_steps * self.timestep_fraction))
