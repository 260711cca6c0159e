# What the A/B scripts (tools/ab-pair.py, ab-whole.py, ab-tcp.py,
# ab-verbs.py) share: a
# `kvmig perf --server` per version, and median [range].
import os, re, statistics, subprocess, time


def server(v, kvmig=None, listen="127.0.0.1:0", extra=()):
    """Starts DIR v's kvmig perf server (v/kvmig unless `kvmig` names
    another binary) listening on `listen` (a free port by default), its log
    in v/server.log; returns the process and its HOST:PORT."""
    log = f"{v}/server.log"
    p = subprocess.Popen([kvmig or f"{v}/kvmig", "perf", "--server", "--listen", listen, *extra],
                         env=dict(os.environ, LD_LIBRARY_PATH=v),
                         stdout=open(log, "w"), stderr=subprocess.STDOUT)
    while True:
        time.sleep(0.2)
        if p.poll() is not None:
            raise RuntimeError(f"{v}'s perf server exited: see {log}")
        m = re.search(r"listening on (\S+:\d+)", open(log).read())
        if m:
            return p, m.group(1)


def span(xs):
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"
