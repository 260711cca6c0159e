"""Requests of the example Llama engine migrated by kvmig between two engine
processes continue exactly: every token, and the logits of the first step
the destination computes (bitwise), equal a run of the same prompts on one
engine that never migrated.

Engine A keeps its cache in the flash-attn layout, B in flash-infer, so
every move also changes the layout. Needs the binding:

    PYTHONPATH=build/src/python /usr/bin/python3 -m pytest -q tests/python/test_llama_migration.py
"""
import functools
import os
import pathlib
import sys
import time

import pytest
import torch

kvmig = pytest.importorskip(
    "kvmig", reason="the kvmig binding is not built (PYTHONPATH=build/src/python)")

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENGINE = ROOT / "examples" / "llama_engine.py"
sys.path.insert(0, str(ENGINE.parent))
import llama_engine as le  # noqa: E402

torch.set_num_threads(1)

CONFIG = le.LlamaConfig()
SEED = 0            # model weights, the same in every process
RATE = 30           # decode steps per second on both engines
NUM_BLOCKS = 128
NEW_TOKENS = 40


def prompt_of(length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (length,), generator=g).tolist()


def poll(condition, timeout=20.0, what="condition"):
    """Calls condition() until it is true; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# --- Reference runs (in this process, no migration) ---------------------------


@functools.lru_cache(maxsize=None)
def _model():
    return le.LlamaModel(CONFIG, SEED)


def reference(requests):
    """requests: [(seq_id, prompt, max_new_tokens)], prefilled in this order
    on one engine and decoded to the end. Returns {seq_id: Request} with
    every step's logits."""
    engine = le.Engine(_model(), le.PagedKVCache(CONFIG, NUM_BLOCKS),
                       record_logits=True)
    for seq_id, prompt, max_new in requests:
        engine.prefill(seq_id, prompt, max_new)
    engine.run_until_finished()
    return {r.seq_id: r for r in engine.requests()}


@functools.lru_cache(maxsize=None)
def built_transports():
    """The data transports an agent of this build serves (verbs needs a
    device, so it is left out), as its status() reports them."""
    wanted = [t for t in kvmig.built_transports() if t in ("tcp", "ucx")]
    engine = le.Engine(_model(), le.PagedKVCache(CONFIG, 4))
    agent = kvmig.Agent(le.make_pager(engine), listen="127.0.0.1:0",
                        transports=wanted)
    agent.start()
    try:
        return list(agent.status(digests=False)["transports"])
    finally:
        agent.stop()


# --- Engine processes ---------------------------------------------------------


class EngineProcess(le.EngineClient):
    """examples/llama_engine.py in a child process; failures carry its log."""

    def __init__(self, name, layout, transports, log_dir, staged=False):
        log_path = pathlib.Path(log_dir) / f"engine-{name}.log"
        args = ["--layout", layout, "--num-blocks", str(NUM_BLOCKS),
                "--seed", str(SEED), "--decode-rate", str(RATE),
                "--transports", ",".join(transports), "--listen", "127.0.0.1:0"]
        super().__init__(args + (["--staged"] if staged else []), name,
                         log_path, env=os.environ)
        self.address = None

    def log_tail(self, lines=40):
        text = pathlib.Path(self.log_path).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def call(self, cmd, timeout=30.0, **fields):
        try:
            return super().call(cmd, timeout, **fields)
        except le.EngineError as e:
            raise AssertionError(f"{e}\n{self.log_tail()}") from None

    def ok(self, cmd, timeout=30.0, **fields):
        reply = self.call(cmd, timeout, **fields)
        assert reply["ok"], f"engine {self.name}: {cmd}: {reply}"
        return reply

    def requests(self, ids=None):
        reply = self.ok("tokens", **({} if ids is None else {"seqs": ids}))
        return {r["seq_id"]: r for r in reply["requests"]}

    def generated(self, ids):
        return {i: len(r["tokens"]) - r["prompt_len"]
                for i, r in self.requests(ids).items()}



