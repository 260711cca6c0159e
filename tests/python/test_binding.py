"""The binding against real agents: a Python pager and a C++ `kvmig serve`
process exchange requests over real sockets, and every misbehaving pager
method gives a clear error that leaves both sides as they were."""

import threading
import time

import numpy as np
import pytest
import torch

import kvmig
from pagers import NumpyPager, SimDevicePager

TINY = kvmig.preset_meta("tiny")  # 16 tokens x 2 layers x 2 heads x 64, f16


def poll(condition, what, timeout=20.0):
    """Waits for condition() to hold: the destination gives its slots back
    when the source's ABORT reaches it, which may be just after the source's
    migrate() has returned its error."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def dst_is_empty(address, capacity):
    status = kvmig.Client(address).status()
    return status["seqs"] == [] and status["free_pages"] == capacity


def digests(status):
    return {s["id"]: s["digest"] for s in status["seqs"]}


# ---- types ----

def test_meta_and_presets():
    meta = kvmig.CacheMeta(page_size_tokens=16, n_layers=32, n_heads=8,
                           head_dim=128, dtype="bf16")
    assert meta == kvmig.preset_meta("llama3-8b")
    assert meta.page_bytes() == 1 << 20
    assert meta.layer_chunk_bytes() == 32 << 10
    assert meta.pages_for_tokens(17) == 2
    with pytest.raises(kvmig.Error) as e:
        kvmig.CacheMeta(page_size_tokens=16, n_layers=1, n_heads=1,
                        head_dim=1, dtype="f64")
    assert e.value.code == "InvalidArgument" and "f64" in str(e.value)
    with pytest.raises(kvmig.Error) as e:
        kvmig.preset_meta("gpt-5")
    assert e.value.code == "NotFound" or e.value.code == "InvalidArgument"


def test_error_keeps_its_code():
    e = kvmig.Error("no such request", code="NotFound")
    assert e.code == "NotFound" and e.message == "no such request"
    assert str(e) == "NotFound: no such request"
    assert isinstance(e, RuntimeError)


# ---- regions ----

META = kvmig.CacheMeta(page_size_tokens=16, n_layers=3, n_heads=2,
                       head_dim=64, dtype="f32")


def test_regions_flash_attention():
    layers = [torch.zeros(2, 10, 16, 2, 64) for _ in range(3)]
    regs = kvmig.regions([t[0] for t in layers], [t[1] for t in layers],
                         meta=META)
    assert len(regs) == 6
    chunk = META.layer_chunk_bytes()
    for i, r in enumerate(regs):
        t = layers[i % 3]
        assert r.base == t[i // 3].data_ptr()
        assert (r.stride, r.chunk, r.slots, r.kind) == (chunk, chunk, 10, "host")
    kvmig.validate_layout(META, regs)


def test_regions_flash_infer_and_sglang():
    layers = [torch.zeros(10, 2, 16, 2, 64) for _ in range(3)]
    regs = kvmig.regions([t[:, 0] for t in layers], [t[:, 1] for t in layers],
                         meta=META)
    chunk = META.layer_chunk_bytes()
    assert [r.stride for r in regs] == [2 * chunk] * 6
    assert regs[3].base == layers[0].data_ptr() + chunk
    # SGLang: per-layer token buffers (tokens, heads, dim) viewed as pages.
    k_buffer = [np.zeros((160, 2, 64), np.float32) for _ in range(3)]
    v_buffer = [np.zeros((160, 2, 64), np.float32) for _ in range(3)]
    regs = kvmig.regions([b.reshape(10, 16, 2, 64) for b in k_buffer],
                         [b.reshape(10, 16, 2, 64) for b in v_buffer],
                         meta=META)
    assert regs[0].base == k_buffer[0].ctypes.data
    assert regs[5].base == v_buffer[2].ctypes.data
    kvmig.validate_layout(META, regs)


def refused(k, v, *needles, meta=META):
    with pytest.raises(kvmig.Error) as e:
        kvmig.regions(k, v, meta=meta)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    return e.value


def test_regions_refuse_what_kvmig_cannot_use():
    good = [torch.zeros(10, 16, 2, 64) for _ in range(3)]
    # A page that is not contiguous: heads and tokens swapped.
    swapped = [t.transpose(1, 2) for t in good]
    refused(swapped, good, "k_views[0]", "not contiguous")
    # dtype and page size that disagree with the meta.
    refused([t.half() for t in good], good, "dtype f16", "f32")
    refused([torch.zeros(10, 8, 2, 64) for _ in range(3)], good,
            "k_views[0]", "4096 bytes", "8192")
    refused(good[:2], good[:2], "2 layers", "has 3")
    refused(good, good[:2], "3 K views but 2 V views")
    refused(good, [torch.zeros(9, 16, 2, 64) for _ in range(3)],
            "disagree on the number of pages")
    ro = np.zeros((10, 16, 2, 64), np.float32)
    ro.flags.writeable = False
    refused([ro] * 3, good, "read-only")
    refused([[1, 2, 3]] * 3, good, "list", "neither a torch tensor")


def test_regions_of_device_memory():
    class FakeMps:  # a device kvmig has no kind for
        device = torch.device("mps", 0)
        data_ptr = element_size = None
    e = refused([FakeMps()] * 3, [FakeMps()] * 3, "mps:0", "host and CUDA")
    assert e.code == "Unimplemented"


def test_torch_device_copies_reach_the_regions_bytes():
    # FlashInfer's (num_blocks, 2, ...) per layer: K and V interleave, so a
    # region has gaps; the copies address region bytes as kvmig does. CPU
    # tensors here; on a GPU the same calls copy to and from the device.
    kv = [torch.zeros(8, 2, 16, 2, 64, dtype=torch.float16) for _ in range(2)]
    k, v = [t[:, 0] for t in kv], [t[:, 1] for t in kv]
    regions = kvmig.regions(k, v, meta=TINY)
    from_dev, to_dev = kvmig.torch_device_copies(k, v)
    chunk = regions[0].chunk
    page3 = bytes(range(256)) * (chunk // 256)
    to_dev(2, 3 * regions[2].stride, memoryview(page3))  # V of layer 0, page 3
    assert v[0][3].contiguous().view(torch.uint8).numpy().tobytes() == page3
    assert not k[0].any() and not v[1].any() and not v[0][2].any()
    out = bytearray(chunk)
    from_dev(2, 3 * regions[2].stride, memoryview(out))
    assert bytes(out) == page3


# ---- agents: Python and C++ exchange requests ----

def python_agent(pager, **kw):
    agent = kvmig.Agent(pager, listen="127.0.0.1:0", **kw)
    agent.start()
    return agent


@pytest.mark.parametrize("layout", [True, False], ids=["zero-copy", "staged"])
def test_python_to_cpp_and_back(cpp_agent, layout):
    pager = NumpyPager(TINY, 64, layout=layout)
    pager.populate(1, 100, seed=1)
    pager.populate(2, 33, seed=2)
    pager.populate(3, 5, seed=3)
    dst = cpp_agent("--preset", "tiny", "--capacity-pages", "64")
    client = kvmig.Client(dst.address)
    with kvmig.Agent(pager) as agent:
        before = digests(agent.status())
        report = agent.migrate(to=dst.address, seqs=[1, 2])
        assert report["ok"] and sorted(report["seqs"]) == [1, 2]
        assert report["pages"] == 7 + 3 and report["staged"] == (not layout)
        assert sorted(pager.seqs) == [3]
        assert digests(client.status()) == {1: before[1], 2: before[2]}
        # And back: the C++ agent moves them into the Python pager.
        back = client.migrate(to=agent.address, all=True)
        assert sorted(back["seqs"]) == [1, 2]
        assert digests(agent.status()) == before
        assert client.status()["seqs"] == []
        if not layout:
            assert pager.calls.get("write_page", 0) == 10
        else:  # zero-copy: the pages went straight into the pool
            assert "write_page" not in pager.calls


def test_simulated_device_through_numpy(cpp_agent):
    # Python's pool and the C++ agent's both on a simulated device: every
    # byte kvmig moves goes through the pagers' device copies.
    pager = SimDevicePager(TINY, 64)
    pager.populate(1, 100, seed=1)
    pager.populate(2, 33, seed=2)
    dst = cpp_agent("--preset", "tiny", "--capacity-pages", "64",
                    "--memory", "sim-device", "--transports", "tcp,ucx"
                    if "ucx" in kvmig.built_transports() else "tcp")
    client = kvmig.Client(dst.address)
    with kvmig.Agent(pager, transports=["tcp"]) as agent:
        status = agent.status()
        assert status["memory"] == "cuda"
        before = digests(status)
        report = agent.migrate(to=dst.address, seqs=[1, 2])
        assert report["memory"] == {"source": "cuda", "destination": "cuda"}
        assert pager.calls.get("copy_from_device", 0) > 0
        assert digests(client.status()) == before
        back = client.migrate(to=agent.address, all=True)
        assert back["memory"] == {"source": "cuda", "destination": "cuda"}
        assert pager.calls.get("copy_to_device", 0) > 0
        # In place: nothing through write_page (read_page serves status's
        # digests only).
        assert "write_page" not in pager.calls
        assert digests(agent.status()) == before
    if "ucx" in kvmig.built_transports():
        # A UCX without CUDA support cannot take it: refused, nothing moved.
        pager2 = SimDevicePager(TINY, 64)
        pager2.populate(5, 40, seed=5)
        with kvmig.Agent(pager2, transports=["tcp", "ucx"]) as agent:
            assert agent.status()["transports"] == ["tcp"]
            with pytest.raises(kvmig.Error) as e:
                agent.migrate(to=dst.address, seqs=[5], transport="ucx")
            assert "CUDA" in str(e.value), str(e.value)
            assert sorted(pager2.seqs) == [5]
            assert 5 not in digests(client.status())


def test_small_moves_go_inline_unless_turned_off(cpp_agent):
    # One tiny page (16 KiB) goes on the control connection by default;
    # inline_page_bytes=0 keeps it on the transport's data path.
    dst = cpp_agent("--preset", "tiny", "--capacity-pages", "16")
    client = kvmig.Client(dst.address)
    for limit, inline in ((None, True), (0, False)):
        pager = NumpyPager(TINY, 16)
        pager.populate(1 if inline else 2, 16, seed=4)
        kw = {} if limit is None else {"inline_page_bytes": limit}
        with kvmig.Agent(pager, **kw) as agent:
            before = digests(agent.status())
            report = agent.migrate(to=dst.address, all=True)
            assert report["inline_pages"] is inline and report["pages"] == 1
        after = digests(client.status())
        assert all(after[k] == v for k, v in before.items())


def test_second_move_to_an_agent_keeps_the_connection(cpp_agent):
    # A committed move's control connection carries the next move to the
    # same agent (kept_idle_ms, default 30 s); kept_idle_ms=0 connects each
    # time; a negative one is refused at creation.
    dst = cpp_agent("--preset", "tiny", "--capacity-pages", "16")
    client = kvmig.Client(dst.address)
    for ids, idle, kept in (((1, 2), None, True), ((3, 4), 0, False)):
        pager = NumpyPager(TINY, 16)
        for seq in ids:
            pager.populate(seq, 16, seed=seq)
        kw = {} if idle is None else {"kept_idle_ms": idle}
        with kvmig.Agent(pager, **kw) as agent:
            before = digests(agent.status())
            first = agent.migrate(to=dst.address, seqs=[ids[0]])
            second = agent.migrate(to=dst.address, seqs=[ids[1]])
        assert first["kept_connection"] is False
        assert second["kept_connection"] is kept
        # One tiny page fits the first OFFER's inline limit: on the kept
        # connection the second move is one exchange (no OFFER).
        assert first["one_exchange"] is False
        assert second["one_exchange"] is kept
        after = digests(client.status())
        assert all(after[k] == v for k, v in before.items())
    with pytest.raises(kvmig.Error) as e:
        kvmig.Agent(NumpyPager(TINY, 4), kept_idle_ms=-1)
    assert "kept_idle_ms" in str(e.value), str(e.value)


def test_report_fields_match_the_cli(cpp_agent):
    # agent.migrate() returns the fields of `kvmig migrate --json`.
    import json
    import subprocess
    from conftest import KVMIG_BIN
    src = cpp_agent("--preset", "tiny", "--capacity-pages", "16",
                    "--populate", "2:40")
    pager = NumpyPager(TINY, 16)
    with kvmig.Agent(pager) as agent:
        out = subprocess.run(
            [str(KVMIG_BIN), "migrate", "--agent", src.address, "--to",
             agent.address, "--seqs", "1", "--json"],
            check=True, capture_output=True, text=True).stdout
        cli = json.loads(out)
        py = kvmig.Client(src.address).migrate(to=agent.address, seqs=[2])
        assert list(py) == list(cli)
        status = agent.status()
        assert list(status) == ["meta", "capacity_pages", "free_pages", "seqs",
                                "migrations", "transports", "memory",
                                "in_doubt",
                                "shared_groups", "control_connections",
                                "kept_connections"]
        assert status["migrations"] == []
        assert status["free_pages"] == 16 - 2 * 3
        light = agent.status(digests=False)
        assert all("digest" not in s for s in light["seqs"])
        # Both arrived by migration just now.
        assert all(s["arrived_ms_ago"] >= 0 for s in light["seqs"])


def test_status_without_digests_never_pauses():
    pager = NumpyPager(TINY, 8)
    pager.populate(1, 20, seed=1)
    with kvmig.Agent(pager) as agent:
        agent.status(digests=False)
        assert "pause" not in pager.calls and "read_page" not in pager.calls
        agent.status()
        assert pager.calls["pause"] == 1


def test_snapshots_only_in_the_snapshot_dir(tmp_path):
    pager = NumpyPager(TINY, 16)
    pager.populate(1, 40, seed=1)
    pager.populate(2, 20, seed=2)
    with kvmig.Agent(pager) as agent:
        with pytest.raises(kvmig.Error) as e:
            kvmig.Client(agent.address).snapshot(str(tmp_path / "a.snap"))
        assert e.value.code == "FailedPrecondition"
        assert "--snapshot-dir" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    with kvmig.Agent(pager, snapshot_dir=str(tmp_path)) as agent:
        before = digests(agent.status())
        saved = kvmig.Client(agent.address).snapshot("a.snap")
        file = tmp_path.resolve() / "a.snap"
        assert saved == {"path": str(file), "requests": 2, "pages": 5,
                         "bytes": file.stat().st_size}
        with pytest.raises(kvmig.Error) as e:
            kvmig.Client(agent.address).snapshot("../b.snap")
        assert e.value.code == "InvalidArgument" and "'..'" in str(e.value)
    target = NumpyPager(TINY, 16)
    with kvmig.Agent(target, snapshot_dir=str(tmp_path)) as agent:
        loaded = kvmig.Client(agent.address).snapshot("a.snap", load=True)
        assert loaded == saved
        assert digests(agent.status()) == before


# ---- bad pagers: a clear error, both sides unchanged, still serving ----

def assert_unchanged(pager, before_seqs, agent):
    assert sorted(pager.seqs) == before_seqs
    assert not pager.allocated and pager.paused == 0
    agent.status(digests=False)  # still serving


@pytest.mark.parametrize("bad,needle", [
    (lambda ix: (b"x" * 10, b"y" * 10), "is 10 bytes; a page half is 8192"),
    (lambda ix: 42, "must return (k, v), not int"),
    (lambda ix: (b"x" * 8192,), "must return (k, v), not 1 items"),
    (lambda ix: ("k" * 8192, b"v" * 8192), "not a contiguous bytes-like"),
], ids=["short", "int", "one-item", "str"])
def test_bad_read_page(cpp_agent, bad, needle):
    pager = NumpyPager(TINY, 16, layout=False)
    pager.populate(1, 40, seed=1)
    dst = cpp_agent("--preset", "tiny", "--capacity-pages", "16")
    with kvmig.Agent(pager) as agent:
        pager.read_page_result = bad
        with pytest.raises(kvmig.Error) as e:
            agent.migrate(to=dst.address, seqs=[1])
        assert needle in str(e.value) and "read_page" in str(e.value)
        assert_unchanged(pager, [1], agent)
        poll(lambda: dst_is_empty(dst.address, 16), "the destination's slots")
        pager.read_page_result = None  # fixed: the same request moves
        assert agent.migrate(to=dst.address, seqs=[1])["ok"]


def test_raising_pager_methods(cpp_agent):
    src = cpp_agent("--preset", "tiny", "--capacity-pages", "16",
                    "--populate", "1:40", "--seed", "4")
    client = kvmig.Client(src.address)
    before = client.status()
    pager = NumpyPager(TINY, 16)
    with kvmig.Agent(pager) as agent:
        pager.faults["allocate_pages"] = ValueError("the pool is on fire")
        with pytest.raises(kvmig.Error) as e:
            client.migrate(to=agent.address, seqs=[1])
        assert "pager.allocate_pages() raised ValueError: the pool is on fire" \
            in str(e.value)
        assert "pagers.py:" in str(e.value)  # where it was raised
        assert client.status() == before
        assert_unchanged(pager, [], agent)

        pager.faults.clear()
        pager.faults["install_logical_seqs"] = kvmig.Error(
            "no room in the scheduler", code="ResourceExhausted")
        with pytest.raises(kvmig.Error) as e:
            client.migrate(to=agent.address, seqs=[1])
        assert "no room in the scheduler" in str(e.value)
        assert client.status() == before
        assert_unchanged(pager, [], agent)
        assert pager.calls.get("release_pages", 0) >= 1

        pager.faults.clear()
        assert client.migrate(to=agent.address, seqs=[1])["ok"]
        assert sorted(pager.seqs) == [1]


class NoHoldPager(NumpyPager):
    """An engine that cannot hold single requests: kvmig pauses it whole."""

    def hold_seqs(self, ids):
        raise kvmig.Error("no single holds here", code="Unimplemented")


@pytest.mark.parametrize("method", ["hold_seqs", "pause"])
def test_raising_pause_on_the_source(cpp_agent, method):
    """The source stops the requests it moves with hold_seqs, or with
    pause() when the pager cannot hold them: either raising fails the
    migration with the pager's error, and nothing moved."""
    pager = (NumpyPager if method == "hold_seqs" else NoHoldPager)(TINY, 16)
    pager.populate(7, 40, seed=1)
    dst = cpp_agent("--preset", "tiny", "--capacity-pages", "16")
    with kvmig.Agent(pager) as agent:
        pager.faults[method] = kvmig.Error("engine busy", code="Unavailable")
        with pytest.raises(kvmig.Error) as e:
            agent.migrate(to=dst.address, seqs=[7])
        assert e.value.code == "Unavailable" and "engine busy" in str(e.value)
        pager.faults.clear()
        assert_unchanged(pager, [7], agent)
        poll(lambda: dst_is_empty(dst.address, 16), "the destination's slots")


