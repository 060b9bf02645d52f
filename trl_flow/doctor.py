"""`trl-flow doctor`: a pre-flight of a recipe, before a long run.

It builds the trainer exactly as `trl-flow grpo` would (same recipe, same overrides), makes one rollout batch in
the configured shapes and dtype, and measures the things users of other Flow-GRPO implementations found only after
days of training: a sampler that does not match the pipeline, an on-policy ratio that is not 1, log-prob drift of
half precision, reward functions that return garbage, and batch quantities that differ from the paper's.
"""

from __future__ import annotations

import copy
import math
import resource
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from .data import SOURCE_IMAGES_COLUMN
from .recipe import effective_quantities

PASS, WARN, FAIL, INFO = "PASS", "WARN", "FAIL", "INFO"

# The paper's SD3.5-Medium setup (official configs, 32 GPUs), shown beside the recipe's effective quantities.
PAPER_QUANTITIES = {
    "processes": 32,
    "unique prompts per rollout batch": 48,
    "images per prompt": 24,
    "images per optimizer update": 576,
    "optimizer updates per rollout batch": 2,
}


@dataclass
class Check:
    """One row of the doctor's table."""

    name: str
    figure: str
    status: str
    fix: str = ""


def _rollout_inputs(trainer) -> list[dict]:
    """One local generation batch of dataset rows, each prompt repeated `num_generations` times, as TRL's sampler."""
    args = trainer.args
    local = args.per_device_train_batch_size * args.steps_per_generation
    group = min(args.num_generations, local)
    rows = [trainer.train_dataset[i % len(trainer.train_dataset)] for i in range(math.ceil(local / group))]
    return [dict(row) for row in rows for _ in range(group)][:local]


def check_sampler_matches_pipeline(trainer, prompts: list[str], condition_images: list | None = None) -> Check:
    """SDE sampling at noise level 0 must be the pipeline's own deterministic sampling (same seed and steps); an
    editing family gets one source image per prompt."""
    args = trainer.args
    steps = args.num_inference_steps
    ours = trainer.generate_images(
        prompts, num_inference_steps=steps, noise_level=0.0, seed=0, condition_images=condition_images
    )
    edit = {} if condition_images is None else {"condition_images": condition_images}
    theirs = trainer.adapter.reference_images(
        prompts,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        max_sequence_length=args.max_sequence_length,
        seed=0,
        **edit,
    )
    difference = max(
        np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
        for a, b in zip(ours, theirs, strict=True)
    )
    status = PASS if difference <= 1 else FAIL
    return Check(
        "SDE at noise_level 0 == pipeline sampling",
        f"max |pixel difference| {difference} / 255",
        status,
        "" if status == PASS else "the rollout does not reproduce the pipeline: check the model adapter",
    )


def check_on_policy_ratio(trainer, batch: dict[str, torch.Tensor]) -> tuple[Check, Check]:
    """Ratio of a first (on-policy) training pass to the rollout, in the configured dtype, per trained step; and
    the log-prob drift of that dtype against float32."""
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    args = trainer.args
    micro_batch = split_tensor_dict(shuffle_sequence_dict(batch), args.steps_per_generation)[0]
    model = trainer.model_wrapped
    old = micro_batch["old_log_probs"]
    deviations, configured = [], []
    with torch.no_grad(), trainer.compute_loss_context_manager():
        for k in range(old.shape[1]):
            log_prob = trainer.rescore_step(model, micro_batch, k).log_prob
            configured.append(log_prob)
            deviations.append((torch.exp(log_prob - old[:, k]) - 1).abs().max().item())
    worst = max(deviations)
    epsilon = min(trainer.epsilon_low, trainer.epsilon_high)
    status = PASS if worst <= 0.1 * epsilon else (WARN if worst <= epsilon else FAIL)
    fix = ""
    if status != PASS:
        fix = f"on-policy ratios must be ~1, far inside the clip range {epsilon:g}."
        if not args.disable_dropout:
            fix += " Dropout makes rollout and training passes differ: set disable_dropout true (or lora_dropout 0)."
        if args.bf16 or args.fp16:
            fix += (
                " Half precision changes log-probs: see the drift row; try fp32 or a larger rollout/train batch match."
            )
    ratio = Check(
        "on-policy ratio, first iteration",
        f"max |r - 1| {worst:.2e} over {len(deviations)} steps (clip {epsilon:g})",
        status,
        fix.strip(),
    )

    half = args.bf16 or args.fp16
    if not half and trainer.adapter.dtype == torch.float32:
        return ratio, Check("log-prob drift vs float32", "n/a: runs in float32", PASS)
    reference = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).float()
    drifts = []
    with torch.no_grad(), torch.autocast(device_type=trainer.accelerator.device.type, enabled=False):
        for k, log_prob in enumerate(configured):
            fp32 = trainer.rescore_step(reference, micro_batch, k).log_prob
            drifts.append((log_prob - fp32).abs().max().item())
    del reference
    worst_drift = max(drifts)
    status = PASS if worst_drift <= 0.1 * epsilon else (WARN if worst_drift <= epsilon else FAIL)
    per_step = ", ".join(f"{d:.1e}" for d in drifts)
    return ratio, Check(
        "log-prob drift vs float32",
        f"max {worst_drift:.2e}; per step: {per_step}",
        status,
        "" if status == PASS else "half-precision log-probs move by more than the clip range: compute in fp32",
    )


