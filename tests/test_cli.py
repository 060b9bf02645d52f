"""End-to-end tests of the `trl-flow` console script, run as a subprocess (`python -m trl_flow.cli`).

Successful runs are few and shared through module-scoped fixtures; only the bad inputs are parametrized.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.factories import sample_tiny_sd3

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO_ROOT / "recipes" / "tiny.yaml"
SUMMARY_LINE = re.compile(r"^reward: -?\d+\.\d{4} -> -?\d+\.\d{4}", re.MULTILINE)
ERROR_PREFIX = "trl-flow: error: "


def run_cli(*args, cwd=REPO_ROOT, timeout=300):
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "trl_flow.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def describe(result) -> str:
    return (
        f"exit code {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n"
        f"--- stderr ---\n{result.stderr[-5000:]}"
    )


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


# --------------------------------------------------------------------------------------------- successful runs
@pytest.fixture(scope="module")
def tiny_run(tiny_sd3_path, tmp_path_factory):
    """One run of the shipped tiny recipe, shortened by command-line overrides."""
    output_dir = tmp_path_factory.mktemp("tiny_run") / "out"
    result = run_cli(
        "grpo",
        "--recipe",
        TINY_RECIPE,
        "--max_steps",
        "4",
        "--logging_steps",
        "1",
        "--learning_rate",
        "0.05",  # high, so that 4 steps visibly move the LoRA
        "--compare_to_base",
        "true",
        "--output_dir",
        output_dir,
    )
    assert result.returncode == 0, describe(result)
    return result, output_dir


COMPARISON_LINE = re.compile(
    r"^prompt_color: base (-?\d+\.\d{3}) -> trained (-?\d+\.\d{3}) \(mean\); gain ([+-]\d+\.\d{3}) \+- "
    r"(\d+\.\d{3})",
    re.MULTILINE,
)


def test_compare_to_base_prints_both_scores_and_writes_the_captioned_grid(tiny_run):
    result, output_dir = tiny_run
    match = COMPARISON_LINE.search(result.stdout)
    assert match, describe(result)
    base, trained, gain, _ = map(float, match.groups())
    assert gain == pytest.approx(trained - base, abs=2e-3)
    assert base != trained  # 4 updates at lr 0.05 move the policy
    assert "held-out prompts: " in result.stdout
    assert_png(output_dir / "comparison.png")
    with Image.open(output_dir / "comparison.png") as grid:
        assert grid.width == 4 * 160  # one column per held-out prompt of the tiny set (4), tiles of 160 px


REWARD_FILE = """
import json
from pathlib import Path

import numpy as np

CHANNEL = {"red": 0, "blue": 2}
SEEN = Path(__file__).with_name("seen.jsonl")


def fn(prompts, completions, target, **kwargs):
    with open(SEEN, "a") as f:
        f.write(json.dumps({"prompts": list(prompts), "target": list(target)}) + "\\n")
    scores = []
    for image, colour in zip(completions, target):
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        scores.append(float(pixels[..., CHANNEL[colour]].mean() - pixels.mean()))
    return scores
"""

CUSTOM_ROWS = [
    {"prompt": "a red image", "target": "red"},
    {"prompt": "a blue image", "target": "blue"},
    {"prompt": "a red square", "target": "red"},
    {"prompt": "a blue circle", "target": "blue"},
]


@pytest.fixture(scope="module")
def custom_run(tiny_sd3_path, tmp_path_factory):
    """A run on a local jsonl dataset with an extra column, scored by a reward from a user's .py file."""
    work = tmp_path_factory.mktemp("custom_run")
    (work / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CUSTOM_ROWS))
    (work / "my_reward.py").write_text(REWARD_FILE)
    output_dir = work / "out"
    result = run_cli(
        "grpo",
        "--recipe",
        TINY_RECIPE,
        "--dataset_name",
        "prompts.jsonl",  # relative to cwd
        "--reward_funcs",
        "my_reward.py:fn",
        "--max_steps",
        "2",
        "--logging_steps",
        "1",
        "--output_dir",
        output_dir,
        cwd=work,
    )
    assert result.returncode == 0, describe(result)
    return result, work, output_dir


