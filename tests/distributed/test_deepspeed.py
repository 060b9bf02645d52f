"""Single-process DeepSpeed ZeRO-2 and ZeRO-3 runs of the tiny recipe on CPU (DeepSpeed does not start several
processes on CPU): they train exactly as the plain run does and save a LoRA that plain diffusers loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from tests.factories import free_port

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
UPDATES = 20
# Measured over 20 updates on 2 CPU cores: ZeRO-2 and ZeRO-3 logged the plain run's rewards to 1.2e-6, its losses
# to 7.3e-6 and its gradient norms to 4.9e-7, and saved its LoRA weights (up to 0.5) to 6.3e-6: float32 round-off of
# a sharded optimizer step. The LoRA's B matrices start at zero, so the 0.5 is all training: an update skipped, scaled
# or applied to other parameters shows far above the tolerance.
TOLERANCE = 1e-4


def tiny_run(output_dir: Path, *flags: str) -> dict:
    """Run the tiny recipe for `UPDATES` updates with ``flags``; return its stdout and logged training entries."""
    # DeepSpeed's one-process group still rendezvouses, by default on port 29500: take a free one.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MASTER_PORT": str(free_port())}
    command = [
        sys.executable, "-m", "trl_flow.cli", "grpo", "--recipe", "recipes/tiny.yaml", "--max_steps", str(UPDATES),
        "--logging_steps", "1", "--output_dir", str(output_dir), *flags,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {"stdout": result.stdout, "logs": [entry for entry in history if "reward" in entry]}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_sd3_path):
    output_dir = tmp_path_factory.mktemp("plain")
    return output_dir, tiny_run(output_dir)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_trains_as_the_plain_run_and_saves_a_diffusers_lora(stage, tmp_path, tiny_sd3_path, plain_run):
    plain_dir, plain = plain_run
    out = tmp_path / f"zero{stage}"
    run = tiny_run(out, "--accelerate_config", f"recipes/accelerate/zero{stage}_cpu.yaml")
    assert f"(DEEPSPEED, ZeRO-{stage})" in run["stdout"] and "DEEPSPEED" not in plain["stdout"]

    # The same training: every logged reward, loss and gradient norm, and the saved LoRA.
    assert len(run["logs"]) == len(plain["logs"]) == UPDATES // 2  # a reward log per generation batch
    for key in ("reward", "loss", "grad_norm"):
        for ours, theirs in zip(run["logs"], plain["logs"], strict=True):
            assert abs(ours[key] - theirs[key]) <= TOLERANCE, (key, ours["step"], ours[key], theirs[key])
    lora, plain_lora = (load_file(folder / "pytorch_lora_weights.safetensors") for folder in (out, plain_dir))
    assert lora.keys() == plain_lora.keys()
    assert max((lora[name] - plain_lora[name]).abs().max().item() for name in lora) <= TOLERANCE

    # The LoRA loads into plain diffusers and changes the images.
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    kwargs = dict(num_inference_steps=4, height=32, width=32, max_sequence_length=16, guidance_scale=1.0)
    base = pipe("a red image", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    pipe.load_lora_weights(out)
    tuned = pipe("a red image", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    assert np.abs(base - tuned).mean() > 1e-3
