"""Recipes: a YAML file of config keys plus command-line flags, parsed into the run's dataclasses, and the trainer
they describe. Used by `trl-flow grpo` (`trl_flow.cli`) and `trl-flow doctor` (`trl_flow.doctor`) alike.

A recipe is a YAML mapping of `FlowGRPOConfig`, TRL `ModelConfig` and `FlowScriptArguments` keys. Each recipe key
becomes a `--key value` flag placed before the command line's own flags, so argparse converts and checks every
value the same way wherever it came from, and a flag given on the command line wins over the recipe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserInputError

# Names usable in recipes instead of a hub id / path: things trl-flow builds or ships, so the demo needs no download.
BUILTIN_MODELS = (
    "trl-flow/tiny-sd3",
    "trl-flow/mini-geneval",
    "trl-flow/tiny-wan",
    "trl-flow/tiny-flux-kontext",
    "trl-flow/tiny-edit-kontext",
)
BUILTIN_DATASETS = (
    "trl-flow/tiny-prompts",
    "trl-flow/mini-geneval-prompts",
    "trl-flow/tiny-video-prompts",
    "trl-flow/tiny-edit",
)


@dataclass
class FlowScriptArguments:
    """Data, reward and model-family keys of a `trl-flow grpo` run (the rest are FlowGRPOConfig / ModelConfig)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: a hub dataset id, a local .txt/.jsonl/.json/.csv/.parquet file, a flow_grpo-style "
            "folder (train.txt/test.txt or *_metadata.jsonl), trl-flow/tiny-prompts, trl-flow/mini-geneval-prompts "
            "or trl-flow/tiny-edit (source images + edit prompts)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split used for evaluation."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    image_column: str = field(
        default="image",
        metadata={
            "help": "Column holding the source images of an image-editing dataset (file paths, relative to the "
            "dataset file's folder, or images); rewards get them as `source_images`."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["prompt_color"],
        metadata={"help": "Reward functions: built-in names, `package.module:function`, or `path/file.py:function`."},
    )
    model_family: str | None = field(
        default=None, metadata={"help": "Force a model adapter (e.g. sd3) instead of detecting it."}
    )
    compare_to_base: bool = field(
        default=False,
        metadata={
            "help": "After training, draw the test split's prompts with the base model and the trained policy from "
            "the same seeds (ODE), print both scores per reward (per tag with a `tag` column) and write "
            "comparison.png, each tile captioned with its prompt and rewards."
        },
    )
    compare_images_per_prompt: int = field(default=1, metadata={"help": "compare_to_base: images per test prompt."})
    compare_base_guidance_scale: float | None = field(
        default=None,
        metadata={
            "help": "compare_to_base: the base model's CFG scale (default guidance_scale), e.g. 4 when the policy "
            "was trained and is evaluated CFG-free: the base counts at its best setting."
        },
    )


def parser():
    """The `trl-flow grpo` argument parser: every FlowScriptArguments, FlowGRPOConfig and ModelConfig key."""
    from trl import ModelConfig, TrlParser

    from .config import FlowGRPOConfig

    class _Parser(TrlParser):
        def error(self, message):  # argparse would print usage and exit; we want one clear line
            raise UserInputError(message)

    return _Parser((FlowScriptArguments, FlowGRPOConfig, ModelConfig), prog="trl-flow grpo")


def _recipe_flags(recipe_path: str, parser) -> list[str]:
    """The recipe as command-line flags (unknown keys are refused here, naming the file)."""
    path = Path(recipe_path)
    if not path.is_file():
        raise UserInputError(f"recipe file not found: {recipe_path}")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserInputError(f"recipe {recipe_path} is not valid YAML: {error}") from error
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise UserInputError(f"recipe {recipe_path} must be a YAML mapping of key: value")
    known = {action.dest for action in parser._actions}
    flags: list[str] = []
    for key, value in recipe.items():
        if key not in known:
            raise UserInputError(
                f"unknown recipe key {key!r} in {recipe_path}; see `trl-flow grpo --help` for the valid keys"
            )
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, list):
            flags.extend(str(v) for v in value)
        elif isinstance(value, dict):
            flags.append(json.dumps(value))
        else:
            flags.append(str(value))
    return flags


