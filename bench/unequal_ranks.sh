#!/usr/bin/env bash
# Ranks of unequal speed, made real with CPU affinity (issue 12): 3 ranks
# started by hand with torchrun-style variables (MASTER_ADDR, MASTER_PORT,
# WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE), ranks 0 and 1 pinned to
# core 0 with `taskset`, rank 2 to core 1: ranks 0 and 1 each get half a core.
# Side by side, interleaved, REPEATS times:
#   ddp, equal shares (--balance off)      vs  ddp --balance auto
#   ps --ps-mode sync (1 server + 2 workers) vs  ps --ps-mode ssp --staleness 2
# Reported: throughput of the last epoch and of the whole run (img/s, all
# training ranks), validation accuracy, medians and their ratios.
# SLOW=U (microseconds) runs the second experiment instead: no pinning, rank
# 0 sleeps U us per sample of each step (TANDEM_TEST_FAULT=slow:0:U), a
# straggler that takes no CPU from the others (for ps, rank 1: the first
# worker).
# Usage: [SLOW=U] bench/unequal_ranks.sh [build dir] [training samples] [epochs] [repeats]
set -euo pipefail
build=${1:-build}
limit=${2:-30000}
epochs=${3:-2}
repeats=${4:-2}
cores=$(nproc)
if (( cores < 2 )); then echo "needs 2 cores, this machine has $cores" >&2; exit 1; fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common="--epochs $epochs --limit $limit --val-limit 5000 --threads 1 --num-workers 0 --quiet --save none"
slow=${SLOW:-}
run() {  # name, then train flags
  local name=$1; shift
  local port=$((20000 + RANDOM % 20000))
  local pids=()
  local straggler=0
  [[ " $* " == *" ps "* ]] && straggler=1
  for r in 0 1 2; do
    local core=0; (( r == 2 )) && core=1
    local pin=(taskset -c $core) fault=()
    if [[ -n $slow ]]; then pin=(); fault=(TANDEM_TEST_FAULT=slow:$straggler:$slow); fi
    env "${fault[@]}" MASTER_ADDR=127.0.0.1 MASTER_PORT=$port WORLD_SIZE=3 RANK=$r LOCAL_RANK=$r LOCAL_WORLD_SIZE=3 \
      "${pin[@]}" "$build/tandem" train $common "$@" --output "$out/$name.json" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
}
for i in $(seq 1 "$repeats"); do
  echo "repetition $i/$repeats" >&2
  run "equal.$i" --strategy ddp
  run "balanced.$i" --strategy ddp --balance auto
  run "pssync.$i" --strategy ps --ps-mode sync
  run "psssp.$i" --strategy ps --ps-mode ssp --staleness 2
done
python3 - "$out" "$repeats" "$limit" "$epochs" "$slow" <<'PY'
import json, statistics, sys
d, repeats, limit, epochs, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
names = ("equal", "balanced", "pssync", "psssp")
docs = {k: [json.load(open(f"{d}/{k}.{r}.json")) for r in range(1, repeats + 1)] for k in names}
setting = (f"no pinning, the first training rank sleeps {slow} us per sample" if slow else
           "ranks 0 and 1 on core 0, rank 2 on core 1")
print(f"cnn, Fashion-MNIST {limit} samples, {epochs} epochs, 3 ranks: {setting}")
print(f"{'run':<10}{'rep':>4}{'last-epoch img/s':>18}{'run img/s':>11}{'val acc':>9}  shares")
def last(j): return j["epochs"][-1]["train_throughput"]
def whole(j): return sum(e["train_throughput"] * e["train_time"] for e in j["epochs"]) / sum(e["train_time"] for e in j["epochs"])
for k in names:
    for r, j in enumerate(docs[k]):
        sh = j["epochs"][-1].get("shares", [])
        print(f"{k:<10}{r + 1:>4}{last(j):>18.0f}{whole(j):>11.0f}{j['epochs'][-1]['val_accuracy']:>9.4f}  "
              + "/".join(f"{s:.2f}" for s in sh))
med = {k: (statistics.median(last(j) for j in v), statistics.median(whole(j) for j in v)) for k, v in docs.items()}
print(f"--balance auto / equal shares (medians): last epoch {med['balanced'][0] / med['equal'][0]:.3f}x, "
      f"whole run {med['balanced'][1] / med['equal'][1]:.3f}x (target >= 1.25; limit 1.33)")
print(f"ps ssp:2 / ps sync (medians): last epoch {med['psssp'][0] / med['pssync'][0]:.3f}x, "
      f"whole run {med['psssp'][1] / med['pssync'][1]:.3f}x (target >= 1.25)")
PY
