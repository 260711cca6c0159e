// The destination side of one migration: check HELLO, allocate every slot
// once, OFFER, receive the data (directly into the slots, or staged), check
// COMMIT, cut the source off, install, DONE. Until install, any failure
// releases the slots, after cutting the source off so that no late write
// can land in a slot that is given back.
#ifndef KVMIG_SRC_MIGRATION_DESTINATION_RUN_H_
#define KVMIG_SRC_MIGRATION_DESTINATION_RUN_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "asio.h"
#include "channel.h"
#include "context.h"
#include "messages.h"
#include "staging.h"

namespace kvmig {

// Slots allocated for one migration: given back to the pager when the lease
// ends, unless install took them. Not thread-safe (the io thread's).
class SlotLease {
 public:
  // tag: the migration's log tag.
  SlotLease(CachePager& pager, std::string tag)
      : pager_(pager), tag_(std::move(tag)) {}
  ~SlotLease() { release(); }
  SlotLease(const SlotLease&) = delete;
  SlotLease& operator=(const SlotLease&) = delete;

  // Slot positions: OFFER order, then each ROUND_OFFER's.
  void add(const std::vector<PageIndex>& slots) {
    slots_.insert(slots_.end(), slots.begin(), slots.end());
  }
  const std::vector<PageIndex>& slots() const { return slots_; }
  size_t size() const { return slots_.size(); }
  PageIndex operator[](size_t position) const { return slots_[position]; }

  // Gives every slot back now (logging a pager failure). Idempotent.
  void release();
  // Install took the slots: the lease ends owning nothing.
  void taken() { slots_.clear(); }

 private:
  CachePager& pager_;
  const std::string tag_;
  std::vector<PageIndex> slots_;
};

// One incoming migration, run on the io thread from HELLO to DONE.
class DestinationRun {
 public:
  DestinationRun(MigrationContext& ctx, FrameChannel& channel, HelloMsg hello);

  // True when the migration committed and the source acknowledged DONE
  // (nothing is pending on the connection): the connection may carry the
  // source's next HELLO.
  asio::awaitable<bool> run();

 private:
  // Each step: a failure is returned and run() rolls back through fail().
  // Refuses (before any slot is allocated): a migration id seen before, the
  // agent itself as source, a meta mismatch, limits, no common transport,
  // a request already live here.
  // Io thread.
  Status check_hello();
  // Data pool (pager calls).
  Status check_ids_not_live();
  // Io thread: records id_ as pending (refused if seen meanwhile).
  Status register_id();
  Status allocate_first_round();
  // Data pool: opens the data path into regions (the pager's own, or the
  // staging buffer), the source allowed into its slots only.
  Status open_target(const std::vector<std::span<std::byte>>& regions);
  // The pager's regions' data path where it opens without a wait; target_
  // stays null where it would wait.
  Status open_target_at_once();
  // target_ = target, allowed only this migration's slots where the
  // transport checks writes.
  Status restrict_target(std::unique_ptr<TransportTarget> target);
  // Opens the data path unless the first trip did, and sends OFFER.
  asio::awaitable<Status> open_and_offer();
  // HELLO's pages_follow: no OFFER; PAGES and COMMIT come next.
  Status take_pages_unasked();
  // Serves live rounds, VERIFY and staged batches until COMMIT arrives.
  asio::awaitable<Result<Frame>> receive_until_commit();
  asio::awaitable<Status> on_round(const Frame& frame);
  asio::awaitable<Status> on_verify(const Frame& frame);
  // Checks the pages at v's positions against v's checksums (VERIFY's, or
  // the paused round's in COMMIT) and marks them verified.
  asio::awaitable<Status> check_sums(const VerifyMsg& v, const char* what);
  // The same, on the calling thread (a data pool thread: pager calls).
  Status verify_sums(const VerifyMsg& v, const char* what);
  asio::awaitable<Status> on_batch(const Frame& frame);
  // Whether OFFER takes HELLO's pages inline (PAGES frames, no data path).
  bool takes_inline() const;
  // The most page bytes this side takes inline (OFFER's inline_limit, what
  // a later one exchange may send): the option, as far as a frame holds.
  uint64_t inline_limit() const;
  // receive_until_commit()'s BulkPlacer: for PAGES, checks the positions
  // (offered, none twice, the bulk exactly their pages) before a byte lands
  // and returns where in the layout each page goes (host memory); keeps
  // the positions for on_pages(). Refuses PAGES unasked; nothing for other
  // frames.
  Result<std::vector<std::span<uint8_t>>> place_pages(const Frame& frame,
                                                      uint32_t bulk);
  // A PAGES frame whose pages place_pages() had read into their slots:
  // marks them landed.
  void on_pages();
  // COMMIT, decoded once no outcome query has fenced the migration, with
  // its request count checked.
  Result<CommitMsg> open_commit(const Frame& frame);
  // The slots of the page tables in COMMIT, checked; the unused ones go to
  // unused_ (a live migration may leave some: requests left behind). A
  // request with no tokens, or whose page count is not
  // meta.pages_for_tokens(n_tokens), is InvalidArgument naming its id, tokens
  // and pages (HELLO and ROUND carry no tables: this is the first point the
  // destination can see them).
  Status check_commit(const CommitMsg& commit);
  Status check_tables(const CommitMsg& commit);
  // Returns once the data path's mark `mark` (COMMIT's) has arrived, every
  // write before it having landed; an error if it cannot any more or has
  // not within the peer timeout. No thread waits meanwhile.
  asio::awaitable<Status> wait_for_mark(uint64_t mark);
  // Waits for COMMIT's mark, if any; checks COMMIT (the paused round's
  // checksums, then check_commit()), ends the data path and installs the
  // requests: one hand-off to the data pool (none where the bookkeeping
  // runs on the control thread).
  asio::awaitable<Status> install(const CommitMsg& commit);
  // Records when commit's requests arrived (MigrationContext::arrivals).
  void note_arrivals(const CommitMsg& commit);

