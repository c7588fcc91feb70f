#!/usr/bin/env bash
# tandem's shared-memory and Gloo all-reduce beside Open MPI's MPI_Allreduce,
# 2 ranks on this machine, float32 sum, the same sizes and the same timing
# (barrier before each iteration, median iteration, max over ranks).
# Each repetition runs, one after the other (interleaved, so that a slow spell
# of the machine hits both alike):
#   <build>/tandem bench comm --nproc 2 --comm shm,gloo --algos native ... --json F
#   mpirun -np 2 <build>/bench/mpi_allreduce ... --json F
# then one markdown table: per size the median over repetitions of time_us for
# shm, gloo and mpi, shm busbw / gloo busbw, and shm time / mpi time (below 1:
# shm is faster than MPI).
# Installs libopenmpi-dev and openmpi-bin if missing (apt-get, sudo when not
# root) and builds the mpi_allreduce target (bench/CMakeLists.txt, optional:
# it exists only where MPI is found) if it is not built yet.
#
# Usage: bench/comm_vs_mpi.sh [--repeats R] [--iters N] [--warmup W]
#                             [--min-bytes 4K] [--max-bytes 64M]
#                             [--build DIR] [--out DIR]
#   --repeats R   repetitions, default 3
#   --iters N     timed iterations per size in every run, default 20
#   --warmup W    untimed iterations per size, default 5
#   --build DIR   build directory with tandem (default build)
#   --out DIR     keep the JSON files (tandem.R.json, mpi.R.json) there
# TANDEM_BENCH_ARGS adds flags to the tandem run (e.g. "--algos native,ring":
# the table still takes only the shm and gloo all-reduce rows).
# Open MPI MCA settings come from the environment as usual (OMPI_MCA_*).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

repeats=3 iters=20 warmup=5 min_bytes=4K max_bytes=64M build=build out=""
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --repeats|--iters|--warmup|--min-bytes|--max-bytes|--build|--out)
      [ $# -ge 2 ] || { echo "comm_vs_mpi: $1 needs a value" >&2; exit 2; }
      v=$2; opt=${1#--}; opt=${opt//-/_}; printf -v "$opt" '%s' "$v"; shift 2 ;;
    *) echo "comm_vs_mpi: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for v in "$repeats" "$iters"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "comm_vs_mpi: --repeats and --iters take a positive integer" >&2; exit 2; }
done
[[ $warmup =~ ^[0-9]+$ ]] || { echo "comm_vs_mpi: --warmup takes an integer >= 0" >&2; exit 2; }
case $build in /*) ;; *) build=$repo/$build ;; esac

# Open MPI from Debian.
missing=()
for p in libopenmpi-dev openmpi-bin; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "comm_vs_mpi: installing missing Debian packages: ${missing[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "comm_vs_mpi: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  # apt's output goes to stderr: stdout carries only the table.
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

[ -x "$build/tandem" ] || { echo "comm_vs_mpi: no $build/tandem: build tandem first (scripts/build.sh)" >&2; exit 1; }
"$build/tandem" bench comm --help 2>/dev/null | grep -q -- '--comm' ||
  { echo "comm_vs_mpi: $build/tandem bench comm has no --comm option: rebuild tandem" >&2; exit 1; }

# The MPI peer: configure again if it is not built (the cache may predate the
# MPI install, when the optional target was left out), then build only it.
mpi_bin=$build/bench/mpi_allreduce
if [ ! -x "$mpi_bin" ]; then
  echo "comm_vs_mpi: building mpi_allreduce in $build" >&2
  cmake -S "$repo" -B "$build" >/dev/null
fi
cmake --build "$build" --target mpi_allreduce -j"$(nproc)" >/dev/null ||
  { echo "comm_vs_mpi: cannot build mpi_allreduce (is MPI found? see bench/CMakeLists.txt)" >&2; exit 1; }

mpirun_args=(-np 2)
[ "$(id -u)" -eq 0 ] && mpirun_args+=(--allow-run-as-root)
[ "$(nproc)" -lt 2 ] && mpirun_args+=(--oversubscribe)

if [ -n "$out" ]; then
  mkdir -p "$out"
else
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
# Only each communicator's own all-reduce (rows shm, gloo), unless TANDEM_BENCH_ARGS chooses.
algos=(--algos native)
[[ " ${TANDEM_BENCH_ARGS:-} " == *" --algos "* ]] && algos=()
sizes=(--min-bytes "$min_bytes" --max-bytes "$max_bytes" --iters "$iters" --warmup "$warmup")
for r in $(seq 1 "$repeats"); do
  echo "comm_vs_mpi: repetition $r/$repeats: tandem (shm, gloo)" >&2
  # shellcheck disable=SC2086  # TANDEM_BENCH_ARGS is a list of flags
  "$build/tandem" bench comm --nproc 2 --comm shm,gloo "${sizes[@]}" "${algos[@]}" ${TANDEM_BENCH_ARGS:-} \
    --json "$out/tandem.$r.json" >/dev/null
  echo "comm_vs_mpi: repetition $r/$repeats: mpi" >&2
  mpirun "${mpirun_args[@]}" "$mpi_bin" "${sizes[@]}" --json "$out/mpi.$r.json" >/dev/null
done

/usr/bin/python3 - "$out" "$repeats" "$iters" <<'PY'
import json, statistics, sys
d, repeats, iters = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def rows(path, algos):
    """(algo, bytes) -> row for the all-reduce rows: algo shm/gloo named after its communicator, or mpi."""
    out = {}
    for r in json.load(open(path))["rows"]:
        if r["algo"] in algos and r.get("comm", r["algo"]) == r["algo"]:
            out[(r["algo"], r["bytes"])] = r
    return out

runs = []
for k in range(1, repeats + 1):
    runs.append({**rows(f"{d}/tandem.{k}.json", ("shm", "gloo")), **rows(f"{d}/mpi.{k}.json", ("mpi",))})
sizes = sorted({b for run in runs for (_, b) in run})
if not sizes:
    sys.exit("comm_vs_mpi: no all-reduce rows in the JSON files")

def med(algo, b, field):
    v = [run[(algo, b)][field] for run in runs if (algo, b) in run]
    return statistics.median(v) if v else None

def wrong(b):
    return [a for a in ("shm", "gloo", "mpi") for run in runs if (a, b) in run and not run[(a, b)]["correct"]]

def size(b):
    for unit, div in (("M", 1 << 20), ("K", 1 << 10)):
        if b >= div and b % div == 0:
            return f"{b // div}{unit}"
    return str(b)

def num(v, f="{:.1f}"):
    return "-" if v is None else f.format(v)

def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"

print(f"2 ranks, float32 sum all-reduce; median over {repeats} repetitions of the median of {iters} iterations")
print()
print("| size | shm time (us) | gloo time (us) | mpi time (us) | shm busbw / gloo busbw | shm time / mpi time |")
print("|---:|---:|---:|---:|---:|---:|")
bad = []
for b in sizes:
    t = {a: med(a, b, "time_us") for a in ("shm", "gloo", "mpi")}
    bw = {a: med(a, b, "busbw_gbps") for a in ("shm", "gloo")}
    w = wrong(b)
    if w:
        bad.append(f"{size(b)}: {', '.join(sorted(set(w)))}")
    print(f"| {size(b)} | {num(t['shm'])} | {num(t['gloo'])} | {num(t['mpi'])} | {ratio(bw['shm'], bw['gloo'])} "
          f"| {ratio(t['shm'], t['mpi'])} |")
if bad:
    print()
    print("WRONG results (correctness check failed): " + "; ".join(bad))
    sys.exit(1)
PY
