"""The mini-GenEval race: each algorithm trained from the same base for the same wall-clock budget, then scored.

Each algorithm of ``--algorithms`` trains a fresh LoRA on the mini SD3 model (``trl_flow/mini``), train prompts
only, with its settings of :data:`trl_flow.mini.grpo.MINI_ALGORITHM_SETTINGS` (the best found, see
docs/mini_geneval.md), one after the other on the same machine, for ``--minutes`` of training (rollouts, rewards and
updates; the evaluations in between are not counted). Every ``--eval-every`` minutes and at the end the policy draws
the held-out prompts (never seen in RL) from fixed seeds with the ODE, scored by the strict mini-GenEval rules. The
base model is drawn once, from the same seeds, at its standard guidance (CFG 4): a CFG-free algorithm is compared
with the base at its best setting, not with the base without guidance.

Written to ``--output`` (default ``outputs/mini_geneval_race``): ``race.md`` (the table: held-out score with its
paired standard error, per tag, per attribute; train-prompt score; drift to the base; images used; updates; wall
time), ``race.png`` (held-out score against training minutes, every algorithm on one plot, the base as a line),
``results.json``, and ``grid_<algorithm>.png`` (held-out prompts: base row above the trained row, same noise,
captioned with prompt and score).

Drift to the base, two ways: ``v-drift`` is the per-element mean of ``(v_policy - v_base)^2`` of the conditional
velocities along the policy's own ODE trajectories of the held-out prompts (the quantity the v-space KL of nft/awm
penalises, and for SDE steps ``KL = dt (v - v_ref)^2 (...) / 2 s^2``, proportional to it); ``pixel drift`` the mean
absolute RGB difference (0-255) between the base's and the policy's images of the same noise, and ``bg drift`` the
distance between their background colours.

Run: python -m benchmarks.mini_geneval --algorithms flow_grpo grpo_guard nft awm [--minutes 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine

EVAL_SEED = 1234


def draw(trainer, rows: list[dict], base: bool, guidance_scale: float | None = None) -> list:
    """ODE images of the base model (LoRA disabled) or of the policy for ``rows``, fixed noise."""
    import contextlib

    model = trainer.accelerator.unwrap_model(trainer.model)
    prompts = [row["prompt"] for row in rows]
    with model.disable_adapter() if base else contextlib.nullcontext():
        return trainer.generate_images(prompts, seed=EVAL_SEED, guidance_scale=guidance_scale)


def correct(images: list, rows: list[dict]) -> np.ndarray:
    """1.0 where an image satisfies every requirement of its row (strict mini-GenEval), else 0.0."""
    from reward_funcs.mini_geneval import mini_geneval

    scores = mini_geneval(
        [row["prompt"] for row in rows], images, include=[row["include"] for row in rows], tag=[r["tag"] for r in rows]
    )
    return np.asarray(scores, dtype=np.float64)


@torch.no_grad()
def velocity_drift(trainer, prompts: list[str], num_steps: int) -> float:
    """Per-element mean of (v_policy - v_base)^2, conditional velocities, along the policy's ODE trajectories."""
    rollouts, adapter = trainer.rollouts, trainer.rollouts.adapter
    _, trajectory, conditioning = rollouts.rollout(
        trainer._denoiser_for_generation, prompts, num_steps, 0.0, range(num_steps), EVAL_SEED, guidance_scale=1.0
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    total = 0.0
    for k in range(num_steps):
        latents, sigma = trajectory["latents"][:, k], trajectory["sigmas"][:, k]
        policy = adapter.predict_velocity(model, latents, sigma, conditioning, 1.0)
        with model.disable_adapter():
            base = adapter.predict_velocity(model, latents, sigma, conditioning, 1.0)
        total += float((policy - base).square().mean())
    return total / num_steps


def pixel_drift(base: list, trained: list) -> float:
    """Mean absolute RGB difference (0-255) between images drawn from the same noise."""
    a = np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) for image in base])
    b = np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) for image in trained])
    return float(np.abs(a - b).mean())


class WallClockBudget:
    """A TrainerCallback that stops training after ``minutes`` of training time and evaluates every
    ``eval_every`` minutes (the evaluation's own time is not counted)."""

    def __init__(self, minutes: float, eval_every: float, evaluate) -> None:
        from transformers import TrainerCallback

        budget = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                budget.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                budget.seconds += time.perf_counter() - budget.last
                if budget.seconds >= budget.budget:
                    control.should_training_stop = True
                elif budget.seconds >= budget.next_eval:
                    budget.evaluate(budget.seconds, state.global_step)
                    budget.next_eval += budget.eval_every
                budget.last = time.perf_counter()

        self.callback = _Callback()
        self.budget, self.eval_every, self.next_eval = minutes * 60, eval_every * 60, eval_every * 60
        self.evaluate, self.seconds, self.last = evaluate, 0.0, 0.0


