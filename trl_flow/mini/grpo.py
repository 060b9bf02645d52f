"""Flow-GRPO on the mini SD3 pipeline with the mini-GenEval reward: the settings of ``recipes/mini_geneval.yaml``.

:func:`make_mini_trainer` builds the trainer the recipe describes (used by ``benchmarks/mini_geneval.py`` and the
tests); :data:`MINI_GRPO_SETTINGS` are the recipe's :class:`~trl_flow.config.FlowGRPOConfig` values and
:data:`MINI_LORA` its LoRA settings (a test checks that the recipe and these agree).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from trl_flow.models.sd3 import SD3_ADALN_LORA_TARGETS, SD3Adapter

__all__ = [
    "MINI_ALGORITHM_SETTINGS",
    "MINI_GRPO_SETTINGS",
    "MINI_LORA",
    "MINI_REWARDS",
    "MINI_REWARD_WEIGHTS",
    "make_mini_trainer",
]

MINI_REWARDS: tuple[str, ...] = ("reward_funcs.mini_geneval:mini_geneval_partial", "mini_geneval")
"""The rewards: mini-GenEval with partial credit (trained on: a denser signal than the strict 0/1 score) and the
strict score (weight 0: logged only)."""

MINI_REWARD_WEIGHTS: tuple[float, ...] = (1.0, 0.0)

MINI_LORA: dict[str, Any] = {
    "r": 16,
    "lora_alpha": 32,
    "target_modules": [*SD3Adapter.default_lora_target_modules, *SD3_ADALN_LORA_TARGETS],
}
"""LoRA on the attention projections of both streams (the paper's targets) and on the AdaLN modulations."""

MINI_GRPO_SETTINGS: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "max_sequence_length": 16,
    "num_inference_steps": 8,
    "eval_num_inference_steps": 10,
    "guidance_scale": 4.0,
    "noise_level": 0.7,
    "sde_window_size": 2,
    "sde_window_range": [0, 4],
    "num_generations": 16,
    "per_device_train_batch_size": 32,
    "steps_per_generation": 2,
    "learning_rate": 1e-3,
    "beta": 0.0,
    "scale_rewards": "group",
    "reward_weights": list(MINI_REWARD_WEIGHTS),
    "max_steps": 120,
    "seed": 0,
}
"""FlowGRPOConfig values of the recipe (beyond output/logging keys)."""


_SHARED_FORWARD_PROCESS: dict[str, Any] = {
    # Trained on the guided velocity at the evaluation's CFG 4: CFG-free training (the papers' default) ended at a
    # held-out ~0.15 against the base's 0.32 at CFG 4, since this small model needs its guidance. At CFG 4, lr 3e-4
    # stayed flat and 3e-3 collapsed (0.24-0.25) in 6 minutes; 1e-3 is the best found.
    "train_guidance_scale": 4.0,
    "learning_rate": 1e-3,
    "beta": 1e-4,
}

MINI_ALGORITHM_SETTINGS: dict[str, dict[str, Any]] = {
    "flow_grpo": {"algorithm": "flow_grpo"},
    "grpo_guard": {"algorithm": "grpo_guard", "epsilon": 2e-6, "learning_rate": 1e-3},
    "nft": {**_SHARED_FORWARD_PROCESS, "algorithm": "nft"},
    "awm": {**_SHARED_FORWARD_PROCESS, "algorithm": "awm", "epsilon": 1.0},
}
"""Overrides of :data:`MINI_GRPO_SETTINGS` per algorithm for the mini-GenEval race (``benchmarks/mini_geneval.py``):
the best settings found (docs/mini_geneval.md says what was tried). ``guidance_scale`` is the evaluation's CFG."""


def make_mini_trainer(
    output_dir: str | os.PathLike,
    model_path: str | os.PathLike | None = None,
    reward_funcs: Sequence[Any] = MINI_REWARDS,
    train_split: str = "train",
    train_dataset: Any = None,
    balance_tags: bool = False,
    **overrides: Any,
):
    """A :class:`~trl_flow.trainer.FlowGRPOTrainer` on the mini model and the shipped train prompts.

    ``train_dataset`` (a ``datasets.Dataset`` with ``prompt`` / ``tag`` / ``include`` columns) replaces the shipped
    ``train_split`` prompts (each tag equally often with ``balance_tags``, see :func:`balanced_by_tag`);
    ``overrides`` replace entries of :data:`MINI_GRPO_SETTINGS` (or set other
    ``FlowGRPOConfig`` fields).
    """
    from peft import LoraConfig

    from trl_flow.config import FlowGRPOConfig
    from trl_flow.data import load_prompt_dataset
    from trl_flow.mini.data import PROMPTS_DIR
    from trl_flow.offline_models.mini_geneval import ensure_mini_sd3
    from trl_flow.trainer import FlowGRPOTrainer

    settings = dict(MINI_GRPO_SETTINGS)
    settings.update(
        output_dir=os.fspath(output_dir),
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=10,
    )
    settings.update(overrides)
    if "reward_weights" not in overrides and len(reward_funcs) != len(MINI_REWARD_WEIGHTS):
        settings["reward_weights"] = None
    lora = LoraConfig(**MINI_LORA, init_lora_weights="gaussian")
    if train_dataset is None and balance_tags:
        train_dataset = balanced_by_tag(load_prompt_dataset(str(PROMPTS_DIR), train_split))
    return FlowGRPOTrainer(
        os.fspath(model_path or ensure_mini_sd3()),
        reward_funcs=list(reward_funcs),
        args=FlowGRPOConfig(**settings),
        train_dataset=train_dataset
        if train_dataset is not None
        else load_prompt_dataset(str(PROMPTS_DIR), train_split),
        peft_config=lora,
    )


def balanced_by_tag(dataset):
    """``dataset`` with each tag's rows repeated so that every tag has about as many rows as the largest one: GenEval's
    score weighs tags equally, and the train split has 6 two-object prompts for each single-object one."""
    from collections import Counter

    counts = Counter(dataset["tag"])
    largest = max(counts.values())
    indices = [i for i, tag in enumerate(dataset["tag"]) for _ in range(round(largest / counts[tag]))]
    return dataset.select(indices)
