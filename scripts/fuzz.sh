#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ and runs them (docs/fuzzing.md).
#
#   scripts/fuzz.sh smoke                    bounded run of every target (ctest: fuzz_smoke)
#   scripts/fuzz.sh long [SECONDS] [TARGET...]
#                                            long run: each target for SECONDS, or, without
#                                            SECONDS, until 1,000,000 executions
#   scripts/fuzz.sh repro TARGET FILE...     run a target on saved inputs (a crash, a seed)
#
# Needs clang-14 and libfuzzer-14-dev (Debian); installs nothing. Exits 77
# (ctest: skipped) without them, non-zero on any finding: a crash, an ASan or
# UBSan report, a leak, an allocation over the limit, a timeout.
#
# A finding's input is copied into fuzz/corpus/<target>/ as
# <kind>-<target>-<sha1 prefix> (kind: crash, leak, oom, timeout), so every
# later smoke run replays it: commit it together with the fix.
#
# Environment:
#   TANDEM_FUZZ_BUILD_DIR   build directory (default: build/fuzz)
#   TANDEM_FUZZ_SOURCE_DIR  checkout whose src/ is fuzzed (default: this one), e.g. a copy with a fix
#   CXX                     compiler (default: clang++-14)
#   TANDEM_FUZZ_JOBS        parallel compile jobs (default: nproc)
#   TANDEM_FUZZ_SMOKE_RUNS  executions per target in smoke (default 20000)
#   TANDEM_FUZZ_SMOKE_SECONDS  time cap per target in smoke (default 20)
#   TANDEM_FUZZ_LONG_RUNS   executions per target in long without SECONDS (default 1000000)
#   TANDEM_FUZZ_STRICT=1    every rejection that is not a tandem::Error is a finding too
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

mode=${1:-}
[ $# -gt 0 ] && shift
case "$mode" in
  smoke|long|repro) ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

build=${TANDEM_FUZZ_BUILD_DIR:-$root/build/fuzz}
cxx=${CXX:-clang++-14}
# A CXX that is not clang (say g++ from the environment) cannot build fuzzers.
case "$("$cxx" --version 2>/dev/null | head -1)" in
  *clang*) ;;
  *) cxx=clang++-14 ;;
esac
if ! command -v "$cxx" >/dev/null; then
  echo "fuzz.sh: $cxx not found: install clang-14 and libfuzzer-14-dev (scripts/deps.sh); skipping" >&2
  exit 77
fi
if ! echo 'extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) { return 0; }' |
     "$cxx" -x c++ -fsanitize=fuzzer -o /dev/null - 2>/dev/null; then
  echo "fuzz.sh: $cxx cannot link -fsanitize=fuzzer: install libfuzzer-14-dev (scripts/deps.sh); skipping" >&2
  exit 77
fi

# ---- build
jobs=${TANDEM_FUZZ_JOBS:-$(nproc)}
source_dir=$(cd "${TANDEM_FUZZ_SOURCE_DIR:-$root}" && pwd)
mkdir -p "$(dirname "$build")"
compiler=$(command -v "$cxx")
if [ ! -f "$build/CMakeCache.txt" ] || ! grep -q "CMAKE_CXX_COMPILER:.*=$compiler\$" "$build/CMakeCache.txt"; then
  rm -rf "$build"
  cmake -S "$root/fuzz" -B "$build" -DCMAKE_CXX_COMPILER="$compiler" -DTANDEM_SOURCE_DIR="$source_dir" \
    >"$build.configure.log" 2>&1 || {
    cat "$build.configure.log" >&2; echo "fuzz.sh: configuring fuzz/ failed" >&2; exit 1; }
else
  # Re-run: picks up a parser that appeared since (src/ckpt/) and the source dir.
  cmake "$build" -DTANDEM_SOURCE_DIR="$source_dir" >"$build.configure.log" 2>&1 || {
    cat "$build.configure.log" >&2; exit 1; }
