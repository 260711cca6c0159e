// windows_for: the write windows of a migration's destination slots.
#ifndef KVMIG_SRC_MIGRATION_WRITE_WINDOWS_H_
#define KVMIG_SRC_MIGRATION_WRITE_WINDOWS_H_

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "kvmig/transport.h"
#include "kvmig/types.h"

namespace kvmig {

// Where `slots` lie in each region of the layout: the only bytes a source
// may write (TransportTarget::allow). In region and offset order, so that
// a target finds them sorted; where a region's chunks fill their stride, a
// run of consecutive slots is one window (thousands of slots from one
// allocation are usually a few runs: a few windows, not one per slot and
// region).
inline std::vector<WriteWindow> windows_for(const PagerLayout& layout,
                                            std::span<const PageIndex> slots) {
  std::vector<PageIndex> sorted(slots.begin(), slots.end());
  if (!std::is_sorted(sorted.begin(), sorted.end())) {
    std::sort(sorted.begin(), sorted.end());
  }
  struct Run {
    PageIndex first;
    uint32_t count;
  };
  std::vector<Run> runs;
  for (PageIndex s : sorted) {
    if (!runs.empty() && uint64_t{runs.back().first} + runs.back().count == s) {
      ++runs.back().count;
    } else {
      runs.push_back({s, 1});
    }
  }
  std::vector<WriteWindow> out;
  for (uint32_t r = 0; r < layout.size(); ++r) {
    const uint64_t stride = layout[r].stride;
    if (layout[r].chunk == stride) {
      for (const Run& run : runs) {
        out.push_back({r, uint64_t{run.first} * stride, run.count * stride});
      }
    } else {
      for (PageIndex s : sorted) {
        out.push_back({r, uint64_t{s} * stride, layout[r].chunk});
      }
    }
  }
  return out;
}

}  // namespace kvmig

#endif  // KVMIG_SRC_MIGRATION_WRITE_WINDOWS_H_
