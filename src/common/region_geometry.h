// RegionGeometry: the shape of one strided region of a page layout, without
// its address. A plain value, shared by the planner (which plans writes over
// geometries) and the wire codec (OFFER carries the destination's).
#ifndef KVMIG_SRC_COMMON_REGION_GEOMETRY_H_
#define KVMIG_SRC_COMMON_REGION_GEOMETRY_H_

#include <cstdint>

namespace kvmig {

struct RegionGeometry {
  uint64_t stride = 0;
  uint64_t chunk = 0;
  uint32_t slots = 0;
  friend bool operator==(const RegionGeometry&,
                         const RegionGeometry&) = default;
};

}  // namespace kvmig

#endif  // KVMIG_SRC_COMMON_REGION_GEOMETRY_H_