def test_bad_layouts_are_refused_at_creation():
    class Wrong(NumpyPager):
        def __init__(self, regions):
            super().__init__(TINY, 8)
            self._regions = regions

        def layout(self):
            return self._regions

    pool = np.zeros((8, 2 * TINY.page_bytes()), np.uint8)
    half = kvmig.StridedRegion(base=pool.ctypes.data, stride=pool.strides[0],
                               chunk=TINY.page_bytes(), slots=8)
    with pytest.raises(kvmig.Error) as e:
        kvmig.Agent(Wrong([half]))
    assert e.value.code == "InvalidArgument" and "pager.layout()" in str(e.value)
    cuda = kvmig.StridedRegion(base=1 << 40, stride=2 * TINY.page_bytes(),
                               chunk=2 * TINY.page_bytes(), slots=8,
                               kind="cuda", device=1)
    with pytest.raises(kvmig.Error) as e:
        kvmig.Agent(Wrong([cuda]))
    assert e.value.code == "Unimplemented" and "device 1" in str(e.value)
    with pytest.raises(kvmig.Error) as e:
        kvmig.Agent(Wrong(42))
    assert "must return a list of kvmig.StridedRegion" in str(e.value)

    class BadMeta(NumpyPager):
        def meta(self):
            return "tiny"
    with pytest.raises(kvmig.Error) as e:
        kvmig.Agent(BadMeta(TINY, 8))
    assert "must return a kvmig.CacheMeta, not str" in str(e.value)
    with pytest.raises(kvmig.Error):
        kvmig.Agent(object())


