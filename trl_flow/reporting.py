"""Pictures of a run: a grid of sample images and a reward curve, written as PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image


def _write_atomically(save, path: Path) -> Path:
    """Write to a temporary name, then rename: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save(partial)
    os.replace(partial, path)
    return path


def save_sample_grid(
    images: list[Image.Image], path: str | os.PathLike, columns: int | None = None, min_tile: int = 128
) -> Path:
    """Tile ``images`` (all the same size) into one PNG, row by row; tiny images are enlarged to ``min_tile``."""
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    scale = max(1, math.ceil(min_tile / max(images[0].size)))
    if scale > 1:  # nearest neighbour keeps a 32 px image's pixels visible as they are
        images = [image.resize((image.width * scale, image.height * scale), Image.NEAREST) for image in images]
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return _write_atomically(lambda p: grid.save(p, format="PNG"), Path(path))


def save_reward_curve(log_history: list[dict], path: str | os.PathLike) -> Path:
    """Plot ``reward`` (and ``eval_reward`` when present) against the step from a Trainer's log history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for key, label in (("reward", "train reward"), ("eval_reward", "eval reward")):
        points = [(entry["step"], entry[key]) for entry in log_history if entry.get(key) is not None]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o", markersize=3, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("reward")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    try:
        return _write_atomically(lambda p: figure.savefig(p, format="png"), Path(path))
    finally:
        plt.close(figure)


def model_card_markdown(
    *,
    base_model: str | None,
    reward_weights: dict[str, float],
    recipe: dict,
    final_metrics: dict[str, float],
    eval_metrics: dict[str, float],
    global_step: int,
    is_lora: bool,
    has_ema: bool,
    repo_id: str | None = None,
    tags: list[str] | None = None,
) -> str:
    """A model card (README.md, with hub metadata) for a Flow-GRPO run: base model, rewards, recipe, final metrics,
    and how to load the result in diffusers."""
    import yaml

    metadata: dict = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags or []}
    if base_model:
        metadata["base_model"] = base_model
    where = repo_id or "path/to/this/folder"
    pipeline_source = base_model or "path/to/the/base/pipeline"
    if is_lora:
        load = f'pipe = DiffusionPipeline.from_pretrained("{pipeline_source}")\npipe.load_lora_weights("{where}")' + (
            f'  # EMA weights: pipe.load_lora_weights("{where}", subfolder="ema")' if has_ema else ""
        )
    else:
        load = (
            f'transformer = AutoModel.from_pretrained("{where}", subfolder="transformer")\n'
            f'pipe = DiffusionPipeline.from_pretrained("{pipeline_source}", transformer=transformer)'
        )

    def table(metrics: dict[str, float]) -> str:
        if not metrics:
            return "(none logged)\n"
        rows = "".join(f"| {name} | {value:.4g} |\n" for name, value in metrics.items())
        return "| metric | value |\n|---|---|\n" + rows

    rewards = "".join(f"- `{name}` (weight {weight:g})\n" for name, weight in reward_weights.items())
    weights = "a LoRA of the denoiser" if is_lora else "the fine-tuned denoiser (`transformer/`)"
    ema = " An exponential moving average of the weights is in `ema/`." if has_ema else ""
    source = f"`{base_model}`" if base_model else "a local pipeline"
    imports = "DiffusionPipeline" if is_lora else "AutoModel, DiffusionPipeline"
    return (
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n\n"
        f"# {repo_id.split('/')[-1] if repo_id else 'Flow-GRPO model'}\n\n"
        f"{weights[0].upper() + weights[1:]} of {source}, trained for {global_step} optimizer steps with Flow-GRPO "
        f"(online RL for flow-matching models) using trl-flow, a subclass of TRL's `GRPOTrainer`.{ema}\n\n"
        f"## Use it with diffusers\n\n```python\nfrom diffusers import {imports}\n\n{load}\n"
        'image = pipe("a photo of a cat").images[0]\n```\n\n'
        f"## Rewards\n\n{rewards}\n"
        f"## Final metrics\n\nTraining (last log, step {global_step}):\n\n{table(final_metrics)}\n"
        f"Evaluation (last evaluation):\n\n{table(eval_metrics)}\n"
        f"## Training recipe\n\nSettings that differ from trl-flow's defaults:\n\n"
        f"```yaml\n{yaml.safe_dump(recipe, sort_keys=True) if recipe else '{}'}```\n"
    )
