#!/usr/bin/python3
"""A small Llama engine with a paged KV cache that kvmig can migrate.

What is here, top to bottom:

- `LlamaModel`: a Llama-architecture decoder in plain torch (token
  embedding, RMSNorm, rotary embeddings, grouped-query attention with 8 query
  heads over 2 KV heads of 64 dims, SwiGLU MLP, 4 layers, hidden 512), with
  random weights drawn from a seed, so nothing is downloaded. Greedy sampling
  over a 512-word toy vocabulary (`toy_words`).
- `PagedKVCache`: every request's K and V in 16-token pages, in one of two
  vLLM layouts, one tensor per layer:
      flash-attn   (2, num_blocks, 16, kv_heads, head_dim)   K = t[0],    V = t[1]
      flash-infer  (num_blocks, 2, 16, kv_heads, head_dim)   K = t[:, 0], V = t[:, 1]
  with refcounted slots and a prefix index: requests whose prompts share
  full pages point at the same slots, and a later request prefills only the
  remainder of its prompt over the cached pages.
- `Engine`: requests, a decode thread, and the operations kvmig calls
  (pause, logical_seqs, allocate_pages, install_logical_seqs, ...), all
  under one lock. Needs no kvmig: tests and reference runs use it as is.
- `make_pager`: the `kvmig.CachePager` over an Engine (kvmig is imported
  only here and in `main`).
- `main`: an engine process embedding a `kvmig.Agent`, driven by JSON lines.

Exactness. Results are bitwise reproducible and do not depend on the layout
or on which slots hold a request's pages: torch runs on one thread, each
request is computed as its own batch of one, and attention gathers a
request's K/V through its block table into the same contiguous tensor a
plain (unpaged) implementation would have. So a request migrated to another
engine continues with exactly the logits it would have had at home.

Who moves what. kvmig moves a request's KV pages and page table; the token
ids are the scheduler's to move, as in a real serving stack. A request's
KV cache holds n_tokens positions, and its token list (prompt + generated)
is one longer: the last sampled token is the next step's input and is not
in the cache yet. After a committed move the source records the departed
request's token ids (`departed`); the destination keeps an installed
request "unadopted" (never decoded) until the scheduler hands them over
(`adopt`), and refuses a list that is not exactly n_tokens + 1 long.

Running it as an engine process (kvmig's Python package on PYTHONPATH):

    PYTHONPATH=build/src/python /usr/bin/python3 examples/llama_engine.py \\
        --layout flash-attn --num-blocks 256 --seed 0 --decode-rate 20 \\
        --transports tcp,ucx --listen 127.0.0.1:0 [--staged] [--secret-file F]

(--staged offers kvmig no layout(), so pages go through read_page and
write_page.) `EngineClient` below starts one and speaks this protocol.

Control protocol: one JSON object per line on stdin, exactly one JSON line
in reply on stdout (logs, including kvmig's, go to stderr). Every reply has
"ok"; a failure is {"ok": false, "error": "...", "code": "<status code>"}
with kvmig's status code names (NotFound, FailedPrecondition, ...).

    {"cmd": "address"}                        -> {"address": "127.0.0.1:PORT"}
    {"cmd": "prefill", "seq_id": 1, "prompt": [ids], "max_new_tokens": 40}
                                              -> {"first_token", "n_tokens", "cached_pages"}
    {"cmd": "start_decoding"[, "rate": steps_per_s]}   {"cmd": "stop_decoding"}
    {"cmd": "tokens"[, "seqs": [ids]]}        -> {"requests": [{"seq_id", "state", "held",
                                                  "prompt_len", "max_new_tokens", "n_tokens",
                                                  "tokens"}]}
         state: "decoding", "unadopted" (installed by a migration, waiting for
         its token ids), "finished" (output kept, pages freed), "departed"
    {"cmd": "stats"}                          -> {"steps", "paused", "decoding",
                                                  "capacity_pages", "free_pages"}
    {"cmd": "migrate", "to": "HOST:PORT", "seqs": [1, 2], "live": true, ...}
         keyword arguments of kvmig.Agent.migrate -> its report (ok, pages, rounds, ...)
    {"cmd": "migrate_start", ...same...}      -> {} and the migration runs in the background
    {"cmd": "migrate_wait", "timeout": s}     -> the report of the migrate_start
    {"cmd": "departed"[, "seqs": [ids]]}      -> {"departed": [{"seq_id", "tokens",
                                                  "prompt_len", "max_new_tokens"}]}
    {"cmd": "adopt", "seq_id", "tokens", "prompt_len", "max_new_tokens"}
                                              (the fields of a departed record)
    {"cmd": "first_logits"}                   -> {"first_logits": [{"seq_id", "position", "hex"}]}
         for each adopted request, the float32 logits of the first step this
         engine computed for it (input position `position`), raw bytes as hex
    {"cmd": "wait_finished", "seqs": [ids], "timeout": s}   -> {"finished": [ids]}
    {"cmd": "forget"[, "seqs": [ids]]}        drops finished and departed records
    {"cmd": "gate_allocations"[, "closed": bool]}           -> {"closed", "waiting"}
         a seam for tests: while closed, kvmig's allocate_pages calls (a
         destination taking slots for an incoming migration) wait at the gate
    {"cmd": "status"[, "digests": bool]}      -> kvmig.Agent.status()
    {"cmd": "quit"}

A "step" of the decode loop advances every runnable request (decoding, not
held, adopted) by one token; --decode-rate is steps per second, 0 as fast
as possible.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import heapq
import json
import logging
import math
import os
import queue
import subprocess
import sys
import threading
import time
import zlib
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("llama_engine")

LAYOUTS = ("flash-attn", "flash-infer")


# --- The model ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The model's and the cache's shape. The defaults are what main() runs."""

    vocab_size: int = 512
    hidden: int = 512
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    # Llama's 8/3 * hidden would be ~1376; 1024 keeps CPU tests quick.
    ffn_hidden: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_positions: int = 2048
    page_size: int = 16

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)


