#!/usr/bin/env python3
# A/B of two kvmig builds on a large migration of small pages, whole
# migration and per phase, on loopback:
#
#   /usr/bin/python3 tools/ab-whole.py N DIR_A DIR_B [tcp|ucx] [random|contiguous] [ref]
#
# DIR_A and DIR_B each hold a copy of tools/kvmig and src/libkvmig.so.0
# (cp -L; found through LD_LIBRARY_PATH). Each version gets its own
# `kvmig perf --server`; N repetitions, interleaved (A B, then B A), of
# tiny layer -> layer, 4096 pages (64 MiB, 4 KiB writes) into random (or
# contiguous) slots, 8 migrations each. Prints each version's median
# [range] of the whole migration's GB/s, the data phase's, the p50 and
# the pause, offer and commit phases' p50 (ms: where the per-page control costs
# show), and B/A of the whole migration's GB/s taken repetition by
# repetition. With `ref`: every repetition first runs DIR_A's ucx_put_ref
# on the same bytes in the same writes (`--bytes 67108864 --chunk 4096
# --iters 5`, raw ucp_put_nbx) and each version's whole migration and data
# phase are also given as a ratio of it, repetition by repetition.
import json, os, subprocess, sys

from ab_common import server, span

n = int(sys.argv[1])
vers = sys.argv[2:4]
transport = sys.argv[4] if len(sys.argv) > 4 else "tcp"
order = sys.argv[5] if len(sys.argv) > 5 else "random"
with_ref = len(sys.argv) > 6 and sys.argv[6] == "ref"

servers = {v: server(v) for v in vers}
runs = {v: [] for v in vers}
refs = []
try:
    for r in range(n):
        if with_ref:
            out = subprocess.run(
                [f"{vers[0]}/ucx_put_ref", "--bytes", "67108864", "--chunk", "4096",
                 "--iters", "5"], capture_output=True, text=True, check=True).stdout
            refs.append(json.loads(out.strip().splitlines()[-1])["gbps"])
        for v in (vers if r % 2 == 0 else vers[::-1]):
            out = subprocess.run(
                [f"{v}/kvmig", "perf", servers[v][1], "--transport", transport,
                 "--preset", "tiny", "--src-layout", "layer", "--dst-layout", "layer",
                 "--dst-order", order, "--pages", "4096", "--iters", "8",
                 "--warmup", "1", "--json"],
                env=dict(os.environ, LD_LIBRARY_PATH=v),
                capture_output=True, text=True, check=True).stdout
            runs[v].append(json.loads(out))
finally:
    for p, _ in servers.values():
        p.terminate()

for v in vers:
    d = runs[v]
    print(f"{v}: whole GB/s {span([x['gbps'] for x in d])}, "
          f"data GB/s {span([x['data_gbps_p50'] for x in d])}, "
          f"p50 ms {span([x['latency_ms']['p50'] for x in d])}, "
          f"pause ms {span([x['phases_ms']['pause'] for x in d])}, "
          f"offer ms {span([x['phases_ms']['offer'] for x in d])}, "
          f"commit ms {span([x['phases_ms']['commit'] for x in d])}")
a, b = runs[vers[0]], runs[vers[1]]
print(f"B/A whole GB/s per repetition {span([y['gbps'] / x['gbps'] for x, y in zip(a, b)])}")
if with_ref:
    print(f"ucx_put_ref 4 KiB GB/s {span(refs)}")
    for v in vers:
        d = runs[v]
        print(f"{v} / ucx_put_ref per repetition: whole "
              f"{span([x['gbps'] / g for x, g in zip(d, refs)])}, data "
              f"{span([x['data_gbps_p50'] / g for x, g in zip(d, refs)])}")
