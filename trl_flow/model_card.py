"""The model card (``README.md`` of the output folder, pushed with the model by ``push_to_hub``): the base model,
rewards, the recipe's non-default settings, final metrics and how to load the weights in diffusers."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

#: Settings that describe the machine or the bookkeeping, not the recipe.
_HOUSEKEEPING = {
    "accelerator_config",
    "dataloader_pin_memory",
    "disable_tqdm",
    "do_eval",
    "do_predict",
    "do_train",
    "generation_batch_size",  # derived from the batch sizes
    "resume_from_checkpoint",
    "use_cpu",
}


def recipe_of(args: Any, model: Any) -> dict:
    """The run's settings that differ from its config class's defaults (no paths, tokens or hub settings), and the
    LoRA of ``model`` (the unwrapped policy) if it has one."""
    defaults = {}
    for config_field in dataclasses.fields(type(args)):
        if config_field.default is not dataclasses.MISSING:
            defaults[config_field.name] = config_field.default
        elif config_field.default_factory is not dataclasses.MISSING:
            defaults[config_field.name] = config_field.default_factory()
    recipe = {}
    for name, value in args.to_dict().items():
        if name.startswith("_") or name in _HOUSEKEEPING or any(word in name for word in ("token", "hub", "_dir")):
            continue
        default = defaults.get(name, None)
        default = getattr(default, "value", default)
        if value is not None and value != default and value != [] and value != {}:
            recipe[name] = value
    if hasattr(model, "peft_config"):
        lora = model.peft_config["default"]
        recipe["lora"] = {
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "target_modules": sorted(lora.target_modules) if lora.target_modules else None,
        }
    return json.loads(json.dumps(recipe, default=str))


def _numbers(entry: dict, prefixes: tuple[str, ...]) -> dict[str, float]:
    return {
        key: value
        for key, value in entry.items()
        if key.startswith(prefixes) and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def write_model_card(
    output_dir: str,
    *,
    base_model: str | None,
    args: Any,
    model: Any,
    reward_weights: dict[str, float],
    log_history: list[dict],
    global_step: int,
    has_ema: bool,
    repo_id: str | None,
    tags: list[str],
) -> Path:
    """Write ``output_dir/README.md`` for a finished (or checkpointed) run; return its path."""
    if base_model and os.path.isdir(base_model):
        base_model = None  # a local folder means nothing to a reader of the card
    train = next((entry for entry in reversed(log_history) if "reward" in entry), {})
    evaluation = next((entry for entry in reversed(log_history) if "eval_reward" in entry), {})
    text = model_card_markdown(
        base_model=base_model,
        reward_weights=reward_weights,
        recipe=recipe_of(args, model),
        final_metrics=_numbers(train, ("reward", "kl", "loss", "clip_ratio/region_mean")),
        eval_metrics=_numbers(evaluation, ("eval_reward",)),
        global_step=global_step,
        is_lora=hasattr(model, "peft_config"),
        has_ema=has_ema,
        repo_id=repo_id,
        tags=tags,
    )
    os.makedirs(output_dir, exist_ok=True)
    path = Path(output_dir, "README.md")
    path.write_text(text)
    return path


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
