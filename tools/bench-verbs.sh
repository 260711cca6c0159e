#!/usr/bin/env bash
# Benchmark, run INSIDE the Soft-RoCE guest:
#
#   ../shared/rxe-vm/rxe-run.sh -- tools/bench-verbs.sh
#
# Interleaves (A B A B ...) a kvmig migration over verbs of llama3-8b requests
# (page layout, MIB MiB of pages) with ib_write_bw on the same device, GID and
# message size (the size of kvmig's RDMA WRITEs), and prints the median and
# range of each and their ratio. Then the message rate: `kvmig perf` of the
# tiny preset layer -> layer into random slots (4 KiB RDMA WRITEs, 1 QP)
# against `ib_write_bw -s 4096`, writes per second of the data phase.
# Under emulation only the ratios mean much.
# Env: BUILD_DIR (build), REPS (3), MIB (64, a multiple of 4), RATE_PAGES
# (1024 tiny pages: 32768 writes a migration).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BUILD_DIR:-build}; K=$B/tools/kvmig; REPS=${REPS:-3}; MIB=${MIB:-64}
DEV=${RXEVM_DEV:?run inside the rxe guest}; IP=${RXEVM_IP:?run inside the rxe guest}
W=$(mktemp -d); trap 'kill $(cat "$W"/*.pid 2>/dev/null) 2>/dev/null; rm -rf "$W"' EXIT