def test_tiny_recipe_writes_state_lora_and_images(tiny_run):
    result, output_dir = tiny_run
    state = json.loads((output_dir / "trainer_state.json").read_text())
    rewards = [entry["reward"] for entry in state["log_history"] if "reward" in entry]
    assert rewards, state["log_history"]
    assert all(math.isfinite(r) for r in rewards)
    assert any("rewards/prompt_color/mean" in entry for entry in state["log_history"]), state["log_history"]
    assert (output_dir / "pytorch_lora_weights.safetensors").stat().st_size > 0
    assert_png(output_dir / "samples.png")
    assert_png(output_dir / "reward_curve.png")
    assert SUMMARY_LINE.search(result.stdout), describe(result)
    # diffusers' pipelines import image processors the run never uses; without torchvision, each warned at start
    assert "requires torchvision" not in result.stderr, describe(result)


def test_command_line_overrides_recipe(tiny_run):
    _, output_dir = tiny_run
    state = json.loads((output_dir / "trainer_state.json").read_text())
    # tiny.yaml says max_steps 200 and logging_steps 10; the flags win.
    assert state["global_step"] == 4
    assert state["max_steps"] == 4
    assert state["logging_steps"] == 1


def test_saved_lora_loads_into_plain_diffusers_pipeline(tiny_run, tiny_sd3_path):
    import torch
    from diffusers import StableDiffusion3Pipeline

    _, output_dir = tiny_run
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return sample_tiny_sd3(pipe)

    base = sample()
    np.testing.assert_array_equal(base, sample())  # same seed, same images: a difference below is the LoRA's
    pipe.load_lora_weights(str(output_dir))
    assert pipe.get_list_adapters(), "load_lora_weights loaded no adapter"
    tuned = sample()
    assert tuned.shape == base.shape
    assert np.isfinite(tuned).all()
    assert np.abs(tuned - base).max() > 1e-3, "the trained LoRA does not change the images"


def test_dataset_columns_reach_custom_reward_file(custom_run):
    result, work, output_dir = custom_run
    calls = [json.loads(line) for line in (work / "seen.jsonl").read_text().splitlines()]
    assert calls, "the custom reward was never called"
    seen_targets = set()
    for call in calls:
        assert len(call["target"]) == len(call["prompts"]) > 0
        for prompt, target in zip(call["prompts"], call["target"], strict=True):
            assert target in ("red", "blue")
            assert target in prompt, f"target {target!r} was handed to the reward with prompt {prompt!r}"
            seen_targets.add(target)
    assert seen_targets == {"red", "blue"}

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    means = [entry["rewards/fn/mean"] for entry in state["log_history"] if "rewards/fn/mean" in entry]
    assert means and all(math.isfinite(m) for m in means), state["log_history"]
    assert SUMMARY_LINE.search(result.stdout), describe(result)


# ------------------------------------------------------------------------------------------------- bad inputs
BAD_REWARDS = """
import math


def raises(prompts, completions, **kwargs):
    raise RuntimeError("reward server unreachable")


def too_few(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def nan(prompts, completions, **kwargs):
    return [math.nan] * len(completions)
"""


