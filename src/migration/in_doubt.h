// The source's in-doubt machinery: a migration whose COMMIT went out and
// whose outcome the source could not learn keeps its requests held (or the
// engine paused) and is asked about in the background until the
// destination answers; then it is settled: dropped here (committed) or run
// here again (rolled back). Never silently dropped, never duplicated.
//
// Not thread-safe: everything runs on the agent's io thread.
#ifndef KVMIG_SRC_MIGRATION_IN_DOUBT_H_
#define KVMIG_SRC_MIGRATION_IN_DOUBT_H_

#include <set>
#include <string>
#include <vector>

#include "asio.h"
#include "kvmig/agent.h"
#include "kvmig/transport.h"
#include "messages.h"

namespace kvmig {

class MigrationContext;

class InDoubtSet {
 public:
  const std::vector<AgentStatus::InDoubt>& entries() const { return entries_; }
  // Every request some in-doubt migration holds.
  std::set<SeqId> held_seqs() const;

  // Records `entry` as in doubt (its requests already held as entry.hold
  // says) and starts asking its destination in the background.
  void enter(MigrationContext& ctx, AgentStatus::InDoubt entry);

  // Applies a learned outcome to an in-doubt migration: drops its requests
  // (a committed move) or lets them run again, then forgets the entry. The
  // entry stays listed (and its requests held) until the pager is done, so
  // whoever sees it gone sees its requests dropped or running again.
  asio::awaitable<void> settle(MigrationContext& ctx,
                               const std::string& migration_id,
                               Outcome outcome);
  // settle() by an operator's word (Agent::settle): NotFound when
  // migration_id is not in doubt here.
  asio::awaitable<Status> settle_by_hand(MigrationContext& ctx,
                                         const std::string& migration_id,
                                         bool committed);

 private:
  // Asks the destination of in-doubt migration_id with backoff until it
  // answers, then settles it.
  asio::awaitable<void> keep_asking(MigrationContext& ctx,
                                    std::string migration_id);

  std::vector<AgentStatus::InDoubt> entries_;
  // Entries being settled right now: nothing settles them twice.
  std::set<std::string> settling_;
};

// The destination's answer, as it gives it, to an OUTCOME_REQ about
// migration_id (kUnknown: it has no record of it), or why none came.
asio::awaitable<Result<OutcomeRespMsg>> query_outcome(
    MigrationContext& ctx, const std::string& to,
    const std::string& migration_id, Deadline deadline);

// Asks the destination `to` once for the outcome of migration_id, by
// `deadline`. kCommitted, kAborted (the destination rolled back, or holds
// nothing of it), or kUnknown when it does not answer.
asio::awaitable<Outcome> ask_outcome(MigrationContext& ctx,
                                     const std::string& to,
                                     const std::string& migration_id,
                                     Deadline deadline);

// After COMMIT went out and DONE did not come back: ask the destination
// until the peer timeout. kCommitted, kAborted, or kUnknown when
// unreachable.
asio::awaitable<Outcome> resolve_outcome(MigrationContext& ctx,
                                         const std::string& to,
                                         const std::string& migration_id);

}  // namespace kvmig

#endif  // KVMIG_SRC_MIGRATION_IN_DOUBT_H_
