"""Two processes on CPU (gloo) through `accelerate launch`: rewards are gathered before group-relative advantages
are computed, each rank trains on its own slice, and both ranks end with identical weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trl_flow.sde import group_relative_advantages

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_sd3_path):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes/accelerate/ddp_cpu.yaml"),
        str(ROOT / "tests/distributed/ddp_worker.py"), str(out),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks


def test_both_processes_join_one_group(ddp_run):
    _, ranks = ddp_run
    assert [r["world_size"] for r in ranks] == [2, 2]


def test_advantages_come_from_the_gathered_rewards(ddp_run):
    _, ranks = ddp_run
    for step, (record0, record1) in enumerate(zip(ranks[0]["records"], ranks[1]["records"], strict=True)):
        # Both ranks see the same gathered rewards: rank 0's 4 images, then rank 1's (one group of 8).
        assert record0["gathered_rewards"] == record1["gathered_rewards"]
        rewards = torch.tensor(record0["gathered_rewards"])
        assert len(rewards) == 8 and len(set(record0["local_prompts"] + record1["local_prompts"])) == 1
        # What a single process computes from those 8 rewards (same function, same settings).
        expected = group_relative_advantages(rewards, 8, "batch", clip=5.0)
        torch.testing.assert_close(torch.tensor(record0["advantages"]), expected)
        # Each rank trains on its own slice of the group.
        torch.testing.assert_close(torch.tensor(record0["local_advantages"]), expected[:4])
        torch.testing.assert_close(torch.tensor(record1["local_advantages"]), expected[4:])
        assert record0["gathered_rewards"][:4] != record0["gathered_rewards"][4:], step  # different images per rank


def test_ranks_end_with_identical_weights(ddp_run):
    out, _ = ddp_run
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert any(rank0[name].abs().sum() > 0 for name in rank0 if "lora_B" in name)  # training moved the LoRA
