#!/usr/bin/env python3
# Inline pages against the data path, two kvmig builds, over tcp:
#
#   /usr/bin/python3 tools/ab-inline.py N PAGES DIR_A DIR_B
#
# DIR_A and DIR_B each hold a copy of tools/kvmig and src/libkvmig.so.0
# (cp -L), each with its own `kvmig perf --server`. Every repetition runs
# PAGES tiny pages (16 KiB each), 200 migrations, on the data path
# (--inline-kib 0) and inline (--inline-kib 1024) for both builds
# (reversed every other repetition), then `rtt_ref --bytes` of the same
# size and `iperf3 -l 1M -n 30M`. Prints p50 medians [range] and ratios
# taken repetition by repetition. Run from the repository with build-bench
# built (tools/rtt_ref); needs iperf3.
import json, os, subprocess, sys

from ab_common import server, span

n, pages = int(sys.argv[1]), int(sys.argv[2])
vers = sys.argv[3:5]
nbytes = pages * 16384
RTT_REF = "build-bench/tools/rtt_ref"
IPERF_PORT = "5299"


def perf(v, addr, kib):
    out = subprocess.run([f"{v}/kvmig", "perf", addr, "--transport", "tcp", "--preset", "tiny",
                          "--pages", str(pages), "--iters", "200", "--warmup", "20",
                          "--inline-kib", str(kib), "--json"],
                         env=dict(os.environ, LD_LIBRARY_PATH=v),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["latency_ms"]["p50"]


def rtt_ms():
    out = subprocess.run([RTT_REF, "--bytes", str(nbytes), "--iters", "300"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["p50_us"] / 1000


def iperf_gbs():
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", IPERF_PORT, "-l", "1M", "-n", "30M", "-J"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 8e9


iperf_server = subprocess.Popen(["iperf3", "-s", "-p", IPERF_PORT],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
servers = {v: server(v) for v in vers}
keys = [(v, k) for v in vers for k in (0, 1024)]
res = {key: [] for key in keys + ["rtt", "iperf"]}
try:
    for r in range(n):
        for v, k in (keys if r % 2 == 0 else keys[::-1]):
            res[(v, k)].append(perf(v, servers[v][1], k))
        res["rtt"].append(rtt_ms())
        res["iperf"].append(iperf_gbs())
finally:
    for p, _ in servers.values():
        p.terminate()
    iperf_server.terminate()


def ratio(a, b):
    return span([y / x for x, y in zip(a, b)])


print(f"{pages} tiny pages ({nbytes} bytes) over tcp, p50 ms, {n} repetitions")
for v, k in keys:
    xs = res[(v, k)]
    print(f"  {v} --inline-kib {k:4}: {span(xs)}; / rtt_ref {ratio(res['rtt'], xs)}; "
          f"x iperf3 {span([nbytes / (x * 1e6) / g for x, g in zip(xs, res['iperf'])])}")
print(f"  rtt_ref --bytes {nbytes}: {span(res['rtt'])} ms; iperf3 -l 1M: {span(res['iperf'])} GB/s")
for k in (0, 1024):
    print(f"  B/A --inline-kib {k}: {ratio(res[(vers[0], k)], res[(vers[1], k)])}")
for v in vers:
    print(f"  {v}: inline / data path {ratio(res[(v, 0)], res[(v, 1024)])}")