def check_forward_process_on_policy(trainer, batch: dict[str, torch.Tensor]) -> list[Check]:
    """What "on-policy" means for the algorithms that train on re-noised final latents (DiffusionNFT, AWM): with the
    old policy equal to the current one, a constant reward (every advantage 0) gives zero gradient; for AWM also the
    likelihood ratio of a first pass is 1. Measured on the policy term alone, each old policy by its own forward."""
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    args, algorithm = trainer.args, trainer.algorithm
    micro_batch = split_tensor_dict(shuffle_sequence_dict(batch), args.steps_per_generation)[0]
    signs = torch.ones_like(micro_batch["advantages"])
    signs[1::2] = -1.0
    parameters = [p for p in trainer.model.parameters() if p.requires_grad]

    def gradient_norm(advantages: torch.Tensor) -> tuple[float, dict[str, float]]:
        with torch.random.fork_rng(devices=[]), algorithm.policy_term_only(), trainer.compute_loss_context_manager():
            torch.manual_seed(0)  # the same timesteps and noise for both advantages
            part = dict(micro_batch, advantages=advantages)
            loss, metrics = algorithm.loss(
                trainer.model_wrapped, part, trainer._reference_denoiser, trainer.accelerator, 1
            )
            trainer.accelerator.backward(loss)
        norm = math.sqrt(sum(float(p.grad.float().norm() ** 2) for p in parameters if p.grad is not None))
        trainer.model_wrapped.zero_grad(set_to_none=True)
        return norm, metrics

    constant, metrics = gradient_norm(torch.zeros_like(signs))
    moving, _ = gradient_norm(signs)
    relative = constant / max(moving, 1e-30)
    status = PASS if relative <= 1e-4 else (WARN if relative <= 1e-2 else FAIL)
    fixes = _on_policy_fixes(args)
    checks = [
        Check(
            "constant reward: zero gradient",
            f"|grad| at advantages 0 / at +-1: {relative:.1e} (old policy = current)",
            status,
            "" if status == PASS else f"the old and current policies' passes differ.{fixes}",
        )
    ]
    if "ratio/max_abs_deviation" in metrics:
        deviation = metrics["ratio/max_abs_deviation"]
        status = PASS if deviation <= 1e-4 else (WARN if deviation <= 1e-3 else FAIL)
        checks.append(
            Check(
                "on-policy ratio, first iteration",
                f"max |r - 1| {deviation:.2e}, {algorithm.num_timesteps()} timesteps (clip {trainer.epsilon_low:g})",
                status,
                "" if status == PASS else f"on-policy ratios must be 1 up to round-off.{fixes}",
            )
        )
    return checks


def _on_policy_fixes(args) -> str:
    """The usual causes of a first pass that differs from the rollout's policy, as fixes."""
    fix = ""
    if not args.disable_dropout:
        fix += " Dropout makes rollout and training passes differ: set disable_dropout true (or lora_dropout 0)."
    if args.bf16 or args.fp16:
        fix += " Half precision changes the passes: try fp32."
    return fix


def check_rewards(trainer, inputs: list[dict]) -> list[Check]:
    """Each reward function on one rollout batch of images: one finite value (or None) per image, and its speed."""
    from .errors import UserInputError

    prompts = [row["prompt"] for row in inputs]
    images = trainer.sample_images()
    columns = {key: [row[key] for row in inputs] for key in inputs[0] if key != "prompt"}
    checks = []
    for func, name in zip(trainer.reward_funcs, trainer.reward_func_names, strict=True):
        start = time.perf_counter()
        try:
            values = func(prompts=prompts, completions=images, completion_ids=[None] * len(images), **columns)
        except UserInputError as error:
            checks.append(Check(f"reward {name}", "error", FAIL, str(error)))
            continue
        seconds = (time.perf_counter() - start) / len(images)
        missing = sum(1 for v in values if v is None or (isinstance(v, float) and math.isnan(v)))
        figure = f"{len(values)} values for {len(images)} images, {missing} None; {seconds * 1000:.1f} ms/image"
        status = WARN if missing == len(values) else PASS
        checks.append(
            Check(f"reward {name}", figure, status, "every value is None: check the dataset columns" if missing else "")
        )
    return checks


