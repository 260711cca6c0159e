#!/usr/bin/env bash
# The benchmark suite: kvmig beside the references, on one host.
#
#   tools/bench.sh [--quick | --ucx | --latency | --device] [--reps N] [--out FILE]
#
# Builds a release build of its own (build-bench, -Dbuildtype=release, no
# -march=native), starts one `kvmig perf --server` and one iperf3 server on
# loopback, then for every case runs kvmig and its references interleaved
# (A B C A B C ..., --reps times, default 3) and prints one table: the
# median GB/s of each side with its range, and kvmig / reference as the
# median of the per-repetition ratios with their range. --ucx runs only the
# UCX issue's cases (llama3-8b page->page 256 MiB and 1 GiB, layer->layer
# with 32 KiB writes at 64 and 256 MiB) against the UCX references.
#
# Every run but --ucx starts with the fixed cost: a 1-page migration's p50
# over tcp and ucx (`kvmig perf --preset tiny --pages 1 --iters 300`, with
# its per-phase p50s) beside rtt_ref, a loopback TCP round trip between two
# processes, interleaved; kvmig / reference reads as round trips. --latency
# runs only that.
#
# Device memory: the full run ends with (and --device runs only) tcp
# between pools on the simulated device (--src-memory/--dst-memory
# sim-device: every byte through the pagers' copies and tcp's bounce
# buffers) against the same migration between host pools, interleaved.
#
# References, each moving the same bytes per iteration:
#   ucx_put_ref          raw ucp_put_nbx in kvmig's average write size, UCX
#                        free to pick (worker addresses): shared memory here,
#                        the lanes kvmig's listener-made endpoint gets too
#   ucx_put_ref random   (cases into random slots) the same puts, read in
#                        order, written to shuffled chunk positions
#                        (--dst-order random): what the scattered
#                        destination costs raw puts too
#   ucx_put_ref tcp      the same with UCX_TLS=tcp (kvmig's ucx then also
#                        runs with UCX_TLS=tcp, on its own perf server)
#   iperf3               one TCP stream on loopback, -l 1M (for kvmig tcp)
#   memcpy_ref           one thread's memcpy: the single-host ceiling
#   rtt_ref              a 64-byte TCP ping-pong between two processes on
#                        loopback (Nagle off): p50 of 2000 round trips
#   rtt_ref --bytes      (kvmig tcp up to 16 MiB) one transfer of the
#                        migration's bytes and a 64-byte answer, blocking
#                        sockets: what moving that much in one go costs
#                        at least (iperf3's stream never waits for an end)
# kvmig's GB/s is `kvmig perf`'s: payload bytes over each migration's whole
# wall time (HELLO to DONE, control round trips and commit included).
#
# Inside ../shared/rxe-vm/rxe-run.sh (RXEVM_DEV set) it also runs
# tools/bench-verbs.sh (kvmig over verbs vs ib_write_bw) when that exists.
#
# Env: BENCH_BUILD_DIR (default build-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BENCH_BUILD_DIR:-build-bench}
QUICK=0
REPS=3
OUT=""
while (($#)); do
  case $1 in
    --quick) QUICK=1 ;;
    --ucx) QUICK=2 ;;
    --latency) QUICK=3 ;;
    --device) QUICK=4 ;;
    --reps) REPS=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) sed -n '2,46p' "$0"; exit 2 ;;
  esac
  shift
done
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "bench.sh: --reps N, N >= 1" >&2; exit 2; }
OUT=${OUT:-$BUILD/bench-results.json}

need_pkg() {
  command -v "$1" >/dev/null && return 0
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo=sudo
  echo "bench.sh: installing $2" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
    --no-install-recommends "$2" >&2
}
need_pkg iperf3 iperf3

RELEASE_ARGS=(-Dbuildtype=release)
if [[ ! -f $BUILD/build.ninja ]]; then
  meson setup "$BUILD" "${RELEASE_ARGS[@]}" >&2
else
  meson configure "$BUILD" "${RELEASE_ARGS[@]}" >&2
fi
ninja -C "$BUILD" -j2 tools/kvmig tools/memcpy_ref tools/ucx_put_ref \
  tools/rtt_ref >&2

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