fi
rm -f "$build.configure.log"
cmake --build "$build" -j "$jobs" || { echo "fuzz.sh: building fuzz/ failed" >&2; exit 1; }
read -r -a all_targets <"$build/targets.txt"

# ---- run
export LSAN_OPTIONS="suppressions=$root/fuzz/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export ASAN_OPTIONS="detect_leaks=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export OMP_NUM_THREADS=1

# Options every run shares: the limits that turn a huge allocation or a hang
# into a finding.
common=(-rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 -print_final_stats=1)
# Longest input the fuzzer makes. Explicit, because a large regression input
# in the corpus would otherwise raise it for every mutation (those inputs are
# replayed at full length first, see replay).
max_len=${TANDEM_FUZZ_MAX_LEN:-16384}

# Copies the artifacts a run left in $1 (libFuzzer's -artifact_prefix) into
# the target's corpus as regression inputs; prints their names.
keep_findings() {
  local dir=$1 target=$2 f kind sum dest
  for f in "$dir"/crash-* "$dir"/leak-* "$dir"/oom-* "$dir"/timeout-*; do
    [ -f "$f" ] || continue
    kind=$(basename "$f"); kind=${kind%%-*}
    sum=$(sha1sum "$f" | cut -c1-12)
    dest="$root/fuzz/corpus/$target/$kind-$target-$sum"
    cp "$f" "$dest"
    echo "fuzz.sh: $target: finding saved as ${dest#$root/}"
  done
}

