#!/usr/bin/env bash
# DDP scaling on this machine, side by side in one run:
#   1 rank vs 2 ranks (one intra-op thread each): throughput ratio (target >= 1.85x on 2 cores)
#   2 ranks DDP vs 2 ranks compute only (--strategy none): step time ratio (target <= 1.10)
# One thread per rank means loading too runs in the training thread (--num-workers 0
# unless TANDEM_BENCH_WORKERS says otherwise): with a loader thread, the 1-rank
# run would borrow the second core for loading. TANDEM_BENCH_ARGS adds flags.
# Usage: bench/ddp_scaling.sh [build dir] [training samples]
set -euo pipefail
build=${1:-build}
limit=${2:-30000}
out=$(mktemp -d)
common="--epochs 1 --limit $limit --val-limit 2000 --threads 1 --num-workers ${TANDEM_BENCH_WORKERS:-0} --quiet ${TANDEM_BENCH_ARGS:-}"
"$build/tandem" train --nproc 1 --strategy ddp  $common --output "$out/one.json"
"$build/tandem" train --nproc 2 --strategy ddp  $common --output "$out/ddp.json"
"$build/tandem" train --nproc 2 --strategy none $common --output "$out/none.json"
python3 - "$out" "$limit" <<'PY'
import json, sys
d, limit = sys.argv[1], sys.argv[2]
r = {k: json.load(open(f"{d}/{k}.json"))["epochs"][0] for k in ("one", "ddp", "none")}
print(f"cnn, Fashion-MNIST {limit} samples, batch 64 per rank, 1 thread per rank")
print(f"{'run':<28}{'img/s':>10}{'step ms':>10}{'comm ms':>10}{'exposed':>10}")
for k, name in (("one", "1 rank, DDP"), ("ddp", "2 ranks, DDP"), ("none", "2 ranks, no communication")):
    e = r[k]
    print(f"{name:<28}{e['train_throughput']:>10.0f}{1e3*e['avg_batch_time']:>10.2f}{1e3*e.get('avg_comm_time',0):>10.2f}{1e3*e.get('avg_comm_wait',0):>10.2f}")
print(f"throughput 2 ranks / 1 rank          : {r['ddp']['train_throughput']/r['one']['train_throughput']:.3f}x (target >= 1.85)")
print(f"DDP step / compute-only step (2 ranks): {r['ddp']['avg_batch_time']/r['none']['avg_batch_time']:.3f} (target <= 1.10)")
PY
rm -rf "$out"
