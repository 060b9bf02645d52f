"""FSDP2 (accelerate, `recipes/accelerate/fsdp2.yaml`) with two processes on CPU (gloo): a full fine-tune and a LoRA
run of the tiny Wan2.1 (a video model) in one launch. Rewards are gathered over both ranks, the denoiser is sharded
block by block (the frozen text encoder and VAE are not), both ranks hold the same weights after training, and what
`save_model` writes loads in plain diffusers.

accelerate 1.15 never selects FSDP on a CPU-only machine (its processes come up as MULTI_CPU and run plain DDP,
silently); the worker's `allow_fsdp_on_cpu` makes that one decision as on GPUs. Everything else is accelerate's and
torch's FSDP2 code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.factories import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    config = yaml.safe_load((ROOT / "recipes/accelerate/fsdp2.yaml").read_text())
    config["use_cpu"] = True  # as the recipe's comment says, for a CPU-only machine
    # the recipe's comment: set the family's block class (Wan: WanTransformerBlock)
    config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = "WanTransformerBlock"
    config_path = out / "fsdp2_cpu.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        # the launched script's folder, not the repository, heads sys.path: import this checkout's trl_flow
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
        "--main_process_port", str(free_port()),
        str(ROOT / "tests/distributed/fsdp2_worker.py"), str(out), "full", "lora",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp2_shards_the_blocks_gathers_rewards_and_keeps_ranks_identical(fsdp2_run, mode):
    ranks = [json.loads((fsdp2_run / f"{mode}_rank{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert (report["world_size"], report["distributed_type"], report["fsdp_version"]) == (
            2,
            "DistributedType.FSDP",
            2,
        )
        assert report["sharded_blocks"] == report["num_blocks"] > 0 and report["frozen_sharded"] == []
        assert report["moved"] > 0  # training changed the weights
    # Both ranks see the same gathered rewards: each step's group of 4 is 2 images from each rank.
    assert ranks[0]["gathered_rewards"] == ranks[1]["gathered_rewards"]
    for step in ranks[0]["gathered_rewards"]:
        assert len(step) == 4 and step[:2] != step[2:]
    # The full (all-gathered) weights are identical on both ranks.
    rank0, rank1 = (load_file(str(fsdp2_run / f"{mode}_rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_fsdp2_full_fine_tune_saves_the_trained_transformer(fsdp2_run):
    from diffusers import WanTransformer3DModel

    saved = WanTransformer3DModel.from_pretrained(fsdp2_run / "full_saved" / "transformer")
    trained = load_file(str(fsdp2_run / "full_rank0.safetensors"))
    prefix = next(name for name in trained if name.endswith("patch_embedding.weight")).removesuffix(
        "patch_embedding.weight"
    )
    state = saved.state_dict()  # parameters and buffers; every trained parameter must be there, as trained
    assert set(trained) <= {prefix + name for name in state}
    for name, value in state.items():
        if prefix + name in trained:
            assert torch.equal(value, trained[prefix + name]), name


def test_fsdp2_lora_loads_in_diffusers_and_changes_the_video(fsdp2_run):
    from diffusers import WanPipeline

    from trl_flow.offline_models.wan import ensure_tiny_wan

    pipe = WanPipeline.from_pretrained(ensure_tiny_wan())
    kwargs = dict(num_inference_steps=2, height=16, width=16, num_frames=9, max_sequence_length=16, guidance_scale=1.0)
    prompt = "red turning blue"
    base = pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).frames
    pipe.load_lora_weights(fsdp2_run / "lora_saved")
    tuned = pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).frames
    assert np.abs(base - tuned).mean() > 1e-4