"$BUILD/tools/kvmig" perf --server --listen 127.0.0.1:0 >"$tmp/perf.out" \
  2>"$tmp/perf.err" &
pids+=($!)
server=""
for _ in $(seq 300); do
  server=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$tmp/perf.out")
  [[ -n $server ]] && break
  sleep 0.1
done
[[ -n $server ]] || { cat "$tmp/perf.err" >&2; exit 1; }
iperf_port=$((20000 + RANDOM % 20000))
iperf3 -s -p "$iperf_port" >"$tmp/iperf.log" 2>&1 &
pids+=($!)
sleep 0.3

echo "machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), kernel $(uname -r)"
echo "command: tools/bench.sh $([[ $QUICK == 1 ]] && echo --quick)$([[ $QUICK == 2 ]] && echo --ucx)$([[ $QUICK == 3 ]] && echo --latency)$([[ $QUICK == 4 ]] && echo --device) --reps $REPS"

python3 - "$BUILD" "$server" "$iperf_port" "$QUICK" "$REPS" "$OUT" <<'PY'
import json, os, statistics, subprocess, sys, time

build, server, iperf_port, quick, reps, out_path = sys.argv[1:]
ucx_only, latency_only, device_only = quick == "2", quick == "3", quick == "4"
quick, reps = quick == "1", int(reps)
K = f"{build}/tools/kvmig"
RTT_REF = f"{build}/tools/rtt_ref"
UCX_REF = f"{build}/tools/ucx_put_ref"
MEM_REF = f"{build}/tools/memcpy_ref"
MiB = 1 << 20
PAGE = {"tiny": 16 * 1024, "llama3-8b": 2 * MiB}  # K + V bytes per page

def run_json(cmd, env=None):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-400:]}")
    try:
        return json.loads(r.stdout)  # iperf3 -J: one multi-line object
    except json.JSONDecodeError:
        return json.loads(r.stdout.strip().splitlines()[-1])

