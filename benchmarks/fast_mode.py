"""Fast mode vs full Flow-GRPO on the tiny offline task: time per step, and reward after the same wall-clock time.

Full mode runs the SDE on all steps and trains 9 of 10 (the paper). Fast mode (`sde_window_size 2`) runs the SDE on
a window of 2 steps in the first half of the schedule, the ODE elsewhere, and trains only the window.
Target: >= 2x less time per step, no worse reward at equal wall-clock.
Run: python -m benchmarks.fast_mode [--seconds 60] [--window 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from benchmarks.common import machine


def run(window: int, seconds: float, steps: int):
    from peft import LoraConfig
    from transformers import TrainerCallback

    from reward_funcs.rules import prompt_color
    from trl_flow import FlowGRPOConfig, FlowGRPOTrainer
    from trl_flow.data import TINY_PROMPTS_PATH, load_prompt_dataset
    from trl_flow.offline_models.sd3 import TINY_SD3_LORA_TARGETS, ensure_tiny_sd3

    config = FlowGRPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to=[],
        max_steps=100_000,
        per_device_train_batch_size=8,
        num_generations=8,
        steps_per_generation=2,
        num_inference_steps=steps,
        sde_window_size=window,
        height=32,
        width=32,
        guidance_scale=1.0,
        max_sequence_length=16,
        learning_rate=1e-2,
        beta=0.0,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1000,
        seed=0,
    )
    trainer = FlowGRPOTrainer(
        ensure_tiny_sd3(),
        ["prompt_color"],
        config,
        train_dataset=load_prompt_dataset(str(TINY_PROMPTS_PATH)),
        peft_config=LoraConfig(
            r=8, lora_alpha=16, target_modules=list(TINY_SD3_LORA_TARGETS), init_lora_weights="gaussian"
        ),
    )

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.elapsed = time.perf_counter() - self.start
            control.should_training_stop = self.elapsed > seconds

    budget = Budget()
    trainer.add_callback(budget)
    trainer.train()
    elapsed = budget.elapsed
    prompts = [p for p in trainer.train_dataset["prompt"] for _ in range(8)]
    images = trainer.generate_images(prompts, num_inference_steps=steps, noise_level=0.0, seed=1234)
    reward = torch.tensor(prompt_color(prompts, images))
    return trainer.state.global_step, elapsed, reward.mean().item(), reward.std().item() / len(reward) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {name: run(window, args.seconds, args.steps) for name, window in (("full", 0), ("fast", args.window))}
    print(f"machine: {machine()}")
    print(f"tiny SD3, 32 px, {args.steps} denoising steps, 16 images per rollout batch, {args.seconds:g} s budget each")
    for name, (steps, elapsed, reward, error) in results.items():
        print(
            f"{name:>4}: {steps} optimizer steps, {elapsed / steps:.3f} s/step, "
            f"held-out ODE reward {reward:.4f} +- {error:.4f}"
        )
    full, fast = results["full"], results["fast"]
    print(f"time per step, full / fast: {(full[1] / full[0]) / (fast[1] / fast[0]):.2f}x (target >= 2x)")
    print(f"reward at equal wall-clock, fast - full: {fast[2] - full[2]:+.4f} (target >= 0 within noise)")


if __name__ == "__main__":
    main()
