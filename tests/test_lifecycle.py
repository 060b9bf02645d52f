"""Training lifecycle: evaluation (with EMA weights), sample grids and tracker images, the reward curve, atomic
checkpoints that load in diffusers, exact resume after a SIGKILL, push_to_hub refused offline.

The kill/resume check runs the console script as subprocesses; the rest run in-process on the tiny SD3 pipeline.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint
from trl.trainer.utils import RepeatSampler

from tests.factories import sample_tiny_sd3, tiny_trainer
from trl_flow import cli
from trl_flow.callbacks import EvalSample, ParameterEMA, log_samples_to_trackers
from trl_flow.config import FlowGRPOConfig
from trl_flow.data import TINY_EVAL_PROMPTS_PATH, TINY_PROMPTS_PATH, load_prompt_dataset
from trl_flow.errors import UserInputError
from trl_flow.lifecycle import EpochSeededRepeatSampler, latest_checkpoint
from trl_flow.trainer import FlowGRPOTrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO_ROOT / "recipes" / "tiny.yaml"
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are too small to gain from threads, and on a shared 2-core machine idle-spinning OpenMP
    threads cost more than they give (measured: several times faster with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_trainer(model_path, output_dir, reward_funcs=("prompt_color",), train_prompts=None, lora=True, **overrides):
    """The tiny settings of tests.factories, plus an evaluation set (the tiny eval prompts)."""
    evaluation = dict(
        eval_num_inference_steps=4,
        num_generations_eval=2,
        per_device_eval_batch_size=8,  # the 4 eval prompts x 2 images: one evaluation batch
    )
    train = load_prompt_dataset(str(TINY_PROMPTS_PATH))
    if train_prompts is not None:
        train = train.select(range(train_prompts))
    return tiny_trainer(
        model_path,
        output_dir,
        reward_funcs=reward_funcs,
        lora=lora,
        train_dataset=train,
        eval_dataset=load_prompt_dataset(str(TINY_EVAL_PROMPTS_PATH)),
        **{**evaluation, **overrides},
    )


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[name].float() - b[name].float()).abs().max().item() for name in a)


def grid_size(num_images: int, tile: int = 128) -> tuple[int, int]:
    """The size `save_sample_grid` gives ``num_images`` 32 px images (enlarged to 128 px tiles)."""
    columns = math.ceil(math.sqrt(num_images))
    return columns * tile, math.ceil(num_images / columns) * tile


def assert_png(path: Path, size: tuple[int, int] | None = None) -> None:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as image:
        assert image.format == "PNG"
        if size is not None:
            assert image.size == size, (path, image.size, size)
        image.verify()


# ------------------------------------------------------------------------------------- evaluation, EMA, images
def test_evaluation_runs_on_start_and_every_eval_steps_with_the_ema_weights(tiny_sd3_path, tmp_path):
    holder = {}

    def probe(prompts, completions, **kwargs):
        """Records the value of one LoRA weight at scoring time: raw weights in training, EMA ones in evaluation."""
        holder.setdefault("seen", []).append((holder["trainer"].model.training, holder["param"].detach().clone()))
        return [0.0] * len(completions)

    trainer = build_trainer(
        tiny_sd3_path,
        tmp_path / "out",
        reward_funcs=("prompt_color", probe),
        max_steps=2,
        learning_rate=5e-2,
        eval_strategy="steps",
        eval_steps=2,
        eval_on_start=True,
        ema=True,
        ema_update_every=1,
    )
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    holder.update(trainer=trainer, param=param)
    trainer.train()
    output_dir = Path(trainer.args.output_dir)

    evaluations = [entry for entry in trainer.state.log_history if "eval_reward" in entry]
    assert [entry["step"] for entry in evaluations] == [0, 2]
    for entry in evaluations:
        assert math.isfinite(entry["eval_reward"])
        assert "eval_rewards/prompt_color/mean" in entry and "eval_rewards/probe/mean" in entry

    # One grid per evaluation, one tile per evaluation image (4 prompts x 2), and its captions.
    for step in (0, 2):
        grid = output_dir / "samples" / f"eval_step_{step:06d}.png"
        assert_png(grid, grid_size(8))
        captions = json.loads(grid.with_suffix(".json").read_text())["samples"]
        assert len(captions) == 8
        assert {c["prompt"] for c in captions} == set(load_prompt_dataset(str(TINY_EVAL_PROMPTS_PATH))["prompt"])
    assert_png(output_dir / "reward_curve.png")

    # The EMA moved away from the raw weights, and the last evaluation scored images of the EMA weights.
    ema, raw = trainer.ema.shadow[name], param.detach()
    assert not torch.equal(ema, raw.float())
    seen_in_eval = [value for training, value in holder["seen"] if not training]
    seen_in_training = [value for training, value in holder["seen"] if training]
    assert len(seen_in_eval) == 2 and seen_in_training
    assert torch.equal(seen_in_eval[-1], ema.to(raw.dtype))
    assert not torch.equal(seen_in_eval[-1], raw)
    assert torch.equal(param.detach(), raw)  # swapped back after evaluation

    samples = trainer.eval_samples
    prompts = [sample.prompt for sample in samples]
    with trainer.ema_weights():
        regenerated = trainer.generate_images(prompts, seed=trainer.args.seed)
    for sample, image in zip(samples, regenerated, strict=True):
        assert np.array_equal(np.asarray(sample.image), np.asarray(image))
    assert all(set(sample.rewards) == {"prompt_color", "probe"} for sample in samples)


def test_parameter_ema_update_and_exact_swap():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = ParameterEMA([("w", weight)], decay=0.9, update_every=8)
    with torch.no_grad():
        weight.copy_(torch.tensor([3.0, 6.0]))
    ema.update(step=8)  # warm-up: decay min(0.9, 9 / 18) = 0.5
    assert torch.allclose(ema.shadow["w"], torch.tensor([2.0, 4.0]))
    assert ema.decay_at(1000) == 0.9
    with ema.applied():
        assert torch.equal(weight.detach(), torch.tensor([2.0, 4.0]))
    assert torch.equal(weight.detach(), torch.tensor([3.0, 6.0]))


class _FakeTracker(types.ModuleType):
    def __init__(self, name):
        super().__init__(name)
        self.run = object()
        self.logged = []

    def Image(self, image, caption=None):  # noqa: N802 - the trackers' own spelling
        return ("image", image.size, caption)

    def log(self, data, **kwargs):
        self.logged.append(data)


class _FakeWriter:
    def __init__(self):
        self.images, self.texts = [], []

    def add_image(self, tag, array, step, dataformats):
        self.images.append((tag, array.shape, step, dataformats))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))


def test_samples_reach_every_image_tracker_in_report_to(monkeypatch):
    wandb, trackio = _FakeTracker("wandb"), _FakeTracker("trackio")
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    writer = _FakeWriter()
    samples = [
        EvalSample("a red image", Image.new("RGB", (32, 32), "red"), 0.5, {"prompt_color": 0.5}),
        EvalSample("a blue image", Image.new("RGB", (32, 32), "blue"), -0.25, {"prompt_color": -0.25}),
    ]
    grid = Image.new("RGB", (256, 128))

    logged = log_samples_to_trackers(samples, grid, 7, ["wandb", "trackio", "tensorboard"], writer)
    assert logged == ["wandb", "trackio", "tensorboard"]
    for tracker in (wandb, trackio):
        (entry,) = tracker.logged
        assert entry["train/global_step"] == 7
        assert [caption for _, _, caption in entry["eval/samples"]] == [
            "a red image | reward 0.500",
            "a blue image | reward -0.250",
        ]
    assert writer.images == [("eval/samples", (128, 256, 3), 7, "HWC")]
    assert "a blue image" in writer.texts[0][1]
    # Only the trackers the run reports to; wandb without an active run is skipped.
    wandb.run = None
    assert log_samples_to_trackers(samples, grid, 8, ["wandb", "tensorboard"], None) == []


# ------------------------------------------------------------------------------------ checkpoints and resume
def test_sampler_order_of_an_epoch_does_not_depend_on_earlier_passes():
    def make():
        return RepeatSampler(list(range(12)), mini_repeat_count=2, batch_size=2, repeat_count=2, shuffle=True, seed=3)

    natural = make()
    natural_epochs = [list(natural) for _ in range(3)]
    continuing = EpochSeededRepeatSampler.from_sampler(make())
    for epoch in range(3):
        continuing.set_epoch(epoch)
        assert list(continuing) == natural_epochs[epoch]
    resumed = EpochSeededRepeatSampler.from_sampler(make())  # a new sampler, as after a resume in epoch 2
    resumed.set_epoch(2)
    assert list(resumed) == natural_epochs[2]
    assert natural_epochs[0] != natural_epochs[2]


class Killed(Exception):
    pass


def test_crash_while_saving_leaves_previous_checkpoint_and_resume_across_an_epoch_is_exact(
    tiny_sd3_path, tmp_path, monkeypatch
):
    # 4 prompts = 2 generation batches of 2 prompts = 4 optimizer steps per epoch.
    common = dict(train_prompts=4, max_steps=6, learning_rate=5e-2, ema=True, ema_update_every=2)
    reference = build_trainer(tiny_sd3_path, tmp_path / "reference", **common)
    reference.train()
    reference_weights = {n: p.detach().clone() for n, p in reference.model.named_parameters() if p.requires_grad}
    reference_ema = {n: t.clone() for n, t in reference.ema.shadow.items()}

    output_dir = tmp_path / "run"
    crashing = build_trainer(tiny_sd3_path, output_dir, save_strategy="steps", save_steps=2, **common)
    real_save_rng_state = FlowGRPOTrainer._save_rng_state

    def save_rng_state_or_die(self, checkpoint_dir):
        if self.state.global_step == 6:
            raise Killed("killed while saving")
        real_save_rng_state(self, checkpoint_dir)

    monkeypatch.setattr(FlowGRPOTrainer, "_save_rng_state", save_rng_state_or_die)
    with pytest.raises(Killed):
        crashing.train()
    monkeypatch.undo()

    names = sorted(p.name for p in output_dir.iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-2", "checkpoint-4", "tmp-checkpoint-6"], names
    assert (output_dir / "tmp-checkpoint-6" / LORA_FILE).is_file()  # half-written: weights but no trainer state
    assert get_last_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-4")
    assert latest_checkpoint(output_dir) == str(output_dir / "checkpoint-4")

    # checkpoint-4 ends epoch 0: the resumed run must draw epoch 1's prompt order, not epoch 0's again.
    resumed = build_trainer(tiny_sd3_path, output_dir, save_strategy="steps", save_steps=2, **common)
    resumed.train(resume_from_checkpoint=True)
    weights = {n: p.detach().clone() for n, p in resumed.model.named_parameters() if p.requires_grad}
    diff = max_abs_diff(weights, reference_weights)
    ema_diff = max_abs_diff(resumed.ema.shadow, reference_ema)
    print(f"resumed at an epoch boundary: max |weight diff| {diff:.3g}, max |EMA diff| {ema_diff:.3g}")
    assert diff <= 1e-5 and ema_diff <= 1e-5
    names = sorted(p.name for p in output_dir.iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6"], names  # the stale temp folder is gone


def test_full_fine_tuning_checkpoint_holds_diffusers_transformer_and_ema(tiny_sd3_path, tmp_path):
    trainer = build_trainer(
        tiny_sd3_path,
        tmp_path / "out",
        lora=False,
        max_steps=1,
        steps_per_generation=1,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=1,
        ema=True,
        ema_update_every=1,
    )
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    raw = SD3Transformer2DModel.from_pretrained(checkpoint / "transformer")
    ema = SD3Transformer2DModel.from_pretrained(checkpoint / "ema" / "transformer")
    trained = trainer.accelerator.unwrap_model(trainer.model).denoiser.state_dict()
    assert max_abs_diff(raw.state_dict(), trained) == 0.0
    assert max_abs_diff(ema.state_dict(), trained) > 0.0
    assert (checkpoint / "ema_state.safetensors").is_file()
    weight_files = [p for p in checkpoint.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert {p.name for p in weight_files} <= {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}


# ---------------------------------------------------------------------------------- the console script, killed
RUN_FLAGS = [
    "--max_steps", "6",
    "--logging_steps", "1",
    "--learning_rate", "0.05",
    "--save_strategy", "steps",
    "--save_steps", "3",  # inside a generation batch (steps_per_generation 2): resuming needs TRL's buffer
    "--save_total_limit", "1",
    "--eval_strategy", "steps",
    "--eval_steps", "3",
    "--eval_on_start", "true",
    "--eval_num_inference_steps", "4",
    "--num_generations_eval", "2",
    "--per_device_eval_batch_size", "8",
    "--ema", "true",
    "--ema_update_every", "2",
]  # fmt: skip


def cli_process(output_dir: Path, log_name: str, *extra: str) -> subprocess.Popen:
    """`trl-flow grpo` on the tiny recipe with RUN_FLAGS, in the background; output in ``log_name`` beside it."""
    # Two of these run at once on small machines: one thread each, else spinning OpenMP threads starve both.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "trl_flow.cli", "grpo", "--recipe", str(TINY_RECIPE), *RUN_FLAGS]
    command += ["--output_dir", str(output_dir), *extra]
    with open(output_dir.parent / log_name, "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    process.wait(timeout=timeout)
    assert process.returncode == 0, f"exit code {process.returncode}\n{log.read_text()[-5000:]}"


@pytest.fixture(scope="module")
def killed_and_resumed_runs(tiny_sd3_path, tmp_path_factory):
    """An uninterrupted run, and a run of the same recipe SIGKILLed after its first checkpoint and resumed."""
    root = tmp_path_factory.mktemp("kill")
    uninterrupted, killed = root / "uninterrupted", root / "killed"
    full = cli_process(uninterrupted, "uninterrupted.log")
    victim = cli_process(killed, "killed.log")
    checkpoint = killed / "checkpoint-3"
    deadline = time.monotonic() + 300
    while not checkpoint.is_dir() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.kill()  # SIGKILL: no handler, no cleanup
    victim.wait()
    assert victim.returncode == -9, f"the run ended by itself (exit {victim.returncode}) before it could be killed"
    assert checkpoint.is_dir() and not (killed / "checkpoint-6").exists()

    # A save killed midway: a temporary folder with some of the files; resuming must ignore it.
    half = killed / "tmp-checkpoint-6"
    shutil.copytree(checkpoint, half)
    (half / "trainer_state.json").unlink()
    (half / LORA_FILE).write_bytes((half / LORA_FILE).read_bytes()[:100])
    assert get_last_checkpoint(str(killed)) == str(checkpoint)
    shutil.copytree(checkpoint, root / "saved-checkpoint-3")  # the resumed run's rotation will delete it

    finish(cli_process(killed, "resumed.log", "--resume_from_checkpoint", "true"), root / "resumed.log")
    finish(full, root / "uninterrupted.log")
    return uninterrupted, killed


def test_killed_and_resumed_run_ends_with_the_same_weights(killed_and_resumed_runs):
    uninterrupted, killed = killed_and_resumed_runs
    assert f"resuming from {killed / 'checkpoint-3'}" in (killed.parent / "resumed.log").read_text()
    for name in (LORA_FILE, f"ema/{LORA_FILE}"):
        diff = max_abs_diff(load_file(uninterrupted / name), load_file(killed / name))
        print(f"{name}: max |uninterrupted - killed and resumed| = {diff:.3g}")
        assert diff <= 1e-5
    final_eval = []
    for run in (uninterrupted, killed):
        history = json.loads((run / "trainer_state.json").read_text())["log_history"]
        final_eval.append([e["eval_reward"] for e in history if "eval_reward" in e and e["step"] == 6])
    assert final_eval[0] == final_eval[1] and len(final_eval[0]) == 1
    for run in (uninterrupted, killed):  # save_total_limit 1; the half-written folder was cleaned away
        assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-6"]


def test_run_writes_eval_metrics_grids_curve_ema_and_model_card(killed_and_resumed_runs):
    output_dir, _ = killed_and_resumed_runs
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_reward" in entry]
    assert [entry["step"] for entry in evaluations] == [0, 3, 6]
    assert all("eval_rewards/prompt_color/mean" in entry for entry in evaluations)
    for step in (0, 3, 6):
        assert_png(output_dir / "samples" / f"eval_step_{step:06d}.png", grid_size(8))
    assert_png(output_dir / "reward_curve.png")
    raw, ema = load_file(output_dir / LORA_FILE), load_file(output_dir / "ema" / LORA_FILE)
    assert max_abs_diff(raw, ema) > 0
    card = (output_dir / "README.md").read_text()
    assert "Flow-GRPO" in card and "`prompt_color` (weight 1)" in card and "load_lora_weights" in card
    assert "eval_reward" in card and "ema: true" in card


def test_checkpoint_lora_loads_into_a_plain_diffusers_pipeline(killed_and_resumed_runs, tiny_sd3_path):
    checkpoint = killed_and_resumed_runs[0] / "checkpoint-6"
    assert not any(p.suffix == ".bin" and p.name != "training_args.bin" for p in checkpoint.rglob("*"))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return sample_tiny_sd3(pipe)

    base = sample()
    pipe.load_lora_weights(str(checkpoint), adapter_name="raw")
    raw = sample()
    assert np.abs(raw - base).max() > 1e-3, "the checkpoint's LoRA does not change the images"
    pipe.load_lora_weights(str(checkpoint / "ema"), adapter_name="ema")
    pipe.set_adapters("ema")
    ema = sample()
    assert np.abs(ema - base).max() > 1e-3 and not np.array_equal(ema, raw)


def test_resume_from_a_path_can_end_inside_the_buffered_generation_batch(killed_and_resumed_runs, tmp_path):
    # Step 4 trains on the generation batch rolled out at step 3, restored from the checkpoint: no rollout at all.
    checkpoint = killed_and_resumed_runs[0].parent / "saved-checkpoint-3"
    output_dir = tmp_path / "out"
    resume = ["--resume_from_checkpoint", str(checkpoint), "--max_steps", "4"]
    resume += ["--eval_strategy", "no", "--eval_on_start", "false"]
    process = cli_process(output_dir, "short.log", *resume)
    finish(process, tmp_path / "short.log")
    log = (tmp_path / "short.log").read_text()
    assert "sample grid: none (no rollout in this run)" in log
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 4
    assert (output_dir / LORA_FILE).is_file() and (output_dir / "ema" / LORA_FILE).is_file()


def test_a_checkpoint_written_before_the_architecture_move_resumes(tmp_path):
    # Written by the code before trainer.py was split (see tests/data/checkpoint_before_architecture/README.md),
    # inside a generation batch: the resumed step trains on the restored TRL buffer, with no rollout of its own.
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(REPO_ROOT / "tests" / "data" / "checkpoint_before_architecture" / "checkpoint-3", checkpoint)
    output_dir = tmp_path / "out"
    resume = ["--resume_from_checkpoint", str(checkpoint), "--max_steps", "4"]
    resume += ["--eval_strategy", "no", "--eval_on_start", "false"]
    process = cli_process(output_dir, "old.log", *resume)
    finish(process, tmp_path / "old.log")
    log = (tmp_path / "old.log").read_text()
    assert f"resuming from {checkpoint}" in log
    assert "sample grid: none (no rollout in this run)" in log, log[-3000:]
    assert "regenerated" not in log and "not restored" not in log, log[-3000:]
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 4
    before, after = load_file(str(checkpoint / LORA_FILE)), load_file(str(output_dir / LORA_FILE))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before), "step 4 did not train"
    assert (output_dir / "ema" / LORA_FILE).is_file()


# ------------------------------------------------------------------------------------------- refused up front
def test_push_to_hub_offline_fails_before_loading_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the hub check")

    monkeypatch.setattr("trl_flow.models.loading.load_pipeline", no_load)
    output_dir = tmp_path / "out"
    argv = ["grpo", "--recipe", str(TINY_RECIPE), "--push_to_hub", "true", "--output_dir", str(output_dir)]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "trl-flow: error: push_to_hub needs the Hugging Face Hub" in error and "HF_HUB_OFFLINE" in error
    assert not output_dir.exists()
    with pytest.raises(UserInputError, match="push_to_hub needs"):
        FlowGRPOTrainer("unused", ["prompt_color"], args=FlowGRPOConfig(output_dir=str(output_dir), push_to_hub=True))


def test_resume_true_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    output_dir = tmp_path / "out"
    (output_dir / "tmp-checkpoint-3").mkdir(parents=True)  # only a half-written save: nothing to resume
    argv = ["grpo", "--recipe", str(TINY_RECIPE), "--resume_from_checkpoint", "true", "--output_dir", str(output_dir)]
    assert cli.main(argv) == 2
    assert "no complete checkpoint-N folder in" in capsys.readouterr().err
