#!/usr/bin/env python3
# Paired A/B of two kvmig builds' fixed cost on loopback:
#
#   /usr/bin/python3 tools/ab-pair.py N DIR_A DIR_B [tcp|ucx]
#
# DIR_A and DIR_B each hold a copy of tools/kvmig and src/libkvmig.so.0
# (cp -L; found through LD_LIBRARY_PATH). Each version gets its own
# `kvmig perf --server`. Every repetition runs 1 tiny page and then 64 (1
# MiB), 200 migrations each, on both versions back to back (A B, then B A).
# Prints, per size, each version's median [range] of p50 latency and the
# median [range] of B/A taken repetition by repetition (a pair shares the
# machine's phase, so the ratio is steadier than either median), and the
# 1-page runs' per-phase p50s (phases_ms), medians over the repetitions.
import json, os, statistics, subprocess, sys

from ab_common import server, span

n = int(sys.argv[1])
vers = sys.argv[2:4]
transport = sys.argv[4] if len(sys.argv) > 4 else "tcp"


def run(v, addr, pages):
    out = subprocess.run([f"{v}/kvmig", "perf", addr, "--transport", transport,
                          "--preset", "tiny", "--pages", str(pages), "--iters", "200",
                          "--warmup", "20", "--json"],
                         env=dict(os.environ, LD_LIBRARY_PATH=v),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


servers = {v: server(v) for v in vers}
p50 = {(v, p): [] for v in vers for p in (1, 64)}
phases = {v: [] for v in vers}
try:
    for r in range(n):
        for pages in (1, 64):
            for v in (vers if r % 2 == 0 else vers[::-1]):
                d = run(v, servers[v][1], pages)
                p50[(v, pages)].append(d["latency_ms"]["p50"])
                if pages == 1:
                    phases[v].append(d["phases_ms"])
finally:
    for p, _ in servers.values():
        p.terminate()
for pages in (1, 64):
    a, b = p50[(vers[0], pages)], p50[(vers[1], pages)]
    print(f"{pages:2} pages over {transport}, p50 ms: A {span(a)}  B {span(b)}  "
          f"B/A per repetition {span([y / x for x, y in zip(a, b)])}")
for v in vers:
    keys = phases[v][0].keys()
    med = {k: round(statistics.median(
        d[k]["p50"] if isinstance(d[k], dict) else d[k] for d in phases[v]), 3) for k in keys}
    print(f"1-page phases p50 ms, {v}: {med}")
