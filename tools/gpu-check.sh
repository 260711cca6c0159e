#!/usr/bin/env bash
# The GPU checks, for a host with an NVIDIA GPU and its driver. Needs only
# this repo, Debian 12's packages and the driver: kvmig loads libcuda.so.1
# at run time, no CUDA toolkit.
#
#   tools/gpu-check.sh [--deps]
#
# Builds with tools/dev.sh build (which, as ever, installs the Debian
# packages that are missing; --deps runs tools/dev.sh deps on its own
# first), then runs and counts:
#   - the device unit tests with KVMIG_TEST_CUDA=1 (the cuda pool must work,
#     not skip);
#   - moves of every request (--preset tiny --populate 4:100) between two
#     agents, cuda->cuda, cuda->host and host->cuda, over tcp and ucx: the
#     report names the transport and memory kinds asked for, and every
#     moved request's digest at the destination is its digest at the
#     source. ucx runs only where it is built; a ucx migration refused with
#     the reason "cannot reach this agent's ... memory" (a UCX without CUDA) is
#     skipped with that reason, not failed.
# Last line: "N passed, N failed" (and N skipped); exit 1 if any failed.
#
# Env: BUILD_DIR (default build), KVMIG_GPU (the GPU's ordinal, default 0).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
GPU=${KVMIG_GPU:-0}
case "${1:-}" in
  --deps) tools/dev.sh deps ;;
  "") ;;
  *) sed -n '2,22p' tools/gpu-check.sh; exit 2 ;;
esac
BUILD_DIR=$BUILD_DIR tools/dev.sh build
K=$BUILD_DIR/tools/kvmig

passed=0 failed=0 skipped=0
TMP=$(mktemp -d)
PIDS=()  # agents running
trap 'stop_agents; rm -rf "$TMP"' EXIT

result() {  # pass|fail|skip NAME [WHY]
  case $1 in
    pass) passed=$((passed + 1)) ;;
    fail) failed=$((failed + 1)) ;;
    skip) skipped=$((skipped + 1)) ;;
  esac
  echo "${1^^} $2${3:+: $3}"
}

# Starts `kvmig serve` on a free loopback port, as tools/dev.sh does, but
# not in a subshell: the agent is this shell's child, so stop_agents can
# wait for it. Sets AGENT_ADDR, or AGENT_ERR and returns 1.
start_agent() {
  local log=$1
  shift
  "$K" serve --listen 127.0.0.1:0 "$@" >"$log" 2>"$log.err" &
  local pid=$!
  PIDS+=("$pid")
  AGENT_ADDR="" AGENT_ERR=""
  for _ in $(seq 300); do
    AGENT_ADDR=$(sed -n 's/.*listening on //p' "$log")
    [[ -n $AGENT_ADDR ]] && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  AGENT_ERR=$(tail -3 "$log.err")
  [[ -n $AGENT_ERR ]] || AGENT_ERR="did not start in 30 s"
  return 1
}

