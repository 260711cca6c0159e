// Placement: which requests go where, as pure functions of the agents'
// state, so that planning is tested and timed without a cluster.
#ifndef KVMIG_SRC_CLUSTER_PLACEMENT_H_
#define KVMIG_SRC_CLUSTER_PLACEMENT_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "kvmig/agent.h"

namespace kvmig {

// What moves in one piece: one request, or the requests that share pages
// (AgentStatus::shared_groups), with the distinct pages a destination must
// have free for it.
struct MoveUnit {
  std::vector<SeqId> seqs;
  uint64_t pages = 0;
};

// Every live request of st in units: its shared groups, then each request
// that shares nothing. Left out: requests held by an in-doubt migration,
// and with settle_ms > 0 units with a request that arrived by migration
// less than settle_ms ago (SeqStatus::arrived_ms_ago).
std::vector<MoveUnit> move_units(const AgentStatus& st, int64_t settle_ms = 0);

// Drain: places each unit (largest first) on the target with the most free
// pages that still fits it after what was placed before. Returns, per unit,
// the target's index in free_pages, or nullopt when none has room.
// O(units * log targets + targets).
std::vector<std::optional<size_t>> plan_drain(
    const std::vector<MoveUnit>& units, std::vector<uint64_t> free_pages);

// One side of a rebalance pair.
struct LoadSide {
  uint64_t used_pages = 0;
  uint64_t capacity_pages = 0;
  double load() const;  // used / capacity (1 when capacity is 0)
};

// Rebalance: which units (fewest pages first) to move from `from` to `to`
// (with to_free free pages): units are taken while the gap in load is above
// threshold and taking one would not flip the order of the two loads (the
// source stays at least as loaded as the destination, so nothing is ever
// moved back). Returns indexes into units; empty when nothing fits.
std::vector<size_t> plan_rebalance(const std::vector<MoveUnit>& units,
                                   LoadSide from, LoadSide to, uint64_t to_free,
                                   double threshold);

}  // namespace kvmig

#endif  // KVMIG_SRC_CLUSTER_PLACEMENT_H_
