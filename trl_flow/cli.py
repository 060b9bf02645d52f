"""`trl-flow` command line: `trl-flow grpo --recipe R [--key value ...]`, `trl-flow env`.

A recipe is a YAML mapping of `FlowGRPOConfig`, TRL `ModelConfig` and `FlowScriptArguments` keys. Each recipe
key becomes a `--key value` flag placed before the command line's own flags, so argparse converts and checks every
value the same way wherever it came from, and a flag given on the command line wins over the recipe.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserInputError

# Names usable in recipes instead of a hub id / path: things trl-flow builds or ships, so the demo needs no download.
BUILTIN_MODELS = ("trl-flow/tiny-sd3", "trl-flow/mini-geneval")
BUILTIN_DATASETS = ("trl-flow/tiny-prompts", "trl-flow/mini-geneval-prompts")
ACCELERATE_CONFIG_NAMES = {"ddp": "multi_gpu.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}


@dataclass
class FlowScriptArguments:
    """Data, reward and model-family keys of a `trl-flow grpo` run (the rest are FlowGRPOConfig / ModelConfig)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: a hub dataset id, a local .txt/.jsonl/.json/.csv/.parquet file, a flow_grpo-style "
            "folder (train.txt/test.txt or *_metadata.jsonl), trl-flow/tiny-prompts or trl-flow/mini-geneval-prompts."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split used for evaluation."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["prompt_color"],
        metadata={"help": "Reward functions: built-in names, `package.module:function`, or `path/file.py:function`."},
    )
    model_family: str | None = field(
        default=None, metadata={"help": "Force a model adapter (e.g. sd3) instead of detecting it."}
    )


def _parser():
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
    parser = _parser()
    argv = list(argv)
    recipe_flags: list[str] = []
    if "--recipe" in argv:
        index = argv.index("--recipe")
        if index + 1 >= len(argv):
            raise UserInputError("--recipe needs a path to a YAML file")
        recipe_path = argv[index + 1]
        del argv[index : index + 2]
        recipe_flags = _recipe_flags(recipe_path, parser)
    try:
        return parser.parse_args_into_dataclasses(args=recipe_flags + argv)
    except UserInputError:
        raise
    except (ValueError, TypeError) as error:
        raise UserInputError(str(error)) from error


def _peft_config(model_args, adapter):
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


def _resolve_model(name: str) -> str:
    if name == "trl-flow/tiny-sd3":
        from .offline_models.sd3 import ensure_tiny_sd3

        return str(ensure_tiny_sd3())
    if name == "trl-flow/mini-geneval":  # ships with the package (trl_flow/mini/pretrained)
        from .offline_models.mini_geneval import ensure_mini_sd3

        return str(ensure_mini_sd3())
    return name


def _load_datasets(script_args, training_args):
    from .data import TINY_EVAL_PROMPTS_PATH, TINY_PROMPTS_PATH, load_prompt_dataset

    if script_args.dataset_name is None:
        raise UserInputError("no prompts: set dataset_name in the recipe or with --dataset_name")
    if script_args.dataset_name == "trl-flow/tiny-prompts":
        train = load_prompt_dataset(str(TINY_PROMPTS_PATH))
        evaluation = load_prompt_dataset(str(TINY_EVAL_PROMPTS_PATH))
    else:
        name = script_args.dataset_name
        if name == "trl-flow/mini-geneval-prompts":  # the shipped folder: train/test_metadata.jsonl
            from .mini.data import PROMPTS_DIR

            name = str(PROMPTS_DIR)
        load = dict(dataset_config=script_args.dataset_config, prompt_column=script_args.prompt_column)
        train = load_prompt_dataset(name, split=script_args.dataset_train_split, **load)
        evaluation = None
        if training_args.eval_strategy != "no" or training_args.eval_on_start:
            evaluation = load_prompt_dataset(name, split=script_args.dataset_test_split, **load)
    wants_eval = training_args.eval_strategy != "no" or training_args.eval_on_start
    return train, (evaluation if wants_eval else None)


def _clean_failed_output(output_dir: Path, existed_before: bool) -> None:
    """After a failed run, remove what it wrote, unless it holds a checkpoint (trained work is never deleted)."""
    if existed_before or not output_dir.exists():
        return
    if any(output_dir.glob("checkpoint-*")):
        return
    shutil.rmtree(output_dir, ignore_errors=True)


def grpo(argv: list[str]) -> int:
    """`trl-flow grpo`: train with Flow-GRPO as a recipe (and flags) say."""
    script_args, training_args, model_args = parse_grpo_args(argv)
    if model_args.model_name_or_path is None:
        raise UserInputError("no model: set model_name_or_path in the recipe or with --model_name_or_path")

    output_dir = Path(training_args.output_dir)
    existed_before = output_dir.exists()
    try:
        return _train(script_args, training_args, model_args)
    except BaseException:
        _clean_failed_output(output_dir, existed_before)
        raise


def build_trainer(script_args, training_args, model_args):
    """The FlowGRPOTrainer a recipe describes (rewards, datasets, pipeline, LoRA), shared by `grpo` and `doctor`."""
    from .models import adapter_for_pipeline
    from .rewards import resolve_reward_funcs
    from .trainer import FlowGRPOTrainer, check_hub_access, load_pipeline

    # Everything the user typed is checked before the long model load and before any output is written.
    check_hub_access(training_args)
    reward_funcs = resolve_reward_funcs(script_args.reward_funcs)
    train_dataset, eval_dataset = _load_datasets(script_args, training_args)
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else None
    pipeline = load_pipeline(_resolve_model(model_args.model_name_or_path), dtype=dtype)
    adapter = adapter_for_pipeline(pipeline, script_args.model_family)
    return FlowGRPOTrainer(
        model=pipeline,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=_peft_config(model_args, adapter),
        model_family=script_args.model_family,
    )