# Stops every agent started and waits for it (also the EXIT trap's).
stop_agents() {
  if ((${#PIDS[@]})); then
    kill "${PIDS[@]}" 2>/dev/null || true
    wait "${PIDS[@]}" 2>/dev/null || true
  fi
  PIDS=()
}

# Pool flags of an agent on memory cuda|host.
pool_flags() {
  if [[ $1 == cuda ]]; then
    echo "--memory cuda --device $GPU"
  else
    echo "--memory host"
  fi
}

# Checks a migration: report.json names transport $1, memory $2 -> $3, and
# moved every request of before.json with its digest into after.json.
# Prints what is wrong.
check_moved() {
  /usr/bin/python3 - "$@" <<'PY'
import json, sys
transport, src_mem, dst_mem, before, report, after = sys.argv[1:]
load = lambda p: json.load(open(p))
before, report, after = load(before), load(report), load(after)
src = {s["id"]: s["digest"] for s in before["seqs"]}
dst = {s["id"]: s["digest"] for s in after["seqs"]}
moved = report["seqs"]
wrong = []
if report["transport"] != transport:
    wrong.append(f"moved over {report['transport']}, not {transport}")
if report["memory"] != {"source": src_mem, "destination": dst_mem}:
    wrong.append(f"memory {report['memory']}, not {src_mem} -> {dst_mem}")
if not moved or sorted(moved) != sorted(src):
    wrong.append(f"moved {sorted(moved)} of {sorted(src)}")
bad = [i for i in moved if dst.get(i) != src.get(i)]
if bad:
    wrong.append(f"digests differ at the destination for {bad}")
print("; ".join(wrong))
sys.exit(1 if wrong else 0)
PY
}

# The error of a failed `migrate --json` (its stdout), or its stderr.
migrate_error() {  # report.json report.err
  /usr/bin/python3 -c '
import json, sys
try:
    print(json.load(open(sys.argv[1]))["error"])
except Exception:
    print(open(sys.argv[2]).read().strip()[-500:])' "$1" "$2"
}

# a. Device unit tests.
echo "== unit tests (KVMIG_TEST_CUDA=1, --gtest_filter='*Cuda*:*Device*')"
# A run where CudaMemoryTest did not pass (a filter that matched nothing,
# a skip) is a failure too.
if KVMIG_TEST_CUDA=1 "$BUILD_DIR/tests/unit_tests" \
  --gtest_filter='*Cuda*:*Device*' >"$TMP/unit.log" 2>&1 &&
  grep -q '^\[       OK \] CudaMemoryTest\.' "$TMP/unit.log"; then
  result pass "unit tests" "$(grep '^\[  PASSED  \]' "$TMP/unit.log")"
else
  tail -60 "$TMP/unit.log"
  result fail "unit tests" "log above"
fi

# b. Is ucx built? An agent with it enabled lists it in its status.
transports=(tcp)
ucx_skip=""
if start_agent "$TMP/probe" --preset tiny --transports tcp,ucx; then
  "$K" status --agent "$AGENT_ADDR" --json >"$TMP/probe.json"
  if /usr/bin/python3 -c 'import json, sys
sys.exit("ucx" not in json.load(open(sys.argv[1]))["transports"])' "$TMP/probe.json"; then
    transports+=(ucx)
  else
    ucx_skip="a host agent does not list ucx in its status"
  fi
else
  ucx_skip=$AGENT_ERR
fi
stop_agents

for transport in "${transports[@]}"; do
  serve_transports=tcp
  [[ $transport == ucx ]] && serve_transports=tcp,ucx
  for pair in cuda:cuda cuda:host host:cuda; do
    src_mem=${pair%:*} dst_mem=${pair#*:}
    name="$src_mem->$dst_mem over $transport"
    dir=$TMP/$transport-$src_mem-$dst_mem
    mkdir "$dir"
    echo "== $name"
    # pool_flags is two or four words on purpose.
    # shellcheck disable=SC2046
    if ! start_agent "$dir/src" --preset tiny --layout layer \
      --populate 4:100 --transports "$serve_transports" \
      $(pool_flags "$src_mem"); then
      result fail "$name" "source agent: $AGENT_ERR"
      stop_agents
      continue
    fi
    src=$AGENT_ADDR
    # shellcheck disable=SC2046
    if ! start_agent "$dir/dst" --preset tiny --layout page \
      --transports "$serve_transports" $(pool_flags "$dst_mem"); then
      result fail "$name" "destination agent: $AGENT_ERR"
      stop_agents
      continue
    fi
    dst=$AGENT_ADDR
    if ! "$K" status --agent "$src" --json --digests >"$dir/before.json"; then
      result fail "$name" "status of the source failed"
    elif ! "$K" migrate --agent "$src" --to "$dst" --all \
      --transport "$transport" --json >"$dir/report.json" \
      2>"$dir/report.err"; then
      error=$(migrate_error "$dir/report.json" "$dir/report.err")
      if [[ $transport == ucx && $error == *"cannot reach this agent"* ]]; then
        result skip "$name" "$error"
      else
        result fail "$name" "$error"
      fi
    elif ! "$K" status --agent "$dst" --json --digests >"$dir/after.json"; then
      result fail "$name" "status of the destination failed"
    elif why=$(check_moved "$transport" "$src_mem" "$dst_mem" \
      "$dir/before.json" "$dir/report.json" "$dir/after.json"); then
      result pass "$name"
    else
      result fail "$name" "$why"
    fi
    stop_agents
  done
done
[[ -z $ucx_skip ]] || result skip "ucx migrations" "no ucx here: $ucx_skip"

summary="$passed passed, $failed failed"
((skipped == 0)) || summary+=", $skipped skipped"
echo "$summary"
((failed == 0))
