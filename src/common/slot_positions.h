// SlotPositions: where each page of a list sits in it: a migration's
// destination slots in their allocation (the destination checks COMMIT's
// page tables with it), the source pages a migration has sent (the
// source's pre-copy rounds). Not thread-safe.
#ifndef KVMIG_SRC_COMMON_SLOT_POSITIONS_H_
#define KVMIG_SRC_COMMON_SLOT_POSITIONS_H_

#include <algorithm>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "kvmig/types.h"

namespace kvmig {

// Where each of a migration's slots sits in its allocation (kNone: not
// one of them). A table over the slots' span when that is dense enough,
// as a pager's allocation usually is (one load per lookup); otherwise a
// binary search over them sorted, so that memory stays bounded by the
// allocation and not by the pool.
class SlotPositions {
 public:
  static constexpr uint32_t kNone = UINT32_MAX;

  SlotPositions() = default;  // finds nothing
  explicit SlotPositions(std::span<const PageIndex> slots) {
    if (slots.empty()) return;
    const auto [lo, hi] = std::minmax_element(slots.begin(), slots.end());
    const uint64_t span = uint64_t{*hi} - *lo + 1;
    if (span <= kDenseFactor * slots.size() + kDenseSlack) {
      lo_ = *lo;
      table_.assign(span, kNone);
      for (uint32_t pos = 0; pos < slots.size(); ++pos) {
        table_[slots[pos] - lo_] = pos;
      }
      return;
    }
    sorted_.reserve(slots.size());
    for (uint32_t pos = 0; pos < slots.size(); ++pos) {
      sorted_.emplace_back(slots[pos], pos);
    }
    std::sort(sorted_.begin(), sorted_.end());
  }

  // The slot's position in the allocation, or kNone.
  uint32_t find(PageIndex p) const {
    if (!sorted_.empty()) {
      auto it = std::lower_bound(sorted_.begin(), sorted_.end(),
                                 std::pair<PageIndex, uint32_t>{p, 0});
      return it != sorted_.end() && it->first == p ? it->second : kNone;
    }
    if (p < lo_ || p - lo_ >= table_.size()) return kNone;
    return table_[p - lo_];
  }

  // Whether lookups go through the table (else the binary search).
  bool dense() const { return sorted_.empty(); }

 private:
  // A table at most this many entries per slot (plus the slack, for small
  // allocations): 4 bytes each.
  static constexpr uint64_t kDenseFactor = 4;
  static constexpr uint64_t kDenseSlack = 4096;

  PageIndex lo_ = 0;
  std::vector<uint32_t> table_;                         // [slot - lo_]
  std::vector<std::pair<PageIndex, uint32_t>> sorted_;  // (slot, position)
};

}  // namespace kvmig

#endif  // KVMIG_SRC_COMMON_SLOT_POSITIONS_H_
