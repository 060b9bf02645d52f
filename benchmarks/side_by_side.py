"""trl-flow beside the official Flow-GRPO loop (yifan123/flow_grpo `scripts/train_sd3.py`), interleaved, same epoch.

It runs the project lead's `compare.sh` (from the bench folder that also prepares the official loop with
`setup_official.sh`; nothing of the official code is in this project) for one shape, then reads the `/usr/bin/time -v`
files it wrote and prints the table: seconds per epoch (whole process with E epochs minus with 1 epoch, over E - 1,
so start-up cancels), peak RSS, their ratios, medians over the repetitions, and the load average before and after
(another process on the cores inflates either side's time; peak RSS does not depend on load).

Run: python -m benchmarks.side_by_side --bench-dir BENCH --anchor ANCHOR_DIR [--shape tiny|compute] [--reps 3]
(BENCH holds compare.sh and anchor_equivalent.yaml; ANCHOR_DIR is what setup_official.sh prepared.)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

#: shape -> (model folder in the anchor dir, resolution, epochs of the long process)
SHAPES = {"tiny": ("tiny-sd3", 64, 6), "compute": ("med-sd3", 128, 3)}


def _time_file(path: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one `/usr/bin/time -v` report."""
    text = path.read_text()
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1).split(":")
    wall = sum(float(part) * 60**i for i, part in enumerate(reversed(clock)))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    return wall, rss


def table(out: Path, reps: int, epochs: int, shape: str) -> str:
    """The markdown table of one shape's runs in ``out`` (compare.sh's file names)."""
    per_epoch: dict[str, list[float]] = {}
    rss: dict[str, list[float]] = {}
    for tool in ("anchor", "trlflow"):
        runs = [(_time_file(out / f"{tool}-e1-r{r}.time"), _time_file(out / f"{tool}-e{epochs}-r{r}.time")) for r in
                range(1, reps + 1)]  # fmt: skip
        per_epoch[tool] = [(long[0] - short[0]) / (epochs - 1) for short, long in runs]
        rss[tool] = [long[1] for _, long in runs]
    time_ratios = [t / a for t, a in zip(per_epoch["trlflow"], per_epoch["anchor"], strict=True)]
    rss_ratios = [t / a for t, a in zip(rss["trlflow"], rss["anchor"], strict=True)]
    med = statistics.median

    def spread(values: list[float], digits: int) -> str:
        return " / ".join(f"{v:.{digits}f}" for v in values)

    header = (
        "| shape | official s/epoch | trl-flow s/epoch | time ratio | official peak RSS MB | trl-flow peak RSS MB "
        "| RSS ratio |\n|---|---|---|---|---|---|---|"
    )
    row = (
        f"| {shape}, {reps} reps x {epochs} epochs | {med(per_epoch['anchor']):.2f} ({spread(per_epoch['anchor'], 2)})"
        f" | {med(per_epoch['trlflow']):.2f} ({spread(per_epoch['trlflow'], 2)}) | **{med(time_ratios):.2f}** "
        f"| {med(rss['anchor']):.0f} ({spread(rss['anchor'], 0)}) | {med(rss['trlflow']):.0f} "
        f"({spread(rss['trlflow'], 0)}) | **{med(rss_ratios):.2f}** |"
    )
    return f"{header}\n{row}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-dir", required=True, type=Path, help="folder with compare.sh (the shared bench)")
    parser.add_argument("--anchor", required=True, type=Path, help="ANCHOR_DIR prepared by setup_official.sh")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="epochs of the long process (default: 6 tiny, 3 compute)")
    parser.add_argument("--out", type=Path, help="where the runs' logs go (default: ANCHOR/compare-SHAPE)")
    parser.add_argument("--table-only", action="store_true", help="print the table of runs already in --out")
    args = parser.parse_args()
    model, resolution, default_epochs = SHAPES[args.shape]
    epochs = args.epochs or default_epochs
    out = args.out or args.anchor / f"compare-{args.shape}"
    if not args.table_only:
        script = args.bench_dir / "compare.sh"
        if not script.is_file() or not (args.anchor / model / "model_index.json").is_file():
            sys.exit(f"need {script} and {args.anchor / model} (run setup_official.sh first)")
        root = str(Path(__file__).resolve().parents[1])
        env = dict(
            os.environ, ANCHOR_DIR=str(args.anchor), TRLFLOW_PY=sys.executable, REPS=str(args.reps),
            MODEL=str(args.anchor / model), RES=str(resolution), E_HI=str(epochs), OUT=str(out),
            # compare.sh runs from OUT: this checkout's trl_flow, not whichever one is installed
            PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        )  # fmt: skip
        before = os.getloadavg()
        subprocess.run(["bash", str(script)], env=env, check=True)
        print(f"load average before {before[0]:.2f}, after {os.getloadavg()[0]:.2f} (1 min)")
    print(table(out, args.reps, epochs, args.shape))


if __name__ == "__main__":
    main()