def check_step_memory(trainer, batch: dict[str, torch.Tensor]) -> Check:
    """Peak memory of one training micro-step (forward + backward), without an optimizer update."""
    from trl.trainer.utils import split_tensor_dict

    micro_batch = split_tensor_dict(batch, trainer.args.steps_per_generation)[0]
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    device = trainer.accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model_wrapped, micro_batch)
    trainer.accelerator.backward(loss)
    trainer.model_wrapped.zero_grad(set_to_none=True)
    if device.type == "cuda":
        figure = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on {device} (torch allocator peak)"
    else:
        figure = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB peak RSS (process)"
    return Check("peak memory of a training step", figure, INFO)


def _make_adapter_nonzero(model, std: float = 0.02) -> None:
    """Give a fresh LoRA (B = 0, so it contributes nothing) small random B weights, as after some training.

    Otherwise differences between rollout and training passes inside the adapter (dropout, dtype) stay invisible
    on the first step and appear only once the adapter has moved. Only this throwaway doctor trainer is touched.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                noise = torch.randn(parameter.shape, generator=generator) * std
                parameter.copy_(noise.to(parameter.device, parameter.dtype))


def run_doctor(script_args, training_args, model_args) -> list[Check]:
    """All the checks of `trl-flow doctor`, as table rows. Nothing is written to the recipe's output_dir."""
    from .recipe import build_trainer

    training_args.output_dir = tempfile.mkdtemp(prefix="trl-flow-doctor-")
    training_args.report_to = []
    trainer = build_trainer(script_args, training_args, model_args)
    _make_adapter_nonzero(trainer.model)
    trainer.algorithm.reset_state()  # old policies / EMAs start from these weights, as from a trained adapter
    inputs = _rollout_inputs(trainer)
    rows = list({row["prompt"]: row for row in inputs}.values())[:2]  # two distinct prompts
    prompts = [row["prompt"] for row in rows]
    sources = [row[SOURCE_IMAGES_COLUMN] for row in rows] if trainer.adapter.takes_condition_images else None

    trainer.model.eval()  # the sampler check compares the math, not dropout masks (the ratio row covers those)
    checks = [check_sampler_matches_pipeline(trainer, prompts, sources)]
    trainer.model.train()  # rollouts run in training mode during `train()`, dropout included
    batch = trainer._generate_and_score_completions(inputs)
    if trainer.algorithm.deterministic_rollout:
        checks.extend(check_forward_process_on_policy(trainer, batch))
    else:
        checks.extend(check_on_policy_ratio(trainer, batch))
    checks.extend(check_rewards(trainer, inputs))
    ours = effective_quantities(trainer.args, trainer.accelerator.num_processes)
    for key, value in ours.items():
        checks.append(Check(key, f"{value:g} (paper: {PAPER_QUANTITIES[key]:g})", INFO))
    checks.append(check_step_memory(trainer, batch))
    return checks


def format_table(checks: list[Check]) -> str:
    """The checks as a fixed-width text table, failing rows followed by their fix."""
    width = max(len(c.name) for c in checks)
    figure_width = max(len(c.figure) for c in checks)
    lines = [f"{'check':<{width}}  {'figure':<{figure_width}}  status", "-" * (width + figure_width + 10)]
    for check in checks:
        lines.append(f"{check.name:<{width}}  {check.figure:<{figure_width}}  {check.status}")
        if check.fix and check.status in (WARN, FAIL):
            lines.append(f"{'':<{width}}  fix: {check.fix}")
    return "\n".join(lines)


def doctor(argv: list[str]) -> int:
    """`trl-flow doctor --recipe R [--key value ...]`: print the table; exit 0 when nothing fails, else 1."""
    from .recipe import parse_grpo_args

    script_args, training_args, model_args = parse_grpo_args(argv)
    checks = run_doctor(script_args, training_args, model_args)
    print(format_table(checks))
    failed = [c.name for c in checks if c.status == FAIL]
    print(f"\n{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "\nall checks passed")
    return 1 if failed else 0