def test_missing_methods_and_super_init():
    class Nothing(kvmig.CachePager):
        def meta(self):
            return TINY
    with kvmig.Agent(Nothing()) as agent:
        with pytest.raises(kvmig.Error) as e:
            agent.status()
        assert "does not support" in str(e.value)

    class NoInit(kvmig.CachePager):
        def __init__(self):
            pass
    with pytest.raises(TypeError):
        NoInit()


# ---- the GIL ----

def test_busy_python_thread_and_migrate_from_the_engine_thread(cpp_agent):
    """A pure-Python thread that never blocks (it holds the GIL whenever it
    runs) does not stop a migration that this, the engine's own thread,
    started; both keep running."""
    pager = NumpyPager(TINY, 64, layout=False)
    for i in range(4):
        pager.populate(i, 160, seed=i)
    dst = cpp_agent("--preset", "tiny", "--capacity-pages", "64")
    stop = threading.Event()
    spins = [0]

    def spin():
        while not stop.is_set():
            spins[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        with kvmig.Agent(pager) as agent:
            start = spins[0]
            report = agent.migrate(to=dst.address, all=True)
            assert sorted(report["seqs"]) == [0, 1, 2, 3]
            assert spins[0] > start  # the spinning thread ran meanwhile
    finally:
        stop.set()
        t.join()
    assert len(kvmig.Client(dst.address).status()["seqs"]) == 4


def test_agent_lifecycle():
    pager = NumpyPager(TINY, 8)
    agent = kvmig.Agent(pager)
    with pytest.raises(kvmig.Error) as e:
        agent.status()
    assert e.value.code == "FailedPrecondition"
    agent.start()
    with pytest.raises(kvmig.Error):
        agent.start()
    host, port = agent.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) == agent.port > 0
    agent.stop()
    agent.stop()
    with pytest.raises(kvmig.Error) as e:
        agent.status()
    assert "stopped" in str(e.value)
    with pytest.raises(kvmig.Error) as e:
        kvmig.Agent(pager, listen="nowhere")
    assert e.value.code == "InvalidArgument"
    with pytest.raises(kvmig.Error) as e:
        kvmig.Agent(pager, transports=["carrier-pigeon"])
    with pytest.raises(kvmig.Error) as e:
        kvmig.Agent(pager, max_migrations=0)
    assert e.value.code == "InvalidArgument"
    with pytest.raises(kvmig.Error) as e:
        kvmig.Agent(pager, secret_file="/nonexistent/secret")
    assert "secret file" in str(e.value)


