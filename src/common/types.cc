#include "kvmig/types.h"

#include <string>

namespace kvmig {

size_t dtype_size(Dtype dtype) {
  switch (dtype) {
    case Dtype::kBf16:
      return 2;
    case Dtype::kF16:
      return 2;
    case Dtype::kF32:
      return 4;
    case Dtype::kFp8E4m3:
      return 1;
  }
  return 0;
}

std::string_view dtype_name(Dtype dtype) {
  switch (dtype) {
    case Dtype::kBf16:
      return "bf16";
    case Dtype::kF16:
      return "f16";
    case Dtype::kF32:
      return "f32";
    case Dtype::kFp8E4m3:
      return "fp8_e4m3";
  }
  return "invalid";
}

Result<Dtype> parse_dtype(std::string_view name) {
  for (Dtype d : {Dtype::kBf16, Dtype::kF16, Dtype::kF32, Dtype::kFp8E4m3}) {
    if (dtype_name(d) == name) return d;
  }
  return Status::invalid_argument("unknown dtype '" + std::string(name) +
                                  "' (bf16|f16|f32|fp8_e4m3)");
}

Status CacheMeta::validate() const {
  if (page_size_tokens == 0 || n_layers == 0 || n_heads == 0 || head_dim == 0) {
    return Status::invalid_argument("cache meta " + to_string() +
                                    ": every dimension must be non-zero");
  }
  if (dtype_size(dtype) == 0) {
    return Status::invalid_argument("cache meta: unknown dtype value " +
                                    std::to_string(static_cast<int>(dtype)));
  }
  // Each factor is < 2^32, so check the product stepwise against 1 GiB.
  constexpr uint64_t kMaxPageBytes = 1ull << 30;
  uint64_t bytes = dtype_size(dtype);
  for (uint64_t f :
       {uint64_t{head_dim}, uint64_t{n_heads}, uint64_t{page_size_tokens},
        uint64_t{n_layers}, uint64_t{2}}) {
    bytes *= f;
    if (bytes > kMaxPageBytes) {
      return Status::invalid_argument("cache meta " + to_string() +
                                      ": a page (K + V) exceeds 1 GiB");
    }
  }
  return Status();
}

std::string CacheMeta::to_string() const {
  return std::to_string(page_size_tokens) + "x" + std::to_string(n_layers) +
         "x" + std::to_string(n_heads) + "x" + std::to_string(head_dim) + " " +
         std::string(dtype_name(dtype));
}

Result<CacheMeta> preset_meta(std::string_view name) {
  if (name == "tiny") return CacheMeta{16, 2, 2, 64, Dtype::kF16};
  if (name == "llama3-8b") return CacheMeta{16, 32, 8, 128, Dtype::kBf16};
  return Status::invalid_argument("unknown preset '" + std::string(name) +
                                  "' (tiny|llama3-8b)");
}

std::string_view memory_kind_name(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::kHost:
      return "host";
    case MemoryKind::kCuda:
      return "cuda";
  }
  return "invalid";
}

Status validate_layout(const CacheMeta& meta, const PagerLayout& layout) {
  if (layout.empty()) return Status::invalid_argument("layout has no regions");
  uint64_t total = 0;
  for (size_t i = 0; i < layout.size(); ++i) {
    const StridedRegion& r = layout[i];
    std::string where = "layout region " + std::to_string(i);
    if (r.base == nullptr) return Status::invalid_argument(where + ": no base");
    if (r.chunk == 0) return Status::invalid_argument(where + ": empty chunk");
    if (memory_kind_name(r.kind) == "invalid") {
      return Status::invalid_argument(where + ": unknown memory kind " +
                                      std::to_string(static_cast<int>(r.kind)));
    }
    if (r.slots > 1 && r.chunk > r.stride) {
      return Status::invalid_argument(
          where + ": chunk " + std::to_string(r.chunk) + " exceeds stride " +
          std::to_string(r.stride));
    }
    if (r.slots != layout[0].slots) {
      return Status::invalid_argument(where + ": " + std::to_string(r.slots) +
                                      " slots, region 0 has " +
                                      std::to_string(layout[0].slots));
    }
    total += r.chunk;
  }
  if (total != 2 * meta.page_bytes()) {
    return Status::invalid_argument(
        "layout chunks add up to " + std::to_string(total) +
        " bytes, a page is " + std::to_string(2 * meta.page_bytes()));
  }
  return Status();
}

}  // namespace kvmig
