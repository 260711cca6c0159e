#!/usr/bin/python3
"""Two Llama engines, three requests, two of them moved live mid-sentence.

Starts engine A (flash-attn layout) and engine B (flash-infer) as child
processes (examples/llama_engine.py), prefills three prompts on A, lets it
decode, live-migrates requests 1 and 2 to B while A keeps decoding, hands
their token ids over as a scheduler would, and prints each request's words
as they are generated, tagged with the engine that generated them. At the
end it checks every request against a run of the same prompts on one engine
that never migrated, and exits 0 only if all match. The engines are stopped
on any exit.

    PYTHONPATH=build/src/python /usr/bin/python3 examples/demo_engine.py [--transport ucx]
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time

import torch

import llama_engine as le

PROMPTS = {
    1: "once upon a time in a quiet valley there lived an old clockmaker "
       "who repaired every clock in the village except his own",
    2: "the committee met on tuesday to decide whether the bridge should "
       "be rebuilt in stone or in steel",
    3: "to make bread you need flour water salt yeast and above all patience",
}
NEW_TOKENS = 24
MOVED = [1, 2]


class Printer:
    """Prints each request's new words, tagged with the engine that made them."""

    def __init__(self, prompts: dict[int, list[int]]):
        self._shown = {i: len(p) for i, p in prompts.items()}
        for seq_id, prompt in prompts.items():
            print(f"request {seq_id}: {PROMPTS[seq_id]!r} "
                  f"({len(prompt)} tokens)")

    def show(self, engine_name: str, requests: dict[int, dict]) -> None:
        for seq_id, req in sorted(requests.items()):
            tokens = req["tokens"]
            if req["state"] not in ("decoding", "finished") or tokens is None:
                continue
            new = tokens[self._shown[seq_id]:]
            if new:
                done = " (finished)" if req["state"] == "finished" else ""
                print(f"  [{engine_name}] {seq_id}: ... {le.detokenize(new)}{done}")
                self._shown[seq_id] = len(tokens)


def requests_of(engine: le.EngineClient) -> dict[int, dict]:
    return {r["seq_id"]: r for r in engine.ok("tokens")["requests"]}


def follow(engines: dict[str, le.EngineClient], printer: Printer,
           until, timeout: float) -> None:
    """Prints progress until until(states) is true: states maps engine name
    to its requests."""
    deadline = time.monotonic() + timeout
    while True:
        states = {name: requests_of(e) for name, e in engines.items()}
        for name, requests in states.items():
            printer.show(name, requests)
        if until(states):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no progress to the next stage in {timeout} s")
        time.sleep(0.4)


def reference(prompts: dict[int, list[int]]) -> dict[int, list[int]]:
    """Every request's tokens on one engine that never migrated."""
    torch.set_num_threads(1)
    config = le.LlamaConfig()
    engine = le.Engine(le.LlamaModel(config, seed=0),
                       le.PagedKVCache(config, 64))
    for seq_id, prompt in prompts.items():
        engine.prefill(seq_id, prompt, NEW_TOKENS)
    engine.run_until_finished()
    return {r.seq_id: r.tokens for r in engine.requests()}


def run(args: argparse.Namespace) -> int:
    prompts = {i: le.tokenize(text) for i, text in PROMPTS.items()}
    logs = tempfile.mkdtemp(prefix="kvmig-demo-")
    common = ["--seed", "0", "--decode-rate", str(args.rate),
              "--transports", args.transport, "--num-blocks", "64"]
    engines: dict[str, le.EngineClient] = {}
    try:
        for name, layout in (("A", "flash-attn"), ("B", "flash-infer")):
            engines[name] = le.EngineClient(["--layout", layout, *common], name,
                                            f"{logs}/engine-{name}.log")
        a, b = engines["A"], engines["B"]
        addresses = {n: e.ok("address", timeout=90)["address"]
                     for n, e in engines.items()}
        print(f"engine A (flash-attn) at {addresses['A']}, engine B "
              f"(flash-infer) at {addresses['B']}; logs in {logs}")

        for seq_id, prompt in prompts.items():
            a.ok("prefill", seq_id=seq_id, prompt=prompt,
                 max_new_tokens=NEW_TOKENS)
        printer = Printer(prompts)
        a.ok("start_decoding")
        b.ok("start_decoding")
        follow({"A": a}, printer, timeout=60, until=lambda s: all(
            len(s["A"][i]["tokens"]) >= len(prompts[i]) + 6 for i in MOVED))

        report = a.ok("migrate", to=addresses["B"], seqs=MOVED, live=True,
                      transport=args.transport)
        print(f"moved requests {report['seqs']} live to B: {report['pages']} "
              f"pages in {report['rounds']} rounds over {report['transport']}, "
              f"A paused {report['pause_ms']:.1f} ms")
        for record in a.ok("departed", seqs=MOVED)["departed"]:
            b.ok("adopt", **record)  # the token ids travel with the scheduler

        def all_finished(states):
            finished = {i for reqs in states.values()
                        for i, r in reqs.items() if r["state"] == "finished"}
            return finished == set(prompts)
        follow(engines, printer, until=all_finished, timeout=120)

        outputs = {}
        for name, engine in engines.items():
            for seq_id, req in requests_of(engine).items():
                if req["state"] == "finished":
                    outputs[seq_id] = (name, req["tokens"])
        expected = reference(prompts)
        exact = 0
        for seq_id in sorted(prompts):
            name, tokens = outputs[seq_id]
            same = tokens == expected[seq_id]
            exact += same
            print(f"request {seq_id} (finished on {name}, "
                  f"{'exact' if same else 'DIFFERENT'}): "
                  f"{le.detokenize(tokens[len(prompts[seq_id]):])}")
        print(f"{exact}/{len(prompts)} requests equal a run without migration")
        return 0 if exact == len(prompts) else 1
    except (le.EngineError, TimeoutError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        for name, engine in engines.items():
            with open(engine.log_path, errors="replace") as log:
                tail = log.read().splitlines()[-5:]
            print(f"--- engine {name} ({engine.log_path}) ---", *tail,
                  sep="\n", file=sys.stderr)
        return 1
    finally:
        for engine in engines.values():
            engine.quit()
        for engine in engines.values():
            engine.close(timeout=10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--transport", default="tcp", choices=["tcp", "ucx"])
    p.add_argument("--rate", type=float, default=8.0,
                   help="decode steps per second on each engine")
    args = p.parse_args()
    # SIGTERM and SIGHUP unwind like Ctrl-C, through run()'s finally.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
