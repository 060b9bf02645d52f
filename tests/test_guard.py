"""The reward-hacking guard: image statistics, the firing rule, the best-checkpoint marker, and a deliberately
hackable run on the tiny model (training reward `brightness`; guard: `mid_grey` and diversity)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerControl, TrainerState, TrainingArguments

from trl_flow.config import FlowGRPOConfig
from trl_flow.errors import UserInputError
from trl_flow.guard import (
    BEST_CHECKPOINT_NAME,
    RewardHackingGuard,
    edge_density,
    group_diversity,
    mean_saturation,
    thumbnail,
)

# Measured on 2 CPU cores (evaluation every 6 updates, tolerance 10%, patience 2, learning rate 0.05 after 16 warm-up
# updates, the same for both runs; only beta differs), over seeds 0-3 as a stand-in for other CPUs' rounding: beta 0
# blows the images out (mid_grey / diversity -39..-74% / -44..-99% at update 24) and the guard fires at update 24, 30
# or 36; beta 1000 moves no guarded quantity by more than 11% in 36 updates, and by more than 3% in the first 18.
# The warm-up matters: where the KL term's gradient is still zero, Adam's first updates move the policy by about the
# learning rate whatever beta is. With 8 warm-up updates beta 1000 swung (mid_grey -31% at update 18 on one machine,
# -60% at 24 with seed 1) and the guard fired, while CI's machines had stayed within 6%.
HACK_LEARNING_RATE = 0.05
HACK_WARMUP_STEPS = 16
LARGE_BETA = 1000.0


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def solid(rgb, size=16):
    return Image.new("RGB", (size, size), rgb)


# ------------------------------------------------------------------------------------------------- statistics
def test_image_statistics():
    assert mean_saturation(solid((128, 128, 128))) == 0.0
    assert mean_saturation(solid((255, 0, 0))) == pytest.approx(1.0)
    assert mean_saturation(solid((0, 0, 0))) == 0.0
    assert edge_density(solid((200, 10, 10))) == 0.0
    checker = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)
    assert edge_density(Image.fromarray(checker).convert("RGB")) == pytest.approx(1.0)
    assert thumbnail(solid((1, 2, 3), size=200)).shape == (64, 64, 3)

    same = [thumbnail(solid((10, 200, 30)))] * 3
    assert group_diversity(["a", "a", "a"], same) == 0.0
    black, white = thumbnail(solid((0, 0, 0))), thumbnail(solid((255, 255, 255)))
    assert group_diversity(["a", "a", "b", "b"], [black, white, black, black]) == pytest.approx(0.5)
    assert group_diversity(["a", "b"], [black, white]) is None  # no prompt has two images


# ---------------------------------------------------------------------------------------------- firing rule
def evaluate(guard, step, reward, mid_grey, diversity, control=None, output_dir="unused"):
    """Feed one evaluation's summary through the guard's rule, as `on_evaluate` does."""
    control = control or TrainerControl()
    evaluation = guard.judge(step, reward, {"mid_grey": mid_grey, "diversity": diversity})
    if guard.consecutive == guard.patience:
        guard._fire(TrainingArguments(output_dir=str(output_dir), report_to=[]), TrainerState(), control, evaluation)
    return evaluation, control


def test_fires_after_patience_degraded_evaluations_only_while_the_reward_rises():
    guard = RewardHackingGuard(["mid_grey"], tolerance=0.1, patience=2)
    evaluate(guard, 0, reward=0.5, mid_grey=0.7, diversity=0.2)  # the baseline
    evaluation, _ = evaluate(guard, 1, reward=0.6, mid_grey=0.6, diversity=0.2)  # mid_grey -14%: degraded
    assert evaluation.degraded and not evaluation.within_tolerance and guard.fired_at_step is None
    assert evaluation.score == pytest.approx(-0.1 / 0.7)
    evaluation, _ = evaluate(guard, 2, reward=0.5, mid_grey=0.5, diversity=0.2)  # reward not above baseline: resets
    assert not evaluation.degraded and guard.consecutive == 0
    evaluate(guard, 3, reward=0.7, mid_grey=0.7, diversity=0.15)  # diversity -25%: degraded
    assert guard.fired_at_step is None
    _, control = evaluate(guard, 4, reward=0.8, mid_grey=0.71, diversity=0.1)
    assert guard.fired_at_step is not None and not control.should_training_stop  # action "warn"

    stopping = RewardHackingGuard(tolerance=0.1, patience=1, action="stop")  # diversity only
    evaluate(stopping, 0, reward=0.0, mid_grey=0.7, diversity=0.2)
    _, control = evaluate(stopping, 1, reward=0.01, mid_grey=0.1, diversity=0.19)  # mid_grey is not guarded here
    assert not control.should_training_stop
    _, control = evaluate(stopping, 2, reward=0.01, mid_grey=0.7, diversity=0.17)
    assert control.should_training_stop


def test_best_checkpoint_is_the_best_reward_within_tolerance_else_the_best_guard_score(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    guard = RewardHackingGuard(["mid_grey"], tolerance=0.1, patience=5)
    for step, reward, mid_grey in [(0, 0.5, 0.7), (2, 0.6, 0.68), (4, 0.7, 0.66), (6, 0.9, 0.3)]:
        evaluate(guard, step, reward, mid_grey, 0.2)
        if step:
            (tmp_path / f"checkpoint-{step}").mkdir()
            state = TrainerState(global_step=step)
            guard.on_save(args, state, TrainerControl())
    # checkpoint-4 (-5.7%) is within tolerance with a higher reward than checkpoint-2; checkpoint-6 hacked.
    assert guard.best_checkpoint(args)[0] == "checkpoint-4"
    assert state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    marker = json.loads((tmp_path / BEST_CHECKPOINT_NAME).read_text())
    assert marker["best_checkpoint"] == "checkpoint-4"
    assert [e["step"] for e in marker["evaluations"]] == [0, 2, 4, 6]

    (tmp_path / "checkpoint-4").rmdir()  # rotated away: the next best that still exists
    (tmp_path / "checkpoint-2").rmdir()
    assert guard.best_checkpoint(args)[0] == "checkpoint-6"  # none within tolerance left: best guard score


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"guard_reward_funcs": ["mid_grey"]}, "eval_strategy"),
        ({"guard_action": "halt"}, "guard_action"),
        ({"guard_tolerance": 0.0}, "guard_tolerance"),
        ({"guard_patience": 0}, "guard_patience"),
    ],
)
def test_bad_guard_settings_are_refused(overrides, message):
    with pytest.raises(UserInputError, match=message):
        FlowGRPOConfig(output_dir="unused", report_to=[], **overrides)


def test_unknown_guard_reward_is_refused_by_name():
    with pytest.raises(UserInputError, match="mid_gray"):
        RewardHackingGuard(["mid_gray"])


# ------------------------------------------------------------------------------------------- hackable runs
def hackable_trainer(model_path, output_dir, beta, **overrides):
    """Training reward `brightness` (hackable: whiter is always better); guard `mid_grey` and diversity."""
    from tests.test_lifecycle import build_trainer

    settings = dict(
        beta=beta,
        max_steps=24,
        learning_rate=HACK_LEARNING_RATE,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=HACK_WARMUP_STEPS,
        eval_strategy="steps",
        eval_steps=6,
        eval_on_start=True,
        eval_num_inference_steps=6,
        eval_images_to_log=0,
        logging_steps=6,
        guard_reward_funcs=["mid_grey"],
        guard_tolerance=0.1,
        guard_patience=2,
    )
    settings.update(overrides)
    return build_trainer(model_path, output_dir, reward_funcs=("brightness",), **settings)


def guard_logs(trainer):
    return [entry for entry in trainer.state.log_history if "guard/score" in entry]


def test_hackable_run_fires_at_beta_zero_stops_and_marks_the_best_checkpoint(tiny_sd3_path, tmp_path):
    output_dir = tmp_path / "hack"
    trainer = hackable_trainer(
        tiny_sd3_path, output_dir, beta=0.0, guard_action="stop", save_strategy="steps", save_steps=6, max_steps=48
    )
    assert trainer.reward_func_names == ["brightness"]  # the guard reward is not a training reward
    trainer.train()
    logs = guard_logs(trainer)
    guard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RewardHackingGuard))
    print("guard logs:", [(e["step"], e["guard/change/mid_grey"], e["guard/change/diversity"]) for e in logs])
    assert guard.fired_at_step is not None and guard.fired_at_step <= 36
    assert trainer.state.global_step == guard.fired_at_step < 48  # stopped at the evaluation that fired
    assert logs[-1]["guard/fired"] == 1.0 and logs[-1]["step"] == guard.fired_at_step
    for key in ("guard/mid_grey", "guard/diversity", "guard/saturation", "guard/edge_density"):
        assert all(math.isfinite(entry[key]) for entry in logs), key
    marker = json.loads((output_dir / BEST_CHECKPOINT_NAME).read_text())
    assert marker["fired_at_step"] == guard.fired_at_step
    best = marker["best_checkpoint"]
    assert best is not None and (output_dir / best).is_dir()
    assert trainer.state.best_model_checkpoint == str(output_dir / best)
    assert marker["checkpoints"][best]["within_tolerance"] or not any(
        c["within_tolerance"] for c in marker["checkpoints"].values()
    )


def test_hackable_run_does_not_fire_at_a_large_beta(tiny_sd3_path, tmp_path):
    trainer = hackable_trainer(tiny_sd3_path, tmp_path / "kl", beta=LARGE_BETA)
    trainer.train()
    logs = guard_logs(trainer)
    guard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RewardHackingGuard))
    print("guard logs:", [(e["step"], e["guard/change/mid_grey"], e["guard/change/diversity"]) for e in logs])
    assert [entry["step"] for entry in logs] == [0, 6, 12, 18, 24]
    assert guard.fired_at_step is None and all(entry["guard/fired"] == 0.0 for entry in logs)
