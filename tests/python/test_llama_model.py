"""The example engine without kvmig: the paged cache computes exactly what a
plain implementation does, whatever the layout and the slots, and the
engine's pause and hold really stop decoding.

    /usr/bin/python3 -m pytest -q tests/python/test_llama_model.py
"""
import pathlib
import sys
import threading
import time

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "examples"))
import llama_engine as le  # noqa: E402

torch.set_num_threads(1)

CONFIG = le.LlamaConfig()
PAGE = CONFIG.page_size


def prompt_of(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (length,), generator=g).tolist()


# Lengths around page boundaries: 1 token, exactly one page, one page and
# one token, two pages and three tokens.
PROMPTS = {1: prompt_of(1, 1), 2: prompt_of(16, 2), 3: prompt_of(17, 3),
           4: prompt_of(35, 4)}
NEW_TOKENS = 18  # crosses a page boundary for every prompt


@pytest.fixture(scope="module")
def model():
    return le.LlamaModel(CONFIG, seed=0)


def run(model, layout="flash-attn", num_blocks=64, slot_order=None,
        prompts=PROMPTS, new_tokens=NEW_TOKENS, garbage=False):
    """Prefills prompts on a fresh engine and decodes them to the end.
    Returns {seq_id: Request} with every step's logits."""
    cache = le.PagedKVCache(CONFIG, num_blocks, layout, slot_order)
    if garbage:  # whatever a slot held before must not matter
        g = torch.Generator().manual_seed(99)
        for t in cache.tensors:
            t.copy_(torch.randn(t.shape, generator=g) * 1e3)
    engine = le.Engine(model, cache, record_logits=True)
    for seq_id, prompt in prompts.items():
        engine.prefill(seq_id, prompt, new_tokens)
    engine.run_until_finished()
    return {r.seq_id: r for r in engine.requests()}


@pytest.fixture(scope="module")
def reference(model):
    return run(model)


def contiguous_run(model, prompt, new_tokens):
    """The same model with unpaged K/V: (tokens, {position: logits bytes})."""
    kv = le.ContiguousKV(CONFIG)
    logits = model.forward(prompt, 0, kv)[-1]
    tokens, by_position = list(prompt), {len(prompt) - 1: logits}
    while True:
        tokens.append(int(torch.argmax(logits)))
        if len(tokens) - len(prompt) == new_tokens:
            break
        position = len(tokens) - 1
        logits = model.forward([tokens[-1]], position, kv)[-1]
        by_position[position] = logits
    return tokens, {p: l.numpy().tobytes() for p, l in by_position.items()}


def assert_same_requests(got, want):
    assert sorted(got) == sorted(want)
    for seq_id in want:
        assert got[seq_id].state == "finished"
        assert got[seq_id].tokens == want[seq_id].tokens, seq_id
        assert got[seq_id].logits == want[seq_id].logits, seq_id  # bitwise


def test_paged_decode_equals_contiguous_kv_bitwise(model, reference):
    for seq_id, prompt in PROMPTS.items():
        tokens, logits = contiguous_run(model, prompt, NEW_TOKENS)
        assert reference[seq_id].tokens == tokens
        assert reference[seq_id].logits == logits
        assert len(tokens) == len(prompt) + NEW_TOKENS


def test_flash_attn_and_flash_infer_layouts_are_bitwise_identical(
        model, reference):
    assert_same_requests(run(model, layout="flash-infer"), reference)


@pytest.mark.parametrize("layout", le.LAYOUTS)
def test_results_do_not_depend_on_the_slots(model, reference, layout):
    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    got = run(model, layout=layout, slot_order=shuffled.tolist(), garbage=True)
    assert_same_requests(got, reference)


def test_layout_tensors_have_the_vllm_shapes():
    attn = le.PagedKVCache(CONFIG, 8, "flash-attn")
    infer = le.PagedKVCache(CONFIG, 8, "flash-infer")
    assert [tuple(t.shape) for t in attn.tensors] == [(2, 8, 16, 2, 64)] * 4
    assert [tuple(t.shape) for t in infer.tensors] == [(8, 2, 16, 2, 64)] * 4
    for cache in (attn, infer):
        assert all(v.data_ptr() == t.data_ptr()
                   for v, t in zip(cache.k_views, cache.tensors))
        assert all(v[0].is_contiguous() for v in cache.k_views + cache.v_views)


