#!/usr/bin/env python3
# What a 1 MiB migration costs over each path, one build, interleaved:
#
#   /usr/bin/python3 tools/one-mib.py N DIR
#
# DIR holds a copy of tools/kvmig and src/libkvmig.so.0 (cp -L) and gets
# one `kvmig perf --server`. Every repetition runs, in turn (reversed every
# other repetition), 200 migrations of 64 tiny pages (1 MiB) each:
# over ucx (the data path: ucx sends at most 64 KiB inline), over tcp
# inline (the pages on the control connection, what a higher ucx cap would
# give on one host), over the tcp data path, and the same MiB as raw ucx
# puts (build-bench/tools/ucx_put_ref). Prints p50 medians [range] in ms.
# Run from the repository with build-bench built.
import json, os, statistics, subprocess, sys

from ab_common import server, span

n, v = int(sys.argv[1]), sys.argv[2]
MIB = 1 << 20
UCX_REF = "build-bench/tools/ucx_put_ref"


def perf(addr, transport, kib):
    out = subprocess.run([f"{v}/kvmig", "perf", addr, "--transport", transport, "--preset", "tiny",
                          "--pages", "64", "--iters", "200", "--warmup", "20",
                          "--inline-kib", str(kib), "--json"],
                         env=dict(os.environ, LD_LIBRARY_PATH=v),
                         capture_output=True, text=True, check=True).stdout
    j = json.loads(out)
    assert j["bytes"] == MIB, j["bytes"]
    return j["latency_ms"]["p50"], j["inline_pages"]


def raw_puts():
    out = subprocess.run([UCX_REF, "--bytes", str(MIB), "--chunk", str(MIB), "--iters", "200"],
                         capture_output=True, text=True, check=True).stdout
    return MIB / (json.loads(out.strip().splitlines()[-1])["gbps"] * 1e9) * 1e3, None


p, addr = server(v)
cases = {"ucx (data path)": lambda: perf(addr, "ucx", 1024),
         "tcp inline": lambda: perf(addr, "tcp", 1024),
         "tcp data path": lambda: perf(addr, "tcp", 0),
         "raw ucx puts": raw_puts}
ms = {k: [] for k in cases}
inline = {}
try:
    for r in range(n):
        for k in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            t, inline[k] = cases[k]()
            ms[k].append(t)
finally:
    p.kill()
for k in cases:
    print(f"{k:16s} p50 ms {span(ms[k])}  = {MIB / statistics.median(ms[k]) / 1e6:5.2f} GB/s"
          + ("" if inline[k] is None else f"  (inline: {str(inline[k]).lower()})"))
