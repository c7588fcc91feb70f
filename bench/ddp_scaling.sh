#!/usr/bin/env bash
# DDP scaling on this machine, side by side:
#   1 rank vs 2 ranks (one intra-op thread each): throughput ratio (target >= 1.85x on 2 cores)
#   2 ranks DDP vs 2 ranks compute only (--strategy none): step time ratio (target <= 1.10)
# The three runs are repeated REPEATS times, interleaved (one, ddp, none, one,
# ddp, none, ...), so that a slow spell of the machine hits all three alike;
# the ratios are taken per repetition and of the medians.
# One thread per rank means loading too runs in the training thread (--num-workers 0
# unless TANDEM_BENCH_WORKERS says otherwise): with a loader thread, the 1-rank
# run would borrow the second core for loading. TANDEM_BENCH_ARGS adds flags to
# every run (e.g. "--compress fp16"; "--strategy ring" replaces DDP in the
# 2-rank synchronised run).
# Usage: bench/ddp_scaling.sh [build dir] [training samples] [repeats]
set -euo pipefail
build=${1:-build}
limit=${2:-30000}
repeats=${3:-3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common="--epochs 1 --limit $limit --val-limit 2000 --threads 1 --num-workers ${TANDEM_BENCH_WORKERS:-0} --quiet"
extra=${TANDEM_BENCH_ARGS:-}
sync_strategy=ddp
if [[ " $extra " == *" --strategy ring "* ]]; then sync_strategy=ring; extra=${extra/--strategy ring/}; fi
for r in $(seq 1 "$repeats"); do
  echo "repetition $r/$repeats" >&2
  "$build/tandem" train --nproc 1 --strategy "$sync_strategy" $common $extra --output "$out/one.$r.json"
  "$build/tandem" train --nproc 2 --strategy "$sync_strategy" $common $extra --output "$out/ddp.$r.json"
  "$build/tandem" train --nproc 2 --strategy none $common ${extra/--compress fp16/} --output "$out/none.$r.json"
done
python3 - "$out" "$limit" "$repeats" "$sync_strategy" "$extra" <<'PY'
import json, statistics, sys
d, limit, repeats, strat, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5].strip()
docs = {k: [json.load(open(f"{d}/{k}.{r}.json")) for r in range(1, repeats + 1)] for k in ("one", "ddp", "none")}
runs = {k: [j["epochs"][0] for j in v] for k, v in docs.items()}
batch = docs["one"][0]["batch_size"]
print(f"cnn, Fashion-MNIST {limit} samples, batch {batch} per rank, 1 thread per rank, sync {strat} {extra}".rstrip())
print(f"{'repetition':<12}{'1 rank img/s':>14}{'2 ranks img/s':>15}{'no-comm img/s':>15}{'exposed ms':>12}"
      f"{'2/1':>8}{'sync/no-comm':>14}")
for r in range(repeats):
    o, s, n = runs["one"][r], runs["ddp"][r], runs["none"][r]
    print(f"{r + 1:<12}{o['train_throughput']:>14.0f}{s['train_throughput']:>15.0f}{n['train_throughput']:>15.0f}"
          f"{1e3 * s.get('avg_comm_wait', 0):>12.2f}{s['train_throughput'] / o['train_throughput']:>8.3f}"
          f"{s['avg_batch_time'] / n['avg_batch_time']:>14.3f}")
med = {k: {f: statistics.median(e[f] for e in v) for f in ("train_throughput", "avg_batch_time")}
       for k, v in runs.items()}
print(f"median step ms: 1 rank {1e3 * med['one']['avg_batch_time']:.2f}, 2 ranks {strat} "
      f"{1e3 * med['ddp']['avg_batch_time']:.2f}, 2 ranks no communication {1e3 * med['none']['avg_batch_time']:.2f}")
print(f"throughput 2 ranks / 1 rank (medians)          : "
      f"{med['ddp']['train_throughput'] / med['one']['train_throughput']:.3f}x (target >= 1.85)")
print(f"no-comm 2 ranks / 1 rank (medians, the ceiling): "
      f"{med['none']['train_throughput'] / med['one']['train_throughput']:.3f}x")
print(f"{strat} step / compute-only step (medians)       : "
      f"{med['ddp']['avg_batch_time'] / med['none']['avg_batch_time']:.3f} (target <= 1.10)")
PY
