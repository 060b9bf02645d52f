"""Trainers on the tiny offline pipelines shared by the tests: one set of fast settings, family overrides on top."""

from collections.abc import Sequence

import torch
from peft import LoraConfig

from reward_funcs.rules import prompt_color
from trl_flow.config import FlowGRPOConfig
from trl_flow.data import TINY_PROMPTS_PATH, load_prompt_dataset
from trl_flow.offline_models.sd3 import TINY_SD3_LORA_TARGETS
from trl_flow.trainer import FlowGRPOTrainer

#: A few seconds per run on 2 CPU cores: 32 px, 6 denoising steps, one prompt's group of 8 per micro-batch.
TINY_TRAINING = dict(
    max_steps=2,
    per_device_train_batch_size=8,
    num_generations=8,
    steps_per_generation=2,
    num_inference_steps=6,
    height=32,
    width=32,
    guidance_scale=1.0,
    max_sequence_length=16,
    learning_rate=1e-2,
    beta=0.0,
    report_to=[],
    save_strategy="no",
    seed=0,
    disable_tqdm=True,
)


def tiny_trainer(
    model_path,
    output_dir,
    lora_targets: Sequence[str] = TINY_SD3_LORA_TARGETS,
    reward_funcs=("prompt_color",),
    lora: bool = True,
    train_dataset=None,
    eval_dataset=None,
    **overrides,
) -> FlowGRPOTrainer:
    """A trainer with `TINY_TRAINING` (updated by ``overrides``), LoRA r8 on ``lora_targets`` (full fine-tuning
    when ``lora`` is false) and the tiny red/green/blue prompts unless ``train_dataset`` is given."""
    settings = {**TINY_TRAINING, "output_dir": str(output_dir), **overrides}
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=list(lora_targets), init_lora_weights="gaussian")
    return FlowGRPOTrainer(
        str(model_path),
        reward_funcs=list(reward_funcs),
        args=FlowGRPOConfig(**settings),
        train_dataset=train_dataset if train_dataset is not None else load_prompt_dataset(str(TINY_PROMPTS_PATH)),
        eval_dataset=eval_dataset,
        peft_config=peft_config if lora else None,
    )


def sample_tiny_sd3(pipe):
    """Two fixed-seed 32 px images (4 steps, no CFG) from a plain diffusers pipeline, as a numpy array: the same call
    before and after loading a LoRA shows what the LoRA changes."""
    return pipe(
        ["a red image", "a blue image"],
        height=32,
        width=32,
        num_inference_steps=4,
        max_sequence_length=16,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def prompt_color_before_and_after_training(trainer, num_inference_steps: int) -> tuple[float, float, float]:
    """Mean `prompt_color` of the trainer's prompts (8 images each, held-fixed seeds) before and after
    `trainer.train()`, and the standard error of the first mean: the learning tests' measurement."""
    prompts = [p for p in trainer.train_dataset["prompt"] for _ in range(8)]

    def mean_and_standard_error() -> tuple[float, float]:
        images = trainer.generate_images(prompts, num_inference_steps=num_inference_steps, noise_level=0.7, seed=1234)
        rewards = torch.tensor(prompt_color(prompts, images))
        return rewards.mean().item(), rewards.std().item() / len(rewards) ** 0.5

    before, standard_error = mean_and_standard_error()
    trainer.train()
    after, _ = mean_and_standard_error()
    print(f"prompt_color: {before:.4f} -> {after:.4f}, initial standard error {standard_error:.4f}")
    return before, after, standard_error


def free_port() -> int:
    """A TCP port nothing listens on now, for a launched process group's rendezvous: the default 29500 may be taken
    by another run on the machine."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
