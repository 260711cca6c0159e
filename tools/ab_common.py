# What the A/B scripts (tools/ab-pair.py, tools/ab-whole.py) share: a
# `kvmig perf --server` per version, and median [range].
import os, re, statistics, subprocess, time


def server(v):
    """Starts DIR v's kvmig perf server on a free loopback port (its log in
    v/server.log); returns the process and its HOST:PORT."""
    log = f"{v}/server.log"
    p = subprocess.Popen([f"{v}/kvmig", "perf", "--server", "--listen", "127.0.0.1:0"],
                         env=dict(os.environ, LD_LIBRARY_PATH=v),
                         stdout=open(log, "w"), stderr=subprocess.STDOUT)
    while True:
        time.sleep(0.2)
        m = re.search(r"listening on (127\.0\.0\.1:\d+)", open(log).read())
        if m:
            return p, m.group(1)


def span(xs):
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"