def iters_for(nbytes):
    # about 512 MiB a measurement, 3 to 30 iterations
    return max(3, min(30, (512 * MiB) // nbytes))

def kvmig(c, transport, tls=None, memory="host"):
    # tls: UCX_TLS for the migrating side (the perf client); its endpoint can
    # only use transports both sides have, so tcp here means tcp throughout.
    # memory: where both pools live (host, sim-device).
    pages = c["bytes"] // PAGE[c["preset"]]
    j = run_json([K, "perf", server, "--transport", transport, "--preset", c["preset"],
                  "--src-layout", c["src"], "--dst-layout", c["dst"],
                  "--src-memory", memory, "--dst-memory", memory,
                  "--dst-order", c["order"], "--pages", str(pages),
                  "--iters", str(iters_for(c["bytes"])), "--warmup", "1", "--json"],
                 {"UCX_TLS": tls} if tls else None)
    c.setdefault("writes", j["writes"])
    return j["gbps"]

def chunk_of(c):
    # kvmig's average write: what the raw references post per call
    return max(1, c["bytes"] // max(1, c.get("writes", 1)))

def ucx_ref(c, tls=None, order="contiguous"):
    chunk = chunk_of(c)
    # shuffled positions are whole chunks: the bytes rounded down to them
    nbytes = c["bytes"] - c["bytes"] % chunk if order == "random" else c["bytes"]
    j = run_json([UCX_REF, "--bytes", str(nbytes), "--chunk", str(chunk),
                  "--iters", str(iters_for(c["bytes"])), "--dst-order", order],
                 {"UCX_TLS": tls} if tls else None)
    return j["gbps"]

def memcpy_ref(c):
    return run_json([MEM_REF, "--bytes", str(c["bytes"]), "--chunk", str(chunk_of(c)),
                     "--iters", str(iters_for(c["bytes"]))])["gbps"]

def one_transfer(c):
    return run_json([RTT_REF, "--bytes", str(c["bytes"]),
                     "--iters", str(iters_for(c["bytes"])), "--warmup", "3"])["gbps"]

def iperf(c):
    total = c["bytes"] * iters_for(c["bytes"])
    j = run_json(["iperf3", "-c", "127.0.0.1", "-p", iperf_port, "-l", "1M",
                  "-n", str(total), "-J"])
    return j["end"]["sum_received"]["bits_per_second"] / 8 / 1e9

def case(preset, nbytes, src="page", dst="page", order="contiguous", device=False):
    return {"preset": preset, "bytes": nbytes, "src": src, "dst": dst, "order": order,
            "device": device}

# The cases. A size sweep on the realistic shape, then layouts and slot
# orders at one size on both shapes.
if ucx_only:
    sweep = [case("llama3-8b", 256 * MiB), case("llama3-8b", 1024 * MiB)]
    variants = [case("llama3-8b", 64 * MiB, "layer", "layer", "random"),
                case("llama3-8b", 256 * MiB, "layer", "layer", "random")]
elif quick:
    sweep = [case("tiny", 1 * MiB), case("llama3-8b", 16 * MiB), case("llama3-8b", 256 * MiB)]
    variants = [case("llama3-8b", 64 * MiB, "layer", "page"),
                case("tiny", 16 * MiB, "page", "page", "random")]
else:
    sweep = [case("tiny", 1 * MiB), case("llama3-8b", 16 * MiB),
             case("llama3-8b", 256 * MiB), case("llama3-8b", 1024 * MiB)]
    variants = []
    for preset in ("tiny", "llama3-8b"):
        for src, dst in (("page", "page"), ("layer", "layer"), ("layer", "page")):
            for order in ("contiguous", "random"):
                if (preset, src, dst, order) != ("llama3-8b", "page", "page", "contiguous"):
                    variants.append(case(preset, 64 * MiB, src, dst, order))

# Device memory: the bounce path's cost, sim-device against host, both tcp.
devices = [case("llama3-8b", 64 * MiB, device=True),
           case("llama3-8b", 256 * MiB, device=True),
           case("llama3-8b", 64 * MiB, "layer", "layer", device=True)]
if device_only:
    sweep, variants = [], devices
elif not ucx_only and not quick:
    variants += devices

def name(c):
    size = f"{c['bytes'] // MiB} MiB" if c["bytes"] < 1024 * MiB else f"{c['bytes'] // (1024 * MiB)} GiB"
    return f"{c['preset']} {c['src']}->{c['dst']} {c['order'][:6]} {size}"

# Each group: kvmig on one transport, then its references, interleaved.
def groups(c, big):
    if c["device"]:
        return [[("kvmig tcp sim-dev", lambda: kvmig(c, "tcp", memory="sim-device")),
                 ("kvmig tcp host", lambda: kvmig(c, "tcp"))]]
    g = [("kvmig ucx", lambda: kvmig(c, "ucx")),
         ("ucx_put_ref", lambda: ucx_ref(c))]
    if c["order"] == "random":
        g.append(("ucx_put_ref random", lambda: ucx_ref(c, order="random")))
    if not ucx_only:
        g.append(("memcpy_ref", lambda: memcpy_ref(c)))
    u = [("kvmig ucx tcp", lambda: kvmig(c, "ucx", "tcp")),
         ("ucx_put_ref tcp", lambda: ucx_ref(c, "tcp"))]
    if ucx_only:
        return [g, u]
    t = [("kvmig tcp", lambda: kvmig(c, "tcp"))]
    t.append(("iperf3 -l 1M", lambda: iperf(c)) if big
             else ("memcpy_ref", lambda: memcpy_ref(c)))
    if big and c["bytes"] <= 16 * MiB:
        t.append(("rtt_ref --bytes", lambda: one_transfer(c)))
    return [t, g, u] if big else [t, g]

rows, results = [], []
t_start = time.time()

# The fixed cost: 1-page migrations against the loopback round trip.
def one_page(transport):
    j = run_json([K, "perf", server, "--transport", transport, "--preset", "tiny",
                  "--pages", "1", "--iters", "300", "--warmup", "20", "--json"])
    return j["latency_ms"]["p50"], j["phases_ms"]

def rtt_us():
    return run_json([RTT_REF, "--iters", "2000"])["p50_us"]

def fixed_cost():
    lat = {t: [] for t in ("tcp", "ucx")}
    phases = {t: [] for t in lat}
    rtts = []
    for rep in range(reps):
        rtts.append(rtt_us() / 1000)
        for t in lat:
            ms, ph = one_page(t)
            lat[t].append(ms)
            phases[t].append(ph)
        rtts.append(rtt_us() / 1000)
    # Each kvmig sample against the two round trips around it.
    out = []
    for t in lat:
        ratios = sorted(lat[t][i] / statistics.mean(rtts[2 * i:2 * i + 2])
                        for i in range(reps))
        ph = {k: statistics.median(p[k] for p in phases[t]) for k in phases[t][0]}
        out.append({"case": "tiny 1 page p50 latency", "kvmig": f"kvmig {t}",
                    "reference": "rtt_ref", "kvmig_ms": lat[t], "ref_ms": rtts,
                    "ratios": ratios, "phases_ms": ph})
    return out

if not ucx_only and not device_only:
    fixed = fixed_cost()
    results += fixed
    print(f"{'case':26} {'kvmig':10} {'ms median [range]':22} {'reference':10} "
          f"{'ms median [range]':22} {'round trips [range]':22} phases (ms, medians)")
    for r in fixed:
        k, ref, q = r["kvmig_ms"], r["ref_ms"], r["ratios"]
        print(f"{r['case']:26} {r['kvmig']:10} "
              f"{statistics.median(k):6.3f} [{min(k):.3f}-{max(k):.3f}]".ljust(60) +
              f" {r['reference']:10} "
              f"{statistics.median(ref):6.4f} [{min(ref):.4f}-{max(ref):.4f}]".ljust(34) +
              f" {statistics.median(q):5.1f} [{min(q):.1f}-{max(q):.1f}]".ljust(23) +
              " " + " ".join(f"{k}={v:.3f}" for k, v in r["phases_ms"].items()))
    print(flush=True)
if latency_only:
    sweep, variants = [], []
for c in sweep + variants:
    big = c in sweep  # iperf3 once per size, not per layout
    for grp in groups(c, big):
        samples = {label: [] for label, _ in grp}
        errors = {}
        for rep in range(reps):
            for label, fn in grp:
                if label in errors:
                    continue
                try:
                    samples[label].append(fn())
                except Exception as ex:  # report, keep going
                    errors[label] = str(ex)
        kl = grp[0][0]
        for label, _ in grp[1:]:
            k, r = samples[kl], samples[label]
            n = min(len(k), len(r))
            ratios = sorted(k[i] / r[i] for i in range(n) if r[i] > 0)
            row = {"case": name(c), "kvmig": kl, "reference": label,
                   "kvmig_gbps": k, "ref_gbps": r, "ratios": ratios,
                   "writes": c.get("writes"), "chunk": chunk_of(c),
                   "error": errors.get(label) or errors.get(kl)}
            results.append(row)
            rows.append(row)
        print(f"  [{time.time() - t_start:5.0f} s] {name(c)}: {kl} done", file=sys.stderr, flush=True)

def fmt(v):
    if not v:
        return "       -              "
    return f"{statistics.median(v):6.3f} [{min(v):.3f}-{max(v):.3f}]".ljust(22)

if rows:
    print()
    print(f"{'case':34} {'kvmig':13} {'GB/s median [range]':22} {'reference':16} "
          f"{'GB/s median [range]':22} {'kvmig/ref median [range]':26} {'write':>9}")
    for r in rows:
        ratio = (f"{statistics.median(r['ratios']):5.2f} [{min(r['ratios']):.2f}-{max(r['ratios']):.2f}]"
                 if r["ratios"] else "-")
        chunk = r["chunk"]
        wr = f"{chunk // MiB} MiB" if chunk >= MiB else f"{chunk // 1024} KiB"
        print(f"{r['case']:34} {r['kvmig']:13} {fmt(r['kvmig_gbps'])} {r['reference']:16} "
              f"{fmt(r['ref_gbps'])} {ratio:26} {wr:>9}" + (f"  ERROR {r['error'][:120]}" if r["error"] else ""))
    print(f"\n{reps} repetitions each, interleaved; GB/s = 10^9 bytes/s; 'write' is kvmig's "
          f"average write (the size the ucx and memcpy references copy in); "
          f"{time.time() - t_start:.0f} s")
os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
with open(out_path, "w") as f:
    json.dump(results, f, indent=1)
PY

if [[ -n ${RXEVM_DEV:-} && -x tools/bench-verbs.sh ]]; then
  echo
  echo "== verbs (tools/bench-verbs.sh)"
  tools/bench-verbs.sh
fi