# The RoCE v2 GID index of $IP, looked up in sysfs.
want=$(printf '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' ${IP//./ })
GIDX=
for g in /sys/class/infiniband/$DEV/ports/1/gids/*; do
  i=${g##*/}
  [[ $(cat "$g") == "$want" ]] || continue
  [[ $(cat /sys/class/infiniband/$DEV/ports/1/gid_attrs/types/$i 2>/dev/null) == "RoCE v2" ]] && GIDX=$i && break
done
[[ -n $GIDX ]] || { echo "no RoCE v2 GID for $IP on $DEV" >&2; exit 1; }

PAGES=$((MIB / 2)); TOKENS=$((PAGES / 2 * 16))   # 2 requests, 2 MiB a page
agent() {  # agent NAME FLAGS... -> prints the address
  "$K" serve --listen "$IP:0" --insecure --preset llama3-8b --layout page \
    --capacity-pages $((PAGES + 8)) --transports tcp,verbs "${@:2}" >"$W/$1" 2>"$W/$1.err" &
  echo $! >"$W/$1.pid"
  for _ in $(seq 600); do
    a=$(sed -n 's/.*listening on //p' "$W/$1"); [[ -n $a ]] && { echo "$a"; return; }
    sleep 0.1
  done
  echo "agent $1 did not start" >&2; cat "$W/$1.err" >&2; exit 1
}

run_kvmig() {  # prints "GBIT_PER_S MSG_BYTES"
  local s d
  s=$(agent src --populate 2:$TOKENS --seed 1); d=$(agent dst)
  "$K" migrate --agent "$s" --to "$d" --all --transport verbs --json >"$W/report.json"
  kill "$(cat "$W/src.pid")" "$(cat "$W/dst.pid")" 2>/dev/null || true
  while kill -0 "$(cat "$W/src.pid")" 2>/dev/null || kill -0 "$(cat "$W/dst.pid")" 2>/dev/null; do sleep 0.1; done
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); assert r["ok"], r
print(r["gbps"] * 8, r["bytes"] // r["writes"])' "$W/report.json"
}

run_ib() {  # run_ib MSG_BYTES -> prints Gbit/s (BW average)
  local n=$(( MIB * 1048576 / $1 )); (( n >= 8 )) || n=8
  ib_write_bw -d "$DEV" -x "$GIDX" -s "$1" -n "$n" --report_gbits >"$W/srv" 2>&1 &
  sleep 1
  ib_write_bw -d "$DEV" -x "$GIDX" -s "$1" -n "$n" --report_gbits "$IP" >"$W/cli" 2>&1
  wait
  awk -v s="$1" '$1 == s && NF >= 5 {print $4}' "$W/cli" | tail -1
}

kv=(); ib=(); msg=
for r in $(seq "$REPS"); do
  out=$(run_kvmig); kv+=("${out% *}"); msg=${out#* }
  ib+=("$(run_ib "$msg")")
  printf -v g "%.3f" "${kv[-1]}"
  echo "rep $r: kvmig $g Gb/s, ib_write_bw ${ib[-1]} Gb/s (message $msg bytes)"
done
python3 - "$MIB" "$msg" "$GIDX" "${kv[*]}" "${ib[*]}" <<'PY'
import statistics, sys
mib, msg, gidx = sys.argv[1:4]
kv = [float(x) for x in sys.argv[4].split()]; ib = [float(x) for x in sys.argv[5].split()]
row = lambda name, v: f"| {name} | {statistics.median(v):.3f} | {min(v):.3f} - {max(v):.3f} | {len(v)} |"
print(f"\n{mib} MiB llama3-8b page layout, RDMA WRITEs of {msg} bytes, 1 QP, GID index {gidx}")
print("| run | median Gb/s | range | reps |\n| --- | --- | --- | --- |")
print(row("kvmig migrate --transport verbs", kv))
print(row(f"ib_write_bw -s {msg}", ib))
print(f"ratio kvmig / ib_write_bw (medians): {statistics.median(kv) / statistics.median(ib):.2f}")
PY

# --- message rate: 4 KiB writes ------------------------------------------
RATE_PAGES=${RATE_PAGES:-1024}
"$K" perf --server --listen "$IP:0" --insecure --transports tcp,verbs >"$W/perf" 2>"$W/perf.err" &
echo $! >"$W/perf.pid"
for _ in $(seq 600); do
  P=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$W/perf"); [[ -n $P ]] && break
  sleep 0.1
done
[[ -n $P ]] || { echo "perf server did not start" >&2; cat "$W/perf.err" >&2; exit 1; }

run_rate() {  # prints writes/s of the data phase (p50 migration)
  "$K" perf "$P" --transport verbs --preset tiny --src-layout layer \
    --dst-layout layer --dst-order random --pages "$RATE_PAGES" --iters 5 \
    --warmup 1 --json >"$W/rate.json"
  python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); assert r["ok"], r
print(r["writes"] / (r["bytes"] / (r["data_gbps_p50"] * 1e9)), r["bytes"] // r["writes"])' "$W/rate.json"
}

run_ib_rate() {  # run_ib_rate QPS -> prints messages/s of 4096-byte writes
  ib_write_bw -d "$DEV" -x "$GIDX" -s 4096 -q "$1" -n 20000 --report_gbits >"$W/srv" 2>&1 &
  sleep 1
  ib_write_bw -d "$DEV" -x "$GIDX" -s 4096 -q "$1" -n 20000 --report_gbits "$IP" >"$W/cli" 2>&1
  wait
  awk '$1 == 4096 && NF >= 5 {print $4 * 1e9 / 8 / 4096}' "$W/cli" | tail -1
}

kr=(); i1=(); i4=()
for r in $(seq "$REPS"); do
  out=$(run_rate); kr+=("${out% *}")
  i1+=("$(run_ib_rate 1)"); i4+=("$(run_ib_rate 4)")
  printf "rate rep %s: kvmig %.0f writes/s (%s bytes), ib_write_bw -q 1 %.0f, -q 4 %.0f msg/s\n" \
    "$r" "${kr[-1]}" "${out#* }" "${i1[-1]}" "${i4[-1]}"
done
python3 - "${kr[*]}" "${i1[*]}" "${i4[*]}" <<'PY'
import statistics, sys
kr, i1, i4 = ([float(x) for x in a.split()] for a in sys.argv[1:4])
row = lambda name, v: f"| {name} | {statistics.median(v):.0f} | {min(v):.0f} - {max(v):.0f} | {len(v)} |"
print("\ntiny layer -> layer, random slots: 4 KiB RDMA WRITEs")
print("| run | median writes/s | range | reps |\n| --- | --- | --- | --- |")
print(row("kvmig perf --transport verbs (1 QP)", kr))
print(row("ib_write_bw -s 4096 -q 1", i1))
print(row("ib_write_bw -s 4096 -q 4", i4))
print(f"ratio kvmig / ib_write_bw -q 1 (medians): {statistics.median(kr) / statistics.median(i1):.2f}")
PY
