#!/usr/bin/env bash
# Soak: N migrations (default 1000) back and forth between two agents built
# with ASan+UBSan (LeakSanitizer on), then SIGTERM and a clean exit with no
# sanitizer report in either agent's stderr.
#
#   tools/soak.sh [N]
#
# Main phase (N migrations, no decoding): random subsets of requests move
# between a page-layout agent and a layer-layout agent (--mode move),
# alternating tcp and ucx (when built), every third one --live. Every
# CHECK_EVERY migrations: each request lives on exactly one agent with its
# original digest, and each agent's free pages are its capacity minus the
# pages of what it holds. Decode phase (N/10 migrations, at least 10): two
# more agents decoding (--decode-rate), --live moves of everything back and
# forth; every request stays on exactly one agent.
#
# Env: BUILD_DIR (default build-asan, as .ci/run), CHECK_EVERY (default 10),
#      SOAK_SEED (default 1). Last line: "soak: N migrations in S s, ok".
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
BUILD_DIR=${BUILD_DIR:-build-asan}
if [[ ! -f $BUILD_DIR/build.ninja ]]; then
  meson setup "$BUILD_DIR" -Db_sanitize=address,undefined -Db_lundef=false \
    -Dbuildtype=debug >&2
fi
ninja -C "$BUILD_DIR" -j2 tools/kvmig >&2
san=$(meson introspect "$BUILD_DIR" --buildoptions | python3 -c \
  'import json, sys; print([o["value"] for o in json.load(sys.stdin) if o["name"] == "b_sanitize"][0])')
if [[ $san != address,undefined ]]; then
  echo "$BUILD_DIR is built with b_sanitize=$san, not address,undefined" >&2
  exit 1
fi

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export KVMIG_LOG_LEVEL=${KVMIG_LOG_LEVEL:-warn}
exec python3 - "$BUILD_DIR/tools/kvmig" "$N" "${CHECK_EVERY:-10}" \
  "${SOAK_SEED:-1}" <<'PY'
import json, os, random, re, signal, subprocess, sys, tempfile, time

kvmig, n, check_every, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
tmp = tempfile.mkdtemp(prefix="kvmig-soak-")
agents = []
start = time.time()

def fail(msg):
    print(f"soak: FAILED: {msg}", file=sys.stderr)
    for a in agents:
        if a["proc"].poll() is None:
            a["proc"].kill()
    sys.exit(1)

