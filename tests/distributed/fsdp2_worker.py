"""Run by `accelerate launch` (FSDP2, 2 CPU processes) from tests/distributed/test_fsdp2.py: a 2-step tiny-Wan2.1 run,
a full fine-tune (`full`) or a LoRA (`lora`), that records per rank the rewards it gathered and, after training, the
full (all-gathered) trained weights, and saves the model (`trainer.save_model`)."""

import functools
import json
import os
import sys
from pathlib import Path

import accelerate.state
import torch
from accelerate.utils import DistributedType
from peft import LoraConfig
from safetensors.torch import save_file
from torch.distributed.fsdp import FSDPModule

from trl_flow import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow.data import TINY_VIDEO_PROMPTS_PATH, load_prompt_dataset
from trl_flow.offline_models.wan import ensure_tiny_wan


def allow_fsdp_on_cpu() -> None:
    """accelerate (1.15) selects FSDP only inside its GPU-type branch: on a CPU-only machine the launched processes
    come up as MULTI_CPU and the FSDP plugin is dropped (a plain DDP run; `accelerate launch` says nothing). torch's
    FSDP2 itself runs on CPU with gloo, so this test shim makes that one decision as a GPU machine does; the plugin,
    `fully_shard` with the wrap policy, and the state-dict gathering are then accelerate's and torch's own."""
    original = accelerate.state.AcceleratorState.__init__

    @functools.wraps(original)
    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # Every AcceleratorState() copies PartialState's (MULTI_CPU) type again: re-apply the decision each time.
        plugin = fsdp_plugin if fsdp_plugin is not None else getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    accelerate.state.AcceleratorState.__init__ = init


class RecordingTrainer(FlowGRPOTrainer):
    def __init__(self, *args, **kwargs):
        self.records = []
        super().__init__(*args, **kwargs)

    def _advantages_and_reward_metrics(self, rewards_per_func, mode):
        self.records.append(rewards_per_func[:, 0].tolist())
        return super()._advantages_and_reward_metrics(rewards_per_func, mode)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trained weight, whole: FSDP2 holds each as a DTensor shard, `full_tensor` all-gathers it."""
    weights = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            tensor = parameter.detach()
            tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            weights[name] = tensor.to(torch.float32).contiguous().cpu()
    return weights


def main(out: Path, mode: str) -> None:
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        allow_fsdp_on_cpu()
    torch.manual_seed(0)
    args = FlowGRPOConfig(
        output_dir=str(out / "run"),
        max_steps=2,
        per_device_train_batch_size=2,  # 2 processes x 2 = one group of 4 spread over both ranks
        num_generations=4,
        prompts_per_step=1,
        num_inference_steps=2,
        sde_window_size=1,  # one trained step per rollout: cheap
        height=16,
        width=16,
        num_frames=9,
        guidance_scale=1.0,
        max_sequence_length=16,
        learning_rate=1e-2 if mode == "lora" else 1e-3,
        beta=0.0,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    peft_config = None
    if mode == "lora":
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
    trainer = RecordingTrainer(
        ensure_tiny_wan(),
        ["color_transition"],
        args,
        train_dataset=load_prompt_dataset(str(TINY_VIDEO_PROMPTS_PATH)),
        peft_config=peft_config,
    )
    before = full_weights(trainer.model)
    trainer.train()
    after = full_weights(trainer.model)
    rank = trainer.accelerator.process_index
    moved = max(float((after[name] - before[name]).abs().max()) for name in after)
    report = {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "fsdp_version": getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", None),
        "sharded": type(trainer.model_wrapped).__name__,
        # The wrap policy: each transformer block is its own FSDP unit; the frozen parts are never sharded.
        "sharded_blocks": sum(
            isinstance(m, FSDPModule) and "WanTransformerBlock" in type(m).__name__ for m in trainer.model.modules()
        ),
        "num_blocks": len(trainer.adapter.denoiser.blocks),
        "frozen_sharded": [name for name, m in trainer.adapter.frozen_modules().items() if isinstance(m, FSDPModule)],
        "gathered_rewards": trainer.records,
        "moved": moved,
    }
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps(report))
    save_file(after, str(out / f"{mode}_rank{rank}.safetensors"))
    trainer.save_model(str(out / f"{mode}_saved"))


if __name__ == "__main__":
    for mode in sys.argv[2:]:  # several runs in one launch share its start-up cost
        main(Path(sys.argv[1]), mode)