def describe_setup(trainer) -> str:
    """One line on how the run is laid out: processes, engine, and the batch quantities that define the algorithm."""
    from .doctor import effective_quantities

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


def _resume_checkpoint(training_args) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or true for the latest complete one in output_dir."""
    from .trainer import latest_checkpoint

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
    if not (Path(text) / "trainer_state.json").is_file():
        raise UserInputError(
            f"--resume_from_checkpoint {text}: not a complete checkpoint folder (no trainer_state.json)"
        )
    return text


def _train(script_args, training_args, model_args) -> int:
    from .reporting import save_reward_curve, save_sample_grid

    resume_from = _resume_checkpoint(training_args)
    trainer = build_trainer(script_args, training_args, model_args)
    if trainer.accelerator.is_main_process:
        print(describe_setup(trainer), flush=True)
        if resume_from is not None:
            print(f"resuming from {resume_from}", flush=True)
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(training_args.output_dir)
    if not trainer.accelerator.is_main_process:
        return 0
    trainer.save_state()
    trainer.create_model_card()
    output_dir = Path(training_args.output_dir)
    curve = save_reward_curve(trainer.state.log_history, output_dir / "reward_curve.png")
    images = trainer.sample_images()  # none when a resumed run only finished a buffered generation batch
    grid = save_sample_grid(images, output_dir / "samples.png") if images else "none (no rollout in this run)"
    print(summarize_rewards(trainer.state.log_history))
    print(f"LoRA / model, trainer_state.json: {output_dir}")
    print(f"reward curve: {curve}\nsample grid: {grid}")
    return 0


def summarize_rewards(log_history: list[dict]) -> str:
    """One line: the mean logged reward of the first and of the last tenth of the run."""
    rewards = [entry["reward"] for entry in log_history if entry.get("reward") is not None]
    if not rewards:
        return "reward: nothing logged"
    window = max(1, len(rewards) // 10)
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    return f"reward: {first:.4f} -> {last:.4f} (mean of the first and last {window} of {len(rewards)} logs)"


def env() -> int:
    """`trl-flow env`: versions to paste into a bug report."""
    import importlib.metadata as metadata

    lines = [f"platform: {platform.platform()}", f"python: {platform.python_version()}"]
    for package in (
        "trl-flow",
        "trl",
        "torch",
        "diffusers",
        "transformers",
        "peft",
        "accelerate",
        "datasets",
        "deepspeed",
    ):
        try:
            lines.append(f"{package}: {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{package}: not installed")
    import torch

    lines.append(f"cuda available: {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)")
    print("\n".join(lines))
    return 0


def _accelerate_relaunch(argv: list[str]) -> int:
    """`--accelerate_config NAME_OR_PATH`: re-run this command under `accelerate launch`, as `trl` does."""
    index = argv.index("--accelerate_config")
    if index + 1 >= len(argv):
        raise UserInputError("--accelerate_config needs a name (ddp, zero2, zero3) or a path")
    name = argv[index + 1]
    rest = argv[:index] + argv[index + 2 :]
    if name in ACCELERATE_CONFIG_NAMES:
        import trl

        config = Path(trl.__file__).parent / "accelerate_configs" / ACCELERATE_CONFIG_NAMES[name]
    else:
        config = Path(name)
    if not config.is_file():
        raise UserInputError(
            f"accelerate config {name!r} not found: use one of {', '.join(ACCELERATE_CONFIG_NAMES)} or a file path"
        )
    command = ["accelerate", "launch", "--config_file", str(config), "-m", "trl_flow.cli", "grpo", *rest]
    return subprocess.call(command, env=os.environ.copy())


USAGE = """usage: trl-flow <command> [options]

commands:
  grpo --recipe RECIPE.yaml [--key value ...]   train with Flow-GRPO (flags override recipe keys;
                                                 --accelerate_config ddp|zero2|zero3|FILE relaunches
                                                 through accelerate; --help lists every key)
  doctor --recipe RECIPE.yaml [--key value ...] pre-flight checks of a recipe (exit 1 if one fails)
  serve-reward NAME [--host H] [--port P] [--token T]
                                                serve a reward over HTTP (use as http://H:P/NAME)
  env                                           print versions for bug reports
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trl-flow` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "grpo":
            if "-h" in rest or "--help" in rest:
                _parser().print_help()
                return 0
            if "--accelerate_config" in rest:
                return _accelerate_relaunch(rest)
            return grpo(rest)
        if command == "env":
            return env()
        if command == "serve-reward":
            from .serve import main_serve_reward

            return main_serve_reward(rest)
        if command == "doctor":
            from .doctor import doctor

            return doctor(rest)
        raise UserInputError(f"unknown command {command!r}; commands: grpo, doctor, serve-reward, env")
    except UserInputError as error:
        _close_progress_bars()  # else a bar left open mid-training shares the error's line on stderr
        print(f"trl-flow: error: {error}", file=sys.stderr)
        return 2


def _close_progress_bars() -> None:
    """Close the tqdm bars still open (e.g. the Trainer's, when a reward fails mid-run): each ends its line."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
