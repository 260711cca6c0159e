#!/usr/bin/env bash
# Developer entry points; the README's two commands and .ci/run call these.
#
#   tools/dev.sh demo   install, build, migrate requests between two agents
#   tools/dev.sh demo-engine  install, build, two PyTorch Llama engines; two
#                       requests move live mid-generation and go on (examples/)
#   tools/dev.sh test   install, build, run every test (last line: N passed, N failed)
#   tools/dev.sh rxe-test  build, then run the verbs tests (and UCX over
#                       rc_verbs) in the Soft-RoCE guest (tools/rxe-tests.sh)
#   tools/dev.sh tsan-test  ThreadSanitizer build (build-tsan) of the unit,
#                       transport and in-process agent tests, and their run
#   tools/dev.sh deps | build
#
# Env: BUILD_DIR (default build), MESON_ARGS (extra meson setup arguments),
#      RXEVM_RUN (default ../shared/rxe-vm/rxe-run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}

PACKAGES="meson ninja-build g++ pkg-config python3 libboost-dev libspdlog-dev
  libfmt-dev libxxhash-dev libssl-dev libucx-dev ucx-utils libgtest-dev libgmock-dev
  libcli11-dev nlohmann-json3-dev clang-format libibverbs-dev ibverbs-providers
  python3-dev pybind11-dev python3-numpy python3-torch python3-pytest
  python3-mesonpy python3-build python3-venv etcd-server etcd-client
  prometheus-cpp-dev prometheus"

deps() {
  local missing=()
  for p in $PACKAGES; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' ||
      missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  echo "installing: ${missing[*]}" >&2
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" >&2
}

build() {
  if [[ ! -f $BUILD_DIR/build.ninja ]]; then
    # shellcheck disable=SC2086
    meson setup "$BUILD_DIR" ${MESON_ARGS:-} >&2
  fi
  ninja -C "$BUILD_DIR" >&2
}

# Starts `kvmig serve` on a free loopback port; prints "PID ADDRESS".
start_agent() {
  local log=$1
  shift
  "$BUILD_DIR/tools/kvmig" serve --listen 127.0.0.1:0 "$@" >"$log" 2>"$log.err" &
  local pid=$! addr=""
  for _ in $(seq 300); do
    addr=$(sed -n 's/.*listening on //p' "$log")
    [[ -n $addr ]] && break
    kill -0 "$pid" 2>/dev/null || { cat "$log.err" >&2; return 1; }
    sleep 0.1
  done
  [[ -n $addr ]] || { echo "agent did not start" >&2; return 1; }
  echo "$pid $addr"
}

demo() {
  deps
  build
  local k=$BUILD_DIR/tools/kvmig
  # Globals, not locals: the EXIT trap runs after demo() has returned.
  DEMO_TMP=$(mktemp -d)
  DEMO_PIDS=()
  # The agents are not this shell's children (start_agent runs in a
  # process substitution), so `wait` cannot see them: poll until both are
  # gone (10 s at most) before returning.
  trap 'kill "${DEMO_PIDS[@]}" 2>/dev/null
    for _ in $(seq 100); do
      kill -0 "${DEMO_PIDS[@]}" 2>/dev/null || break
      sleep 0.1
    done
    rm -rf "$DEMO_TMP"' EXIT
  local tmp=$DEMO_TMP
  read -r p1 src < <(start_agent "$tmp/src" --preset llama3-8b --layout layer \
    --capacity-pages 512 --populate 8:1000 --share-prefix 512 --seed 7)
  DEMO_PIDS+=("$p1")
  read -r p2 dst < <(start_agent "$tmp/dst" --preset llama3-8b --layout page \
    --capacity-pages 512)
  DEMO_PIDS+=("$p2")
  echo "== source agent $src (llama3-8b, layer layout), destination $dst (page layout)"
  "$k" status --agent "$src"
  "$k" status --agent "$src" --json --digests >"$tmp/before.json"
  echo "== kvmig migrate --agent $src --to $dst --all"
  "$k" migrate --agent "$src" --to "$dst" --all
  "$k" status --agent "$dst" --json --digests >"$tmp/after.json"
  echo "== destination now"
  "$k" status --agent "$dst"
  python3 - "$tmp/before.json" "$tmp/after.json" <<'PY'
import json, sys
before = {s["id"]: s["digest"] for s in json.load(open(sys.argv[1]))["seqs"]}
after = {s["id"]: s["digest"] for s in json.load(open(sys.argv[2]))["seqs"]}
same = sum(1 for i, d in before.items() if after.get(i) == d)
print(f"digest check: {same}/{len(before)} requests arrived intact")
sys.exit(0 if before and same == len(before) == len(after) else 1)
PY
}

# "N passed, N failed[, N skipped]" over JUnit XML files (GoogleTest's and
# pytest's); fails if any case failed, a file is missing, or none passed.
# Arguments: JUnit files, then (optional) meson's testlog.json after
# "--meson-log": meson writes a suite that timed out or was interrupted as
# one passing testcase (GoogleTest never wrote its XML), so those results
# are read from meson's own log and counted as failed.
junit_summary() {
  /usr/bin/python3 - "$@" <<'PY'
import json, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
args = sys.argv[1:]
if "--meson-log" in args:
    at = args.index("--meson-log")
    meson_log, args = args[at + 1], args[:at] + args[at + 2:]
    try:
        with open(meson_log) as f:
            for line in f:
                t = json.loads(line)
                if t.get("result") in ("TIMEOUT", "INTERRUPT"):
                    print(f"{t.get('name')}: {t['result']} after "
                          f"{t.get('duration', 0):.0f}s", file=sys.stderr)
                    failed += 1
    except (OSError, ValueError) as e:
        print(f"{meson_log}: {e}", file=sys.stderr)
        failed += 1
for path in args:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        failed += 1
        continue
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
sys.exit(1 if failed or passed == 0 else 0)
PY
}