# replay TARGET LOG: runs the target once on each saved finding input in its
# corpus (crash-*, leak-*, oom-*, timeout-*), at full length. Non-zero while
# one of them still fails.
replay() {
  local target=$1 log=$2 f rc=0 files=()
  : >"$log"
  for f in "$root/fuzz/corpus/$target"/{crash,leak,oom,timeout}-*; do [ -f "$f" ] && files+=("$f"); done
  [ ${#files[@]} -eq 0 ] && return 0
  mkdir -p "$build/artifacts/replay"
  # All in one process (LibTorch takes a second to load); one by one only to
  # name every input that still fails.
  "$build/${target}_fuzz" "${common[@]}" -artifact_prefix="$build/artifacts/replay/" "${files[@]}" >"$log" 2>&1 &&
    return 0
  : >"$log"
  for f in "${files[@]}"; do
    if ! "$build/${target}_fuzz" "${common[@]}" -artifact_prefix="$build/artifacts/replay/" "$f" >>"$log" 2>&1; then
      echo "fuzz.sh: saved finding still fails: ${f#$root/}" | tee -a "$log" >&2
      rc=1
    fi
  done
  return $rc
}

# run_target TARGET WORK_CORPUS_DIR LOG [libFuzzer options...]
# Replays the saved findings, then fuzzes from the checked-in corpus plus
# WORK_CORPUS_DIR (where new inputs go). Returns libFuzzer's exit status; the
# output and stats land in LOG.
run_target() {
  local target=$1 work=$2 log=$3; shift 3
  local art="$build/artifacts/$target"
  local dict=()
  replay "$target" "$log" || return $?
  [ -f "$root/fuzz/dict/$target.dict" ] && dict=(-dict="$root/fuzz/dict/$target.dict")
  rm -rf "$art"; mkdir -p "$art" "$work"
  "$build/${target}_fuzz" "${common[@]}" -max_len="$max_len" "${dict[@]}" -artifact_prefix="$art/" "$@" \
    "$work" "$root/fuzz/corpus/$target" >"$log" 2>&1
  local rc=$?
  keep_findings "$art" "$target"
  return $rc
}

stat_of() { sed -n "s/^stat::$1: *//p" "$2" | tail -1; }

summary=()
failed=0
report() {  # target rc log work_corpus
  local target=$1 rc=$2 log=$3 work=$4
  local execs secs rate rss
  execs=$(stat_of number_of_executed_units "$log")
  rate=$(stat_of average_exec_per_sec "$log")
  rss=$(stat_of peak_rss_mb "$log")
  secs=$(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' "$log" | awk '{print $5}' | tail -1)
  if [ "$rc" -eq 0 ]; then
    summary+=("$(printf '%-9s ok  %10s execs %6s s %7s exec/s  working corpus %6s  peak RSS %s MB' "$target" \
      "${execs:-?}" "${secs:-?}" "${rate:-?}" "$(ls "$work" 2>/dev/null | wc -l)" "${rss:-?}")")
  else
    failed=1
    if grep -q "^fuzz.sh: saved finding still fails" "$log"; then
      summary+=("$(printf '%-9s FINDING  %d saved finding input(s) still fail, log %s' "$target" \
        "$(grep -c "^fuzz.sh: saved finding still fails" "$log")" "$log")")
    else
      summary+=("$(printf '%-9s FINDING  (exit %d) after %s execs, log %s' "$target" "$rc" "${execs:-?}" "$log")")
    fi
    echo "---- $target: the first report (all of them: $log):" >&2
    grep -E -m1 -B1 -A30 '^==[0-9]+== ?ERROR|runtime error:|FINDING:|ALARM' "$log" | head -40 >&2
  fi
}

pick_targets() {  # the named targets (all when none), checked
  local t
  if [ $# -eq 0 ]; then targets=("${all_targets[@]}"); return; fi
  targets=()
  for t in "$@"; do
    [[ " ${all_targets[*]} " == *" $t "* ]] || {
      echo "fuzz.sh: unknown target '$t' (have: ${all_targets[*]})" >&2; exit 2; }
    targets+=("$t")
  done
}

case "$mode" in
  smoke)
    runs=${TANDEM_FUZZ_SMOKE_RUNS:-20000}
    secs=${TANDEM_FUZZ_SMOKE_SECONDS:-20}
    for t in "${all_targets[@]}"; do
      # A fresh working corpus and a fixed seed: each smoke run starts from the
      # checked-in corpus and mutates the same way.
      rm -rf "$build/smoke/$t"
      log="$build/logs/smoke-$t.log"; mkdir -p "$build/logs"
      echo "fuzz.sh: smoke $t: $runs runs, at most $secs s"
      run_target "$t" "$build/smoke/$t" "$log" -runs="$runs" -max_total_time="$secs" -seed=1
      report "$t" $? "$log" "$build/smoke/$t"
    done
    ;;
  long)
    secs=""
    if [[ ${1:-} =~ ^[0-9]+$ ]]; then secs=$1; shift; fi
    pick_targets "$@"
    for t in "${targets[@]}"; do
      # The working corpus persists in $build/corpus/<target>, so each long run
      # continues where the last one stopped.
      log="$build/logs/long-$t.log"; mkdir -p "$build/logs"
      if [ -n "$secs" ]; then
        echo "fuzz.sh: long $t: $secs s"
        run_target "$t" "$build/corpus/$t" "$log" -max_total_time="$secs"
      else
        echo "fuzz.sh: long $t: ${TANDEM_FUZZ_LONG_RUNS:-1000000} executions"
        run_target "$t" "$build/corpus/$t" "$log" -runs="${TANDEM_FUZZ_LONG_RUNS:-1000000}"
      fi
      report "$t" $? "$log" "$build/corpus/$t"
    done
    ;;
  repro)
    [ $# -ge 2 ] || { echo "usage: scripts/fuzz.sh repro TARGET FILE..." >&2; exit 2; }
    pick_targets "$1"; shift
    exec "$build/${targets[0]}_fuzz" "${common[@]}" "$@"
    ;;
esac

echo
echo "fuzz.sh: $mode summary"
printf '  %s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "fuzz.sh: FINDINGS: see the reports above; inputs saved in fuzz/corpus/<target>/ (docs/fuzzing.md)" >&2
  exit 1
fi
