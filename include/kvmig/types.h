// The vocabulary shared by pagers, the engine and transports: what a KV
// cache page is, what a request's page table is, and where pages live.
//
// Canonical byte order of a page (the order in which digests, checksums,
// snapshots and the planner see it): K then V, each page_bytes() long; inside
// K (and V) the layers one after another, each layer's chunk laid out as
// [token][head][dim] elements of the dtype. So a page is 2 * n_layers chunks
// of layer_chunk_bytes() each: K layer 0 .. K layer L-1, V layer 0 .. V
// layer L-1.
//
// All types here are plain values with no synchronization of their own.
#ifndef KVMIG_TYPES_H_
#define KVMIG_TYPES_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kvmig/status.h"

namespace kvmig {

// Element type of the cache. The numeric values go on the wire and into
// snapshot files: never renumber.
enum class Dtype : uint8_t { kBf16 = 1, kF16 = 2, kF32 = 3, kFp8E4m3 = 4 };

// Bytes per element (1, 2 or 4); 0 for a value outside the enum.
size_t dtype_size(Dtype dtype);
// "bf16", "f16", "f32", "fp8_e4m3"; "invalid" outside the enum.
std::string_view dtype_name(Dtype dtype);
// Inverse of dtype_name.
Result<Dtype> parse_dtype(std::string_view name);

// Physical index of a page slot in a pager's pool.
using PageIndex = uint32_t;
// A request's id, unique within one pager.
using SeqId = uint64_t;

// The shape of a KV cache. Two pagers can exchange pages only if their metas
// are equal.
struct CacheMeta {
  uint32_t page_size_tokens = 0;
  uint32_t n_layers = 0;
  uint32_t n_heads = 0;
  uint32_t head_dim = 0;
  Dtype dtype = Dtype::kF16;

  // Bytes of K in one page (and the same of V):
  // page_size_tokens * n_layers * n_heads * head_dim * dtype_size(dtype).
  uint64_t page_bytes() const { return layer_chunk_bytes() * n_layers; }
  // Bytes of K (or V) of one layer in one page.
  uint64_t layer_chunk_bytes() const {
    return token_bytes_per_layer() * page_size_tokens;
  }
  // Bytes of K (or V) of one token in one layer.
  uint64_t token_bytes_per_layer() const {
    return uint64_t{n_heads} * head_dim * dtype_size(dtype);
  }
  // Pages needed to hold n_tokens tokens: ceil(n_tokens / page_size_tokens),
  // exact for every n_tokens (no wrap near 2^64).
  uint64_t pages_for_tokens(uint64_t n_tokens) const {
    return page_size_tokens == 0 ? 0
                                 : n_tokens / page_size_tokens +
                                       (n_tokens % page_size_tokens != 0);
  }

  // InvalidArgument unless every dimension is non-zero, the dtype is known
  // and one page (K + V) is at most 1 GiB.
  Status validate() const;

  // "16x2x2x64 f16" (tokens x layers x heads x dim, dtype).
  std::string to_string() const;

  friend bool operator==(const CacheMeta&, const CacheMeta&) = default;
};

// Named shapes: "tiny" (16 tokens x 2 layers x 2 heads x 64 dims, f16: 8 KiB
// of K per page) and "llama3-8b" (16 x 32 x 8 x 128, bf16: 1 MiB of K per
// page, 32 KiB per layer chunk).
Result<CacheMeta> preset_meta(std::string_view name);

// One request's page table: tokens [i * page_size_tokens, ...) live in
// pages[i]. pages.size() == meta.pages_for_tokens(n_tokens). A page index may
// appear in several sequences (shared prefix), never twice in one.
struct LogicalSeq {
  SeqId seq_id = 0;
  uint64_t n_tokens = 0;
  std::vector<PageIndex> pages;

  friend bool operator==(const LogicalSeq&, const LogicalSeq&) = default;
};

// One page in canonical byte order: k and v are page_bytes() each.
struct PageBytes {
  std::vector<std::byte> k;
  std::vector<std::byte> v;
};

enum class MemoryKind : uint8_t { kHost = 0, kCuda = 1 };
// "host", "cuda"; "invalid" outside the enum.
std::string_view memory_kind_name(MemoryKind kind);

// A dmabuf that covers a region of device memory: the region's byte 0 is
// byte `offset` of the buffer behind `fd`. The fd stays owned (and open) by
// whoever exported it (the pager) for its lifetime; kvmig never closes it.
struct DmabufRegion {
  int fd = -1;
  uint64_t offset = 0;
};

// A strided run of page pieces in memory. Page ix's piece in this region is
// [base + ix * stride, base + ix * stride + chunk), for ix < slots.
struct StridedRegion {
  std::byte* base = nullptr;
  uint64_t stride = 0;
  uint64_t chunk = 0;
  uint32_t slots = 0;
  MemoryKind kind = MemoryKind::kHost;
  int device = 0;

  // Bytes from base to the end of the last slot's piece.
  uint64_t span_bytes() const {
    return slots == 0 ? 0 : (uint64_t{slots} - 1) * stride + chunk;
  }
};

// Where a pager's pages live: page ix is the concatenation, in canonical
// order, of its pieces in each region, in list order. The chunks add up to
// 2 * page_bytes(). One region of chunk 2 * page_bytes() describes a
// page-major pool; 2 * n_layers regions of chunk layer_chunk_bytes()
// describe per-layer K and V tensors (vLLM's shape).
using PagerLayout = std::vector<StridedRegion>;

// InvalidArgument unless the layout's chunks add up to 2 * meta.page_bytes(),
// every region has a base, chunk <= stride (or one slot) and all regions have
// the same slot count.
Status validate_layout(const CacheMeta& meta, const PagerLayout& layout);

}  // namespace kvmig

#endif  // KVMIG_TYPES_H_
