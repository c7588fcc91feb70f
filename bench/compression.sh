#!/usr/bin/env bash
# Gradient compression and local SGD against plain DDP (issue 12): 2 ranks,
# the cnn on all of Fashion-MNIST, EPOCHS epochs, the same seed, through
# `tandem compare`, whose report has the accuracy-versus-bytes table and plot.
# Usage: bench/compression.sh [build dir] [epochs] [results dir]
set -euo pipefail
build=${1:-build}
epochs=${2:-5}
dir=${3:-results/compression}
methods=${TANDEM_BENCH_METHODS:-ddp,ddp:powersgd:2,ddp:topk:0.01,ddp:int8,localsgd:8}
"$build/tandem" compare --nproc 2 --epochs "$epochs" --methods "$methods" --out "$dir" ${TANDEM_BENCH_ARGS:-}
python3 - "$dir" <<'PY'
import glob, json, sys
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/results_*.json")):
    j = json.load(open(f))
    c = j["config"]
    name = j["method"] + ("" if c.get("compress", "none") == "none" else ":" + c["compress"]) + \
        (f" sync-every {c['sync_every']}" if c.get("sync_every", 1) > 1 else "")
    b = sum(e["comm_bytes"] for e in j["epochs"]) / len(j["epochs"])
    tp = sum(e["train_throughput"] for e in j["epochs"]) / len(j["epochs"])
    rows.append((name, j["epochs"][-1]["val_accuracy"], j["summary"]["best_val_accuracy"], b, tp))
base = next(r for r in rows if r[0] == "baseline_ddp")
print(f"{'method':<34}{'final acc':>10}{'best acc':>10}{'vs ddp (pts)':>13}{'KiB/step':>10}{'fewer bytes':>12}{'img/s':>8}")
for n, acc, best, b, tp in rows:
    print(f"{n:<34}{acc:>10.4f}{best:>10.4f}{100 * (acc - base[1]):>13.2f}{b / 1024:>10.1f}{base[3] / b:>11.1f}x{tp:>8.0f}")
PY
