"""`trl-flow` command line: `trl-flow grpo --recipe R [--key value ...]`, `doctor`, `serve-reward`, `env`.

Recipes (YAML + flags) are parsed by `trl_flow.recipe`, which also builds the trainer they describe.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import UserInputError
from .recipe import build_trainer, describe_setup, parse_grpo_args, parser, resume_checkpoint

ACCELERATE_CONFIG_NAMES = {"ddp": "multi_gpu.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}


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


def _train(script_args, training_args, model_args) -> int:
    from .reporting import save_reward_curve, save_sample_grid

    resume_from = resume_checkpoint(training_args)
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
    if script_args.compare_to_base:
        _compare_to_base(trainer, script_args, output_dir)
    return 0


def _compare_to_base(trainer, script_args, output_dir: Path) -> None:
    """Base vs trained on the test split (`compare_to_base`): the summary lines and comparison.png."""
    from .comparison import compare_with_base, save_comparison_grid

    comparison = compare_with_base(
        trainer,
        trainer.test_split,
        images_per_prompt=script_args.compare_images_per_prompt,
        base_guidance_scale=script_args.compare_base_guidance_scale,
    )
    print("\n".join(comparison.summary_lines()))
    print(f"base vs trained images: {save_comparison_grid(comparison, output_dir / 'comparison.png')}")


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
                parser().print_help()
                return 0
            if "--accelerate_config" in rest:
                return _accelerate_relaunch(rest)
            return grpo(rest)
        if command == "env":
            return env()
        if command == "serve-reward":
            from .rewards.server import main_serve_reward

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
