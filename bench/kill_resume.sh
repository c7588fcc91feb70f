#!/usr/bin/env bash
# Durable training's acceptance run: the same 2-rank DDP training twice,
#   1. uninterrupted,
#   2. with rank 1 killed by an outside `kill -9` in the middle of epoch 2 and
#      the group restarted by --max-restarts from the newest checkpoint,
# then compares the final val_accuracy and every tensor of model.pt (bit for
# bit) and reports the restart's cost (steps redone, wall time).
# Usage: bench/kill_resume.sh [build dir] [strategy] [extra train flags...]
set -euo pipefail
build=$(cd "${1:-build}" && pwd)
strategy=${2:-ddp}
shift 2 || true
extra=("$@")
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
nproc=2
victim_rank=1
if [ "$strategy" = ps ]; then nproc=3; victim_rank=2; fi
common=(train --nproc "$nproc" --strategy "$strategy" --epochs 2 --checkpoint-every 50 --max-restarts 2 "${extra[@]}")

t0=$(date +%s.%N)
"$build/tandem" "${common[@]}" --checkpoint-dir "$out/ck_ref" --output "$out/ref/results.json" 2> "$out/ref.log"
t1=$(date +%s.%N)

"$build/tandem" "${common[@]}" --checkpoint-dir "$out/ck" --output "$out/killed/results.json" 2> "$out/killed.log" &
job=$!
# Steps per epoch, from the first epoch line's progress bar total is not
# parsed: wait for the progress record to pass 1.5 epochs' worth of steps.
steps_per_epoch=$(/usr/bin/python3 -c "
import json; j = json.load(open('$out/ref/results.json')); print(len(j['all_losses']) // len(j['epochs']))")
target=$((steps_per_epoch * 3 / 2))
while :; do
  step=$(/usr/bin/python3 -c "import json; print(json.load(open('$out/ck/progress.json'))['global_step'])" 2>/dev/null || echo 0)
  [ "$step" -ge "$target" ] && break
  kill -0 "$job" 2>/dev/null || { echo "the run ended before step $target" >&2; exit 1; }
  sleep 0.2
done
victim=""
for p in $(pgrep -P "$job"); do
  if tr '\0' '\n' < "/proc/$p/environ" | grep -qx "RANK=$victim_rank"; then victim=$p; fi
done
[ -n "$victim" ] || { echo "rank $victim_rank not found among the children of $job" >&2; exit 1; }
echo "killing rank $victim_rank (pid $victim) at global step $step of $((steps_per_epoch * 2)) (kill -9)" >&2
kill -9 "$victim"
t2=$(date +%s.%N)
wait "$job" && code=0 || code=$?
t3=$(date +%s.%N)
echo "killed run's exit code: $code" >&2
grep -E "restarting|resuming|succeeded" "$out/killed.log" >&2 || true
/usr/bin/python3 - "$out" "$code" "$t0" "$t1" "$t2" "$t3" <<'PY'
import json, sys, torch
d, code = sys.argv[1], int(sys.argv[2])
t0, t1, t2, t3 = map(float, sys.argv[3:7])
ref, got = json.load(open(f"{d}/ref/results.json")), json.load(open(f"{d}/killed/results.json"))
a, b = torch.load(f"{d}/ref/model.pt"), torch.load(f"{d}/killed/model.pt")
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
va, vb = ref["epochs"][-1]["val_accuracy"], got["epochs"][-1]["val_accuracy"]
print(f"strategy {ref['config']['strategy']}, {ref['world_size']} ranks, {len(ref['all_losses'])} steps, "
      f"checkpoint every 50 steps")
print(f"exit code of the killed run: {code} (want 0); restarts {got['restarts']}, steps redone {got['steps_redone']}")
print(f"final val_accuracy: uninterrupted {va:.4f}, killed+restarted {vb:.4f}: {'identical' if va == vb else 'DIFFERENT'}")
print(f"model.pt: {len(a)} tensors, {'bit-identical' if same else 'DIFFERENT'}")
print(f"wall time: uninterrupted {t1 - t0:.1f} s; killed run {t3 - t1:.1f} s in all")
sys.exit(0 if code == 0 and same and va == vb else 1)
PY
