"""Peak memory of a Flow-GRPO training step: LoRA and full fine-tuning, with and without the memory savers
(gradient checkpointing; training passes micro-batched one denoising step and `--micro` samples at a time).

Each configuration runs in its own process (peak RSS is per process on CPU; on a GPU the torch allocator's peak is
reported). The figure is the peak during one rollout + training micro-step minus the memory after set-up.
The video rows train the tiny offline Wan2.1 (`trl_flow.offline_models.wan`) on 33-frame 64x64 videos (latents
16 x 9 x 8 x 8), with and without `offload_rollouts` (the rollout record waits on the CPU: it lowers the accelerator's
peak; on a CPU-only machine both rows hold the same memory).
Run: python -m benchmarks.memory [--size small|medium] [--images 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def measure(size: str, images: int, lora: bool, checkpointing: bool, micro_batch_size: int | None) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from benchmarks.common import build_pipeline, peak_rss_mb
    from trl_flow import FlowGRPOConfig, FlowGRPOTrainer

    pipe, resolution = build_pipeline(size)
    config = FlowGRPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to=[],
        height=resolution,
        width=resolution,
        max_sequence_length=128,
        num_generations=images,
        per_device_train_batch_size=images,
        beta=0.0 if not lora else 0.04,
        gradient_checkpointing=checkpointing,
        train_micro_batch_size=micro_batch_size,
    )
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    peft_config = LoraConfig(r=32, lora_alpha=64, target_modules=targets) if lora else None
    trainer = FlowGRPOTrainer(
        pipe, ["brightness"], config, train_dataset=Dataset.from_dict({"prompt": ["a red image"]}),
        peft_config=peft_config,
    )  # fmt: skip
    if checkpointing:
        trainer.model.activation_checkpointing_enable()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    device = trainer.accelerator.device
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Rollout, rewards, then the training forward + backward passes, as the Trainer runs a micro-step.
    trainer.training_step(trainer.model, [{"prompt": "a red image"}] * images, None)
    after = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {"set-up MB": round(before), "step peak MB": round(after), "step adds MB": round(after - before)}


def measure_video(images: int, offload: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from benchmarks.common import peak_rss_mb
    from trl_flow import FlowGRPOConfig, FlowGRPOTrainer
    from trl_flow.offline_models.wan import TINY_WAN_LORA_TARGETS, ensure_tiny_wan

    config = FlowGRPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to=[],
        height=64,
        width=64,
        num_frames=33,
        max_sequence_length=16,
        num_generations=images,
        per_device_train_batch_size=images,
        guidance_scale=4.5,
        offload_rollouts=offload,
    )
    trainer = FlowGRPOTrainer(
        str(ensure_tiny_wan()), ["color_transition"], config,
        train_dataset=Dataset.from_dict({"prompt": ["red turning blue"]}),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=list(TINY_WAN_LORA_TARGETS)),
    )  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    device = trainer.accelerator.device
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.training_step(trainer.model, [{"prompt": "red turning blue"}] * images, None)
    after = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {"set-up MB": round(before), "step peak MB": round(after), "step adds MB": round(after - before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", choices=["small", "medium"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--micro", type=int, default=2, help="train_micro_batch_size of the micro-batched rows")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration in this process
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one and args.one.startswith("video"):
        print(json.dumps(measure_video(args.images, offload=args.one == "video-offload")))
        return
    if args.one:
        lora, checkpointing, micro = (part == "1" for part in args.one.split(","))
        print(json.dumps(measure(args.size, args.images, lora, checkpointing, args.micro if micro else None)))
        return

    from benchmarks.common import machine

    print(f"machine: {machine()}")
    print(f"model: {args.size} SD3-shaped, {args.images} images per micro-step, 10 SDE steps, 9 trained, CFG 4.5")
    savers = [(False, False), (True, False), (False, True), (True, True)]  # (checkpointing, micro-batching)
    for lora in (True, False):
        for checkpointing, micro in savers:
            one = f"{int(lora)},{int(checkpointing)},{int(micro)}"
            command = [sys.executable, "-m", "benchmarks.memory", "--size", args.size, "--images", str(args.images),
                       "--micro", str(args.micro), "--one", one]  # fmt: skip
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()
            figures = json.loads(output[-1])
            name = (
                f"{'LoRA r32' if lora else 'full fine-tune'}, checkpointing {'on' if checkpointing else 'off'}, "
                f"micro-batch {args.micro if micro else 'off'}"
            )
            print(f"{name:<58} {figures}")
    for one in ("video", "video-offload"):
        command = [sys.executable, "-m", "benchmarks.memory", "--images", str(args.images), "--one", one]
        figures = json.loads(
            subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        )
        name = f"video: tiny Wan2.1 33x64x64, LoRA r8, offload_rollouts {'on' if one.endswith('offload') else 'off'}"
        print(f"{name:<58} {figures}")


if __name__ == "__main__":
    main()
