// MappedRegion: owns one anonymous, page-aligned private mapping (mmap) and
// unmaps it on destruction. The one mmap owner of kvmig. Movable, not
// copyable; not thread-safe (the bytes it maps are the caller's to guard).
#ifndef KVMIG_SRC_COMMON_MAPPED_REGION_H_
#define KVMIG_SRC_COMMON_MAPPED_REGION_H_

#include <cstddef>
#include <span>
#include <string_view>

#include "kvmig/status.h"

namespace kvmig {

class MappedRegion {
 public:
  // Maps `length` bytes (> 0) of zeroed memory. populate: fault every page
  // in now (MAP_POPULATE), as an engine's pre-allocated pool is.
  // ResourceExhausted naming `what` when the kernel refuses.
  static Result<MappedRegion> create(size_t length, bool populate,
                                     std::string_view what);

  MappedRegion() = default;
  MappedRegion(MappedRegion&& other) noexcept;
  MappedRegion& operator=(MappedRegion&& other) noexcept;
  MappedRegion(const MappedRegion&) = delete;
  MappedRegion& operator=(const MappedRegion&) = delete;
  ~MappedRegion();

  std::byte* data() const { return base_; }
  size_t size() const { return length_; }
  std::span<std::byte> span() const { return {base_, length_}; }

 private:
  MappedRegion(std::byte* base, size_t length) : base_(base), length_(length) {}
  void reset();

  std::byte* base_ = nullptr;
  size_t length_ = 0;
};

}  // namespace kvmig

#endif  // KVMIG_SRC_COMMON_MAPPED_REGION_H_