def _bad_recipe(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(TINY_RECIPE.read_text() + "\nnot_a_key: 1\n")
    return ["--recipe", recipe]


def _no_prompt_column(tmp_path):
    data = tmp_path / "text_only.jsonl"
    data.write_text('{"text": "a red image"}\n{"text": "a blue image"}\n')
    return ["--recipe", TINY_RECIPE, "--dataset_name", data]


def _bad_reward(name):
    def args(tmp_path):
        (tmp_path / "bad_rewards.py").write_text(BAD_REWARDS)
        return ["--recipe", TINY_RECIPE, "--reward_funcs", f"{tmp_path / 'bad_rewards.py'}:{name}"]

    return args


BAD_INPUTS = {
    # id: (args given a tmp folder, a regex the error line must match)
    "unknown_recipe_key": (_bad_recipe, r"unknown recipe key 'not_a_key'"),
    "wrong_type": (lambda tmp: ["--recipe", TINY_RECIPE, "--learning_rate", "fast"], r"--learning_rate.*'fast'"),
    "missing_recipe": (lambda tmp: ["--recipe", tmp / "nope.yaml"], r"recipe file not found: .*nope\.yaml"),
    "missing_dataset": (
        lambda tmp: ["--recipe", TINY_RECIPE, "--dataset_name", "missing.jsonl"],
        r"'missing\.jsonl' does not exist",
    ),
    "missing_prompt_column": (_no_prompt_column, r"no column 'prompt' \(available columns: text\)"),
    "unknown_reward": (
        lambda tmp: ["--recipe", TINY_RECIPE, "--reward_funcs", "no_such_reward"],
        r"unknown reward 'no_such_reward'",
    ),
    "reward_raises": (_bad_reward("raises"), r"bad_rewards\.py:raises' raised RuntimeError: reward server unreachable"),
    "reward_wrong_count": (_bad_reward("too_few"), r"bad_rewards\.py:too_few' returned (\d+) values for (\d+) images"),
    "reward_nan": (_bad_reward("nan"), r"bad_rewards\.py:nan' returned NaN"),
    "missing_resume_folder": (
        lambda tmp: ["--recipe", TINY_RECIPE, "--resume_from_checkpoint", tmp / "no-such-checkpoint"],
        r"--resume_from_checkpoint .*no-such-checkpoint: the folder does not exist",
    ),
    "tracker_not_installed": (
        lambda tmp: ["--recipe", TINY_RECIPE, "--report_to", "tensorboard"],
        r"report_to: tensorboard needs the 'tensorboard' package.*pip install 'trl-flow\[tensorboard\]'",
    ),
    "unloadable_model": (
        lambda tmp: ["--recipe", TINY_RECIPE, "--model_name_or_path", "/nonexistent/model"],
        r"could not load the diffusers pipeline '/nonexistent/model'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_exit_2(case, tmp_path, tiny_sd3_path):
    if case == "tracker_not_installed" and importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    make_args, pattern = BAD_INPUTS[case]
    output_dir = tmp_path / "out"
    assert not output_dir.exists()
    result = run_cli("grpo", *make_args(tmp_path), "--max_steps", "2", "--output_dir", output_dir, cwd=tmp_path)

    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    error_lines = [line for line in result.stderr.splitlines() if "trl-flow: error:" in line]
    assert len(error_lines) == 1, describe(result)
    assert error_lines[0].startswith(ERROR_PREFIX), describe(result)
    match = re.search(pattern, error_lines[0])
    assert match, f"{pattern!r} not in {error_lines[0]!r}"
    if case == "reward_wrong_count":
        assert int(match.group(1)) == int(match.group(2)) - 1
    assert not output_dir.exists(), f"{case}: a failed run left {sorted(p.name for p in output_dir.iterdir())}"


def test_grpo_help_lists_flow_keys():
    result = run_cli("grpo", "--help")
    assert result.returncode == 0, describe(result)
    for flag in ("--noise_level", "--num_inference_steps", "--dataset_name", "--reward_funcs", "--lora_r"):
        assert flag in result.stdout, flag


def test_env_prints_versions():
    result = run_cli("env")
    assert result.returncode == 0, describe(result)
    assert re.search(r"^trl: \d", result.stdout, re.MULTILINE), describe(result)
    assert re.search(r"^diffusers: \d", result.stdout, re.MULTILINE), describe(result)
