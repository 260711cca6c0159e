#!/usr/bin/env bash
# Runs the verbs tests (and UCX over rc_verbs) INSIDE the Soft-RoCE guest:
#
#   ../shared/rxe-vm/rxe-run.sh -- tools/rxe-tests.sh     (or: tools/dev.sh rxe-test)
#
# Runs transport_tests and e2e_tests with the verbs/rxe filters, writes their
# output to files in the build dir (the guest's serial console is slow), and
# prints one line: "N passed, N failed, N skipped". Exits non-zero if a test
# failed, or if any was skipped: in the guest every one of them must run.
# Env: BUILD_DIR (default build).
set -uo pipefail
cd "$(dirname "$0")/.."
B=${BUILD_DIR:-build}
[[ -n ${RXEVM_DEV:-} ]] || { echo "rxe-tests.sh: run me inside the rxe guest (RXEVM_DEV unset)" >&2; exit 2; }
for t in transport_tests e2e_tests; do
  [[ -x $B/tests/$t ]] || { echo "rxe-tests.sh: $B/tests/$t is not built" >&2; exit 2; }
done
t0=$(cut -d' ' -f1 /proc/uptime)
since() { awk -v a="$(cut -d' ' -f1 /proc/uptime)" -v b="$1" 'BEGIN{printf "%.1f", a-b}'; }

run() {  # run NAME BINARY FILTER
  local name=$1 bin=$2 filter=$3 s
  s=$(cut -d' ' -f1 /proc/uptime)
  "$B/tests/$bin" --gtest_filter="$filter" --gtest_output="xml:$B/rxe-$name.xml" \
    >"$B/rxe-$name.log" 2>&1
  echo "rxe-tests: $name rc=$? in $(since "$s")s (log: $B/rxe-$name.log)"
}
run transport transport_tests '*verbs*:TransportRegistryTest.*:DeviceMemoryTransport.Verbs*'
run e2e e2e_tests '*verbs*:VerbsE2E.*:UcxOnRxeE2E.*:DeviceMemoryE2E.Verbs*'

echo "rxe-tests: done in $(since "$t0")s"
# The summary is the last line (.ci/run sums these up).
python3 - "$B/rxe-transport.xml" "$B/rxe-e2e.xml" <<'PY'
import os, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
bad = []
for path in sys.argv[1:]:
    if not os.path.exists(path):
        print(f"rxe-tests: {path} missing (the suite crashed?)"); failed += 1; continue
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}.{case.get('name')}"
        why = case.find("failure")
        if why is None:
            why = case.find("error")
        if why is not None:
            # CI keeps only this output, not the logs: the first lines of
            # each failure say which check failed and with what.
            lines = (why.get("message") or why.text or "").splitlines()
            failed += 1; bad.append("FAILED  " + name)
            bad.extend("  | " + l[:300] for l in lines[:30])
        elif case.find("skipped") is not None or case.get("result") == "skipped":
            skipped += 1; bad.append("SKIPPED " + name)
        else:
            passed += 1
for b in bad: print(b if b.startswith("  |") else "rxe-tests: " + b)
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed or skipped or passed == 0 else 0)
PY
