"""Two processes on CPU (gloo) through `accelerate launch`: rewards are gathered before group-relative advantages
are computed, each rank trains on its own slice, and both ranks end with identical weights. The run is stated in
global quantities (`prompts_per_step`), so the same script on one process reports the same effective quantities and
computes the same advantages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.factories import free_port
from trl_flow.algorithms.advantages import group_relative_advantages

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_sd3_path):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           # the launched script's folder, not the repository, heads sys.path: import this checkout's trl_flow
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "recipes/accelerate/ddp_cpu.yaml"),
        "--main_process_port", str(free_port()),
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


def test_one_process_and_two_processes_run_the_same_recipe(ddp_run, tmp_path):
    from tests.distributed.ddp_worker import main as run_worker

    _, ranks = ddp_run
    run_worker(tmp_path)  # the same script in this process: 1 process, so 2 micro-batches per rollout batch
    single = json.loads((tmp_path / "rank0.json").read_text())
    assert single["world_size"] == 1
    assert (single["quantities"]["processes"], ranks[0]["quantities"]["processes"]) == (1, 2)
    for key in single["quantities"]:  # every global quantity but the number of processes
        if key != "processes":
            assert single["quantities"][key] == ranks[0]["quantities"][key] == ranks[1]["quantities"][key], key
    assert single["quantities"]["unique prompts per rollout batch"] == 1
    assert single["quantities"]["images per optimizer update"] == 8
    assert single["setup"].split(";", 1)[1] == ranks[0]["setup"].split(";", 1)[1]  # all but the process count
    assert len(single["records"]) == len(ranks[0]["records"]) == 3  # rollout batches
    for one, two in zip(single["records"], ranks[0]["records"], strict=True):
        # Same images (noise drawn per image from its global index), so the same rewards and advantages; CPU kernels
        # may round differently for a batch of 8 and two of 4.
        torch.testing.assert_close(torch.tensor(one["gathered_rewards"]), torch.tensor(two["gathered_rewards"]))
        torch.testing.assert_close(torch.tensor(one["advantages"]), torch.tensor(two["advantages"]), atol=1e-3, rtol=0)