def test_shared_prefix_is_computed_once_and_matches_unshared_runs(model):
    prefix = prompt_of(32, 10)  # two full pages
    prompts = {1: prefix + prompt_of(5, 11), 2: prefix + prompt_of(20, 12)}
    cache = le.PagedKVCache(CONFIG, 32)
    engine = le.Engine(model, cache, record_logits=True)
    first = engine.prefill(1, prompts[1], 6)  # finishes first: 2 keeps the pages
    second = engine.prefill(2, prompts[2], NEW_TOKENS)
    assert (first.cached_pages, second.cached_pages) == (0, 2)
    assert second.pages[:2] == first.pages[:2]
    assert len(cache.occupied()) == len(first.pages) + len(second.pages) - 2
    engine.run_until_finished()
    assert cache.free_count() == 32  # every page back, shared ones too
    shared = {r.seq_id: r for r in engine.requests()}

    for seq_id, prompt in prompts.items():
        new_tokens = 6 if seq_id == 1 else NEW_TOKENS
        alone = run(model, prompts={seq_id: prompt}, new_tokens=new_tokens)
        got, want = shared[seq_id], alone[seq_id]
        assert got.tokens == want.tokens
        # Request 2 computed its remainder's rows in a smaller batch than an
        # unshared prefill of its whole prompt. That is bitwise equal where
        # torch's GEMM gives each row the same result whatever the row count
        # (it does on this Debian build, with its generic BLAS), but blocked
        # GEMMs (MKL, OpenBLAS) need not: so tokens are compared exactly and
        # logits to a tight tolerance.
        assert got.logits.keys() == want.logits.keys()
        for position in want.logits:
            torch.testing.assert_close(
                torch.frombuffer(bytearray(got.logits[position]),
                                 dtype=torch.float32),
                torch.frombuffer(bytearray(want.logits[position]),
                                 dtype=torch.float32),
                rtol=1e-5, atol=1e-5)


def test_a_request_moved_by_hand_through_the_pager_calls_continues_exactly(
        model, reference):
    """What kvmig does in a stop-and-copy move, spelled out with the
    engine's pager-side calls (no kvmig): the request continues on a
    flash-infer engine exactly as it would have at home."""
    src = le.Engine(model, le.PagedKVCache(CONFIG, 16, "flash-attn"))
    dst = le.Engine(model, le.PagedKVCache(CONFIG, 16, "flash-infer",
                                           list(range(15, -1, -1))))
    src.prefill(4, PROMPTS[4], NEW_TOKENS)
    for _ in range(7):
        src.step()

    src.pause()
    (table,) = [t for t in src.logical_seqs() if t.seq_id == 4]
    slots = dst.allocate_pages(len(table.pages))
    for page, slot in zip(table.pages, slots):
        dst.write_page(slot, *src.read_page(page))
    dst.install_logical_seqs([le.SeqTable(4, table.n_tokens, slots)])
    src.drop_logical_seqs([4])
    src.resume()

    assert dst.step() == 0  # installed but unadopted: not decoded
    (handover,) = src.departed()
    short = dict(handover, tokens=handover["tokens"][:-1])
    with pytest.raises(le.EngineError) as e:
        dst.adopt(**short)
    assert e.value.code == "FailedPrecondition"
    dst.adopt(**handover)
    dst.run_until_finished()

    (moved,) = dst.requests()
    assert moved.tokens == reference[4].tokens
    position, logits = dst.first_logits()[4]
    assert position == table.n_tokens
    assert logits == reference[4].logits[position]
    assert src.capacity() == (16, 16)
    assert dst.capacity() == (16, 16)


def test_page_bytes_are_in_canonical_order(model):
    engine = le.Engine(model, le.PagedKVCache(CONFIG, 8, "flash-infer"))
    engine.prefill(1, PROMPTS[4], 4)
    slot = engine.logical_seqs()[0].pages[1]
    k, v = engine.read_page(slot)
    assert len(k) == len(v) == 4 * 16 * 2 * 64 * 4
    k_layers = torch.frombuffer(bytearray(k), dtype=torch.float32)
    want = torch.cat([view[slot].flatten() for view in engine.cache.k_views])
    assert torch.equal(k_layers, want)  # K layer 0 .. 3, each [token][head][dim]


