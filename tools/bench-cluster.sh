#!/usr/bin/env bash
# The cluster's numbers (README, "Cluster"): starts a throwaway etcd on free
# loopback ports, then build/tools/cluster_bench against it, then the CLI's
# `kvmig agents` wall time (a process start included) against `etcdctl get`
# of the same keys, interleaved.
#
#   tools/bench-cluster.sh [--agents 200] [--reps 10]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
agents=200
reps=10
while (($#)); do
  case $1 in
    --agents) agents=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    *) echo "usage: $0 [--agents N] [--reps N]" >&2; exit 2 ;;
  esac
done

free_port() {
  /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
dir=$(mktemp -d /tmp/kvmig-bench-etcd-XXXXXX)
client=$(free_port)
peer=$(free_port)
etcd --name bench --data-dir "$dir/data" \
  --listen-client-urls "http://127.0.0.1:$client" \
  --advertise-client-urls "http://127.0.0.1:$client" \
  --listen-peer-urls "http://127.0.0.1:$peer" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
  --initial-cluster "bench=http://127.0.0.1:$peer" >"$dir/log" 2>&1 &
etcd_pid=$!
bench_pid=
cleanup() {
  [[ -n $bench_pid ]] && kill "$bench_pid" 2>/dev/null || true
  kill "$etcd_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 100); do
  etcdctl --endpoints "127.0.0.1:$client" endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done
ep="127.0.0.1:$client"

echo "== in-process: $agents agents, Cluster::agents(), writes at rest, drain plan"
"$BUILD_DIR/tools/cluster_bench" --etcd "$ep" --agents "$agents" --window 15 \
  >"$dir/bench.out" 2>&1 &
bench_pid=$!
# While the agents are up, time the CLI against etcdctl.
for _ in $(seq 600); do
  grep -q "cluster view" "$dir/bench.out" 2>/dev/null && break
  sleep 0.1
done
cli=()
ctl=()
ms() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); echo $(((t1 - t0) / 1000)); }
for _ in $(seq "$reps"); do
  ctl+=("$(ms etcdctl --endpoints "$ep" get --prefix /kvmig-bench/agents/)")
  cli+=("$(ms "$BUILD_DIR/tools/kvmig" agents --etcd "$ep" --etcd-prefix /kvmig-bench --json)")
done
wait "$bench_pid"
bench_pid=
cat "$dir/bench.out"
summary() {
  printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {printf "%.1f ms [%.1f-%.1f]", a[int((NR+1)/2)]/1000, a[1]/1000, a[NR]/1000}'
}
echo "kvmig agents --json (a process): $(summary "${cli[@]}"); etcdctl get --prefix (a process, the reference): $(summary "${ctl[@]}")"