def parse_grpo_args(argv: list[str]):
    """Recipe + flags -> (FlowScriptArguments, FlowGRPOConfig, ModelConfig)."""
    argument_parser = parser()
    argv = list(argv)
    recipe_flags: list[str] = []
    if "--recipe" in argv:
        index = argv.index("--recipe")
        if index + 1 >= len(argv):
            raise UserInputError("--recipe needs a path to a YAML file")
        recipe_path = argv[index + 1]
        del argv[index : index + 2]
        recipe_flags = _recipe_flags(recipe_path, argument_parser)
    try:
        return argument_parser.parse_args_into_dataclasses(args=recipe_flags + argv)
    except UserInputError:
        raise
    except (ValueError, TypeError) as error:
        raise UserInputError(str(error)) from error


def peft_config_for(model_args, adapter):
    """A LoRA config for the denoiser from TRL's ModelConfig keys (None when `use_peft` is off)."""
    if not model_args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or list(adapter.default_lora_target_modules),
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        init_lora_weights="gaussian",
    )


def resolve_model(name: str) -> str:
    if name == "trl-flow/tiny-sd3":
        from .offline_models.sd3 import ensure_tiny_sd3

        return str(ensure_tiny_sd3())
    if name == "trl-flow/tiny-wan":
        from .offline_models.wan import ensure_tiny_wan

        return str(ensure_tiny_wan())
    if name == "trl-flow/mini-geneval":  # ships with the package (trl_flow/mini/pretrained)
        from .offline_models.mini_geneval import ensure_mini_sd3

        return str(ensure_mini_sd3())
    if name == "trl-flow/tiny-flux-kontext":
        from .offline_models.flux_kontext import ensure_tiny_flux_kontext

        return str(ensure_tiny_flux_kontext())
    if name == "trl-flow/tiny-edit-kontext":  # the tiny Kontext pretrained to keep its source's shape
        from .offline_models.flux_kontext_edit import ensure_tiny_edit_kontext

        return str(ensure_tiny_edit_kontext())
    return name


def evaluates(training_args) -> bool:
    """Whether the run evaluates during training (and so hands the trainer an eval dataset)."""
    return training_args.eval_strategy != "no" or training_args.eval_on_start


def load_datasets(script_args, training_args, with_test_split: bool = False):
    """``(train, evaluation)`` datasets of a run; evaluation is None unless the run evaluates or
    ``with_test_split`` (compare_to_base also reads the test split)."""
    from .data import TINY_EVAL_PROMPTS_PATH, TINY_PROMPTS_PATH, TINY_VIDEO_PROMPTS_PATH, load_prompt_dataset

    wants_eval = evaluates(training_args) or with_test_split
    if script_args.dataset_name is None:
        raise UserInputError("no prompts: set dataset_name in the recipe or with --dataset_name")
    if script_args.dataset_name == "trl-flow/tiny-prompts":
        train = load_prompt_dataset(str(TINY_PROMPTS_PATH))
        evaluation = load_prompt_dataset(str(TINY_EVAL_PROMPTS_PATH))
    elif script_args.dataset_name == "trl-flow/tiny-video-prompts":  # balanced: evaluation uses the same two
        train = evaluation = load_prompt_dataset(str(TINY_VIDEO_PROMPTS_PATH))
    else:
        name = script_args.dataset_name
        if name == "trl-flow/mini-geneval-prompts":  # the shipped folder: train/test_metadata.jsonl
            from .mini.data import PROMPTS_DIR

            name = str(PROMPTS_DIR)
        elif name == "trl-flow/tiny-edit":  # the shipped folder: source PNGs + train/test_metadata.jsonl
            from .data import TINY_EDIT_DIR

            name = str(TINY_EDIT_DIR)
        load = dict(
            dataset_config=script_args.dataset_config,
            prompt_column=script_args.prompt_column,
            image_column=script_args.image_column,
        )
        train = load_prompt_dataset(name, split=script_args.dataset_train_split, **load)
        evaluation = None
        if wants_eval:
            evaluation = load_prompt_dataset(name, split=script_args.dataset_test_split, **load)
    return train, (evaluation if wants_eval else None)


