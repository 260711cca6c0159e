// The transfer planner: turns (source page -> destination slot) pairs into
// writes, by walking both sides' layouts in canonical byte order, so pages
// can move between differently shaped pools (page-major <-> per-layer). Runs
// that are contiguous on both sides merge into one write. Pure functions;
// thread-safe.
#ifndef KVMIG_SRC_PLANNER_H_
#define KVMIG_SRC_PLANNER_H_

#include <cstdint>
#include <span>
#include <vector>

#include "kvmig/pager.h"
#include "kvmig/status.h"
#include "kvmig/types.h"
#include "region_geometry.h"

namespace kvmig {

// One page to move: source slot (in the source geometry) to destination
// slot (in the destination geometry).
struct PagePair {
  uint32_t src = 0;
  uint32_t dst = 0;
};

// One planned write, region-relative on both sides.
struct PlannedWrite {
  uint32_t src_region = 0;
  uint64_t src_offset = 0;
  uint32_t dst_region = 0;
  uint64_t dst_offset = 0;
  uint64_t length = 0;
  friend bool operator==(const PlannedWrite&, const PlannedWrite&) = default;
};

// The geometry of a layout (its regions without addresses).
std::vector<RegionGeometry> geometry_of(const PagerLayout& layout);

// Plans the writes that copy every pair's page (page_total_bytes = K + V)
// from src to dst. Both geometries must add up to page_total_bytes per slot
// and every slot must be in range (InvalidArgument otherwise, naming the
// pair). Writes are ordered by source position; one write never exceeds
// max_write_bytes (0: no bound).
Result<std::vector<PlannedWrite>> plan_writes(
    std::span<const RegionGeometry> src, std::span<const RegionGeometry> dst,
    std::span<const PagePair> pairs, uint64_t page_total_bytes,
    uint64_t max_write_bytes);

}  // namespace kvmig

#endif  // KVMIG_SRC_PLANNER_H_
