// kvmig perf's session messages (PERF_SETUP, PERF_READY), on the control
// protocol's framing and codec. Stateless; thread-safe.
#ifndef KVMIG_SRC_PERF_PERF_MESSAGES_H_
#define KVMIG_SRC_PERF_PERF_MESSAGES_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "codec.h"
#include "kvmig/status.h"
#include "kvmig/types.h"
#include "synthetic_pager.h"

namespace kvmig {

// kvmig perf: the client asks the perf server to (re)build its target, an
// agent over an empty SyntheticPager of this shape (PERF_SETUP); the server
// answers where that agent listens (PERF_READY). PERF_RESET (no payload)
// drops every request the target holds; PERF_READY answers it too.
struct PerfSetupMsg {
  CacheMeta meta;
  PoolLayout layout = PoolLayout::kPage;
  uint32_t capacity_pages = 0;
  AllocationOrder order = AllocationOrder::kContiguous;
  uint64_t seed = 0;  // for AllocationOrder::kRandom
  PoolMemoryKind memory = PoolMemoryKind::kHost;  // where the pool lives
};
struct PerfReadyMsg {
  std::string address;  // the target agent's control "HOST:PORT"
  uint32_t free_pages = 0;
};

std::vector<uint8_t> encode(const PerfSetupMsg& m);
std::vector<uint8_t> encode(const PerfReadyMsg& m);
Result<PerfSetupMsg> decode_perf_setup(std::span<const uint8_t> p,
                                       const WireLimits& l);
Result<PerfReadyMsg> decode_perf_ready(std::span<const uint8_t> p,
                                       const WireLimits& l);

}  // namespace kvmig

#endif  // KVMIG_SRC_PERF_PERF_MESSAGES_H_
