"""Memory over a long run: RSS and peak RSS after every epoch (one rollout batch and its updates), so that anything that
accumulates (metrics, image lists, rollout buffers, tracker objects) shows as growth.

The epoch is the official Flow-GRPO one (as `benchmarks.side_by_side` compares): 8 prompts x 8 images, 10 SDE steps
with CFG 4.5, 9 trained steps, micro-batches of 8, KL reference (beta 0.04), 2 AdamW updates, LoRA r32 on the 8
attention projections, EMA, JPEG reward, fp32. The last line compares the peak after ``--early`` epochs with the
peak at the end.

Run: python -m benchmarks.long_run [--epochs 50] [--early 5] [--model PATH --height 64 --width 64] [--dataset FILE]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from transformers import TrainerCallback

#: the official epoch's keys (model, prompts and resolution come from the command line)
EPOCH = dict(
    use_peft=True, lora_r=32, lora_alpha=64,
    lora_target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    reward_funcs=["jpeg_compressibility"], max_sequence_length=128, num_inference_steps=10, noise_level=0.7,
    guidance_scale=4.5, timestep_fraction=0.99, num_generations=8, per_device_train_batch_size=8,
    steps_per_generation=8, gradient_accumulation_steps=4, learning_rate=3e-4, weight_decay=1e-4, max_grad_norm=1.0,
    beta=0.04, epsilon=1e-4, advantage_clip=5, scale_rewards="batch", ema=True, lr_scheduler_type="constant",
    logging_steps=2, save_strategy="no", eval_strategy="no", report_to="none", seed=42, dataloader_num_workers=0,
    disable_tqdm=True,
)  # fmt: skip
UPDATES_PER_EPOCH = 2  # steps_per_generation / gradient_accumulation_steps


def memory_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MB, from /proc (Linux)."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


class EpochMemory(TrainerCallback):
    """Prints RSS and peak RSS after each epoch and keeps the peaks."""

    def __init__(self) -> None:
        self.peaks: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % UPDATES_PER_EPOCH == 0:
            rss, peak = memory_mb()
            self.peaks.append(peak)
            print(f"epoch {len(self.peaks):3d}  rss {rss:7.1f} MB  peak {peak:7.1f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--early", type=int, default=5)
    parser.add_argument("--model", default="trl-flow/tiny-sd3")
    parser.add_argument("--dataset", default="trl-flow/tiny-prompts")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from trl_flow.recipe import build_trainer, parse_grpo_args

    flags = []
    for key, value in {**EPOCH, "height": args.height, "width": args.width}.items():
        flags += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    flags += ["--model_name_or_path", args.model, "--dataset_name", args.dataset]
    flags += ["--max_steps", str(args.epochs * UPDATES_PER_EPOCH), "--output_dir", tempfile.mkdtemp()]
    trainer = build_trainer(*parse_grpo_args(flags))
    callback = EpochMemory()
    trainer.add_callback(callback)
    trainer.train()
    early, final = callback.peaks[min(args.early, len(callback.peaks)) - 1], callback.peaks[-1]
    print(f"peak RSS after {args.early} epochs {early:.1f} MB, after {len(callback.peaks)} {final:.1f} MB: "
          f"growth {final - early:+.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
