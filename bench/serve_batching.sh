#!/usr/bin/env bash
# Dynamic batching against one request per forward pass, side by side:
# `tandem serve` with --max-batch auto (the policy's choice, logged) and with
# --max-batch 1, each with serve's default model instances (--instances auto:
# measured at start-up) and with one instance on every core (--instances 1),
# loaded by `tandem bench serve` (64 keep-alive clients, real Fashion-MNIST
# test images as PNG). The four set-ups are interleaved and repeated, so a
# slow spell of the machine hits all alike; ratios are of the medians: at
# the defaults, with one instance, and best against best. Server and load
# generator share the machine's cores, as they would on one host.
# Usage: bench/serve_batching.sh [build dir] [weights] [model] [repeats] [requests]
# Extra serve flags: TANDEM_SERVE_ARGS (e.g. "--precision fp32").
set -euo pipefail
build=${1:-build}
weights=${2:?weights: a model.pt written by tandem train}
model=${3:-cnn}
repeats=${4:-3}
requests=${5:-10000}
port=${TANDEM_BENCH_PORT:-18181}
out=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$out"' EXIT
run() {  # run LABEL REP MAX_BATCH INSTANCES
  "$build/tandem" serve --weights "$weights" --model "$model" --port "$port" --max-batch "$3" --instances "$4" --quiet \
    ${TANDEM_SERVE_ARGS:-} 2> "$out/$1.$2.log" &
  local pid=$!
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/healthz" > /dev/null && break; sleep 0.1; done
  "$build/tandem" bench serve --url "http://127.0.0.1:$port" --clients 64 --requests "$requests" \
    --json "$out/$1.$2.json" > /dev/null
  kill -TERM "$pid"
  wait "$pid"
}
for r in $(seq 1 "$repeats"); do
  echo "repetition $r/$repeats" >&2
  run auto "$r" auto auto
  run one "$r" 1 auto
  run auto_i1 "$r" auto 1
  run one_i1 "$r" 1 1
done
for f in "$out"/auto.*.log "$out"/one.1.log; do grep -h "precision .*(\|max batch .*(\|instances\? x" "$f" >&2 || true; done
python3 - "$out" "$repeats" "$model" "$requests" <<'PY'
import json, statistics, sys
d, repeats, model, requests = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
keys = (("auto", "--max-batch auto"), ("one", "--max-batch 1"),
        ("auto_i1", "--max-batch auto --instances 1"), ("one_i1", "--max-batch 1 --instances 1"))
res = {k: [json.load(open(f"{d}/{k}.{r}.json")) for r in range(1, repeats + 1)] for k, _ in keys}
print(f"{model}, 64 clients, {requests} requests per run, {repeats} interleaved repetitions")
print("| run | requests/s | p50 ms | p99 ms | errors |")
print("|---|---|---|---|---|")
for k, label in keys:
    v = res[k]
    col = lambda key, f: " / ".join(f % x[key] for x in v)
    print(f"| {label} | {col('throughput', '%.0f')} | {col('p50_ms', '%.1f')} | {col('p99_ms', '%.1f')} | "
          f"{sum(x['errors'] for x in v)} |")
med = {k: statistics.median(x["throughput"] for x in res[k]) for k, _ in keys}
print(f"auto / 1 at the defaults: {med['auto'] / med['one']:.2f}x; with --instances 1: "
      f"{med['auto_i1'] / med['one_i1']:.2f}x; best auto / best 1: "
      f"{max(med['auto'], med['auto_i1']) / max(med['one'], med['one_i1']):.2f}x; "
      f"default instances / one instance: {med['auto'] / med['auto_i1']:.2f}x (auto), "
      f"{med['one'] / med['one_i1']:.2f}x (1) (medians)")
PY