def build_trainer(script_args, training_args, model_args):
    """The FlowGRPOTrainer a recipe describes (rewards, datasets, pipeline, LoRA), shared by `grpo` and `doctor`."""
    from .lifecycle import check_hub_access
    from .models import adapter_for_pipeline
    from .models.loading import load_pipeline
    from .rewards import resolve_reward_funcs
    from .trackers import check_trackers_installed
    from .trainer import FlowGRPOTrainer

    # Everything the user typed is checked before the long model load and before any output is written.
    check_hub_access(training_args)
    reward_funcs = resolve_reward_funcs(script_args.reward_funcs)
    train_dataset, test_split = load_datasets(script_args, training_args, script_args.compare_to_base)
    eval_dataset = test_split if evaluates(training_args) else None  # else read for compare_to_base only
    check_trackers_installed(training_args.report_to)
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else None
    pipeline = load_pipeline(resolve_model(model_args.model_name_or_path), dtype=dtype)
    adapter = adapter_for_pipeline(pipeline, script_args.model_family)
    trainer = FlowGRPOTrainer(
        model=pipeline,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config_for(model_args, adapter),
        model_family=script_args.model_family,
    )
    trainer.test_split = test_split  # compare_to_base's prompts (None unless evaluating or comparing)
    return trainer


def describe_setup(trainer) -> str:
    """One line on how the run is laid out: processes, engine, and the batch quantities that define the algorithm."""
    accelerator = trainer.accelerator
    engine = str(accelerator.distributed_type).split(".")[-1]
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        engine += f", ZeRO-{plugin.zero_stage}"
    quantities = effective_quantities(trainer.args, accelerator.num_processes)
    return (
        f"setup: {accelerator.num_processes} process(es) ({engine}); "
        f"{quantities['unique prompts per rollout batch']:g} prompts x {quantities['images per prompt']:g} images "
        f"per rollout batch; {quantities['images per optimizer update']:g} images per optimizer update; "
        f"{quantities['optimizer updates per rollout batch']:g} updates per rollout batch"
    )


def resume_checkpoint(training_args) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or true for the latest complete one in output_dir."""
    from .lifecycle import latest_checkpoint

    value = training_args.resume_from_checkpoint
    text = "" if value is None else str(value).strip()
    if text.lower() in ("", "false", "no", "none", "0"):
        return None
    if text.lower() in ("true", "yes", "1", "latest"):
        checkpoint = latest_checkpoint(training_args.output_dir)
        if checkpoint is None:
            raise UserInputError(
                f"--resume_from_checkpoint true: no complete checkpoint-N folder in {training_args.output_dir} "
                "(checkpoints are written every save_steps with save_strategy: steps)"
            )
        return checkpoint
    if not Path(text).exists():
        raise UserInputError(f"--resume_from_checkpoint {text}: the folder does not exist")
    if not (Path(text) / "trainer_state.json").is_file():
        raise UserInputError(
            f"--resume_from_checkpoint {text}: not a complete checkpoint folder (no trainer_state.json)"
        )
    return text


def effective_quantities(args, world_size: int) -> dict[str, float]:
    """The batch quantities that define the algorithm, over all processes."""
    images = args.generation_batch_size
    return {
        "processes": world_size,
        "unique prompts per rollout batch": images / args.num_generations,
        "images per prompt": args.num_generations,
        "images per optimizer update": args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps,
        "optimizer updates per rollout batch": args.steps_per_generation
        * args.num_iterations
        / args.gradient_accumulation_steps,
    }
