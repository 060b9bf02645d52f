#!/usr/bin/env bash
# trl-flow beside the official Flow-GRPO loop on one GPU: the tiny (64 px) and compute-bound (med-sd3, 128 px)
# epochs, fp32 and bf16, per-epoch time ((E epochs - 1 epoch) / (E - 1)), peak RSS and peak CUDA memory
# (torch.cuda.max_memory_allocated at exit, through a sitecustomize hook in both processes). About 16 short processes:
# under 10 minutes on an H100-class GPU.
# Needs ANCHOR_DIR prepared by the bench's setup_official.sh (its venv with a CUDA torch) and BENCH_DIR (the folder
# with anchor_equivalent.yaml); TRLFLOW_PY: a python with trl-flow's dependencies (default: python).
# Usage: ANCHOR_DIR=DIR BENCH_DIR=DIR [E_HI=3] bash benchmarks/gpu_side_by_side.sh
# bf16 is mixed precision on both sides (accelerate's --mixed_precision bf16 / trl-flow's --bf16 true); trainable
# LoRA weights stay fp32.
set -u
A=${ANCHOR_DIR:?set ANCHOR_DIR}; B=${BENCH_DIR:?set BENCH_DIR}; E_HI=${E_HI:-3}; TP=${TRLFLOW_PY:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd); OUT=${OUT:-$A/gpu-compare}; mkdir -p "$OUT/hook"
cat > "$OUT/hook/sitecustomize.py" <<'PY'
import atexit, os
def _report():
    import sys
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        with open(os.environ["CUDA_PEAK_FILE"], "w") as f:
            f.write(str(torch.cuda.max_memory_allocated() / 2**20))
atexit.register(_report)
PY
anchor() {  # model res precision epochs tag
  local mp=no; [ "$3" = bf16 ] && mp=bf16
  (cd "$A/flow_grpo_cpu" && WANDB_MODE=disabled HF_HUB_OFFLINE=1 TQDM_DISABLE=1 ANCHOR_EPOCHS=$4 ANCHOR_MODEL=$1 \
    ANCHOR_RES=$2 CUDA_PEAK_FILE="$OUT/$5.cuda" PYTHONPATH=.:$OUT/hook /usr/bin/time -v -o "$OUT/$5.time" \
    "$A/venv/bin/accelerate" launch --num_processes 1 --num_machines 1 --mixed_precision $mp --dynamo_backend no \
    scripts/train_sd3.py --config config/cpu_anchor.py:tiny_sd3_cpu --config.mixed_precision=$mp > "$OUT/$5.log" 2>&1)
}
trlflow() {  # model res precision epochs tag
  local bf=false; [ "$3" = bf16 ] && bf=true
  (cd "$OUT" && HF_HUB_OFFLINE=1 TQDM_DISABLE=1 CUDA_PEAK_FILE="$OUT/$5.cuda" PYTHONPATH=$ROOT:$OUT/hook \
    /usr/bin/time -v -o "$OUT/$5.time" "$TP" -m trl_flow.cli grpo --recipe "$B/anchor_equivalent.yaml" \
    --model_name_or_path "$1" --height $2 --width $2 --dataset_name "$A/flow_grpo_cpu/dataset/cpu_anchor/train.txt" \
    --max_steps $((2 * $4)) --bf16 $bf --output_dir "$OUT/out-$5" --disable_tqdm true > "$OUT/$5.log" 2>&1)
}
for shape in "tiny $A/tiny-sd3 64" "compute $A/med-sd3 128"; do
  set -- $shape; name=$1; model=$2; res=$3
  for precision in fp32 bf16; do
    for job in "anchor 1" "trlflow 1" "anchor $E_HI" "trlflow $E_HI"; do
      set -- $job; tag="$name-$precision-$1-e$2"; $1 "$model" "$res" "$precision" "$2" "$tag"
      echo "$tag rc-log $(tail -c 200 "$OUT/$tag.log" | tr '\n' ' ' | cut -c1-120)"
    done
  done
done
python3 - "$OUT" "$E_HI" <<'PY'
import re, sys
out, hi = sys.argv[1], int(sys.argv[2])
def time_file(tag):
    t = open(f"{out}/{tag}.time").read()
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", t).group(1).split(":")
    wall = sum(float(x) * 60 ** i for i, x in enumerate(reversed(clock)))
    return wall, int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
def cuda(tag):
    try:
        return float(open(f"{out}/{tag}.cuda").read())
    except OSError:
        return float("nan")
print("| shape | precision | official s/epoch | trl-flow s/epoch | time ratio | official peak CUDA MB | trl-flow peak CUDA MB"
      " | CUDA ratio | official peak RSS MB | trl-flow peak RSS MB |")
print("|---|---|---|---|---|---|---|---|---|---|")
for shape in ("tiny", "compute"):
    for precision in ("fp32", "bf16"):
        row = {}
        for tool in ("anchor", "trlflow"):
            try:
                (w1, _), (wh, rss) = time_file(f"{shape}-{precision}-{tool}-e1"), time_file(f"{shape}-{precision}-{tool}-e{hi}")
                row[tool] = ((wh - w1) / (hi - 1), cuda(f"{shape}-{precision}-{tool}-e{hi}"), rss)
            except (OSError, AttributeError):
                row[tool] = (float("nan"),) * 3
        a, t = row["anchor"], row["trlflow"]
        print(f"| {shape} | {precision} | {a[0]:.2f} | {t[0]:.2f} | {t[0] / a[0]:.2f} | {a[1]:.0f} | {t[1]:.0f} | "
              f"{t[1] / a[1]:.2f} | {a[2]:.0f} | {t[2]:.0f} |")
PY