def test_an_engine_that_never_pauses(cpp_agent):
    """pause() waits for a step that does not end (an engine thread that
    never yields): the migration fails at the peer timeout instead of
    hanging, and the pause, once it returns, is undone by kvmig."""
    release = threading.Event()

    class Stuck(NoHoldPager):
        def pause(self):
            if not release.wait(60):
                raise AssertionError("the test never released the pause")
            super().pause()

    pager = Stuck(TINY, 16)
    pager.populate(1, 40, seed=1)
    dst = cpp_agent("--preset", "tiny", "--capacity-pages", "16")
    with kvmig.Agent(pager, peer_timeout_ms=500) as agent:
        with pytest.raises(kvmig.Error) as e:
            agent.migrate(to=dst.address, seqs=[1])
        assert e.value.code == "DeadlineExceeded"
        assert "did not pause within the peer timeout" in str(e.value)
        poll(lambda: dst_is_empty(dst.address, 16), "the destination's slots")
        release.set()
        # kvmig undoes the late pause: its resume() runs.
        poll(lambda: pager.calls.get("resume", 0) == 1 and pager.paused == 0,
             "the late pause to be undone")
        assert_unchanged(pager, [1], agent)
        assert agent.migrate(to=dst.address, seqs=[1])["ok"]


# ---- cancel and timeout ----

