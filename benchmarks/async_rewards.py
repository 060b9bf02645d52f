"""What `async_rewards` saves: rollout + scoring of one generation batch, synchronous vs overlapped.

With `async_rewards`, each chunk of `rollout_batch_size` images is scored in a worker thread while the next chunk
denoises. The reward here stands for a remote reward server or a reward model on another device: it waits
`--reward_ms` per image without using this machine's cores. A CPU-bound reward on the same cores gains little.
Run: python -m benchmarks.async_rewards [--size small|medium] [--images 16] [--chunk 4] [--reward_ms 50]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks.common import best_of, build_pipeline, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["small", "medium"])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--reward_ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from datasets import Dataset

    from trl_flow import FlowGRPOConfig, FlowGRPOTrainer

    def remote_like_reward(prompts, completions, **kwargs):
        time.sleep(args.reward_ms / 1000 * len(completions))
        return [0.0] * len(completions)

    pipe, resolution = build_pipeline(args.size)
    prompts = ["a red image", "something blue"] * (args.images // 2)
    timings = {}
    for async_rewards in (False, True):
        config = FlowGRPOConfig(
            output_dir=tempfile.mkdtemp(),
            report_to=[],
            height=resolution,
            width=resolution,
            max_sequence_length=128,
            num_generations=args.images // 2,
            per_device_train_batch_size=args.images,
            rollout_batch_size=args.chunk,
            async_rewards=async_rewards,
            beta=0.0,
        )
        trainer = FlowGRPOTrainer(
            pipe, [remote_like_reward], config, train_dataset=Dataset.from_dict({"prompt": prompts})
        )
        trainer.model.train()
        rows = [{"prompt": p} for p in sorted(prompts)]
        timings[async_rewards] = best_of(lambda t=trainer, r=rows: t._generate_and_score_completions(r), args.repeats)
    print(f"machine: {machine()}")
    print(
        f"model: {args.size} SD3-shaped, {resolution} px, {args.images} images in chunks of {args.chunk}, "
        f"reward {args.reward_ms:g} ms/image (waiting, not computing)"
    )
    print(f"rollout + rewards, synchronous: {timings[False]:.3f} s")
    print(f"rollout + rewards, async_rewards: {timings[True]:.3f} s")
    print(f"saved: {timings[False] - timings[True]:.3f} s ({1 - timings[True] / timings[False]:.0%})")


if __name__ == "__main__":
    main()