class EnginePairs:
    """Engine pairs (A: flash-attn, B: flash-infer, every transport the
    binding built) that tests share, one per staged flag, since starting
    an engine (importing torch) costs seconds. A pair is handed out only
    when it is clean: both alive, unpaused, no live request, every page
    free; old records forgotten. Otherwise it is replaced by a new one."""

    def __init__(self, log_dir):
        self._log_dir = log_dir
        self._pairs = {}
        self._start_failed = {}  # staged -> why a pair could not start

    def get(self, staged):
        if staged in self._start_failed:  # fail fast: it will not start now
            pytest.fail(self._start_failed[staged], pytrace=False)
        pair = self._pairs.pop(staged, None)
        if pair is None or not self._reset(pair):
            if pair is not None:
                self._close(pair)
            try:
                pair = self._start(staged)
            except AssertionError as e:
                self._start_failed[staged] = f"engines did not start: {e}"
                raise
        self._pairs[staged] = pair
        return pair

    def _start(self, staged):
        log_dir = self._log_dir / f"{'staged' if staged else 'zero-copy'}-{time.monotonic_ns()}"
        log_dir.mkdir()
        transports = built_transports()
        pair = [EngineProcess("A", "flash-attn", transports, log_dir, staged),
                EngineProcess("B", "flash-infer", transports, log_dir, staged)]
        try:
            for engine in pair:  # both import torch at once, then report
                engine.address = engine.ok("address", timeout=90)["address"]
        except BaseException:
            self._close(pair)
            raise
        return pair

    @staticmethod
    def _reset(pair):
        try:
            for engine in pair:
                engine.ok("stop_decoding")
                engine.ok("gate_allocations", closed=False)
                stats = engine.ok("stats")
                if stats["paused"] or stats["free_pages"] != NUM_BLOCKS:
                    return False
                if any(r["state"] in ("decoding", "unadopted")
                       for r in engine.requests().values()):
                    return False
                engine.ok("forget")
        except AssertionError:
            return False
        return True

    @staticmethod
    def _close(pair):
        for engine in pair:
            engine.quit()  # both shut down at once
        for engine in pair:
            engine.close()

    def close(self):
        for pair in self._pairs.values():
            self._close(pair)


@pytest.fixture(scope="module")
def engine_pairs(tmp_path_factory):
    pairs = EnginePairs(tmp_path_factory.mktemp("engines"))
    yield pairs
    pairs.close()


@pytest.fixture
def engine_pair(engine_pairs):
    """start(staged=False) -> (A, B), clean; their logs are printed after
    the test (pytest shows them when it fails)."""
    used = []

    def start(staged=False):
        pair = engine_pairs.get(staged)
        used.extend(pair)
        return pair

    yield start
    for engine in used:
        print(f"--- engine {engine.name} log ---\n{engine.log_tail()}")


def transport_param(name):
    return pytest.param(name, id=name)


TRANSPORTS = [transport_param("tcp"), transport_param("ucx")]


def need_transport(name):
    if name not in built_transports():
        pytest.skip(f"{name!r} is not among the agent's transports "
                    f"{built_transports()} (not built here)")


# --- Steps every test shares ----------------------------------------------------


def prefill_all(engine, requests):
    for seq_id, prompt, max_new in requests:
        engine.ok("prefill", seq_id=seq_id, prompt=prompt,
                  max_new_tokens=max_new)


def wait_generated(engine, ids, at_least):
    poll(lambda: all(n >= at_least for n in engine.generated(ids).values()),
         what=f"{ids} to generate {at_least} tokens on {engine.name}")


def gated_migration(src, dst, while_gated=None, **migrate):
    """Starts a migration src -> dst and holds it where the destination
    allocates slots for it (the first round's snapshot is taken, nothing
    sent), runs while_gated(), then lets it finish. Returns the report."""
    dst.ok("gate_allocations", closed=True)
    src.ok("migrate_start", to=dst.address, **migrate)
    try:
        poll(lambda: dst.ok("gate_allocations")["waiting"] >= 1,
             what="the destination to allocate")
        if while_gated is not None:
            while_gated()
    finally:
        dst.ok("gate_allocations", closed=False)
    report = src.ok("migrate_wait", timeout=60)
    return report


def hand_over(src, dst, ids):
    """The scheduler's half of a move: the departed requests' token ids."""
    records = src.ok("departed", seqs=ids)["departed"]
    assert sorted(r["seq_id"] for r in records) == sorted(ids)
    for record in records:
        dst.ok("adopt", **record)
    return {r["seq_id"]: r for r in records}


def assert_tokens_match(engine, ids, refs):
    for seq_id, req in engine.requests(ids).items():
        assert req["state"] == "finished", (engine.name, req)
        assert req["tokens"] == refs[seq_id].tokens, (engine.name, seq_id)


def assert_first_logits_match(engine, handed, refs):
    """The first step engine computed for each handed-over request, bitwise
    against the reference step at the same position."""
    got = {f["seq_id"]: f for f in engine.ok("first_logits")["first_logits"]}
    for seq_id, record in handed.items():
        position = len(record["tokens"]) - 1  # the first input not cached
        assert got[seq_id]["position"] == position
        assert got[seq_id]["hex"] == refs[seq_id].logits[position].hex(), seq_id


def assert_empty(engine):
    """Every request finished or gone, every page back."""
    status = engine.ok("status")
    assert status["seqs"] == [], (engine.name, status["seqs"])
    assert status["free_pages"] == status["capacity_pages"] == NUM_BLOCKS