class GatedPager(NumpyPager):
    """Staged pages whose read_page waits at a gate: the migration stays in
    its data phase, before the decision point, until the test opens it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, layout=False, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.reading = threading.Event()

    def read_page(self, ix):
        self.reading.set()
        assert self.gate.wait(30), "gate never opened"
        return super().read_page(ix)


def phase_of_the_migration(agent):
    migrations = agent.status(digests=False)["migrations"]
    return migrations[0]["phase"] if migrations else None


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_cancel_and_timeout_roll_back(cpp_agent, how):
    pager = GatedPager(TINY, 32)
    pager.populate(1, 40, seed=1)
    dst = cpp_agent("--preset", "tiny", "--capacity-pages", "32")
    with kvmig.Agent(pager) as agent:
        before = digests(agent.status())
        pager.gate.clear()
        pager.reading.clear()
        outcome = {}

        def move():
            try:
                agent.migrate(to=dst.address, all=True, migration_id="py-1",
                              timeout_ms=100 if how == "timeout" else 0)
            except kvmig.Error as e:
                outcome["error"] = e

        mover = threading.Thread(target=move)
        mover.start()
        assert pager.reading.wait(30)
        cancel = {}
        if how == "cancel":
            canceller = threading.Thread(
                target=lambda: cancel.update(
                    kvmig.Client(agent.address).cancel("py-1")))
            canceller.start()
        # The cancel (or the timeout) has reached the run: let it go on.
        poll(lambda: phase_of_the_migration(agent) == "cancelling",
             "the migration to be cancelling")
        pager.gate.set()
        mover.join()
        if how == "cancel":
            canceller.join()
            assert cancel["outcome"] == "cancelled", cancel
        error = outcome["error"]
        assert error.code == ("Aborted" if how == "cancel"
                              else "DeadlineExceeded"), error
        assert "cancelled" in str(error)
        assert agent.cancel("py-1")["outcome"] == "cancelled"
        assert digests(agent.status()) == before
        poll(lambda: dst_is_empty(dst.address, 32), "the destination to empty")


def test_settle_needs_a_migration_in_doubt(cpp_agent):
    src = cpp_agent("--preset", "tiny", "--capacity-pages", "8")
    client = kvmig.Client(src.address)
    with pytest.raises(kvmig.Error) as e:
        client.settle("never-in-doubt", outcome="aborted")
    assert e.value.code == "NotFound"
    with pytest.raises(kvmig.Error) as e:
        client.settle("never-in-doubt", outcome="maybe")
    assert e.value.code == "InvalidArgument"
