#!/usr/bin/env python3
# A/B of two kvmig builds over verbs, run INSIDE the Soft-RoCE guest:
#
#   ../shared/rxe-vm/rxe-run.sh -- python3 tools/ab-verbs.py N DIR_A DIR_B
#
# DIR_A and DIR_B each hold tools/kvmig and src/libkvmig.so.0 (kvmig finds
# its library through an RPATH relative to itself: copy both). Each version
# gets its own `kvmig perf --server`; the cases run interleaved (A B, then
# B A), N repetitions: one tiny page (the fixed cost), and 1024 tiny pages
# layer -> layer into random slots (the most separate slot runs). Prints
# each case's p50 latency and data-phase GB/s, median [range] over the
# repetitions, and the median of each phase. Under emulation only the
# difference between A and B means much.
import json, os, statistics, subprocess, sys
from ab_common import server
N = int(sys.argv[1]); vers = sys.argv[2:4]
ip = os.environ["RXEVM_IP"]
srv = {v: server(v, kvmig=f"{v}/tools/kvmig", listen=f"{ip}:0",
                 extra=("--insecure", "--transports", "tcp,verbs")) for v in vers}
cases = {"1page": ["--preset", "tiny", "--pages", "1", "--iters", "100", "--warmup", "10"],
         "rand1024": ["--preset", "tiny", "--src-layout", "layer", "--dst-layout", "layer", "--dst-order", "random", "--pages", "1024", "--iters", "5", "--warmup", "1"]}
lat = {(v, c): [] for v in vers for c in cases}; ph = {(v, c): [] for v in vers for c in cases}; gb = {(v, c): [] for v in vers for c in cases}
for i in range(N):
    order = vers if i % 2 == 0 else vers[::-1]
    for c, args in cases.items():
        for v in order:
            r = subprocess.run([f"{v}/tools/kvmig", "perf", srv[v][1], "--transport", "verbs", *args, "--json"], capture_output=True, text=True)
            try:
                j = json.loads(r.stdout.strip().splitlines()[-1])
            except Exception:
                print("bad", v, c, r.stdout[-500:], r.stderr[-500:]); continue
            lat[(v, c)].append(j["latency_ms"]["p50"]); ph[(v, c)].append(j["phases_ms"]); gb[(v, c)].append(j.get("data_gbps_p50", 0))
def md(x): return f"{statistics.median(x):.3f} [{min(x):.3f}-{max(x):.3f}]" if x else "-"
for c in cases:
    for v in vers:
        phs = {k: statistics.median([p[k] for p in ph[(v, c)]]) for k in ph[(v, c)][0]} if ph[(v, c)] else {}
        print(c, v, "p50_ms", md(lat[(v, c)]), "data_gbps", md(gb[(v, c)]), " ".join(f"{k}={x:.3f}" for k, x in phs.items()), flush=True)
for s in srv.values(): s[0].kill()