def paired_score(base: np.ndarray, trained: np.ndarray, rows: list[dict]) -> dict[str, Any]:
    """GenEval's overall score of ``trained`` (mean over tags), per tag, and its gain over ``base`` with the paired
    standard error."""
    from trl_flow.comparison import paired_gain

    tags = [row["tag"] for row in rows]
    gain, gain_se = paired_gain(base, trained, tags)
    labels = np.asarray(tags)
    per_tag = {tag: float(trained[labels == tag].mean()) for tag in sorted(set(tags))}
    return {"score": float(np.mean(list(per_tag.values()))), "per_tag": per_tag, "gain": gain, "gain_se": gain_se}


def run_algorithm(
    name: str, minutes: float, eval_every: float, rows, train_rows, base, output, model_path, extra, balance_tags
):
    """Train ``name`` for ``minutes``; return its result row (and write its grid)."""
    from trl_flow.comparison import Comparison, save_comparison_grid
    from trl_flow.mini.evaluate import background_colours, score_images
    from trl_flow.mini.grpo import MINI_ALGORITHM_SETTINGS, make_mini_trainer

    settings = {**MINI_ALGORITHM_SETTINGS[name], **extra}
    guidance = settings.get("guidance_scale", 4.0)
    curve: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_mini_trainer(
            output_dir, model_path=model_path, balance_tags=balance_tags, max_steps=100_000, **settings
        )
        images_used = [0]
        generate_and_score = trainer._generate_and_score_completions

        def counted(inputs):
            if trainer.model.training:
                images_used[0] += len(inputs)
            return generate_and_score(inputs)

        trainer._generate_and_score_completions = counted

        def evaluate(seconds: float, step: int) -> None:
            trained = correct(draw(trainer, rows, base=False), rows)
            result = paired_score(base["correct"], trained, rows)
            curve.append((seconds / 60, result["score"], result["gain_se"]))
            print(f"  {name} {seconds / 60:.1f} min (step {step}): held-out {result['score']:.3f}", flush=True)

        budget = WallClockBudget(minutes, eval_every, evaluate)
        trainer.add_callback(budget.callback)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        images = draw(trainer, rows, base=False)
        scores = score_images(images, rows)
        trained_correct = scores["correct"]
        result = paired_score(base["correct"], trained_correct, rows)
        curve.append((budget.seconds / 60, result["score"], result["gain_se"]))
        train_images = draw(trainer, train_rows, base=False)
        row = {
            "algorithm": name,
            "settings": settings,
            "held_out": result,
            "per_attribute": scores["per_attribute"],
            "train_score": score_images(train_images, train_rows)["score"],
            "v_drift": velocity_drift(trainer, [r["prompt"] for r in rows[::4]], trainer.args.eval_num_inference_steps),
            "pixel_drift": pixel_drift(base["images"], images),
            "bg_drift": float(
                np.nanmean(np.linalg.norm(background_colours(images) - background_colours(base["images"]), axis=1))
            ),
            "images_used": images_used[0],
            "updates": trainer.state.global_step,
            "train_minutes": budget.seconds / 60,
            "wall_minutes": wall / 60,
            "curve": curve,
            "eval_guidance_scale": guidance,
        }
        comparison = Comparison([r["prompt"] for r in rows], [r["tag"] for r in rows], base["images"], images)
        comparison.base_rewards["mini_geneval"] = base["correct"]
        comparison.trained_rewards["mini_geneval"] = trained_correct
        row["grid"] = str(save_comparison_grid(comparison, output / f"grid_{name}.png"))
    return row