def toy_words(vocab_size: int = 512) -> list[str]:
    """A deterministic word for every token id (two syllables each, unique)."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70
    n = len(syllables)
    return [syllables[i % n] + syllables[(i // n * 11 + i) % n]
            for i in range(vocab_size)]


def detokenize(tokens: Iterable[int], vocab_size: int = 512) -> str:
    words = toy_words(vocab_size)
    return " ".join(words[t] for t in tokens)


def tokenize(text: str, vocab_size: int = 512) -> list[int]:
    """Words of the toy vocabulary map to their ids; any other word to a
    stable hash of it."""
    index = {w: i for i, w in enumerate(toy_words(vocab_size))}
    return [index.get(w, zlib.crc32(w.encode()) % vocab_size)
            for w in text.split()]


class KVStore:
    """Where one request's K and V live, as the model sees it. K and V of a
    layer are [positions, n_kv_heads, head_dim] float32."""

    def write(self, layer: int, start: int, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Stores K/V for positions start .. start + len(k)."""
        raise NotImplementedError

    def read(self, layer: int, length: int) -> tuple[torch.Tensor,
                                                     torch.Tensor]:
        """K/V of positions 0 .. length, contiguous."""
        raise NotImplementedError


class ContiguousKV(KVStore):
    """One request's K/V in plain tensors that grow by concatenation: the
    unpaged reference a paged cache must match bit for bit."""

    def __init__(self, config: LlamaConfig):
        empty = torch.empty(0, config.n_kv_heads, config.head_dim)
        self._k = [empty] * config.n_layers
        self._v = [empty] * config.n_layers

    def write(self, layer, start, k, v):
        if start != len(self._k[layer]):
            raise ValueError(f"write at {start}, have {len(self._k[layer])}")
        self._k[layer] = torch.cat([self._k[layer], k])
        self._v[layer] = torch.cat([self._v[layer], v])

    def read(self, layer, length):
        return self._k[layer][:length], self._v[layer][:length]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@dataclasses.dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wq: torch.Tensor  # [hidden, n_heads * head_dim], applied as x @ wq
    wk: torch.Tensor  # [hidden, n_kv_heads * head_dim]
    wv: torch.Tensor
    wo: torch.Tensor  # [n_heads * head_dim, hidden]
    mlp_norm: torch.Tensor
    w_gate: torch.Tensor  # [hidden, ffn_hidden]
    w_up: torch.Tensor
    w_down: torch.Tensor  # [ffn_hidden, hidden]


