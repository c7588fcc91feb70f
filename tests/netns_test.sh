#!/usr/bin/env bash
# Two hosts on one machine (issue 9): two network namespaces joined by a veth
# pair, 10.77.0.1 and 10.77.0.2, each with its own host name (unshare --uts).
# `tandem launch --nnodes 2` runs on each with 2 ranks per node.
#   1. Both nodes point at 10.77.0.1: the job trains and exits 0, the results
#      JSON exists (and, when it records config.comm, that is "hybrid").
#   2. Node 1 points at 10.77.0.9 (nobody there), --timeout 20: the job fails
#      on both nodes within 60 s and the error names the address.
# Needs root and `ip netns`; elsewhere it says so and exits 77 (ctest: skipped).
# The namespaces, the veth pair and every process left in them are removed on exit.
#
# Usage: tests/netns_test.sh /path/to/tandem
set -u

TANDEM=${1:?usage: netns_test.sh /path/to/tandem}
SKIP=77

skip() {
  echo "netns_test: cannot create network namespaces here ($1); multi-host path not exercised"
  exit "$SKIP"
}

[ -x "$TANDEM" ] || { echo "netns_test: FAIL: tandem binary '$TANDEM' not found or not executable"; exit 1; }
[ "$(id -u)" = 0 ] || skip "not root"
for tool in ip unshare timeout; do
  command -v "$tool" >/dev/null 2>&1 || skip "no '$tool' command"
done

NSA="tandem_a_$$"
NSB="tandem_b_$$"
VA="tdma$$"  # interface names: at most 15 characters
VB="tdmb$$"
ADDR_A=10.77.0.1
ADDR_B=10.77.0.2
ADDR_NOBODY=10.77.0.9
PORT=$((20000 + $$ % 20000))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tandem_netns.XXXXXX")
CREATED=()