def start_agent(name, *flags, required=True):
    out = open(f"{tmp}/{name}.out", "w+")
    err = open(f"{tmp}/{name}.err", "w+")
    p = subprocess.Popen([kvmig, "serve", "--listen", "127.0.0.1:0", *flags],
                         stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    for _ in range(600):
        text = open(out.name).read()
        m = re.search(r"listening on (\S+)", text)
        if m:
            a = {"name": name, "proc": p, "addr": m.group(1), "err": err.name}
            agents.append(a)
            return a
        if p.poll() is not None:
            break
        time.sleep(0.05)
    if required:
        fail(f"agent {name} did not start: {open(err.name).read()}")
    p.kill()
    p.wait()
    return None

def cli(*args, ok=True):
    r = subprocess.run([kvmig, *args], capture_output=True, text=True, timeout=300)
    if ok and r.returncode != 0:
        fail(f"kvmig {' '.join(args)}: exit {r.returncode}: {r.stdout}{r.stderr}")
    return r

def status(a):
    return json.loads(cli("status", "--agent", a["addr"], "--json", "--digests").stdout)

def migrate(src, dst, ids, *extra):
    r = cli("migrate", "--agent", src["addr"], "--to", dst["addr"], "--seqs",
            ",".join(map(str, sorted(ids))), "--json", *extra)
    rep = json.loads(r.stdout)
    if sorted(rep["seqs"]) != sorted(ids) or rep.get("left_behind"):
        fail(f"migration moved {rep['seqs']}, asked {sorted(ids)}: {rep}")
    return rep

# Use ucx too when this build has it (a probe agent reports its transports).
cap = 512
common = ["--capacity-pages", str(cap), "--peer-timeout-ms", "5000"]
probe = start_agent("probe", "--transports", "tcp,ucx", *common, required=False)
has_ucx = probe is not None
if probe:
    probe["proc"].send_signal(signal.SIGTERM)
    probe["proc"].wait(30)
    agents.remove(probe)
ts = "tcp,ucx" if has_ucx else "tcp"
a = start_agent("a", "--layout", "page", "--populate", "12:100", "--seed", "5",
                "--transports", ts, *common)
b = start_agent("b", "--layout", "layer", "--transports", ts, *common)
base = {s["id"]: (s["digest"], s["pages"]) for s in status(a)["seqs"]}
holder = {i: a for i in base}
modes = ["tcp", "ucx"] if has_ucx else ["tcp"]

def check(step):
    seen = {}
    for ag in (a, b):
        st = status(ag)
        held = {s["id"]: s for s in st["seqs"]}
        for i, s in held.items():
            if i in seen:
                fail(f"after {step}: request {i} live on two agents")
            seen[i] = s["digest"]
            if base.get(i, (None,))[0] != s["digest"]:
                fail(f"after {step}: request {i} digest changed on {ag['name']}")
            if holder.get(i) is not ag:
                fail(f"after {step}: request {i} on {ag['name']}, expected elsewhere")
        used = sum(s["pages"] for s in held.values())
        if st["free_pages"] != st["capacity_pages"] - used:
            fail(f"after {step}: {ag['name']} has {st['free_pages']} free pages, "
                 f"expected {st['capacity_pages'] - used}")
        if st.get("in_doubt"):
            fail(f"after {step}: {ag['name']} has requests in doubt")
    if set(seen) != set(base):
        fail(f"after {step}: requests {sorted(set(base) - set(seen))} lost")

check(0)
for k in range(1, n + 1):
    src = rng.choice([x for x in (a, b) if any(h is x for h in holder.values())])
    dst = b if src is a else a
    mine = sorted(i for i, h in holder.items() if h is src)
    ids = rng.sample(mine, rng.randint(1, len(mine)))
    extra = ["--mode", "move", "--transport", modes[k % len(modes)]]
    if k % 3 == 0:
        extra.append("--live")
    migrate(src, dst, ids, *extra)
    for i in ids:
        holder[i] = dst
    if k % check_every == 0 or k == n:
        check(k)
    if k % 100 == 0:
        print(f"soak: {k}/{n} migrations, {time.time() - start:.0f} s", file=sys.stderr)

# Decode phase: live moves of everything while both engines decode.
c = start_agent("c", "--layout", "layer", "--populate", "4:200", "--seed", "9",
                "--decode-rate", "50", "--transports", ts, "--capacity-pages", "4096")
d = start_agent("d", "--layout", "page", "--decode-rate", "50", "--transports", ts,
                "--capacity-pages", "4096")
ids = sorted(s["id"] for s in status(c)["seqs"])
live_n = max(10, n // 10)
src, dst = c, d
for k in range(1, live_n + 1):
    migrate(src, dst, ids, "--live", "--transport", modes[k % len(modes)])
    src, dst = dst, src
    if k % check_every == 0 or k == live_n:
        got = [sorted(x["id"] for x in status(ag)["seqs"]) for ag in (c, d)]
        if sorted(got[0] + got[1]) != ids or got[0 if src is c else 1] != ids:
            fail(f"decode phase after {k}: requests {got}, expected {ids} on {src['name']}")

# Stop cleanly; any sanitizer report fails the soak.
for ag in agents:
    ag["proc"].send_signal(signal.SIGTERM)
bad = []
for ag in agents:
    try:
        rc = ag["proc"].wait(60)
    except subprocess.TimeoutExpired:
        ag["proc"].kill()
        rc = "timeout"
    err = open(ag["err"]).read()
    reports = [l for l in err.splitlines()
               if re.search(r"ERROR: (Address|Leak)Sanitizer|runtime error:", l)]
    if rc != 0 or reports:
        bad.append(f"{ag['name']}: exit {rc}; " + "; ".join(reports[:5]))
if bad:
    print("\n".join(bad), file=sys.stderr)
    print(f"logs in {tmp}", file=sys.stderr)
    sys.exit(1)
total = n + live_n
print(f"soak: {total} migrations ({n} + {live_n} decoding) in {time.time() - start:.0f} s, "
      f"transports {ts}, no sanitizer reports")
PY