THREE = [(1, prompt_of(21, 1), NEW_TOKENS), (2, prompt_of(30, 2), NEW_TOKENS),
         (3, prompt_of(40, 3), NEW_TOKENS)]


def three_decoding(engine_pair, transport, generated):
    """A pair of engines, the three requests prefilled on A, both decoding,
    each request `generated` tokens in; and the reference outputs."""
    need_transport(transport)
    refs = reference(THREE)
    a, b = engine_pair()
    prefill_all(a, THREE)
    a.ok("start_decoding")
    b.ok("start_decoding")
    wait_generated(a, [1, 2, 3], generated)
    return refs, a, b


def finish_and_check(refs, handed, arrived, moved, stayed_at, stayed, *pair):
    """Both engines run their requests to the end: every output equals the
    reference, the first logits `arrived` computed for the handed-over
    requests too, and both engines end empty."""
    arrived.ok("wait_finished", seqs=moved, timeout=30)
    stayed_at.ok("wait_finished", seqs=stayed, timeout=30)
    assert_tokens_match(arrived, moved, refs)
    assert_tokens_match(stayed_at, stayed, refs)
    assert_first_logits_match(arrived, handed, refs)
    for engine in pair:
        assert_empty(engine)


# --- The tests ----------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_live_move_while_the_source_decodes(engine_pair, transport):
    refs, a, b = three_decoding(engine_pair, transport, 4)

    def source_keeps_decoding():
        # The first round is under way: A must go on decoding the very
        # requests being copied.
        before = a.generated([1, 2])
        poll(lambda: all(n >= before[i] + 2
                         for i, n in a.generated([1, 2]).items()),
             what="A to decode during the live migration")

    report = gated_migration(a, b, source_keeps_decoding, seqs=[1, 2],
                             live=True, transport=transport)
    assert report["seqs"] == [1, 2] and report["left_behind"] == []
    assert report["rounds"] >= 2 and len(report["round_pages"]) == report["rounds"]
    assert report["transport"] == transport
    assert {r["state"] for r in a.requests([1, 2]).values()} == {"departed"}
    assert {r["state"] for r in b.requests([1, 2]).values()} == {"unadopted"}

    handed = hand_over(a, b, [1, 2])
    finish_and_check(refs, handed, b, [1, 2], a, [3], a, b)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stop_and_copy_move(engine_pair, transport):
    refs, a, b = three_decoding(engine_pair, transport, 3)

    def only_the_moving_requests_stop():
        # Stop-and-copy holds the requests it moves before the destination
        # allocates; the engine is not paused, and request 2 decodes on.
        assert a.ok("stats")["paused"] == 0
        reqs = a.requests([1, 2, 3])
        assert reqs[1]["held"] and reqs[3]["held"] and not reqs[2]["held"]
        two = a.generated([2])[2]
        poll(lambda: a.generated([2])[2] > two or two == NEW_TOKENS,
             what="request 2 to decode while 1 and 3 move")
        assert a.generated([1, 3]) == {i: len(reqs[i]["tokens"]) -
                                       reqs[i]["prompt_len"] for i in (1, 3)}

    report = gated_migration(a, b, only_the_moving_requests_stop, seqs=[1, 3],
                             live=False, transport=transport)
    assert report["seqs"] == [1, 3] and report["rounds"] == 1
    assert report["transport"] == transport and report["pause_ms"] > 0
    assert report["hold"] == "seqs"
    assert a.ok("stats")["paused"] == 0

    handed = hand_over(a, b, [1, 3])
    finish_and_check(refs, handed, b, [1, 3], a, [2], a, b)


def test_move_there_and_back(engine_pair):
    refs, a, b = three_decoding(engine_pair, "tcp", 3)
    report = a.ok("migrate", to=b.address, seqs=[1, 2], live=True)
    assert report["seqs"] == [1, 2]
    hand_over(a, b, [1, 2])

    # B decodes request 1 a while, then it goes home to A (flash-infer
    # pages back into flash-attn slots).
    arrived = b.generated([1])[1]
    wait_generated(b, [1], arrived + 3)
    report = b.ok("migrate", to=a.address, seqs=[1], live=True)
    assert report["seqs"] == [1] and report["left_behind"] == []
    handed_back = hand_over(b, a, [1])

    finish_and_check(refs, handed_back, a, [1, 3], b, [2], a, b)


