#!/usr/bin/env bash
# DDP scaling on this machine, side by side:
#   2 ranks DDP (--comm auto: shared memory here) vs 2 ranks compute only
#   (--strategy none): throughput ratio (target >= 0.95x: communication nearly free)
#   2 ranks DDP over Gloo (--comm gloo), the reference transport
#   1 rank vs 2 ranks (one intra-op thread each)
# The four runs are repeated REPEATS times, interleaved (one, ddp, none, gloo,
# one, ...), so that a slow spell of the machine hits all alike; the ratios
# are taken per repetition and of the medians.
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
  "$build/tandem" train --nproc 2 --strategy "$sync_strategy" --comm gloo $common $extra --output "$out/gloo.$r.json"
done
python3 - "$out" "$limit" "$repeats" "$sync_strategy" "$extra" <<'PY'
import json, statistics, sys
d, limit, repeats, strat, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5].strip()
docs = {k: [json.load(open(f"{d}/{k}.{r}.json")) for r in range(1, repeats + 1)] for k in ("one", "ddp", "none", "gloo")}
runs = {k: [j["epochs"][0] for j in v] for k, v in docs.items()}
batch = docs["one"][0]["batch_size"]
comm = docs["ddp"][0]["config"].get("comm", "?")
print(f"cnn, Fashion-MNIST {limit} samples, batch {batch} per rank, 1 thread per rank, sync {strat} over {comm} "
      f"{extra}".rstrip())
print(f"{'repetition':<12}{'1 rank img/s':>14}{comm + ' img/s':>13}{'no-comm img/s':>15}{'gloo img/s':>12}"
      f"{'exposed ms':>12}{'2/1':>8}{comm + '/no-comm':>13}{'gloo/no-comm':>14}")
for r in range(repeats):
    o, s, n, g = runs["one"][r], runs["ddp"][r], runs["none"][r], runs["gloo"][r]
    print(f"{r + 1:<12}{o['train_throughput']:>14.0f}{s['train_throughput']:>13.0f}{n['train_throughput']:>15.0f}"
          f"{g['train_throughput']:>12.0f}{1e3 * s.get('avg_comm_wait', 0):>12.2f}"
          f"{s['train_throughput'] / o['train_throughput']:>8.3f}{s['train_throughput'] / n['train_throughput']:>13.3f}"
          f"{g['train_throughput'] / n['train_throughput']:>14.3f}")
med = {k: {f: statistics.median(e[f] for e in v) for f in ("train_throughput", "avg_batch_time")}
       for k, v in runs.items()}
print(f"median step ms: 1 rank {1e3 * med['one']['avg_batch_time']:.2f}, 2 ranks {strat} "
      f"{1e3 * med['ddp']['avg_batch_time']:.2f}, 2 ranks no communication {1e3 * med['none']['avg_batch_time']:.2f}")
print(f"throughput {strat} over {comm} / no communication (medians): "
      f"{med['ddp']['train_throughput'] / med['none']['train_throughput']:.3f}x (target >= 0.95)")
print(f"throughput {strat} over gloo / no communication (medians)   : "
      f"{med['gloo']['train_throughput'] / med['none']['train_throughput']:.3f}x")
print(f"throughput 2 ranks / 1 rank (medians)          : "
      f"{med['ddp']['train_throughput'] / med['one']['train_throughput']:.3f}x")
print(f"no-comm 2 ranks / 1 rank (medians, the ceiling): "
      f"{med['none']['train_throughput'] / med['one']['train_throughput']:.3f}x")
print(f"{strat} step / compute-only step (medians)       : "
      f"{med['ddp']['avg_batch_time'] / med['none']['avg_batch_time']:.3f}")
PY
