#!/usr/bin/env bash
# Pause against request length: one llama3-8b request of 1k..32k tokens,
# moved between two agents on loopback while the source decodes, by
# stop-and-copy and by --live, interleaved (A B A B), REPS times each.
# Prints median and range of pause_ms per case.
#
#   tools/bench-live.sh [--reps N] [--rate TOKENS_PER_S] [--lengths "1024 4096"]
#                       [--transport tcp|ucx] [--converge-pages N]
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=3 RATE=50 LENGTHS="1024 4096 16384 32768" TRANSPORT=tcp CONVERGE=
while (($#)); do
  case $1 in
    --reps) REPS=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --lengths) LENGTHS=$2; shift 2 ;;
    --transport) TRANSPORT=$2; shift 2 ;;
    --converge-pages) CONVERGE=$2; shift 2 ;;
    *) sed -n '2,9p' "$0"; exit 2 ;;
  esac
done
BUILD_DIR=${BUILD_DIR:-build} tools/dev.sh build >/dev/null 2>&1
K=${BUILD_DIR:-build}/tools/kvmig
tmp=$(mktemp -d)
pids=()
trap '((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null; rm -rf "$tmp"' EXIT

start() {  # start LOG ARGS... -> prints address; pid in LOG.pid
  local log=$1; shift
  "$K" serve --listen 127.0.0.1:0 "$@" >"$log" 2>"$log.err" &
  echo $! >"$log.pid"
  for _ in $(seq 600); do
    local a; a=$(sed -n 's/.*listening on //p' "$log")
    [[ -n $a ]] && { echo "$a"; return; }
    sleep 0.1
  done
  echo "agent did not start: $(cat "$log.err")" >&2; exit 1
}

run() {  # run TOKENS MODE -> prints pause_ms rounds
  local tokens=$1 mode=$2
  local cap=$(( tokens / 16 + 64 ))
  local src dst extra=()
  [[ $mode == live ]] && extra=(--live)
  [[ $mode == live && -n $CONVERGE ]] && extra+=(--converge-pages "$CONVERGE")
  src=$(start "$tmp/src" --preset llama3-8b --capacity-pages $cap \
        --populate 1:$tokens --decode-rate "$RATE" --transports tcp,ucx)
  dst=$(start "$tmp/dst" --preset llama3-8b --capacity-pages $cap --transports tcp,ucx)
  pids=("$(cat "$tmp/src.pid")" "$(cat "$tmp/dst.pid")")
  "$K" migrate --agent "$src" --to "$dst" --all --transport "$TRANSPORT" --json \
    "${extra[@]}" | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["ok"], d; print(d["pause_ms"], d["rounds"], d["gbps"])'
  kill "${pids[@]}"
  for p in "${pids[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; done
  pids=()
}

echo "# $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo "# llama3-8b (2 MiB per page), 1 request, decode $RATE tokens/s, $TRANSPORT, $REPS reps interleaved, converge-pages ${CONVERGE:-default}"
declare -A results
for rep in $(seq "$REPS"); do
  for t in $LENGTHS; do
    for mode in stop live; do
      r=$(run "$t" "$mode")
      results[$t,$mode]+="$r;"
      echo "rep $rep tokens $t $mode: pause_ms rounds gbps = $r" >&2
    done
  done
done
python3 - "$LENGTHS" "$(for k in "${!results[@]}"; do echo "$k=${results[$k]}"; done)" <<'PY'
import statistics, sys
lengths = sys.argv[1].split()
data = {}
for line in sys.argv[2].splitlines():
    key, vals = line.split("=", 1)
    data[key] = [list(map(float, v.split())) for v in vals.split(";") if v]
print(f"{'tokens':>7} {'stop-and-copy pause ms':>26} {'live pause ms':>24} {'live rounds':>11}")
for t in lengths:
    s = [v[0] for v in data[f"{t},stop"]]; l = [v[0] for v in data[f"{t},live"]]
    r = [v[1] for v in data[f"{t},live"]]
    print(f"{t:>7} {statistics.median(s):>10.1f} ({min(s):.1f}-{max(s):.1f}) "
          f"{statistics.median(l):>10.1f} ({min(l):.1f}-{max(l):.1f}) {statistics.median(r):>11.0f}")
l1 = statistics.median(v[0] for v in data[f"{lengths[0]},live"])
ln = statistics.median(v[0] for v in data[f"{lengths[-1]},live"])
print(f"live pause at {lengths[-1]} / at {lengths[0]} tokens: {ln / l1:.2f} (goal <= 1.5)")
PY
