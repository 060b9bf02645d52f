"""The tiny edit task learns: on the pretrained tiny edit Kontext (`trl-flow/tiny-edit-kontext`), a short run with
`recipes/tiny_edit.yaml`'s settings raises `recolor_shape` on held-fixed seeds, and the base follows the source's
shape but not the prompt's colour (its reward starts at about 0)."""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from reward_funcs.edit_rules import recolor_shape
from trl_flow.data import SOURCE_IMAGES_COLUMN
from trl_flow.offline_models.cache import MARKER_FILE
from trl_flow.offline_models.flux_kontext_edit import edit_pairs
from trl_flow.recipe import build_trainer, parse_grpo_args, resolve_model

RECIPE = "recipes/tiny_edit.yaml"
SAMPLES_PER_ROW = 8


def held_fixed_reward(trainer, num_inference_steps: int) -> tuple[float, float]:
    """Mean `recolor_shape` of ODE edits of every (prompt, source) row, 8 held-fixed seeds each, and its standard
    error from the per-sample rewards."""
    rows = trainer.train_dataset
    prompts = [p for p in rows["prompt"] for _ in range(SAMPLES_PER_ROW)]
    sources = [s for s in rows[SOURCE_IMAGES_COLUMN] for _ in range(SAMPLES_PER_ROW)]
    images = trainer.generate_images(prompts, num_inference_steps, seed=1234, condition_images=sources)
    rewards = torch.tensor(recolor_shape(prompts, images, source_images=sources))
    return rewards.mean().item(), rewards.std().item() / len(rewards) ** 0.5


def test_pretraining_pairs_keep_the_sources_shape():
    sources, targets = edit_pairs(64, torch.Generator().manual_seed(0))
    shape = sources.mean(dim=1) > 0.5  # the light shape, as `recolor_shape` reads a source
    background = sources.amin(dim=(1, 2, 3))  # the source's dark grey, kept by its target outside the shape
    outside = (targets - background[:, None, None, None]).abs().amax(dim=1) < 1e-6
    assert torch.equal(shape, ~outside)
    assert 0.05 < shape.float().mean() < 0.95


def test_the_base_keeps_the_shape_but_ignores_the_prompts_colour():
    """The build's own measurements (marker file): 4 ODE steps on the tiny edit set's 12 rows x 4 seeds."""
    _, _, model = parse_grpo_args(["--recipe", RECIPE])
    metrics = json.loads((pathlib.Path(resolve_model(model.model_name_or_path)) / MARKER_FILE).read_text())["edit"]
    assert metrics["shape_contrast"] > 0.25, metrics
    assert abs(metrics["recolor_shape_mean"]) < 0.1, metrics


def test_the_tiny_edit_task_learns(tmp_path):
    """The recipe's settings, fewer updates. Measured (2 shared CPU cores, one thread): see the recipe's header."""
    script, config, model = parse_grpo_args(
        ["--recipe", RECIPE, "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true"]
    )
    torch.manual_seed(0)
    trainer = build_trainer(script, config, model)
    before, standard_error = held_fixed_reward(trainer, config.num_inference_steps)
    assert abs(before) < 4 * standard_error, (before, standard_error)  # the base ignores the prompt's colour
    trainer.train()
    after, _ = held_fixed_reward(trainer, config.num_inference_steps)
    print(f"recolor_shape: {before:.4f} -> {after:.4f}, initial standard error {standard_error:.4f}")
    assert after - before >= 4 * standard_error, (before, after, standard_error)
