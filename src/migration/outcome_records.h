// OutcomeRecords: the destination's memory of each migration it took part
// in, by migration id, so a source that lost contact can ask how it ended.
// Not thread-safe: the agent's io thread owns it.
#ifndef KVMIG_SRC_MIGRATION_OUTCOME_RECORDS_H_
#define KVMIG_SRC_MIGRATION_OUTCOME_RECORDS_H_

#include <cstddef>
#include <deque>
#include <map>
#include <memory>
#include <string>

#include "log.h"
#include "messages.h"

namespace kvmig {

class OutcomeRecords {
 public:
  // Outcomes kept for queries, oldest forgotten first; a committed one the
  // source has not acknowledged (DONE_ACK) is kept past that, up to
  // kMaxUnacknowledged, and never a pending one.
  static constexpr size_t kMaxRecords = 4096;
  static constexpr size_t kMaxUnacknowledged = 1u << 16;

  bool contains(const std::string& id) const { return records_.count(id); }
  // Whether a HELLO with id may start a migration here: no record of it, or
  // only an outcome query's fence and the HELLO is a resent one exchange
  // (HelloMsg::resent).
  bool admits(const std::string& id, bool resent) const;

  // The agent started over a pager that already held requests: what it does
  // not remember may have been installed by an earlier agent over it.
  void set_started_with_requests(bool v) { started_with_requests_ = v; }

  // Records (or updates) the outcome of id, forgetting the oldest records
  // that may go.
  void remember(const std::string& id, Outcome outcome);
  // The source learned the outcome of id (DONE_ACK): its record may go.
  void acknowledge(const std::string& id);

  // The answer to a source's OUTCOME_REQ. A migration still pending before
  // its COMMIT was accepted is decided aborted now (fenced), so a COMMIT
  // still in flight is refused. An id with no record is fenced too: a HELLO
  // with it that comes later (a one exchange held on the way while its
  // source heard "no record" and rolled back) is refused, unless it is
  // the source's resend (admits()).
  OutcomeRespMsg answer_query(const std::string& id,
                              const std::shared_ptr<spdlog::logger>& log);

  // COMMIT is being applied (a query now answers pending, not aborted).
  // False when a query fenced the migration first: it must abort.
  bool begin_commit(const std::string& id);

 private:
  struct Record {
    Outcome outcome = Outcome::kPending;
    bool committing = false;  // COMMIT accepted, install under way
    bool fenced = false;      // an outcome query decided "aborted" first
    bool acknowledged = false;
    // Made by an outcome query about an id never seen here: answered as no
    // record, and kept only to refuse a HELLO that comes later.
    bool queried_only = false;
  };
  // A commit whose source may still ask about it.
  static bool kept_for_source(const Record& r) {
    return r.outcome == Outcome::kCommitted && !r.acknowledged;
  }
  // Drops the oldest records that may go: beyond kMaxRecords of them, and
  // unacknowledged commits beyond kMaxUnacknowledged.
  void evict();

  std::map<std::string, Record> records_;
  std::deque<std::string> order_;  // oldest first, bounded
  bool started_with_requests_ = false;
  bool forgot_committed_ = false;  // evicted an unacknowledged commit
  size_t unacknowledged_ = 0;      // records kept_for_source()
  size_t pending_ = 0;             // records still pending
};

// The source's memory of how its recent migrations ended, by id: what a
// CANCEL that comes late is answered, and which ids a scheduler may not
// reuse. Not thread-safe: the agent's io thread owns it.
class SourceOutcomes {
 public:
  static constexpr size_t kMaxRecords = 4096;

  struct Entry {
    std::string outcome;  // CancelReport::outcome: aborted, committed, ...
    std::string detail;
  };
  // Records how id ended, forgetting the oldest past kMaxRecords.
  void remember(const std::string& id, Entry entry);
  // How id ended, or null when unknown (or forgotten).
  const Entry* find(const std::string& id) const;

 private:
  std::map<std::string, Entry> records_;
  std::deque<std::string> order_;  // oldest first
};

}  // namespace kvmig

#endif  // KVMIG_SRC_MIGRATION_OUTCOME_RECORDS_H_