cleanup() {
  local ns pid
  for ns in "${CREATED[@]}"; do
    # Leftover ranks of this test only: the processes inside our namespaces.
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
  done
  ip link del "$VA" 2>/dev/null  # only exists if moving it into its namespace failed
  for ns in "${CREATED[@]}"; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! err=$(ip netns add "$NSA" 2>&1); then skip "ip netns add: ${err:-failed}"; fi
CREATED+=("$NSA")
if ! err=$(ip netns add "$NSB" 2>&1); then skip "ip netns add: ${err:-failed}"; fi
CREATED+=("$NSB")
if ! err=$(ip netns exec "$NSA" unshare --uts true 2>&1); then skip "unshare --uts: ${err:-failed}"; fi

net() {  # net <description> <command...>: set-up step; any failure is a test failure, not a skip
  local desc=$1 out
  shift
  if ! out=$("$@" 2>&1); then
    echo "netns_test: FAIL: $desc: $* -> $out"
    exit 1
  fi
}
net "veth pair" ip link add "$VA" type veth peer name "$VB"
net "veth into $NSA" ip link set "$VA" netns "$NSA"
net "veth into $NSB" ip link set "$VB" netns "$NSB"
net "address A" ip -n "$NSA" addr add "$ADDR_A/24" dev "$VA"
net "address B" ip -n "$NSB" addr add "$ADDR_B/24" dev "$VB"
for ns in "$NSA" "$NSB"; do net "lo up in $ns" ip -n "$ns" link set lo up; done
net "veth up A" ip -n "$NSA" link set "$VA" up
net "veth up B" ip -n "$NSB" link set "$VB" up
echo "netns_test: hosts $NSA ($ADDR_A on $VA, host name hostA) and $NSB ($ADDR_B on $VB, host name hostB), master port $PORT"

now_ms() { date +%s%3N; }

# node <ns> <hostname> <node-rank> <master-addr> <log> <train args...>: one `tandem launch` in a namespace.
node() {
  local ns=$1 host=$2 rank=$3 master=$4 log=$5 limit=$6
  shift 6
  timeout -k 10 "$limit" ip netns exec "$ns" unshare --uts sh -c '
    tandem=$1 host=$2; shift 2
    hostname "$host" 2>/dev/null || echo "$host" > /proc/sys/kernel/hostname || exit 97
    exec "$tandem" launch "$@"' sh "$TANDEM" "$host" \
    --nnodes 2 --node-rank "$rank" --master-addr "$master" --master-port "$PORT" --nproc-per-node 2 \
    -- "$TANDEM" train "$@" >"$log" 2>&1
}

# pair <tag> <master-addr of node 1> <limit> <train args...>: both nodes at once; sets rca/rcb (exit
# codes) and ta/tb (each node's own wall time in ms). Node 0 always points at its own address.
pair() {
  local tag=$1 master_b=$2 limit=$3 t0
  shift 3
  t0=$(now_ms)
  (node "$NSA" hostA 0 "$ADDR_A" "$WORK/${tag}_a.log" "$limit" "$@"; echo "$? $(( $(now_ms) - t0 ))" >"$WORK/${tag}_a.rc") &
  (node "$NSB" hostB 1 "$master_b" "$WORK/${tag}_b.log" "$limit" "$@"; echo "$? $(( $(now_ms) - t0 ))" >"$WORK/${tag}_b.rc") &
  wait
  read -r rca ta <"$WORK/${tag}_a.rc" || { rca=255; ta=0; }
  read -r rcb tb <"$WORK/${tag}_b.rc" || { rcb=255; tb=0; }
}

show() {  # show <log> <prefix> [lines]
  tail -n "${3:-40}" "$1" | sed "s/^/  $2| /"
}

FAILED=0
fail() {
  echo "netns_test: FAIL: $*"
  FAILED=1
}

# --- case 1: two hosts train together -----------------------------------------------------------
JSON="$WORK/r.json"
TRAIN=(--epochs 1 --limit 2048 --val-limit 512 --quiet --timeout 120 --output "$JSON")
LIMIT_OK=300
pair ok "$ADDR_A" "$LIMIT_OK" "${TRAIN[@]}"
echo "netns_test: case 1 (2 hosts x 2 ranks): node 0 exit $rca after ${ta} ms, node 1 exit $rcb after ${tb} ms"
grep -a -h -i -E 'bind|route to|GLOO_SOCKET_IFNAME' "$WORK/ok_a.log" "$WORK/ok_b.log" | sort -u | sed 's/^/  log| /'
if [ "$rca" != 0 ] || [ "$rcb" != 0 ]; then
  fail "case 1: the two-host job failed (exit codes $rca / $rcb; 124 or 137: stopped by the ${LIMIT_OK} s limit)"
  show "$WORK/ok_a.log" "node0"
  show "$WORK/ok_b.log" "node1"
elif [ ! -s "$JSON" ]; then
  fail "case 1: no results JSON at $JSON"
  show "$WORK/ok_a.log" "node0"
else
  comm=""
  if command -v jq >/dev/null 2>&1; then
    comm=$(jq -r 'if (.config | type) == "object" and (.config | has("comm")) then .config.comm else "<absent>" end' "$JSON" 2>&1)
  else
    comm=$(grep -o '"comm" *: *"[^"]*"' "$JSON" | head -n1 | sed 's/.*: *"\(.*\)"/\1/')
    [ -n "$comm" ] || comm="<absent>"
  fi
  echo "netns_test: case 1: results JSON written ($(wc -c <"$JSON") bytes); config.comm = $comm"
  if [ "$comm" != "<absent>" ] && [ "$comm" != "hybrid" ]; then
    fail "case 1: config.comm is '$comm', expected 'hybrid' (two hosts, two ranks each)"
  fi
fi

# --- case 2: node 1 points at an address where nobody listens -----------------------------------
TRAIN=(--epochs 1 --limit 2048 --val-limit 512 --quiet --timeout 20)
pair bad "$ADDR_NOBODY" 90 "${TRAIN[@]}"
echo "netns_test: case 2 (node 1 -> $ADDR_NOBODY, --timeout 20): node 0 exit $rca after ${ta} ms, node 1 exit $rcb after ${tb} ms"
echo "netns_test: case 2: error text, node 0:"
grep -a -i -E 'error|fail|timed? ?out|cannot' "$WORK/bad_a.log" | grep -a -v '^frame #' | head -n 8 | sed 's/^/  node0| /'
echo "netns_test: case 2: error text, node 1:"
grep -a -i -E 'error|fail|timed? ?out|cannot' "$WORK/bad_b.log" | grep -a -v '^frame #' | head -n 8 | sed 's/^/  node1| /'
[ "$rca" != 0 ] || fail "case 2: node 0 exited 0 though half of its world never came"
[ "$rcb" != 0 ] || fail "case 2: node 1 exited 0 though its master address is unreachable"
[ "$rca" != 124 ] && [ "$rca" != 137 ] || fail "case 2: node 0 did not stop by itself (killed by timeout after 90 s)"
[ "$rcb" != 124 ] && [ "$rcb" != 137 ] || fail "case 2: node 1 did not stop by itself (killed by timeout after 90 s)"
[ "$ta" -le 60000 ] && [ "$tb" -le 60000 ] || fail "case 2: failing took longer than 60 s"
grep -a -q -F "$ADDR_NOBODY" "$WORK/bad_b.log" || {
  fail "case 2: node 1's error does not name the address it tried ($ADDR_NOBODY)"
  show "$WORK/bad_b.log" "node1"
}

if [ "$FAILED" = 0 ]; then echo "netns_test: PASS"; else echo "netns_test: FAILED"; fi
exit "$FAILED"
