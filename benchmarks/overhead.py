"""Training-step overhead: a full Flow-GRPO step vs the same model calls alone.

A "step" here is one generation batch end to end: SDE rollouts (CFG), VAE decode, rewards, advantages, and the
optimizer updates of all its micro-batches. The baseline makes exactly the same denoiser forward/backward and VAE
calls on tensors of the same shapes, with nothing else. Target ratio <= 1.10.
Run: python -m benchmarks.overhead [--size small|medium] [--images 16] [--beta 0.04]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from benchmarks.common import build_pipeline, machine, peak_rss_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", choices=["small", "medium"])
    parser.add_argument("--images", type=int, default=16, help="images per generation batch")
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--micro_batches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_flow import FlowGRPOConfig, FlowGRPOTrainer

    pipe, resolution = build_pipeline(args.size)
    config = FlowGRPOConfig(
        output_dir=tempfile.mkdtemp(),
        report_to=[],
        height=resolution,
        width=resolution,
        num_inference_steps=args.steps,
        max_sequence_length=128,
        num_generations=args.group,
        per_device_train_batch_size=args.images // args.micro_batches,
        steps_per_generation=args.micro_batches,
        gradient_accumulation_steps=args.micro_batches,
        beta=args.beta,
        max_steps=args.repeats + 1,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1000,
    )
    prompts = ["a red image", "something blue", "a green square", "a dark red picture"] * 8
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    trainer = FlowGRPOTrainer(
        pipe,
        ["brightness"],
        config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        peft_config=LoraConfig(r=32, lora_alpha=64, target_modules=targets, init_lora_weights="gaussian"),
    )

    # The same model calls alone, on random tensors of the same shapes.
    model, vae = trainer.model, pipe.vae
    latent = resolution // pipe.vae_scale_factor
    n, cfg = args.images, 2
    text = trainer._conditioning(prompts[:n])
    hidden = text["prompt_embeds"].repeat(cfg, 1, 1)
    pooled = text["pooled_prompt_embeds"].repeat(cfg, 1)
    num_trained = config.num_trained_steps

    def model_calls():
        optimizer = trainer.optimizer
        with torch.no_grad():
            x = torch.randn(n * cfg, 16, latent, latent)
            for _ in range(args.steps):
                model(
                    hidden_states=x,
                    timestep=torch.full((n * cfg,), 500.0),
                    encoder_hidden_states=hidden,
                    pooled_projections=pooled,
                )
            vae.decode(torch.randn(n, 16, latent, latent))
        b = n // args.micro_batches
        for _ in range(args.micro_batches):
            loss = 0
            for _ in range(num_trained):
                x = torch.randn(b * cfg, 16, latent, latent)
                kwargs = dict(
                    timestep=torch.full((b * cfg,), 500.0),
                    encoder_hidden_states=hidden[: b * cfg],
                    pooled_projections=pooled[: b * cfg],
                )
                loss = loss + model(hidden_states=x, **kwargs).float().mean()
                if args.beta:
                    with torch.no_grad(), model.disable_adapter():
                        model(hidden_states=x, **kwargs)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    # Each optimizer step is followed by the same model calls alone, so that both see the same machine load.
    step_times: list[float] = []
    baseline: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter() - self.start)
            start = time.perf_counter()
            model_calls()
            baseline.append(time.perf_counter() - start)

    trainer.add_callback(Timer())
    trainer.train()
    # The first pair pays one-off costs (allocations, lazy initialisation).
    t_step, t_model = min(step_times[1:]), min(baseline[1:])
    pair_ratios = sorted(step / alone for step, alone in zip(step_times[1:], baseline[1:], strict=True))
    print(f"machine: {machine()}")
    print(
        f"model: {args.size} SD3-shaped, {resolution} px; {n} images per step ({n // args.group} prompts x "
        f"{args.group}), {args.steps} SDE steps, {num_trained} trained, CFG on, beta {args.beta}, LoRA r32"
    )
    print(f"full Flow-GRPO step (best of {len(step_times) - 1}): {t_step:.3f} s")
    print(f"same model calls alone (best of {len(baseline) - 1}, each right after a step): {t_model:.3f} s")
    print(f"overhead ratio: {t_step / t_model:.3f} (target <= 1.10)")
    print(f"ratio of each step to the calls right after it: {', '.join(f'{r:.3f}' for r in pair_ratios)}")
    print(f"peak RSS: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