def test_shared_prefix_pages_are_sent_once(engine_pair):
    prefix = prompt_of(32, 7)  # two full pages, shared by requests 1 and 2
    requests = [(1, prefix + prompt_of(7, 8), NEW_TOKENS),
                (2, prefix + prompt_of(12, 9), NEW_TOKENS),
                (3, prompt_of(20, 10), NEW_TOKENS)]
    refs = reference(requests)  # shares the prefix in the same way
    a, b = engine_pair()
    prefill_all(a, requests[:1])
    assert a.ok("prefill", seq_id=2, prompt=requests[1][1],
                max_new_tokens=NEW_TOKENS)["cached_pages"] == 2
    prefill_all(a, requests[2:])
    a.ok("start_decoding")
    b.ok("start_decoding")
    wait_generated(a, [1, 2], 2)

    report = a.ok("migrate", to=b.address, seqs=[1, 2], live=True)
    assert report["seqs"] == [1, 2]
    # Not adopted yet, so B has not decoded: its pages are what arrived.
    status = b.ok("status")
    pages = {s["id"]: s["pages"] for s in status["seqs"]}
    assert sorted(pages) == [1, 2]
    assert report["pages"] == pages[1] + pages[2] - 2
    assert status["capacity_pages"] - status["free_pages"] == report["pages"]

    handed = hand_over(a, b, [1, 2])
    finish_and_check(refs, handed, b, [1, 2], a, [3], a, b)


def test_request_finishing_during_a_live_move_is_left_behind(engine_pair):
    short = 10
    requests = [(1, prompt_of(30, 4), NEW_TOKENS), (3, prompt_of(20, 5), short)]
    refs = reference(requests)
    a, b = engine_pair()
    prefill_all(a, requests)
    a.ok("start_decoding")
    b.ok("start_decoding")
    wait_generated(a, [3], 3)

    def three_finishes():
        # The first round's snapshot has request 3; it finishes at A before
        # the final round.
        a.ok("wait_finished", seqs=[3], timeout=20)

    report = gated_migration(a, b, three_finishes, seqs=[1, 3], live=True)
    assert report["seqs"] == [1] and report["left_behind"] == [3]
    # Slots B took for request 3's pages went back at install.
    status = b.ok("status")
    (moved,) = status["seqs"]
    assert moved["id"] == 1
    assert status["capacity_pages"] - status["free_pages"] == moved["pages"]
    assert a.requests([3])[3]["state"] == "finished"

    handed = hand_over(a, b, [1])
    b.ok("wait_finished", seqs=[1], timeout=30)
    assert_tokens_match(b, [1], refs)
    assert_tokens_match(a, [3], refs)  # its whole generation stayed at A
    assert_first_logits_match(b, handed, refs)
    assert_empty(a)
    assert_empty(b)


def test_staged_pages_without_zero_copy(engine_pair):
    """Neither engine offers layout(): kvmig reads and writes pages through
    read_page/write_page and staging buffers."""
    requests = THREE[:2]
    refs = reference(requests)
    a, b = engine_pair(staged=True)
    prefill_all(a, requests)
    a.ok("start_decoding")
    b.ok("start_decoding")
    wait_generated(a, [1, 2], 3)
    report = a.ok("migrate", to=b.address, seqs=[2], live=True)
    assert report["seqs"] == [2] and report["staged"] is True
    handed = hand_over(a, b, [2])
    b.ok("wait_finished", seqs=[2], timeout=30)
    a.ok("wait_finished", seqs=[1], timeout=30)
    assert_tokens_match(b, [2], refs)
    assert_tokens_match(a, [1], refs)
    assert_first_logits_match(b, handed, refs)


def test_adopt_refuses_a_token_list_that_does_not_fit(engine_pair):
    requests = THREE[:1]
    refs = reference(requests)
    a, b = engine_pair()
    prefill_all(a, requests)
    before = a.ok("status", digests=True)["seqs"]
    a.ok("migrate", to=b.address, seqs=[1])  # A never decoded: n_tokens = 21
    # The KV bytes arrived intact in the other layout (kvmig's digests).
    after = b.ok("status", digests=True)["seqs"]
    assert [s.pop("arrived_ms_ago") >= 0 for s in after] == [True]
    assert after == before
    (record,) = a.ok("departed", seqs=[1])["departed"]
    assert len(record["tokens"]) == 22
    wrong = b.call("adopt", **dict(record, tokens=record["tokens"][:-1]))
    assert not wrong["ok"] and wrong["code"] == "FailedPrecondition"
    unknown = b.call("adopt", **dict(record, seq_id=9))
    assert not unknown["ok"] and unknown["code"] == "NotFound"
    b.ok("adopt", **record)
    b.ok("start_decoding")
    b.ok("wait_finished", seqs=[1], timeout=30)
    assert_tokens_match(b, [1], refs)
    failed = a.call("migrate", to=b.address, seqs=[1])  # no longer at A
    assert not failed["ok"] and failed["code"], failed
