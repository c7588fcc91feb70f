#!/usr/bin/env bash
# What checkpointing costs training, side by side: 2 ranks DDP on the cnn,
# without checkpoints and with a checkpoint every EVERY steps (target: <= 3%
# throughput lost at 50 steps). The two runs alternate REPEATS times, so a
# slow spell of the machine hits both alike; the ratio is taken per
# repetition and of the medians. The checkpointed runs write to a fresh
# directory each time; the log's "training paused" lines give the snapshot
# pause per checkpoint (the write itself is in the background).
# Usage: bench/checkpoint_overhead.sh [build dir] [training samples] [repeats] [every] [model]
set -euo pipefail
build=${1:-build}
limit=${2:-30000}
repeats=${3:-3}
every=${4:-50}
model=${5:-cnn}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common="--nproc 2 --model $model --epochs 1 --limit $limit --val-limit 2000 --save none"
for r in $(seq 1 "$repeats"); do
  echo "repetition $r/$repeats" >&2
  "$build/tandem" train $common --quiet --output "$out/plain.$r.json"
  "$build/tandem" train $common --checkpoint-dir "$out/ck.$r" --checkpoint-every "$every" \
    --output "$out/ckpt.$r.json" 2> "$out/ckpt.$r.log"
  rm -rf "$out/ck.$r"
done
/usr/bin/python3 - "$out" "$limit" "$repeats" "$every" "$model" <<'PY'
import json, re, statistics, sys
d, limit, repeats, every, model = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
plain = [json.load(open(f"{d}/plain.{r}.json"))["epochs"][0]["train_throughput"] for r in range(1, repeats + 1)]
ckpt = [json.load(open(f"{d}/ckpt.{r}.json"))["epochs"][0]["train_throughput"] for r in range(1, repeats + 1)]
pauses, counts = [], []
for r in range(1, repeats + 1):
    p = [float(x) for x in re.findall(r"training paused ([0-9.]+) s", open(f"{d}/ckpt.{r}.log").read())]
    pauses += p
    counts.append(len(p))
print(f"{model}, 2 ranks DDP, Fashion-MNIST {limit} samples, checkpoint every {every} steps")
print(f"{'repetition':<12}{'plain img/s':>13}{'ckpt img/s':>12}{'ratio':>8}{'checkpoints':>13}")
for r in range(repeats):
    print(f"{r + 1:<12}{plain[r]:>13.0f}{ckpt[r]:>12.0f}{ckpt[r] / plain[r]:>8.3f}{counts[r]:>13}")
print(f"throughput with / without checkpoints (medians): {statistics.median(ckpt) / statistics.median(plain):.3f}x "
      f"(target >= 0.97)")
if pauses:
    print(f"training paused per checkpoint: median {1e3 * statistics.median(pauses):.1f} ms, "
          f"max {1e3 * max(pauses):.1f} ms over {len(pauses)} checkpoints")
PY
