#!/usr/bin/python3
"""Benchmarks of the Python binding (not tests: numbers, median and range).

1. A Python engine's migration against the C++ synthetic agent moving the
   same meta and bytes (llama3-8b, page-major pool, --requests x --tokens),
   interleaved rep by rep, to the same C++ destination, over each transport:
   the ratio py/C++ of GB/s. The Python source is tests/python/pagers.py's
   NumpyPager, its pool described per layer through kvmig.regions.
2. The live pause of the PyTorch Llama engine (examples/llama_engine.py,
   flash-attn -> flash-infer) at 1k and 8k tokens, decoding meanwhile.
3. The cost of agent.status() and of a migrate() that fails at once, from
   Python, against a loopback TCP round trip between two processes.

    /usr/bin/python3 tools/bench-python.py [--reps 5] [--build build]
        [--skip-engine | --engine-only] [--engine-tokens 1024,8192]
"""
import argparse
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def summary(values, unit="", fmt="{:.3f}"):
    values = sorted(values)
    return (f"{fmt.format(statistics.median(values))}{unit} "
            f"[{fmt.format(values[0])}-{fmt.format(values[-1])}] (n={len(values)})")


def start_cpp(kvmig_bin, *args):
    proc = subprocess.Popen([str(kvmig_bin), "serve", "--listen", "127.0.0.1:0",
                             *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "listening on " in line:
            return proc, line.split("listening on ", 1)[1].split()[0]
    raise RuntimeError("kvmig serve did not start")


def bench_throughput(kvmig, kvmig_bin, args):
    from pagers import NumpyPager
    meta = kvmig.preset_meta("llama3-8b")
    pages = args.requests * meta.pages_for_tokens(args.tokens)
    cap = str(pages + 4)
    transports = [t for t in ("tcp", "ucx") if t in kvmig.built_transports()]
    procs = []
    try:
        dst, dst_addr = start_cpp(kvmig_bin, "--preset", "llama3-8b",
                                  "--layout", "page", "--capacity-pages", cap,
                                  "--transports", ",".join(transports))
        procs.append(dst)
        src, src_addr = start_cpp(
            kvmig_bin, "--preset", "llama3-8b", "--layout", "page",
            "--capacity-pages", cap, "--transports", ",".join(transports),
            "--populate", f"{args.requests}:{args.tokens}")
        procs.append(src)
        pager = NumpyPager(meta, pages + 4)
        for i in range(args.requests):
            pager.populate(1000 + i, args.tokens, seed=i)
        to_dst = kvmig.Client(dst_addr)
        with kvmig.Agent(pager, transports=transports) as agent:
            cpp = kvmig.Client(src_addr)
            for transport in transports:
                ratios, py_gbps, cpp_gbps = [], [], []
                for rep in range(args.reps + 1):  # the first warms up
                    # Interleaved, alternating which goes first.
                    order = ["cpp", "py"] if rep % 2 else ["py", "cpp"]
                    got = {}
                    for who in order:
                        if who == "cpp":
                            r = cpp.migrate(to=dst_addr, all=True,
                                            transport=transport)
                            to_dst.migrate(to=src_addr, all=True)
                        else:
                            r = agent.migrate(to=dst_addr, all=True,
                                              transport=transport)
                            to_dst.migrate(to=agent.address, all=True)
                        assert r["pages"] == pages, r
                        got[who] = r["gbps"]
                    if rep == 0:
                        continue
                    py_gbps.append(got["py"])
                    cpp_gbps.append(got["cpp"])
                    ratios.append(got["py"] / got["cpp"])
                mib = pages * 2 * meta.page_bytes() / 2**20
                print(f"{transport}: {args.requests} x {args.tokens} tokens "
                      f"({mib:.0f} MiB) llama3-8b page->page: python "
                      f"{summary(py_gbps, ' GB/s')}, C++ "
                      f"{summary(cpp_gbps, ' GB/s')}, python/C++ "
                      f"{summary(ratios, ' x', '{:.2f}')}", flush=True)
    finally:
        for p in procs:
            p.terminate()
            p.wait()


def tcp_round_trip_us(n=2000):
    """A 1-byte ping-pong between this process and a child, over loopback."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c", f"""
import socket
s = socket.create_connection(("127.0.0.1", {port}))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (b := s.recv(1)):
    s.sendall(b)
"""])
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        conn.sendall(b"x")
        conn.recv(1)
        times.append((time.perf_counter() - t) * 1e6)
    conn.close()
    child.wait()
    server.close()
    return times


def bench_call_costs(kvmig, args):
    from pagers import NumpyPager
    meta = kvmig.preset_meta("tiny")
    empty = NumpyPager(meta, 8)
    one = NumpyPager(meta, 8)
    one.populate(1, 16, seed=1)
    n = 500
    with kvmig.Agent(empty) as a, kvmig.Agent(one) as b:
        def timed(fn):
            out = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1e6)
            return out

        def failing_migrate():
            try:
                a.migrate(to=b.address, all=True)
            except kvmig.Error:
                pass

        def one_page_round_trip():
            b.migrate(to=a.address, seqs=[1])
            a.migrate(to=b.address, seqs=[1])

        rtt = tcp_round_trip_us()
        print(f"loopback TCP round trip between two processes: "
              f"{summary(rtt, ' us', '{:.0f}')}")
        print(f"agent.status(digests=False), in process: "
              f"{summary(timed(lambda: a.status(digests=False)), ' us', '{:.0f}')}")
        print(f"kvmig.Client(...).status() over the control port: "
              f"{summary(timed(kvmig.Client(a.address).status), ' us', '{:.0f}')}")
        print(f"agent.migrate(all=True) of an empty engine (fails: nothing "
              f"to move): {summary(timed(failing_migrate), ' us', '{:.0f}')}")
        times = timed(one_page_round_trip)
        print(f"a 1-page tiny move from Python, there and back, per move: "
              f"{summary([t / 2 for t in times], ' us', '{:.0f}')}")


def bench_engine_pause(args):
    import llama_engine as le
    import random
    rng = random.Random(7)
    for tokens in args.engine_tokens:
        # A keeps the prefill chunks' pages while the request is away and
        # back: room for it twice.
        blocks = 2 * (tokens // 16) + 200
        common = ["--seed", "0", "--decode-rate", "20", "--num-blocks", str(blocks),
                  "--max-positions", str(tokens + 200)]
        a = le.EngineClient(["--layout", "flash-attn", *common], "A")
        b = le.EngineClient(["--layout", "flash-infer", *common], "B")
        try:
            b_addr = b.ok("address", timeout=90)["address"]
            a_addr = a.ok("address", timeout=90)["address"]
            prompt = [rng.randrange(512) for _ in range(tokens)]
            # Long prompts prefill in 1k chunks through the prefix cache:
            # request k holds the first (k + 1) * 1024 tokens.
            t = time.perf_counter()
            chunk = 1024
            for k, end in enumerate(range(chunk, tokens + 1, chunk)):
                a.ok("prefill", timeout=600, seq_id=100 + k,
                     prompt=prompt[:end], max_new_tokens=190)
            target = 100 + tokens // chunk - 1
            prefill_s = time.perf_counter() - t
            a.ok("start_decoding")
            b.ok("start_decoding")
            pauses = []
            src, dst = (a, a_addr), (b, b_addr)
            for rep in range(args.reps):  # A->B, B->A, ...: each decodes it
                r = src[0].ok("migrate", timeout=120, to=dst[1],
                              seqs=[target], live=True)
                assert r["seqs"] == [target], r
                pauses.append(r["pause_ms"])
                for rec in src[0].ok("departed", seqs=[target])["departed"]:
                    dst[0].ok("adopt", **rec)
                src, dst = dst, src
            print(f"torch engine live move of one {tokens}-token request "
                  f"(A decoding 20 steps/s, {prefill_s:.0f} s prefill): pause "
                  f"{summary(pauses, ' ms', '{:.1f}')}", flush=True)
        finally:
            a.close()
            b.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--build", default=str(ROOT / "build"))
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--engine-only", action="store_true")
    p.add_argument("--engine-tokens", default="1024,8192",
                   type=lambda t: [int(x) for x in t.split(",")])
    args = p.parse_args()
    build = pathlib.Path(args.build).resolve()
    for path in (build / "src" / "python", ROOT / "examples",
                 ROOT / "tests" / "python"):
        sys.path.insert(0, str(path))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(build / "src" / "python"), str(ROOT / "examples")])
    import kvmig
    if not args.engine_only:
        bench_call_costs(kvmig, args)
        bench_throughput(kvmig, build / "tools" / "kvmig", args)
    if not args.skip_engine:
        bench_engine_pause(args)


if __name__ == "__main__":
    main()
