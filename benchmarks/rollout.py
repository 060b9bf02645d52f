"""Rollout cost: trl-flow's SDE rollout with per-step log-probs vs the plain diffusers pipeline call.

Same prompts, batch, resolution, steps and CFG; both decode to PIL images. Target ratio <= 1.05.
Run: python -m benchmarks.rollout [--size small|medium] [--batch 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from benchmarks.common import best_of, build_pipeline, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", choices=["small", "medium"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance_scale", type=float, default=4.5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from datasets import Dataset

    from trl_flow import FlowGRPOConfig, FlowGRPOTrainer

    pipe, resolution = build_pipeline(args.size)
    prompts = ["a red image", "something blue"] * (args.batch // 2)
    config = FlowGRPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to=[],
        height=resolution,
        width=resolution,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        max_sequence_length=128,
        num_generations=2,
        per_device_train_batch_size=args.batch,
        beta=0.0,
    )
    trainer = FlowGRPOTrainer(pipe, ["brightness"], config, train_dataset=Dataset.from_dict({"prompt": prompts}))
    steps = range(config.num_trained_steps)

    def ours():
        trainer._rollout(prompts, args.steps, config.noise_level, steps, seed=0)

    def diffusers_pipeline():
        pipe(
            prompts,
            height=resolution,
            width=resolution,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            max_sequence_length=128,
            generator=torch.Generator().manual_seed(0),
        )

    with torch.no_grad():
        ours(), diffusers_pipeline()  # warm-up
        t_pipe = best_of(diffusers_pipeline, args.repeats)
        t_ours = best_of(ours, args.repeats)
    print(f"machine: {machine()}")
    print(
        f"model: {args.size} SD3-shaped, {resolution} px, batch {args.batch}, {args.steps} steps, "
        f"CFG {args.guidance_scale}"
    )
    print(f"diffusers pipeline call: {t_pipe:.3f} s")
    print(f"trl-flow SDE rollout with log-probs: {t_ours:.3f} s")
    print(f"ratio: {t_ours / t_pipe:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