class LlamaModel:
    """A Llama decoder with random weights from `seed`: the same seed gives
    the same weights in every process.

    Holds no per-request state (that lives in the KVStore given to forward),
    so it is safe to call from several threads.
    """

    def __init__(self, config: LlamaConfig = LlamaConfig(), seed: int = 0):
        self.config = c = config
        g = torch.Generator().manual_seed(seed)

        def dense(n_in: int, n_out: int) -> torch.Tensor:
            return torch.randn(n_in, n_out, generator=g) / math.sqrt(n_in)

        def norm() -> torch.Tensor:
            return 1.0 + 0.1 * torch.randn(c.hidden, generator=g)

        self.embedding = torch.randn(c.vocab_size, c.hidden, generator=g)
        self.layers = [
            LayerWeights(
                attn_norm=norm(),
                wq=dense(c.hidden, c.n_heads * c.head_dim),
                wk=dense(c.hidden, c.n_kv_heads * c.head_dim),
                wv=dense(c.hidden, c.n_kv_heads * c.head_dim),
                wo=dense(c.n_heads * c.head_dim, c.hidden),
                mlp_norm=norm(),
                w_gate=dense(c.hidden, c.ffn_hidden),
                w_up=dense(c.hidden, c.ffn_hidden),
                w_down=dense(c.ffn_hidden, c.hidden),
            ) for _ in range(c.n_layers)
        ]
        self.final_norm = norm()
        self.lm_head = dense(c.hidden, c.vocab_size)
        inv_freq = 1.0 / (c.rope_theta**(
            torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        angles = torch.outer(torch.arange(c.max_positions,
                                          dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self._cos, self._sin = angles.cos(), angles.sin()

    @torch.no_grad()
    def forward(self, tokens: Sequence[int], start: int,
                kv: KVStore) -> torch.Tensor:
        """Runs tokens (at positions start, start + 1, ...) through the
        model, storing their K/V in kv, which must already hold positions
        0 .. start. Returns the logits, [len(tokens), vocab_size] float32."""
        c = self.config
        n = len(tokens)
        x = self.embedding[torch.tensor(list(tokens), dtype=torch.long)]
        cos = self._cos[start:start + n, None, :]
        sin = self._sin[start:start + n, None, :]
        for layer, w in enumerate(self.layers):
            h = rms_norm(x, w.attn_norm, c.norm_eps)
            q = (h @ w.wq).view(n, c.n_heads, c.head_dim)
            k = (h @ w.wk).view(n, c.n_kv_heads, c.head_dim)
            v = (h @ w.wv).view(n, c.n_kv_heads, c.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            kv.write(layer, start, k, v)
            keys, values = kv.read(layer, start + n)
            x = x + self._attention(q, keys, values, start) @ w.wo
            h = rms_norm(x, w.mlp_norm, c.norm_eps)
            x = x + (F.silu(h @ w.w_gate) * (h @ w.w_up)) @ w.w_down
        return rms_norm(x, self.final_norm, c.norm_eps) @ self.lm_head

    def _attention(self, q: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, start: int) -> torch.Tensor:
        """Grouped-query causal attention of n queries (positions start ..)
        over keys/values of positions 0 .. start + n. Returns [n, hidden]."""
        c = self.config
        n, total = q.shape[0], keys.shape[0]
        group = c.n_heads // c.n_kv_heads
        keys = keys.repeat_interleave(group, dim=1)      # [T, H, D]
        values = values.repeat_interleave(group, dim=1)
        scores = torch.matmul(q.transpose(0, 1), keys.permute(1, 2, 0))
        scores = scores / math.sqrt(c.head_dim)          # [H, n, T]
        if n > 1:
            visible = torch.ones(n, total, dtype=torch.bool).tril(start)
            scores = scores.masked_fill(~visible, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), values.transpose(0, 1))
        return out.transpose(0, 1).reshape(n, c.n_heads * c.head_dim)


# --- The paged cache ---------------------------------------------------------


class EngineError(Exception):
    """A refused operation. `code` is a kvmig status code name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class PagedKV(KVStore):
    """One request's K/V through its block table (pages[i] holds positions
    16i .. 16i + 15) in a PagedKVCache."""

    def __init__(self, cache: "PagedKVCache", pages: Sequence[int]):
        self._cache = cache
        self._pages = torch.tensor(list(pages), dtype=torch.long)

    def write(self, layer, start, k, v):
        size = self._cache.config.page_size
        positions = torch.arange(start, start + len(k))
        slots = self._pages[positions // size]
        offsets = positions % size
        self._cache.k_views[layer][slots, offsets] = k
        self._cache.v_views[layer][slots, offsets] = v

    def read(self, layer, length):
        c = self._cache.config
        n_pages = c.pages_for(length)
        shape = (-1, c.n_kv_heads, c.head_dim)
        pages = self._pages[:n_pages]
        k = self._cache.k_views[layer][pages].reshape(shape)[:length]
        v = self._cache.v_views[layer][pages].reshape(shape)[:length]
        return k, v


class PagedKVCache:
    """Page slots for K and V, one tensor per layer, never reallocated (kvmig
    reads and writes them in place), plus the slot bookkeeping.

    A slot is free, reserved (allocate_pages handed it to kvmig; no request
    owns it yet) or owned by one or more requests (refcount > 0; more than
    one only for a shared full prefix page). The prefix index maps a prompt
    prefix of whole pages to the slot holding its last page, while some
    request owns that slot.

    Not thread-safe: the Engine's lock guards it.
    """

    def __init__(self, config: LlamaConfig, num_blocks: int,
                 layout: str = "flash-attn",
                 slot_order: Sequence[int] | None = None):
        """slot_order: the order in which free slots are handed out (default
        ascending); tests use it to place requests in other slots."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
        self.config = c = config
        self.layout = layout
        self.num_blocks = num_blocks
        page = (c.page_size, c.n_kv_heads, c.head_dim)
        if layout == "flash-attn":
            self.tensors = [torch.zeros(2, num_blocks, *page)
                            for _ in range(c.n_layers)]
            self.k_views = [t[0] for t in self.tensors]
            self.v_views = [t[1] for t in self.tensors]
        else:
            self.tensors = [torch.zeros(num_blocks, 2, *page)
                            for _ in range(c.n_layers)]
            self.k_views = [t[:, 0] for t in self.tensors]
            self.v_views = [t[:, 1] for t in self.tensors]
        order = list(range(num_blocks)) if slot_order is None else list(slot_order)
        if sorted(order) != list(range(num_blocks)):
            raise ValueError("slot_order must be a permutation of the slots")
        self._rank = {slot: r for r, slot in enumerate(order)}
        self._free = [(r, slot) for r, slot in enumerate(order)]  # a heap
        self._refs = [0] * num_blocks
        self._reserved: set[int] = set()
        self._prefix: dict[tuple[int, ...], int] = {}
        self._prefix_of_slot: dict[int, tuple[int, ...]] = {}

    # Bytes of K (and of V) in one page, all layers.
    def page_bytes(self) -> int:
        c = self.config
        return c.n_layers * c.page_size * c.n_kv_heads * c.head_dim * 4

    def free_count(self) -> int:
        return len(self._free)

    def occupied(self) -> list[int]:
        return [s for s in range(self.num_blocks)
                if self._refs[s] > 0 or s in self._reserved]

    def check_slot(self, slot: int) -> None:
        """OutOfRange past capacity, FailedPrecondition for a free slot."""
        if not 0 <= slot < self.num_blocks:
            raise EngineError("OutOfRange",
                              f"slot {slot} past capacity {self.num_blocks}")
        if self._refs[slot] == 0 and slot not in self._reserved:
            raise EngineError("FailedPrecondition", f"slot {slot} is free")

    def reserve(self, n: int) -> list[int]:
        """n free slots, reserved; all or nothing."""
        if n > len(self._free):
            raise EngineError("ResourceExhausted",
                              f"{n} pages asked, {len(self._free)} free")
        slots = [heapq.heappop(self._free)[1] for _ in range(n)]
        self._reserved.update(slots)
        return slots

    def allocate(self, n: int) -> list[int]:
        """n free slots, owned (refcount 1); all or nothing."""
        slots = self.reserve(n)
        for s in slots:
            self.ref(s)
        return slots

    def ref(self, slot: int) -> None:
        """One more owner of a reserved or owned slot."""
        self._reserved.discard(slot)
        self._refs[slot] += 1

    def unref(self, slot: int) -> None:
        """One owner fewer; the last one frees the slot."""
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._prefix.pop(self._prefix_of_slot.pop(slot, None), None)
            heapq.heappush(self._free, (self._rank[slot], slot))

    def release(self, slots: Sequence[int]) -> None:
        """Frees reserved slots; all or nothing."""
        for s in slots:
            if not 0 <= s < self.num_blocks or s not in self._reserved:
                raise EngineError("FailedPrecondition",
                                  f"slot {s} is not reserved")
        for s in slots:
            self._reserved.discard(s)
            heapq.heappush(self._free, (self._rank[s], s))

    def shareable_prefix(self, prompt: Sequence[int]) -> list[int]:
        """Slots of the longest run of cached whole pages that begin prompt.
        The page holding the prompt's last token is never shared: prefill
        needs at least one token to compute the first logits."""
        size = self.config.page_size
        slots = []
        for i in range((len(prompt) - 1) // size):
            slot = self._prefix.get(tuple(prompt[:(i + 1) * size]))
            if slot is None:
                break
            slots.append(slot)
        return slots

    def index_prefix(self, prompt: Sequence[int], pages: Sequence[int]) -> None:
        """Makes the prompt's full pages findable by shareable_prefix()."""
        size = self.config.page_size
        for i in range(len(prompt) // size):
            key = tuple(prompt[:(i + 1) * size])
            if key not in self._prefix:
                self._prefix[key] = pages[i]
                self._prefix_of_slot[pages[i]] = key

    def view(self, pages: Sequence[int]) -> PagedKV:
        return PagedKV(self, pages)

    def read_page(self, slot: int) -> tuple[bytes, bytes]:
        """Page slot's K and V in kvmig's canonical order: layer 0 .. L-1,
        each [token][head][dim]."""
        k = torch.stack([view[slot] for view in self.k_views])
        v = torch.stack([view[slot] for view in self.v_views])
        return k.numpy().tobytes(), v.numpy().tobytes()

    def write_page(self, slot: int, k: bytes | memoryview,
                   v: bytes | memoryview) -> None:
        """Overwrites page slot from canonical-order bytes (InvalidArgument,
        and nothing written, unless both are page_bytes() long)."""
        c = self.config
        shape = (c.n_layers, c.page_size, c.n_kv_heads, c.head_dim)
        for data in (k, v):
            if memoryview(data).nbytes != self.page_bytes():
                raise EngineError(
                    "InvalidArgument", f"page of {memoryview(data).nbytes} "
                    f"bytes, expected {self.page_bytes()}")
        for data, views in ((k, self.k_views), (v, self.v_views)):
            layers = torch.from_numpy(
                np.frombuffer(data, dtype=np.float32).reshape(shape).copy())
            for layer, view in enumerate(views):
                view[slot] = layers[layer]


# --- The engine --------------------------------------------------------------


class SeqTable(NamedTuple):
    """A request's page table as kvmig sees it."""
    seq_id: int
    n_tokens: int
    pages: list[int]


@dataclasses.dataclass
class Request:
    """One request's state. The engine's lock guards it; callers get copies.
    While decoding, len(tokens) == n_tokens + 1: the last token is the next
    step's input, not yet in the cache."""

    seq_id: int
    prompt_len: int
    max_new_tokens: int
    n_tokens: int              # positions held in the KV cache
    pages: list[int]           # block table
    tokens: list[int] | None   # prompt + generated; None until adopted
    state: str                 # decoding | unadopted | finished | departed
    held: bool = False
    cached_pages: int = 0      # prefix pages prefill found cached
    migrated_in: bool = False  # installed here by a migration
    first_logits: tuple[int, bytes] | None = None  # (position, float32 bytes)
    logits: dict[int, bytes] = dataclasses.field(default_factory=dict)

    @property
    def live(self) -> bool:
        """In the cache: kvmig may see, move, hold or drop it."""
        return self.state in ("decoding", "unadopted")

    def describe(self) -> dict:
        return {"seq_id": self.seq_id, "state": self.state,
                "held": self.held, "prompt_len": self.prompt_len,
                "max_new_tokens": self.max_new_tokens,
                "n_tokens": self.n_tokens, "tokens": self.tokens}

    def handover(self) -> dict:
        """What a scheduler gives the destination's adopt()."""
        return {"seq_id": self.seq_id, "tokens": self.tokens,
                "prompt_len": self.prompt_len,
                "max_new_tokens": self.max_new_tokens}


class Engine:
    """Requests over a PagedKVCache, a decode loop, and the cache operations
    kvmig calls.

    Thread-safe. One condition variable's lock guards the cache and every
    request; prefill and each decode step (one token for every runnable
    request) run entirely under it, so pause(), hold_seqs() and
    logical_seqs() see the engine between steps, never inside one.
    """

    def __init__(self, model: LlamaModel, cache: PagedKVCache,
                 decode_rate: float = 0.0, record_logits: bool = False):
        """decode_rate: steps per second of the decode thread, 0 as fast as
        possible. record_logits: keep every step's logits per request (for
        reference runs)."""
        self.model = model
        self.cache = cache
        self.config = model.config
        self._record_logits = record_logits
        self._cond = threading.Condition()
        self._requests: dict[int, Request] = {}
        self._pause_depth = 0
        self._steps = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._rate = float(decode_rate)

    # --- Scheduler side ------------------------------------------------------

    def prefill(self, seq_id: int, prompt: Sequence[int], max_new_tokens: int,
                timeout: float = 30.0) -> Request:
        """Adds a request: computes its prompt's K/V (reusing cached prefix
        pages) and samples its first token. Waits up to timeout while the
        engine is paused. Returns a copy of the request."""
        c = self.config
        prompt = [int(t) for t in prompt]
        if not prompt or not all(0 <= t < c.vocab_size for t in prompt):
            raise EngineError("InvalidArgument",
                              f"prompt must be 1+ ids below {c.vocab_size}")
        if max_new_tokens < 1 or len(prompt) + max_new_tokens > c.max_positions:
            raise EngineError("InvalidArgument",
                              f"max_new_tokens {max_new_tokens} out of range")
        with self._cond:
            self._wait_unpaused(timeout)
            self._check_new_id(seq_id)
            cached = self.cache.shareable_prefix(prompt)
            new = self.cache.allocate(c.pages_for(len(prompt)) - len(cached))
            for slot in cached:
                self.cache.ref(slot)
            req = Request(seq_id, len(prompt), max_new_tokens, 0,
                          cached + new, prompt, "decoding",
                          cached_pages=len(cached))
            start = len(cached) * c.page_size
            try:
                logits = self.model.forward(prompt[start:], start,
                                            self.cache.view(req.pages))
            except BaseException:
                self._forget(req, "finished")
                raise
            req.n_tokens = len(prompt)
            self.cache.index_prefix(prompt, req.pages)
            self._requests[seq_id] = req
            self._take_token(req, logits[-1], len(prompt) - 1)
            self._cond.notify_all()
            return self._copy(req)

    def adopt(self, seq_id: int, tokens: Sequence[int], prompt_len: int,
              max_new_tokens: int) -> None:
        """Hands a migrated-in request its token ids, so it starts decoding.
        tokens must be the n_tokens ids whose K/V arrived plus the next
        input: exactly n_tokens + 1 ids."""
        c = self.config
        tokens = [int(t) for t in tokens]
        with self._cond:
            req = self._requests.get(seq_id)
            if req is None or not req.live:
                raise EngineError("NotFound", f"request {seq_id} is not here")
            if req.state != "unadopted":
                raise EngineError("FailedPrecondition",
                                  f"request {seq_id} already has its tokens")
            if len(tokens) != req.n_tokens + 1:
                raise EngineError(
                    "FailedPrecondition",
                    f"request {seq_id} arrived with {req.n_tokens} cached "
                    f"positions, so it needs {req.n_tokens + 1} token ids "
                    f"(the cached ones and the next input), got {len(tokens)}")
            if not all(0 <= t < c.vocab_size for t in tokens):
                raise EngineError("InvalidArgument", "token id out of range")
            generated = len(tokens) - prompt_len
            if not 0 < prompt_len <= req.n_tokens or not (
                    0 < generated < max_new_tokens):
                raise EngineError(
                    "InvalidArgument",
                    f"prompt_len {prompt_len}, max_new_tokens "
                    f"{max_new_tokens} do not fit {len(tokens)} tokens")
            req.tokens = tokens
            req.prompt_len = prompt_len
            req.max_new_tokens = max_new_tokens
            req.state = "decoding"
            self._cond.notify_all()

    def requests(self, ids: Iterable[int] | None = None) -> list[Request]:
        """Copies of the requests (all, or ids), ascending by id."""
        with self._cond:
            chosen = sorted(self._requests) if ids is None else list(ids)
            return [self._copy(self._requests[i]) for i in chosen
                    if i in self._requests]

    def departed(self, ids: Iterable[int] | None = None) -> list[dict]:
        """Handover records of requests dropped after a move."""
        return [r.handover() for r in self.requests(ids)
                if r.state == "departed"]

    def forget(self, ids: Iterable[int] | None = None) -> None:
        """Drops the records of finished and departed requests (ids, or all
        of them); FailedPrecondition for a live one."""
        with self._cond:
            if ids is None:
                ids = [i for i, r in self._requests.items() if not r.live]
            for i in ids:
                if i in self._requests and self._requests[i].live:
                    raise EngineError("FailedPrecondition",
                                      f"request {i} is live")
            for i in ids:
                self._requests.pop(i, None)

    def first_logits(self) -> dict[int, tuple[int, bytes]]:
        """For each adopted request: (input position, float32 logits bytes)
        of the first step this engine computed for it."""
        with self._cond:
            return {r.seq_id: r.first_logits for r in self._requests.values()
                    if r.first_logits is not None}

    def wait_finished(self, ids: Sequence[int], timeout: float) -> None:
        """Blocks until every request in ids has finished here.
        DeadlineExceeded after timeout; FailedPrecondition when one left."""
        def done() -> bool:
            for i in ids:
                r = self._requests.get(i)
                if r is None:
                    raise EngineError("NotFound", f"request {i} is not here")
                if r.state == "departed":
                    raise EngineError("FailedPrecondition",
                                      f"request {i} moved away")
                if r.state != "finished":
                    return False
            return True
        with self._cond:
            if not self._cond.wait_for(done, timeout):
                raise EngineError("DeadlineExceeded",
                                  f"requests {list(ids)} not finished "
                                  f"after {timeout} s")

    def stats(self) -> dict:
        with self._cond:
            return {"steps": self._steps, "paused": self._pause_depth,
                    "decoding": self._thread is not None,
                    "capacity_pages": self.cache.num_blocks,
                    "free_pages": self.cache.free_count()}

    # --- The decode loop -----------------------------------------------------

    def step(self) -> int:
        """One decode step, now, on the caller's thread (for synchronous
        runs). Returns how many requests advanced. FailedPrecondition while
        paused."""
        with self._cond:
            if self._pause_depth:
                raise EngineError("FailedPrecondition", "engine is paused")
            return self._step_locked()

    def run_until_finished(self, max_steps: int = 10_000) -> None:
        """Steps until no request can advance (synchronous runs)."""
        for _ in range(max_steps):
            if self.step() == 0:
                return
        raise EngineError("DeadlineExceeded", f"{max_steps} steps ran")

    def start_decoding(self, rate: float | None = None) -> None:
        """Starts (or re-rates) the decode thread: `rate` steps per second,
        0 as fast as possible."""
        with self._cond:
            if rate is not None:
                self._rate = float(rate)
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._decode_loop, name="decode", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def stop_decoding(self) -> None:
        """Stops the decode thread after its current step."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._stop.set()
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    STEP_GAP_S = 0.001

    def _decode_loop(self) -> None:
        next_step = time.monotonic()
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stop.is_set() or self._can_step())
                if self._stop.is_set():
                    return
                batch = [r.seq_id for r in self._runnable()]
                rate = self._rate
            # One request at a time under the lock, so that a pause() or a
            # kvmig call waits for one request's forward, not the batch's
            # (with long requests on one CPU thread, a batch took ~1 s).
            counted = False
            for seq_id in batch:
                with self._cond:
                    if self._pause_depth or self._stop.is_set():
                        break
                    req = self._requests.get(seq_id)
                    if (req is not None and req.state == "decoding"
                            and not req.held
                            and self._step_one_locked(req) and not counted):
                        # Counted under the lock of the forward that made
                        # the step: once a pause() returns, the count is
                        # final until resume().
                        self._steps += 1
                        counted = True
                        self._cond.notify_all()
            # A gap between steps, however far behind its cadence the loop
            # is: Python's locks are not fair, and a loop that re-takes the
            # lock at once starves a waiting kvmig call (allocate_pages,
            # install_logical_seqs). Measured with tools/bench-python.py,
            # an 8k-token request moved into a busy engine: the source's
            # pause was 3.6-4.9 s without the gap and without taking the
            # lock per request below, 0.4-1.3 s with both (one forward of
            # a long request), 4 ms into an idle engine.
            gap = self.STEP_GAP_S
            if rate > 0:
                # A fixed cadence that does not burst to catch up.
                next_step = max(next_step + 1.0 / rate, time.monotonic())
                gap = max(gap, next_step - time.monotonic())
            self._stop.wait(gap)

    def _runnable(self) -> list[Request]:
        return [r for _, r in sorted(self._requests.items())
                if r.state == "decoding" and not r.held]

    def _can_step(self) -> bool:
        if self._pause_depth:
            return False
        return any(self._has_room(r) for r in self._runnable())

    def _has_room(self, req: Request) -> bool:
        return (req.n_tokens % self.config.page_size != 0
                or self.cache.free_count() > 0)

    def _step_one_locked(self, req: Request) -> int:
        """Decodes one token of req; 0 when it waits for a free page."""
        if not self._has_room(req):
            return 0
        pos = req.n_tokens
        if pos % self.config.page_size == 0:
            req.pages.append(self.cache.allocate(1)[0])
        logits = self.model.forward([req.tokens[-1]], pos,
                                    self.cache.view(req.pages))
        req.n_tokens += 1
        self._take_token(req, logits[-1], pos)
        return 1

    def _step_locked(self) -> int:
        advanced = 0
        for req in self._runnable():
            advanced += self._step_one_locked(req)
        if advanced:
            self._steps += 1
            self._cond.notify_all()
        return advanced

    def _take_token(self, req: Request, logits: torch.Tensor,
                    position: int) -> None:
        """Greedy sampling of the token after `position`; finishes the
        request at max_new_tokens."""
        raw = logits.contiguous().numpy().tobytes()
        if self._record_logits:
            req.logits[position] = raw
        if req.migrated_in and req.first_logits is None:
            req.first_logits = (position, raw)
        req.tokens.append(int(torch.argmax(logits)))
        if len(req.tokens) - req.prompt_len >= req.max_new_tokens:
            self._forget(req, "finished")

    def _forget(self, req: Request, state: str) -> None:
        for slot in req.pages:
            self.cache.unref(slot)
        req.pages = []
        req.state = state
        req.held = False

    # --- Pager side (what kvmig calls) ---------------------------------------

    def pause(self) -> None:
        """Returns once no forward (a request's decode, a prefill) is in
        progress; none starts until the matching resume(). Nests."""
        with self._cond:
            self._pause_depth += 1

    def resume(self) -> None:
        with self._cond:
            if self._pause_depth == 0:
                raise EngineError("FailedPrecondition", "not paused")
            self._pause_depth -= 1
            self._cond.notify_all()

    def occupied_pages(self) -> list[int]:
        with self._cond:
            return self.cache.occupied()

    def logical_seqs(self) -> list[SeqTable]:
        with self._cond:
            return [SeqTable(r.seq_id, r.n_tokens, list(r.pages))
                    for _, r in sorted(self._requests.items()) if r.live]

    def read_page(self, slot: int) -> tuple[bytes, bytes]:
        with self._cond:
            self.cache.check_slot(slot)
            return self.cache.read_page(slot)

    def allocate_pages(self, n: int) -> list[int]:
        with self._cond:
            slots = self.cache.reserve(n)
            self._cond.notify_all()
            return slots

    def write_page(self, slot: int, k: bytes | memoryview,
                   v: bytes | memoryview) -> None:
        with self._cond:
            self.cache.check_slot(slot)
            self.cache.write_page(slot, k, v)

    def install_logical_seqs(self, seqs: Sequence[SeqTable]) -> None:
        """Adds migrated-in requests, unadopted; all or nothing."""
        with self._cond:
            self._check_install(seqs)
            for s in seqs:
                for slot in s.pages:
                    self.cache.ref(slot)
                self._requests[s.seq_id] = Request(
                    s.seq_id, 0, 0, s.n_tokens, list(s.pages), None,
                    "unadopted", migrated_in=True)
            self._cond.notify_all()

    def release_pages(self, slots: Sequence[int]) -> None:
        with self._cond:
            self.cache.release(list(slots))
            self._cond.notify_all()

    def drop_logical_seqs(self, ids: Sequence[int]) -> None:
        """Forgets requests that moved away, keeping their token ids for
        the handover; all or nothing."""
        with self._cond:
            reqs = self._live(ids)
            for req in reqs:
                self._forget(req, "departed")
                log.info("request %d departed with %d tokens", req.seq_id,
                         len(req.tokens or ()))
            self._cond.notify_all()

    def hold_seqs(self, ids: Sequence[int]) -> None:
        with self._cond:
            for req in self._live(ids):
                req.held = True

    def unhold_seqs(self, ids: Sequence[int]) -> None:
        with self._cond:
            for req in self._live(ids):
                req.held = False
            self._cond.notify_all()

    def capacity(self) -> tuple[int, int]:
        with self._cond:
            return self.cache.num_blocks, self.cache.free_count()

    # --- Helpers (called with the lock held) ---------------------------------

    def _wait_unpaused(self, timeout: float) -> None:
        if not self._cond.wait_for(lambda: self._pause_depth == 0, timeout):
            raise EngineError("Unavailable",
                              f"engine still paused after {timeout} s")

    def _check_new_id(self, seq_id: int) -> None:
        old = self._requests.get(seq_id)
        if old is not None and old.live:
            raise EngineError("AlreadyExists", f"request {seq_id} is live")

    def _live(self, ids: Sequence[int]) -> list[Request]:
        reqs = []
        for i in ids:
            req = self._requests.get(i)
            if req is None or not req.live:
                raise EngineError("NotFound", f"request {i} is not live")
            reqs.append(req)
        return reqs

    def _check_install(self, seqs: Sequence[SeqTable]) -> None:
        seen: set[int] = set()
        for s in seqs:
            if s.seq_id in seen:
                raise EngineError("AlreadyExists",
                                  f"request {s.seq_id} given twice")
            seen.add(s.seq_id)
            self._check_new_id(s.seq_id)
            if len(s.pages) != self.config.pages_for(s.n_tokens):
                raise EngineError(
                    "InvalidArgument", f"request {s.seq_id}: {len(s.pages)} "
                    f"pages for {s.n_tokens} tokens")
            if len(set(s.pages)) != len(s.pages):
                raise EngineError("InvalidArgument",
                                  f"request {s.seq_id} repeats a page")
            if s.n_tokens + 1 > self.config.max_positions:
                raise EngineError("InvalidArgument",
                                  f"request {s.seq_id} is too long")
            for slot in s.pages:
                self.cache.check_slot(slot)

    @staticmethod
    def _copy(req: Request) -> Request:
        return dataclasses.replace(
            req, pages=list(req.pages),
            tokens=None if req.tokens is None else list(req.tokens),
            logits=dict(req.logits))


# --- kvmig's view of an Engine -------------------------------------------------


class AllocationGate:
    """While closed, wait() blocks (a test seam: it holds a destination's
    allocate_pages, and so a migration, at a known point). Thread-safe."""

    def __init__(self):
        self._cond = threading.Condition()
        self._closed = False
        self._waiting = 0

    def set_closed(self, closed: bool) -> None:
        with self._cond:
            self._closed = closed
            self._cond.notify_all()

    def state(self) -> dict:
        with self._cond:
            return {"closed": self._closed, "waiting": self._waiting}

    def wait(self, timeout: float = 60.0) -> None:
        with self._cond:
            self._waiting += 1
            try:
                if not self._cond.wait_for(lambda: not self._closed, timeout):
                    raise EngineError("DeadlineExceeded",
                                      "allocation gate stayed closed")
            finally:
                self._waiting -= 1


@functools.cache
def _pager_class() -> type:
    """kvmig.CachePager over an Engine; built on first use so that nothing
    above needs kvmig."""
    import kvmig

    def engine_errors(method: Callable) -> Callable:
        @functools.wraps(method)
        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except EngineError as e:
                raise kvmig.Error(str(e), code=e.code) from e
        return call

    class EnginePager(kvmig.CachePager):
        """The CachePager kvmig drives. Thread-safe (the Engine is); kvmig
        calls it from its own threads."""

        def __init__(self, engine: Engine, zero_copy: bool = True):
            super().__init__()
            self.engine = engine
            self.allocation_gate = AllocationGate()
            self._zero_copy = zero_copy
            c = engine.config
            self._meta = kvmig.CacheMeta(
                page_size_tokens=c.page_size, n_layers=c.n_layers,
                n_heads=c.n_kv_heads, head_dim=c.head_dim, dtype="f32")

        def meta(self):
            return self._meta

        def layout(self):
            if not self._zero_copy:
                return None  # pages go through read_page/write_page
            cache = self.engine.cache
            return kvmig.regions(cache.k_views, cache.v_views, self._meta)

        @engine_errors
        def pause(self):
            self.engine.pause()

        @engine_errors
        def resume(self):
            self.engine.resume()

        @engine_errors
        def occupied_pages(self):
            return self.engine.occupied_pages()

        @engine_errors
        def logical_seqs(self):
            return [kvmig.LogicalSeq(s.seq_id, s.n_tokens, s.pages)
                    for s in self.engine.logical_seqs()]

        @engine_errors
        def read_page(self, ix):
            return self.engine.read_page(ix)

        @engine_errors
        def allocate_pages(self, n):
            self.allocation_gate.wait()
            return self.engine.allocate_pages(n)

        @engine_errors
        def write_page(self, ix, k, v):
            self.engine.write_page(ix, k, v)

        @engine_errors
        def install_logical_seqs(self, seqs):
            self.engine.install_logical_seqs(
                [SeqTable(s.seq_id, s.n_tokens, list(s.pages)) for s in seqs])

        @engine_errors
        def release_pages(self, ixs):
            self.engine.release_pages(list(ixs))

        @engine_errors
        def drop_logical_seqs(self, ids):
            self.engine.drop_logical_seqs(list(ids))

        @engine_errors
        def hold_seqs(self, ids):
            self.engine.hold_seqs(list(ids))

        @engine_errors
        def unhold_seqs(self, ids):
            self.engine.unhold_seqs(list(ids))

        def capacity(self):
            return self.engine.capacity()

    return EnginePager


def make_pager(engine: Engine, zero_copy: bool = True):
    """A kvmig.CachePager for engine. zero_copy=False offers no layout(), so
    kvmig stages pages through read_page/write_page."""
    return _pager_class()(engine, zero_copy)


# --- The engine process ------------------------------------------------------


class MigrationThread:
    """One agent.migrate() running in the background (migrate_start)."""

    def __init__(self, agent, kwargs: dict):
        self._result: dict | None = None
        self._thread = threading.Thread(target=self._run, args=(agent, kwargs),
                                        name="migrate", daemon=True)
        self._thread.start()

    def _run(self, agent, kwargs: dict) -> None:
        self._result = migrate_reply(agent, kwargs)

    def wait(self, timeout: float) -> dict:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise EngineError("DeadlineExceeded",
                              f"migration still running after {timeout} s")
        return self._result


def migrate_reply(agent, kwargs: dict) -> dict:
    import kvmig
    try:
        report = dict(agent.migrate(**kwargs))
    except kvmig.Error as e:
        return {"ok": False, "error": str(e), "code": e.code}
    report.setdefault("ok", True)
    return report


def error_reply(e: Exception) -> dict:
    """A failed command's reply: EngineError and kvmig.Error keep their
    code; a malformed command is InvalidArgument; anything else Internal."""
    if hasattr(e, "code"):
        code = e.code
    elif isinstance(e, (TypeError, KeyError, ValueError)):
        code = "InvalidArgument"
    else:
        code = "Internal"
    return {"ok": False, "error": f"{type(e).__name__}: {e}", "code": code}


class ControlLoop:
    """Serves the JSON-lines protocol (see the module docstring) on one
    thread."""

    def __init__(self, engine: Engine, pager, agent):
        self.engine = engine
        self.pager = pager
        self.agent = agent
        self._migration: MigrationThread | None = None

    def serve(self, lines: Iterable[str], reply: Callable[[dict], None]) -> None:
        for line in lines:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                cmd = request.pop("cmd")
                handler = getattr(self, "cmd_" + cmd, None)
                if handler is None:
                    raise EngineError("InvalidArgument",
                                      f"unknown command {cmd!r}")
                answer = handler(**request)
            except Exception as e:  # every failure is a reply, not an exit
                answer = error_reply(e)
            answer.setdefault("ok", True)
            reply(answer)
            if answer.get("bye"):
                return

    def cmd_address(self):
        return {"address": self.agent.address}

    def cmd_prefill(self, seq_id, prompt, max_new_tokens):
        req = self.engine.prefill(seq_id, prompt, max_new_tokens)
        return {"first_token": req.tokens[req.prompt_len],
                "n_tokens": req.n_tokens, "cached_pages": req.cached_pages}

    def cmd_start_decoding(self, rate=None):
        self.engine.start_decoding(rate)
        return {}

    def cmd_stop_decoding(self):
        self.engine.stop_decoding()
        return {}

    def cmd_tokens(self, seqs=None):
        return {"requests": [r.describe() for r in self.engine.requests(seqs)]}

    def cmd_stats(self):
        return self.engine.stats()

    def cmd_migrate(self, **kwargs):
        return migrate_reply(self.agent, kwargs)

    def cmd_migrate_start(self, **kwargs):
        if self._migration is not None:
            raise EngineError("FailedPrecondition",
                              "a migration is running: migrate_wait first")
        self._migration = MigrationThread(self.agent, kwargs)
        return {}

    def cmd_migrate_wait(self, timeout=60.0):
        if self._migration is None:
            raise EngineError("FailedPrecondition", "no migrate_start")
        result = self._migration.wait(timeout)
        self._migration = None
        return result

    def cmd_departed(self, seqs=None):
        return {"departed": self.engine.departed(seqs)}

    def cmd_adopt(self, seq_id, tokens, prompt_len, max_new_tokens):
        self.engine.adopt(seq_id, tokens, prompt_len, max_new_tokens)
        return {}

    def cmd_forget(self, seqs=None):
        self.engine.forget(seqs)
        return {}

    def cmd_first_logits(self):
        return {"first_logits": [
            {"seq_id": i, "position": pos, "hex": raw.hex()}
            for i, (pos, raw) in sorted(self.engine.first_logits().items())]}

    def cmd_wait_finished(self, seqs, timeout=30.0):
        self.engine.wait_finished(seqs, timeout)
        return {"finished": list(seqs)}

    def cmd_gate_allocations(self, closed=None):
        if closed is not None:
            self.pager.allocation_gate.set_closed(bool(closed))
        return self.pager.allocation_gate.state()

    def cmd_status(self, digests=False):
        return dict(self.agent.status(digests=digests))

    def cmd_quit(self):
        return {"bye": True}


class EngineClient:
    """Runs this file as an engine process and talks to it over the JSON
    lines protocol: what a scheduler, a test or a demo uses. Not
    thread-safe: one caller at a time."""

    def __init__(self, args: Sequence[str], name: str = "engine",
                 log_path: str | os.PathLike | None = None,
                 env: dict | None = None):
        """args: the engine's flags (--layout ...). Its stderr goes to
        log_path (default: inherited). env: default os.environ."""
        self.name = name
        self.log_path = log_path
        log = open(log_path, "w") if log_path is not None else None
        try:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                text=True, bufsize=1, env=dict(os.environ if env is None
                                               else env))
        finally:
            if log is not None:
                log.close()
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name=f"{name}-replies",
                         daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def call(self, cmd: str, timeout: float = 30.0, **fields) -> dict:
        """Sends one command and returns its reply, {"ok": false, ...}
        included. EngineError (DeadlineExceeded) without a reply in
        timeout s, (Unavailable) when the process has exited."""
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise EngineError("Unavailable", f"{self.name}: {e}") from e
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise EngineError("DeadlineExceeded", f"{self.name}: no reply to "
                              f"{cmd} in {timeout} s") from None
        if line is None:
            raise EngineError("Unavailable", f"{self.name} exited with "
                              f"status {self.proc.wait()}")
        return json.loads(line)

    def ok(self, cmd: str, timeout: float = 30.0, **fields) -> dict:
        """call(), raising EngineError for a failed reply."""
        reply = self.call(cmd, timeout, **fields)
        if not reply["ok"]:
            raise EngineError(reply.get("code", "Internal"),
                              f"{self.name}: {cmd}: {reply.get('error')}")
        return reply

    def quit(self) -> None:
        """Asks the engine to quit, without waiting (see close())."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
            except OSError:
                pass

    def close(self, timeout: float = 10.0) -> None:
        """Asks the engine to quit; kills it if it does not in timeout s."""
        self.quit()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layout", choices=LAYOUTS, default="flash-attn")
    p.add_argument("--num-blocks", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="model weights")
    p.add_argument("--max-positions", type=int,
                   default=LlamaConfig.max_positions,
                   help="longest request (prompt and generation), tokens")
    p.add_argument("--decode-rate", type=float, default=0.0,
                   help="decode steps per second once decoding (0: as fast "
                        "as possible)")
    p.add_argument("--transports", default="tcp",
                   help="comma-separated: tcp,ucx")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--secret-file", default=None)
    p.add_argument("--staged", action="store_true",
                   help="offer kvmig no layout(): pages go through "
                        "read_page/write_page")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Replies own the real stdout; anything else written to fd 1 (kvmig's
    # C++ logging, a stray print) goes to stderr instead.
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s engine %(levelname)s %(message)s")
    torch.set_num_threads(1)
    import kvmig

    config = LlamaConfig(max_positions=args.max_positions)
    engine = Engine(LlamaModel(config, args.seed),
                    PagedKVCache(config, args.num_blocks, args.layout),
                    decode_rate=args.decode_rate)
    pager = make_pager(engine, zero_copy=not args.staged)
    try:
        agent = kvmig.Agent(pager, listen=args.listen,
                            transports=args.transports.split(","),
                            secret_file=args.secret_file)
        agent.start()
    except kvmig.Error as e:
        log.error("cannot serve kvmig (%s): %s", e.code, e)
        return 1
    log.info("%s engine, %d blocks, serving kvmig at %s", args.layout,
             args.num_blocks, agent.address)

    def reply(answer: dict) -> None:
        replies.write(json.dumps(answer, default=str) + "\n")

    try:
        ControlLoop(engine, pager, agent).serve(iter(sys.stdin.readline, ""),
                                                reply)
    finally:
        engine.stop_decoding()
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
