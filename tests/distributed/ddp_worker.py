"""Run by `accelerate launch` from tests/distributed/test_ddp.py (and called in-process there for the 1-process run):
a short tiny-SD3 run stated in global quantities (`prompts_per_step`) that records, per rank, its effective batch
quantities, the rewards it gathered, the advantages it computed and the slice it trained on, plus its final LoRA
weights."""

import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from trl_flow import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow.data import TINY_PROMPTS_PATH, load_prompt_dataset
from trl_flow.offline_models.sd3 import ensure_tiny_sd3
from trl_flow.recipe import describe_setup, effective_quantities


class RecordingTrainer(FlowGRPOTrainer):
    def __init__(self, *args, **kwargs):
        self.records = []
        super().__init__(*args, **kwargs)

    def _advantages_and_reward_metrics(self, rewards_per_func, mode):
        advantages = super()._advantages_and_reward_metrics(rewards_per_func, mode)
        self.records.append({"gathered_rewards": rewards_per_func[:, 0].tolist(), "advantages": advantages.tolist()})
        return advantages

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        self.records[-1]["local_advantages"] = batch["advantages"].tolist()
        self.records[-1]["local_prompts"] = [row["prompt"] for row in inputs]
        return batch


def main(out: Path) -> None:
    args = FlowGRPOConfig(
        output_dir=str(out / "run"),
        max_steps=3,
        per_device_train_batch_size=4,  # 2 processes x 4 = one group of 8 spread over both ranks
        num_generations=8,
        prompts_per_step=1,  # 2 processes: 1 micro-batch per rollout batch; 1 process: 2 (gradient accumulation 2)
        num_inference_steps=4,
        height=32,
        width=32,
        guidance_scale=1.0,
        max_sequence_length=16,
        learning_rate=3e-2,
        beta=0.0,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    trainer = RecordingTrainer(
        ensure_tiny_sd3(),
        ["prompt_color"],
        args,
        train_dataset=load_prompt_dataset(str(TINY_PROMPTS_PATH)),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"),
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    world_size = trainer.accelerator.num_processes
    report = {
        "world_size": world_size,
        "quantities": effective_quantities(trainer.args, world_size),
        "setup": describe_setup(trainer),
        "records": trainer.records,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    weights = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    save_file({n: w.to(torch.float32) for n, w in weights.items()}, str(out / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