# Runs the suites (GoogleTest through meson, then pytest under tests/python
# with Debian's interpreter); prints the meson summary, then "N passed, N
# failed" over every test case of both (skips counted apart).
# PYTEST_ENV: extra environment for pytest (the ASan run's LD_PRELOAD).
run_tests() {
  local dir=$1 rc=0
  # Two at a time: only the suites not marked is_parallel: false (unit,
  # e2e, e2e-faults) ever share the machine.
  meson test -C "$dir" --print-errorlogs --num-processes 2 >&2 || rc=$?
  local xmls=("$dir/meson-logs/testlog.junit.xml")
  local pyxml=$dir/meson-logs/pytest.junit.xml
  rm -f "$pyxml"
  if [[ -d $dir/src/python/kvmig ]]; then
    # shellcheck disable=SC2086
    env ${PYTEST_ENV:-} KVMIG_BUILD_DIR="$dir" /usr/bin/python3 -m pytest \
      -p no:cacheprovider -q -rs tests/python --junitxml="$pyxml" >&2 || rc=$?
    xmls+=("$pyxml")
  else
    echo "the Python package was not built (meson -Dpython): its tests fail" >&2
    rc=1
  fi
  junit_summary "${xmls[@]}" --meson-log "$dir/meson-logs/testlog.json" || rc=1
  return $rc
}

# Builds, then runs tools/rxe-tests.sh inside the Soft-RoCE guest; the guest
# sees this directory read-write, so the build and its logs are shared.
rxe_test() {
  local start=$SECONDS rc=0
  "${RXEVM_RUN:-../shared/rxe-vm/rxe-run.sh}" -- tools/rxe-tests.sh || rc=$?
  echo "rxe-test: rc=$rc, $((SECONDS - start))s including the guest's boot" >&2
  return $rc
}

# ThreadSanitizer over everything threaded that runs in one process: the
# unit tests, the transport conformance suite (tcp and ucx targets, revoke
# races) and the in-process agents of tests/e2e/embed_example.cc (cancel,
# stop, in doubt, a blocking pager). The two-process suites are left out:
# their agents are separate processes, and under TSan they take too long
# for CI. Prints "N passed, N failed" last.
tsan_test() {
  local dir=build-tsan rc=0
  if [[ ! -f $dir/build.ninja ]]; then
    # GCC 12 warns that TSan does not model Asio's standalone fences
    # (-Wtsan); they order nothing TSan needs: Asio's queues take locks.
    meson setup "$dir" -Db_sanitize=thread -Dbuildtype=debug -Dpython=disabled \
      -Dmetrics=disabled -Dcpp_args=-Wno-tsan >&2
  fi
  ninja -C "$dir" tests/unit_tests tests/transport_tests \
    tests/inprocess_tests >&2
  local supp=$PWD/tools/tsan.supp xmls=()
  for t in unit_tests transport_tests inprocess_tests; do
    rm -f "$dir/tsan-$t.xml"
    # Five ucx cases move MiBs through UCX's emulated puts: at -O0 under
    # TSan their flushes pass their deadlines (slowness, not a race: one
    # of them took 22-59 s there before and after the progress thread's
    # yield, 0.3 s in the normal build; MarkedWrites... took 22 s at
    # 74f1735 and after it alike on 2026-12-07, FlushCoversWritesStillQueued
    # moves 80 MiB). FlushCoversManySmallWrites/ucx posts 819200 puts: five
    # of its hundred rounds took 269 s under TSan on 2026-12-08.
    local filter='*'
    [[ $t == transport_tests ]] &&
      filter='-*WritesLandByteExactAfterFlush/ucx:*KeptPathServesTheNextAndStillRevokes/ucx:*SmallAndLargeWritesInterleaved/ucx:*MarkedWritesHaveLandedWhenTheMarkArrives/ucx:*FlushCoversWritesStillQueued/ucx:*FlushCoversManySmallWrites/ucx'
    UCX_MEM_EVENTS=no \
      TSAN_OPTIONS="halt_on_error=1 history_size=7 suppressions=$supp" \
      "$dir/tests/$t" --gtest_filter="$filter" \
      --gtest_output="xml:$dir/tsan-$t.xml" \
      >"$dir/tsan-$t.log" 2>&1 || {
      rc=1
      echo "tsan: $t failed (log: $dir/tsan-$t.log):" >&2
      grep -A30 -m1 "WARNING: ThreadSanitizer\|Failure" "$dir/tsan-$t.log" >&2
    }
    xmls+=("$dir/tsan-$t.xml")
  done
  junit_summary "${xmls[@]}" || rc=1
  return $rc
}

case "${1:-}" in
  deps) deps ;;
  build) deps; build ;;
  demo) demo ;;
  demo-engine)
    deps
    build
    PYTHONPATH=$BUILD_DIR/src/python:examples /usr/bin/python3 examples/demo_engine.py "${@:2}"
    ;;
  test) deps; build; run_tests "$BUILD_DIR" ;;
  run-tests) run_tests "$BUILD_DIR" ;;
  rxe-test) deps; build; rxe_test ;;
  tsan-test) deps; tsan_test ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
