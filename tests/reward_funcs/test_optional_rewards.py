"""Tests for the registry of model-based rewards (their scoring is tested in the per-reward test files).

`imagereward` and `hps` need no optional package any more (they run on transformers' BLIP and CLIP modules); see
test_imagereward.py and test_hps.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reward_funcs
from reward_funcs import BUILTIN_REWARDS, get_builtin_reward
from trl_flow.rewards import resolve_reward_func, reward_func_name

MODEL_REWARDS = [
    "aesthetic", "clipscore", "geneval", "hps", "image_similarity", "imagereward", "ocr", "pickscore", "vlm_judge",
]  # fmt: skip


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_registry_entries(name: str) -> None:
    func = get_builtin_reward(name)
    assert BUILTIN_REWARDS[name] == f"reward_funcs.{name}:{name}"
    assert callable(func) and func.__name__ == name == reward_func_name(func)
    assert not isinstance(func, torch.nn.Module)  # TRL would treat a Module as a text reward model
    assert resolve_reward_func(name) is func
    factory = getattr(sys.modules[f"reward_funcs.{name}"], f"make_{name}")
    assert factory(name=f"my_{name}").__name__ == f"my_{name}"


def test_importing_model_rewards_loads_nothing_heavy() -> None:
    root = Path(reward_funcs.__file__).resolve().parent.parent
    modules = ", ".join(f"reward_funcs.{name}" for name in MODEL_REWARDS)
    code = (
        f"import sys, {modules}, trl_flow.rewards.server; "
        "print(*[m in sys.modules for m in ('torch', 'transformers', 'PIL', 'rapidocr_onnxruntime')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["False", "False", "False", "False"]
