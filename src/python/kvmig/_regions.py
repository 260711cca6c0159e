"""kvmig.regions: an engine's per-layer KV views as kvmig.StridedRegion."""

from kvmig._kvmig import Error, StridedRegion

# Element types kvmig knows, by the names torch and numpy give them. A view
# of raw bytes (uint8, int8) carries any dtype and is checked by size only.
_TORCH_DTYPES = {"torch.float32": "f32", "torch.float16": "f16",
                 "torch.bfloat16": "bf16", "torch.float8_e4m3fn": "fp8_e4m3"}
_NUMPY_DTYPES = {"float32": "f32", "float16": "f16"}
_RAW = {"torch.uint8", "torch.int8", "uint8", "int8"}


def _invalid(what, text):
    return Error(f"{what}: {text}", code="InvalidArgument")


def _describe(view, what):
    """(base, shape, strides in bytes, itemsize, dtype name or None,
    memory kind, device)."""
    if hasattr(view, "data_ptr") and hasattr(view, "element_size"):  # torch
        device = view.device
        if device.type not in ("cpu", "cuda"):
            raise Error(f"{what}: a tensor on {device}; kvmig moves host and "
                        "CUDA memory", code="Unimplemented")
        size = view.element_size()
        dtype = str(view.dtype)
        kind = "cuda" if device.type == "cuda" else "host"
        return (view.data_ptr(), tuple(view.shape),
                tuple(s * size for s in view.stride()), size,
                None if dtype in _RAW else _TORCH_DTYPES.get(dtype, dtype),
                kind, device.index or 0)
    iface = getattr(view, "__array_interface__", None)
    if iface is None:
        raise _invalid(what, f"a {type(view).__name__} is neither a torch "
                       "tensor nor an array (no __array_interface__)")
    base, readonly = iface["data"]
    if readonly:
        raise _invalid(what, "a read-only array; kvmig writes the pages it "
                       "receives into it")
    shape = tuple(iface["shape"])
    import numpy  # only needed for arrays

    dt = numpy.dtype(iface["typestr"])
    strides = iface.get("strides")
    if strides is None:  # C-contiguous
        strides, step = [], dt.itemsize
        for n in reversed(shape):
            strides.insert(0, step)
            step *= n
    name = dt.name
    return (base, shape, tuple(strides), dt.itemsize,
            None if name in _RAW else _NUMPY_DTYPES.get(name, name), "host", 0)


def _region(view, what, meta):
    base, shape, strides, itemsize, dtype, kind, device = _describe(view, what)
    if len(shape) < 1:
        raise _invalid(what, "a scalar; dimension 0 must be the page index")
    # A page (view[i]) must be one contiguous run: dimensions 1.. in C order.
    expect = itemsize
    for d in range(len(shape) - 1, 0, -1):
        if shape[d] != 1 and strides[d] != expect:
            raise _invalid(
                what, f"a page is not contiguous (dimension {d} has stride "
                f"{strides[d]} bytes, a contiguous page needs {expect}); "
                f"shape {list(shape)}")
        expect *= shape[d]
    chunk, slots, stride = expect, shape[0], strides[0]
    if slots == 0:
        raise _invalid(what, "no pages (dimension 0 is empty)")
    if slots > 1 and stride < chunk:
        raise _invalid(what, f"pages overlap (stride {stride} bytes < page "
                       f"{chunk} bytes)")
    if meta is not None:
        if dtype is not None and dtype != meta.dtype:
            raise _invalid(what, f"dtype {dtype}, but the cache is {meta.dtype}")
        want = meta.layer_chunk_bytes()
        if chunk != want:
            raise _invalid(
                what, f"a page is {chunk} bytes (shape {list(shape[1:])}), "
                f"but one layer of a page is {want} bytes ({meta!r}: "
                f"{meta.page_size_tokens} tokens x {meta.n_heads} heads x "
                f"{meta.head_dim} dims)")
    return StridedRegion(base=base, stride=stride, chunk=chunk, slots=slots,
                         kind=kind, device=device)


def regions(k_views, v_views, meta=None):
    """Per-layer K and V views whose dimension 0 is the page index (torch
    tensors or numpy arrays) as the regions of a CachePager.layout(): K of
    every layer, then V of every layer (the canonical page order). CUDA
    tensors give kind="cuda" regions: the pager must then also define
    copy_from_device(region, offset, out) and copy_to_device(region, offset,
    data), through which kvmig reaches that memory (torch_device_copies()
    builds them from the same views).

    vLLM FlashAttention, per layer t of shape (2, num_blocks, block, heads,
    dim): regions([t[0] for t in kv], [t[1] for t in kv]). FlashInfer,
    (num_blocks, 2, ...): t[:, 0] and t[:, 1]. SGLang: k_buffer[l] and
    v_buffer[l] viewed as (num_pages, page_size, heads, dim).

    With meta, each view's dtype and page size must agree with it. kvmig
    reads and writes the memory in place and never frees it: the tensors
    must stay alive, at the same address, while an agent uses the pager.
    Raises kvmig.Error (InvalidArgument) naming the view that is wrong.
    """
    k_views, v_views = list(k_views), list(v_views)
    if len(k_views) != len(v_views):
        raise _invalid("regions", f"{len(k_views)} K views but "
                       f"{len(v_views)} V views")
    if not k_views:
        raise _invalid("regions", "no views")
    if meta is not None and len(k_views) != meta.n_layers:
        raise _invalid("regions", f"{len(k_views)} layers of views, but the "
                       f"cache has {meta.n_layers}")
    out = [_region(v, f"k_views[{i}]", meta) for i, v in enumerate(k_views)]
    out += [_region(v, f"v_views[{i}]", meta) for i, v in enumerate(v_views)]
    slots = {r.slots for r in out}
    if len(slots) != 1:
        raise _invalid("regions", f"views disagree on the number of pages: "
                       f"{sorted(slots)}")
    return out


def torch_device_copies(k_views, v_views):
    """copy_from_device and copy_to_device for the regions that
    regions(k_views, v_views) made of torch tensors: byte ranges of region
    i (K views, then V views) copied with torch, so that kvmig never touches
    device memory itself. Returns the two functions, to be called from a
    CachePager's methods of the same names."""
    import torch

    views = list(k_views) + list(v_views)

    def flat(i):
        # Region i's bytes, from its first page's start to its last's end,
        # as one uint8 tensor on the views' device (gaps included).
        v = views[i]
        n = (v.shape[0] - 1) * v.stride(0) + v[0].numel()
        return torch.as_strided(v, (n,), (1,),
                                v.storage_offset()).view(torch.uint8)

    def copy_from_device(region, offset, out):
        if len(out) == 0:
            return
        src = flat(region)[offset:offset + len(out)]
        torch.frombuffer(out, dtype=torch.uint8).copy_(src)

    def copy_to_device(region, offset, data):
        if len(data) == 0:
            return
        dst = flat(region)[offset:offset + len(data)]
        dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    return copy_from_device, copy_to_device