  // Cuts the source off, gives the slots back, remembers the outcome,
  // reports the end and tells the source why (best effort).
  asio::awaitable<void> fail(Status why);
  // Calls AgentOptions::on_migration_end, before the source learns the
  // outcome (DONE or ABORT), so an observer sees it first.
  void report_end(const char* outcome) const;
  // Ends the run with `why` before it accepts COMMIT (ActiveMigration::
  // cancel: the agent is stopping).
  void cancel(const Status& why);

  MigrationContext& ctx_;
  FrameChannel& channel_;
  const HelloMsg hello_;
  const std::string& id_;
  const std::string tag_;
  const CacheMeta meta_;
  const uint64_t page_total_;

  Transport* transport_ = nullptr;
  bool registered_ = false;  // this run owns ctx_.dst_records[id_]
  SlotLease slots_;
  std::vector<bool> landed_;      // staged or inline positions written
  std::vector<uint32_t> placed_;  // the PAGES being read: its positions
  bool inline_pages_ = false;     // OFFER took the pages in PAGES frames
  std::vector<bool> verified_;    // checked against VERIFY
  std::vector<PageIndex> unused_;
  std::unique_ptr<StagingBuffer> staging_;
  // Pages known to have arrived: checked (VERIFY), written from staging
  // (BATCH), or every slot once committed. Bytes received, for metrics.
  uint64_t verified_pages_ = 0;
  uint64_t batched_pages_ = 0;
  uint64_t installed_pages_ = 0;
  uint64_t progress_frames_ = 0;  // PROGRESS frames received
  std::string installed_line_;    // install()'s log line, logged after DONE
  // The slots were taken with HELLO (one exchange): said in the line that
  // ends the run (installed, or aborted), not on its own before DONE.
  bool took_with_hello_ = false;
  const Clock::time_point t_start_ = Clock::now();
  std::optional<Status> cancelled_;  // cancel()'s reason
  bool deciding_ = false;            // COMMIT accepted: too late to cancel
  // Declared after the lease: the target (revoked by its destructor) goes
  // before the slots are given back, however the run ends.
  std::unique_ptr<TransportTarget> target_;
  // What status lists while the run lives.
  ActiveMigration progress_;
  std::optional<ActiveListing> listing_;
};

}  // namespace kvmig

#endif  // KVMIG_SRC_MIGRATION_DESTINATION_RUN_H_
