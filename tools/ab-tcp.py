#!/usr/bin/env python3
# A/B of two kvmig builds over tcp (or ucx) on loopback:
#
#   /usr/bin/python3 tools/ab-tcp.py N DIR_A DIR_B [tcp|ucx] [latency]
#
# DIR_A and DIR_B each hold a copy of tools/kvmig and src/libkvmig.so.0
# (cp -L; found through LD_LIBRARY_PATH). Each version gets its own
# `kvmig perf --server`; the cases run interleaved (A B, then B A), N
# repetitions: tiny layer -> layer 4096 pages into random slots (4 KiB
# writes), the same into contiguous slots (the reference: the same bytes in
# a few large writes), and one tiny page (the fixed cost). Prints each
# case's median [range]: data-phase GB/s, or p50 latency in ms, and the
# 4 KiB case as a ratio of the contiguous one from the same repetition.
# With `latency`: only the tiny page, 1 page and 64 pages (1 MiB), and
# DIR_A's rtt_ref (a loopback round trip) in every repetition, each p50
# also in round trips of that repetition's reference.
import json, os, statistics, subprocess, sys

from ab_common import server

n = int(sys.argv[1])
vers = sys.argv[2:4]
transport = sys.argv[4] if len(sys.argv) > 4 else "tcp"
latency = len(sys.argv) > 5 and sys.argv[5] == "latency"


def run(v, addr, args):
    env = dict(os.environ, LD_LIBRARY_PATH=v)
    out = subprocess.run([f"{v}/kvmig", "perf", addr, "--transport", transport] + args + ["--json"],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


layer = ["--preset", "tiny", "--src-layout", "layer", "--dst-layout", "layer", "--pages", "4096", "--iters", "5"]
cases = {
    "4 KiB random GB/s": layer + ["--dst-order", "random"],
    "contiguous GB/s": layer + ["--dst-order", "contiguous"],
    "1 page p50 ms": ["--preset", "tiny", "--pages", "1", "--iters", "300", "--warmup", "20"],
}
if latency:
    cases = {
        "1 page p50 ms": cases["1 page p50 ms"],
        "64 pages p50 ms": ["--preset", "tiny", "--pages", "64", "--iters", "100", "--warmup", "10"],
    }


def rtt():
    out = subprocess.run([f"{vers[0]}/rtt_ref", "--iters", "2000"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["p50_us"] / 1000


servers = {v: server(v) for v in vers}
res = {(v, c): [] for v in vers for c in cases}
rtts = []
try:
    for r in range(n):
        order = vers if r % 2 == 0 else vers[::-1]
        if latency:
            rtts.append(rtt())
        for c, a in cases.items():
            for v in order:
                d = run(v, servers[v][1], a)
                res[(v, c)].append(d["latency_ms"]["p50"] if "ms" in c else d["data_gbps_p50"])
finally:
    for p, _ in servers.values():
        p.terminate()
if latency:
    x = sorted(rtts)
    print(f"{'rtt_ref ms':18} {'':12} {statistics.median(x):.3f} [{x[0]:.3f}-{x[-1]:.3f}]")
for c in cases:
    for v in vers:
        x = sorted(res[(v, c)])
        line = f"{c:18} {v:12} {statistics.median(x):.3f} [{x[0]:.3f}-{x[-1]:.3f}]"
        if latency:
            t = sorted(a / b for a, b in zip(res[(v, c)], rtts))
            line += f"  round trips {statistics.median(t):.1f} [{t[0]:.1f}-{t[-1]:.1f}]"
        print(line)
for v in vers if not latency else []:
    q = sorted(a / b for a, b in zip(res[(v, "4 KiB random GB/s")], res[(v, "contiguous GB/s")]))
    print(f"4 KiB / contiguous {v:12} {statistics.median(q):.2f} [{q[0]:.2f}-{q[-1]:.2f}]")