def table(results: list[dict], base: dict) -> str:
    """The race as a markdown table."""
    tags = list(base["held_out"]["per_tag"])
    header = (
        "| algorithm | held-out score | gain ± SE | "
        + " | ".join(tags)
        + " | object / color / position | train prompts | v-drift | pixel / bg drift | images | updates | train min |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    b = base["held_out"]
    lines.append(
        f"| base (CFG 4) | {b['score']:.3f} | | "
        + " | ".join(f"{b['per_tag'][t]:.3f}" for t in tags)
        + f" | {' / '.join(f'{v:.2f}' for v in base['per_attribute'].values())} | {base['train_score']:.3f} "
        "| 0 | 0 / 0 | | | |"
    )
    for r in results:
        h = r["held_out"]
        lines.append(
            f"| {r['algorithm']} (CFG {r['eval_guidance_scale']:g}) | {h['score']:.3f} | "
            f"{h['gain']:+.3f} ± {h['gain_se']:.3f} | "
            + " | ".join(f"{h['per_tag'][t]:.3f}" for t in tags)
            + f" | {' / '.join(f'{v:.2f}' for v in r['per_attribute'].values())} | {r['train_score']:.3f} | "
            f"{r['v_drift']:.4f} | {r['pixel_drift']:.1f} / {r['bg_drift']:.1f} | {r['images_used']} | "
            f"{r['updates']} | {r['train_minutes']:.1f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], base: dict, path: pathlib.Path) -> pathlib.Path:
    """Held-out score against training minutes, one line per algorithm, the base as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for r in results:
        points = [(0.0, base["held_out"]["score"], 0.0)] + [tuple(p) for p in r["curve"]]
        minutes, scores, errors = (list(column) for column in zip(*points, strict=True))
        axes.errorbar(minutes, scores, yerr=errors, marker="o", markersize=3, capsize=2, label=r["algorithm"])
    axes.axhline(base["held_out"]["score"], color="grey", linestyle="--", label="base (CFG 4)")
    axes.set_xlabel("training minutes (2 CPU cores)")
    axes.set_ylabel("held-out mini-GenEval score")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=["flow_grpo", "grpo_guard", "nft", "awm"])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per algorithm")
    parser.add_argument("--eval-every", type=float, default=2.0, help="minutes of training between evaluations")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default="outputs/mini_geneval_race")
    parser.add_argument("--model", default=None, help="mini SD3 folder (default: the shipped build)")
    parser.add_argument("--override", default="{}", help="JSON dict of config overrides for every algorithm")
    parser.add_argument("--single-seeds", type=int, default=8, help="images per held-out single-object prompt")
    parser.add_argument("--pair-seeds", type=int, default=2, help="images per held-out two-object prompt")
    parser.add_argument("--two-object", type=int, default=None, help="held-out two-object prompts (default all 96)")
    parser.add_argument(
        "--balance-tags",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train on each tag equally often (the train split has 6 two-object prompts per single-object one)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    from trl_flow.mini.evaluate import evaluation_rows, score_images
    from trl_flow.mini.grpo import MINI_ALGORITHM_SETTINGS, make_mini_trainer

    unknown = [name for name in args.algorithms if name not in MINI_ALGORITHM_SETTINGS]
    if unknown:
        parser.error(f"unknown algorithm(s) {unknown}; known: {sorted(MINI_ALGORITHM_SETTINGS)}")
    rows = evaluation_rows("test", args.two_object, args.single_seeds, args.pair_seeds)
    train_rows = evaluation_rows("train", args.two_object or 96, args.single_seeds // 4 or 1, 1)
    with tempfile.TemporaryDirectory() as scratch:  # the base: LoRA disabled, CFG 4
        trainer = make_mini_trainer(scratch, model_path=args.model, guidance_scale=4.0)
        images = draw(trainer, rows, base=True)
        scores = score_images(images, rows)
        base_correct = scores["correct"]
        base = {
            "images": images,
            "correct": base_correct,
            "held_out": paired_score(base_correct, base_correct, rows),
            "per_attribute": scores["per_attribute"],
            "train_score": score_images(draw(trainer, train_rows, base=True), train_rows)["score"],
        }
        del trainer
    print(f"base held-out {base['held_out']['score']:.3f} {base['held_out']['per_tag']}", flush=True)
    results = []
    for name in args.algorithms:
        results.append(
            run_algorithm(
                name,
                args.minutes,
                args.eval_every,
                rows,
                train_rows,
                base,
                output,
                args.model,
                json.loads(args.override),
                args.balance_tags,
            )
        )
        print(table(results, base), flush=True)
    header = (
        f"machine: {machine()}, torch threads {torch.get_num_threads()}, load average after the race "
        f"{tuple(round(x, 2) for x in os.getloadavg())}\n"
        f"held-out: {len({r['prompt'] for r in rows})} prompts, {len(rows)} images "
        f"({args.single_seeds} per single-object prompt, {args.pair_seeds} per two-object prompt); "
        f"{args.minutes:g} training minutes per algorithm, one after the other\n"
    )
    text = header + "\n" + table(results, base) + "\n"
    (output / "race.md").write_text(text)
    plot(results, base, output / "race.png")
    summary = {"machine": machine(), "minutes": args.minutes, "results": results}
    summary["base"] = {key: value for key, value in base.items() if key not in ("images", "correct")}
    (output / "results.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(text + f"\nwritten: {output / 'race.md'}, {output / 'race.png'}, grids grid_<algorithm>.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
