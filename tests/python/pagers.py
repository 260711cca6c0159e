"""A small, thread-safe numpy CachePager for the binding's tests, with
switches to make each method misbehave."""

import threading

import numpy as np

import kvmig


class NumpyPager(kvmig.CachePager):
    """Pages in one numpy pool, page-major and in canonical order (K of every
    layer, then V). layout=True describes it through kvmig.regions (zero
    copy); layout=False sends pages through read_page/write_page."""

    def __init__(self, meta, capacity, layout=True):
        super().__init__()
        self._meta = meta
        self._pb = meta.page_bytes()
        self._capacity = capacity
        self._use_layout = layout
        self._lock = threading.RLock()
        self.pool = np.zeros((capacity, 2 * self._pb), dtype=np.uint8)
        self.refs = {}        # slot -> number of sequences using it
        self.allocated = set()
        self.seqs = {}        # seq_id -> LogicalSeq
        self.held = set()
        self.paused = 0
        self.calls = {}       # method -> how many times kvmig called it
        self.faults = {}      # method -> exception to raise, or a callable
        self.read_page_result = None  # callable(ix) replacing read_page

    def _enter(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1
        fault = self.faults.get(name)
        if fault is not None:
            raise fault

    # The nine methods.
    def meta(self):
        return self._meta

    def pause(self):
        with self._lock:
            self._enter("pause")
            self.paused += 1

    def resume(self):
        with self._lock:
            self._enter("resume")
            if not self.paused:
                raise kvmig.Error("not paused", code="FailedPrecondition")
            self.paused -= 1

    def occupied_pages(self):
        with self._lock:
            self._enter("occupied_pages")
            return sorted(set(self.refs) | self.allocated)

    def logical_seqs(self):
        with self._lock:
            self._enter("logical_seqs")
            return [kvmig.LogicalSeq(s.seq_id, s.n_tokens, list(s.pages))
                    for _, s in sorted(self.seqs.items())]

    def _check_slot(self, ix):
        if ix >= self._capacity:
            raise kvmig.Error(f"slot {ix} past capacity", code="OutOfRange")
        if ix not in self.refs and ix not in self.allocated:
            raise kvmig.Error(f"slot {ix} is free", code="FailedPrecondition")

    def read_page(self, ix):
        with self._lock:
            self._enter("read_page")
            if self.read_page_result is not None:
                return self.read_page_result(ix)
            self._check_slot(ix)
            page = self.pool[ix]
            return bytes(page[:self._pb]), bytes(page[self._pb:])

    def allocate_pages(self, n):
        with self._lock:
            self._enter("allocate_pages")
            free = [i for i in range(self._capacity)
                    if i not in self.refs and i not in self.allocated]
            if len(free) < n:
                raise kvmig.Error(f"{n} pages asked, {len(free)} free",
                                  code="ResourceExhausted")
            self.allocated.update(free[:n])
            return free[:n]

    def write_page(self, ix, k, v):
        with self._lock:
            self._enter("write_page")
            self._check_slot(ix)
            self.pool[ix, :self._pb] = np.frombuffer(k, dtype=np.uint8)
            self.pool[ix, self._pb:] = np.frombuffer(v, dtype=np.uint8)

    def install_logical_seqs(self, seqs):
        with self._lock:
            self._enter("install_logical_seqs")
            for s in seqs:
                if s.seq_id in self.seqs:
                    raise kvmig.Error(f"seq {s.seq_id} is live",
                                      code="AlreadyExists")
                if len(s.pages) != self._meta.pages_for_tokens(s.n_tokens):
                    raise kvmig.Error(f"seq {s.seq_id}: {len(s.pages)} pages "
                                      f"for {s.n_tokens} tokens",
                                      code="InvalidArgument")
                for p in s.pages:
                    self._check_slot(p)
            for s in seqs:
                self.seqs[s.seq_id] = kvmig.LogicalSeq(s.seq_id, s.n_tokens,
                                                       list(s.pages))
                for p in s.pages:
                    self.allocated.discard(p)
                    self.refs[p] = self.refs.get(p, 0) + 1

    # Optional methods.
    def layout(self):
        if not self._use_layout:
            return None
        layers = self._meta.n_layers
        chunks = self.pool.reshape(self._capacity, 2, layers, -1)
        return kvmig.regions([chunks[:, 0, l] for l in range(layers)],
                             [chunks[:, 1, l] for l in range(layers)],
                             meta=self._meta)

    def release_pages(self, ixs):
        with self._lock:
            self._enter("release_pages")
            for ix in ixs:
                self.allocated.discard(ix)

    def drop_logical_seqs(self, ids):
        with self._lock:
            self._enter("drop_logical_seqs")
            missing = [i for i in ids if i not in self.seqs]
            if missing:
                raise kvmig.Error(f"seqs {missing} are not live",
                                  code="NotFound")
            for i in ids:
                for p in self.seqs.pop(i).pages:
                    self.refs[p] -= 1
                    if not self.refs[p]:
                        del self.refs[p]
                self.held.discard(i)

    def hold_seqs(self, ids):
        with self._lock:
            self._enter("hold_seqs")
            self.held.update(ids)

    def unhold_seqs(self, ids):
        with self._lock:
            self._enter("unhold_seqs")
            self.held.difference_update(ids)

    def capacity(self):
        with self._lock:
            used = len(set(self.refs) | self.allocated)
            return self._capacity, self._capacity - used

    # For tests.
    def populate(self, seq_id, n_tokens, seed):
        pages = self.allocate_pages(self._meta.pages_for_tokens(n_tokens))
        rng = np.random.default_rng(seed)
        for p in pages:
            self.pool[p] = rng.integers(0, 256, 2 * self._pb, dtype=np.uint8)
        self.install_logical_seqs([kvmig.LogicalSeq(seq_id, n_tokens, pages)])
        self.calls.clear()


class SimDevicePager(NumpyPager):
    """A NumpyPager whose pool stands for GPU memory: a memfd mapped twice.
    The engine (this class) uses the readable mapping; layout() reports the
    other one, mapped PROT_NONE, as kind="cuda": kvmig may reach it only
    through copy_from_device/copy_to_device, and a CPU access by kvmig would
    kill the process."""

    def __init__(self, meta, capacity):
        import ctypes
        import mmap
        import os

        super().__init__(meta, capacity, layout=True)
        length = capacity * 2 * self._pb
        fd = os.memfd_create("kvmig-test-sim-device")
        os.ftruncate(fd, length)
        self._engine_map = mmap.mmap(fd, length, flags=mmap.MAP_SHARED,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
        device = libc.mmap(None, length, 0, mmap.MAP_SHARED, fd, 0)  # PROT_NONE
        assert device not in (None, ctypes.c_void_p(-1).value), \
            os.strerror(ctypes.get_errno())
        os.close(fd)
        self.device_base = device
        self.pool = np.frombuffer(self._engine_map, dtype=np.uint8).reshape(
            capacity, 2 * self._pb)
        self._flat = self.pool.reshape(-1)
        self._engine_base = self.pool.ctypes.data

    def _engine_regions(self):
        return super().layout()

    def layout(self):
        shift = self.device_base - self._engine_base
        return [kvmig.StridedRegion(base=r.base + shift, stride=r.stride,
                                    chunk=r.chunk, slots=r.slots, kind="cuda",
                                    device=0)
                for r in self._engine_regions()]

    def _span(self, region, offset, n):
        r = self._engine_regions()[region]
        start = r.base - self._engine_base + offset
        return slice(start, start + n)

    def copy_from_device(self, region, offset, out):
        self._enter("copy_from_device")
        out[:] = self._flat[self._span(region, offset, len(out))]

    def copy_to_device(self, region, offset, data):
        self._enter("copy_to_device")
        self._flat[self._span(region, offset, len(data))] = np.frombuffer(
            data, dtype=np.uint8)