def test_pager_calls_refuse_bad_use_and_change_nothing(model):
    engine = le.Engine(model, le.PagedKVCache(CONFIG, 8))
    engine.prefill(1, PROMPTS[3], 4)  # two pages

    def code(call, *args):
        with pytest.raises(le.EngineError) as e:
            call(*args)
        return e.value.code

    assert code(engine.resume) == "FailedPrecondition"
    assert code(engine.allocate_pages, 7) == "ResourceExhausted"
    assert engine.capacity() == (8, 6)
    assert code(engine.read_page, 8) == "OutOfRange"
    assert code(engine.read_page, 5) == "FailedPrecondition"
    slots = engine.allocate_pages(2)
    assert engine.occupied_pages() == [0, 1] + slots
    assert code(engine.write_page, slots[0], b"x", b"y") == "InvalidArgument"
    assert code(engine.install_logical_seqs,
                [le.SeqTable(2, 40, slots)]) == "InvalidArgument"
    assert code(engine.install_logical_seqs,
                [le.SeqTable(2, 20, slots), le.SeqTable(1, 1, [slots[0]])]
                ) == "AlreadyExists"
    assert code(engine.install_logical_seqs,
                [le.SeqTable(2, 20, [slots[0], 7])]) == "FailedPrecondition"
    assert [t.seq_id for t in engine.logical_seqs()] == [1]
    assert code(engine.drop_logical_seqs, [1, 9]) == "NotFound"
    assert code(engine.hold_seqs, [9]) == "NotFound"
    assert code(engine.release_pages, [0]) == "FailedPrecondition"
    engine.release_pages(slots)
    assert engine.capacity() == (8, 6)
    engine.pause()
    engine.pause()
    engine.resume()
    assert code(engine.step) == "FailedPrecondition"  # still paused once
    engine.resume()
    assert engine.step() == 1


class GatedModel:
    """A model whose next forward() can be made to wait for the test."""

    def __init__(self, model):
        self.config = model.config
        self._model = model
        self.calls = 0
        self.entered = threading.Event()
        self._go = threading.Event()
        self._go.set()

    def hold_next_call(self):
        self.entered.clear()
        self._go.clear()

    def let_go(self):
        self._go.set()

    def forward(self, tokens, start, kv):
        self.calls += 1
        self.entered.set()
        if not self._go.wait(30):
            raise TimeoutError("test never let the step go")
        return self._model.forward(tokens, start, kv)


def poll(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_pause_waits_for_the_step_in_progress_and_stops_the_loop(model):
    gated = GatedModel(model)
    engine = le.Engine(gated, le.PagedKVCache(CONFIG, 16), decode_rate=0)
    engine.prefill(1, PROMPTS[1], 100)
    gated.hold_next_call()
    engine.start_decoding()
    try:
        assert gated.entered.wait(20), "the decode loop never stepped"
        paused = threading.Event()
        pauser = threading.Thread(target=lambda: (engine.pause(), paused.set()))
        pauser.start()
        # The step is inside forward(): pause() must not return before it ends.
        assert not paused.wait(0.2)
        gated.let_go()
        assert paused.wait(20)
        pauser.join()
        steps, calls = engine.stats()["steps"], gated.calls
        tokens = engine.requests([1])[0].tokens
        # Unpaused, the loop steps every few ms; paused, it must not step at
        # all. Watch it for a while, checking at every poll.
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert engine.stats()["steps"] == steps
            assert gated.calls == calls
            time.sleep(0.005)
        assert engine.requests([1])[0].tokens == tokens
        engine.resume()
        poll(lambda: engine.stats()["steps"] >= steps + 3, what="steps resume")
    finally:
        gated.let_go()
        engine.stop_decoding()


def test_held_request_is_not_decoded_until_unheld(model, reference):
    engine = le.Engine(model, le.PagedKVCache(CONFIG, 16), decode_rate=0,
                       record_logits=True)
    engine.prefill(2, PROMPTS[2], NEW_TOKENS)
    engine.prefill(3, PROMPTS[3], NEW_TOKENS)
    engine.hold_seqs([3])
    held_tokens = engine.requests([3])[0].tokens
    engine.start_decoding()
    try:
        def two_done_three_untouched():
            two, three = engine.requests([2, 3])
            assert three.tokens == held_tokens and three.held
            return two.state == "finished"
        poll(two_done_three_untouched, what="request 2 to finish")
        engine.unhold_seqs([3])
        engine.wait_finished([3], timeout=20)
    finally:
        engine.stop_decoding()
    for req in engine.requests():
        assert req.tokens == reference[req.seq_id].tokens
        assert req.logits == reference[req.seq_id].logits


def test_toy_words_are_unique_and_round_trip():
    words = le.toy_words()
    assert len(set(words)) == len(words) == CONFIG.vocab_size
    assert le.tokenize(le.detokenize([3, 141, 511])) == [3, 141, 511]
