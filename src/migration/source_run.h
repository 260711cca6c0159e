// The source side of a migration: select, (pause), HELLO, OFFER, data in one
// or more rounds, COMMIT, DONE, then drop (move) or keep (copy) and resume.
// Any failure before the destination decides rolls back: the destination
// releases its slots and the source resumes with everything it had. A
// COMMIT whose answer never comes leaves the move in doubt (in_doubt.h).
//
// Stop-and-copy pauses first and copies everything in one round. Live
// migration copies in rounds while the engine runs (PrecopyState says what
// each round sends), then pauses for a last round.
#ifndef KVMIG_SRC_MIGRATION_SOURCE_RUN_H_
#define KVMIG_SRC_MIGRATION_SOURCE_RUN_H_

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "asio.h"
#include "channel.h"
#include "context.h"
#include "kvmig/agent.h"
#include "messages.h"
#include "planner.h"
#include "precopy.h"
#include "staging.h"

namespace kvmig {

// Runs the migration a scheduler (or Agent::migrate) asked for: checks the
// request, picks the requests, runs a SourceRun. Up to
// options.max_migrations at once per agent, of disjoint requests
// (ResourceExhausted beyond it; FailedPrecondition for a request another
// run moves). Runs on ctx's io thread.
asio::awaitable<Result<MigrationReport>> run_source(MigrationContext& ctx,
                                                    MigrateRequest request);

// Cancels the source migration `id` (SourceRun::cancel) and waits until it
// has ended, then says how it ended (CancelReport); one that ended already
// is reported as it ended. NotFound for an id this agent has not seen,
// which it remembers as cancelled all the same, so that a MIGRATE_REQ with
// that id arriving later is refused (a scheduler's cancel may overtake its
// own request). FailedPrecondition when this agent is the destination of
// `id`. Io thread.
asio::awaitable<Result<CancelReport>> cancel_source(MigrationContext& ctx,
                                                    std::string id);

// What a migration stops while it copies, owned by the migration: the
// requests it moves (CachePager::hold_seqs; the rest of the engine keeps
// running), or the whole engine (pause(), for a pager without hold_seqs).
// Released when the migration ends, however it ends, unless handed over to
// an in-doubt entry. Not thread-safe; release() calls the pager.
class EnginePause {
 public:
  enum class Scope { kNone, kSeqs, kEngine };

  explicit EnginePause(CachePager& pager) : pager_(pager) {}
  ~EnginePause() { (void)release(); }
  EnginePause(const EnginePause&) = delete;
  EnginePause& operator=(const EnginePause&) = delete;

  // kSeqs: ids are held; kEngine: the engine is paused.
  void engage(Scope scope, std::vector<SeqId> ids) {
    scope_ = scope;
    ids_ = std::move(ids);
  }
  bool engaged() const { return scope_ != Scope::kNone; }
  Scope scope() const { return scope_; }
  // "seqs" or "engine" (MigrationReport::hold); "none" when not engaged.
  const char* scope_name() const;
  // The hold or pause now belongs to someone else (an in-doubt entry, or
  // nobody: held requests that were dropped): nothing to release.
  void hand_over() { scope_ = Scope::kNone; }
  // Requests no longer moving (left behind): unheld now, if held.
  Status unhold(const std::vector<SeqId>& ids);
  // Resumes or unholds now (logging a failure). Success when not engaged.
  Status release();

 private:
  CachePager& pager_;
  Scope scope_ = Scope::kNone;
  std::vector<SeqId> ids_;  // kSeqs: the held requests
};

// One outgoing migration. Its coroutines run on the io thread; its data
// work runs on one pool thread at a time while the coroutine awaits it,
// but for a stop-and-copy's hold, which runs while the coroutine connects.
class SourceRun {
 public:
  SourceRun(MigrationContext& ctx, const MigrateRequest& req,
            Transport& transport, std::string id);

  // Moves (or copies) ids, every one not in doubt and live (with
  // check_live, a stop-and-copy checks that on its hold's trip and fails
  // with NotFound naming the unknown ones, nothing held).
  asio::awaitable<Result<MigrationReport>> run(std::vector<SeqId> ids,
                                               bool check_live = false);
  // How the run ended, for AgentOptions::on_migration_end: "committed",
  // "in_doubt", or else "aborted". Call after run().
  MigrationEvent ended() const;
  // Whether cancel() stopped the run (it then ended with cancel's status).
  bool cancelled() const { return cancelled_.has_value(); }

  // Ends the run with `why` unless it has reached the decision point
  // (COMMIT about to be sent): what it waits on (a frame, the data pool's
  // writes, the pause) is cut short, and it rolls back as for any failure.
  // Io thread. Also ActiveMigration::cancel.
  void cancel(const Status& why);

 private:
  Deadline deadline() const { return ctx_.peer_deadline(); }
  // Ends the phase under way (its time goes to phases_ms_) and starts p;
  // status shows the run in phase p, unless it is cancelling.
  void enter_phase(const char* p);
  // The time since the phase under way started, added to its total.
  void close_phase();
  // The status cancel() set, or OK.
  Status cancel_status() const { return cancelled_ ? *cancelled_ : Status(); }
  // Arms the request's timeout (MigrateRequest::timeout), if any.
  void arm_timeout();
  // Runs f (returning Status) on the data pool; while it runs, tells the
  // destination every heartbeat period how many bytes went out (PROGRESS),
  // so that its progress deadline sees a source that is alive and moving.
  template <typename F>
  asio::awaitable<Status> offload_with_progress(F f);
  asio::awaitable<void> abort_peer(const Status& why);
  // Pauses: holds the requests that move where the pager can, else (or
  // when one has finished) pauses the whole engine. The paused round's
  // snapshot comes back on the same trip (paused_seqs_).
  asio::awaitable<Status> pause_engine();
  // pause_engine() in two halves, so that the pager's trip to the data
  // pool overlaps other io-thread work: start_pause() sends it off;
  // finish_pause() waits for it (until the peer deadline, or a cancel)
  // and engages pause_. Without whole_engine, a pager that cannot hold the
  // requests is left running, and finish_pause() returns OK unengaged.
  // With check_live, the trip first checks that every request is live
  // (run()'s check_live); finish_pause() then sets selection_refused_ and
  // returns the refusal as it is.
  struct PauseRace;
  std::shared_ptr<PauseRace> start_pause(bool whole_engine,
                                         bool check_live = false);
  asio::awaitable<Status> finish_pause(std::shared_ptr<PauseRace> race);
  asio::awaitable<Status> run_live_rounds();
  // Plans, allocates and sends one round from a fresh snapshot.
  asio::awaitable<Status> run_round(bool first);
  // Drops requests that no longer extend what was copied (live only).
  Status leave_behind(const std::vector<SeqId>& dropped);
  // The first round: HELLO, OFFER. The data path connects on the first
  // data job (connect_data_path()), not on a trip of its own. One exchange
  // instead where the kept connection's OFFER allows (HELLO then goes with
  // COMMIT): the slots are the slot positions.
  asio::awaitable<Result<std::vector<PageIndex>>> hello_and_offer(
      uint32_t n_pages);
  // The control connection: with may_reuse, one kept from an earlier
  // migration to the same destination if there is one; else a new one.
  asio::awaitable<Result<FrameChannel>> open_channel(bool may_reuse);
  // Closes a kept channel_ the destination closed and opens a new one in
  // its place, not kept (so a second failure is not retried). On failure
  // channel_ stays, closed.
  asio::awaitable<Status> reconnect();
  // Sends HELLO and receives the answer, on a new connection once more if
  // a kept one turns out closed.
  asio::awaitable<Result<Frame>> exchange_hello(
      std::span<const uint8_t> payload);
  // A later round: ROUND, ROUND_OFFER.
  asio::awaitable<Result<std::vector<PageIndex>>> ask_round_slots(
      uint32_t n_pages);
  // Copies the pages at `positions` into their destination slots.
  asio::awaitable<Status> send_positions(
      const std::vector<uint32_t>& positions);
  Status ensure_source_geometry();
  // Whether HELLO asks to send a first round of n_pages in PAGES frames
  // (AgentOptions::inline_page_bytes).
  bool may_inline(uint32_t n_pages) const;
  // The paused round's pages in a PAGES frame (OFFER took them inline):
  // its positions in pages_frame_ and where each page lies in pages_bulk_.
  // COMMIT takes it along.
  Status read_inline(const std::vector<uint32_t>& positions);
  // Connects the initiator to OFFER's target once (data pool); later calls
  // return the first call's result. Then hands it the window updates of
  // the ROUND_OFFERs received since.
  Status connect_data_path();
  // Writes positions[first, first + count) and flushes, or with `last`
  // (the paused round's last writes, COMMIT next) posts a mark for COMMIT
  // where the transport has marks; with verify, also fills
  // sums[first, first + count) with the pages' checksums.
  Status write_batch(const std::vector<uint32_t>& positions, size_t first,
                     size_t count, bool mid_fault, bool last,
                     std::vector<uint64_t>& sums);
  asio::awaitable<Status> send_batch_and_wait(
      const std::vector<uint32_t>& positions, size_t first, size_t count);
  // How long the destination may take to check `pages` pages.
  Clock::duration check_time(size_t pages) const;
  // Waits until the destination has checked a round, so its checking never
  // lands inside the final pause (the paused round's checksums go with
  // COMMIT instead).
  asio::awaitable<Status> verify_round(const std::vector<uint32_t>& positions,
                                       const std::vector<uint64_t>& sums);

  asio::awaitable<Result<MigrationReport>> commit();
  CommitMsg commit_tables() const;
  // Sends COMMIT (with PAGES and, one exchange, HELLO before it) and reads
  // the answer: kCommitted, kAborted (with why) or kUnknown (with why) when
  // no answer came.
  asio::awaitable<Outcome> send_commit(const CommitMsg& msg, Status& why);
  // One exchange on a kept connection that failed with no answer: whether
  // the destination never read it (the connection closed as it went out),
  // asked on a new connection; if so, sends it again on that one.
  asio::awaitable<Outcome> send_commit_again(const CommitMsg& msg, Status& why);
  // The requests stay here, held (`held`: hold_seqs' result for a move),
  // until the destination answers.
  Status enter_in_doubt(const std::vector<SeqId>& ids, const Status& why,
                        const Status& held);
  // The report of a committed migration whose requests were dropped here
  // (a move) and whose engine was resumed, with those calls' results.
  Result<MigrationReport> finish(
      const std::vector<SeqId>& ids,
      std::vector<std::pair<SeqId, std::string>> digests, const Status& dropped,
      const Status& resumed);
  // Resumes the engine if this run paused it (data pool).
  asio::awaitable<void> resume_engine();

  MigrationContext& ctx_;
  const MigrateRequest& req_;
  Transport& transport_;
  const std::string id_;
  const std::string tag_;
  // The run's first line ("moving N requests..."), written right after
  // HELLO goes out, while the destination answers, rather than on the way
  // to it; empty once written.
  std::string start_line_;
  void log_start();
  const CacheMeta meta_;
  const uint64_t page_total_;

  std::optional<FrameChannel> channel_;
  bool kept_connection_ = false;  // channel_ came from ctx_.kept_channels
  // What the OFFER on channel_ said of the destination (its inline limit,
  // its incarnation): kept with the connection for the next migration.
  KeptTerms dst_terms_;
  // One exchange (HELLO's pages_follow): HELLO, and its payload sent with
  // PAGES and COMMIT (encoded again when the exchange is resent); empty
  // otherwise.
  HelloMsg hello_;
  std::vector<uint8_t> hello_frame_;
  std::unique_ptr<TransportInitiator> init_;
  PrecopyState precopy_;
  EnginePause pause_;
  std::vector<SeqId> moving_;
  std::vector<SeqId> left_behind_;
  std::vector<uint64_t> round_pages_;
  // With verify: the paused round's checksums, sent with COMMIT.
  VerifyMsg paused_round_sums_;
  // The paused round's PAGES frame (inline pages), sent in one write with
  // COMMIT: the destination wakes once for both. Its payload (the
  // positions), then its bulk: the held pages' bytes, sent from page
  // memory. Empty otherwise.
  std::vector<uint8_t> pages_frame_;
  std::vector<std::span<const uint8_t>> pages_bulk_;
  // The mark behind the paused round's writes, sent with COMMIT (0: they
  // were flushed).
  uint64_t data_mark_ = 0;
  // The snapshot pause_engine() took right after pausing, on the same trip
  // to the data pool: the paused round plans from it.
  std::optional<Result<std::vector<LogicalSeq>>> paused_seqs_;

  // Where writes go: the destination's geometry (or staging), from OFFER.
  std::vector<RegionGeometry> dst_regions_;
  uint32_t dst_staging_slots_ = 0;
  std::string dst_memory_;  // OFFER's: where the destination's pages live
  // OFFER's target address, until connect_data_path() has used it.
  std::optional<std::vector<uint8_t>> dst_target_;
  bool inline_pages_ = false;  // OFFER took the pages in PAGES frames
  Status data_path_;           // connect_data_path()'s result
  // ROUND_OFFERs' window updates, until connect_data_path() (on the data
  // pool, before the round's writes) hands them to the initiator.
  std::vector<std::vector<uint8_t>> window_updates_;
  // Where writes come from: the pager's layout or a staging buffer.
  std::vector<RegionGeometry> src_geometry_;
  std::vector<std::byte*> src_bases_;
  std::unique_ptr<StagingBuffer> src_staging_;

  Clock::time_point t_start_ = Clock::now();
  // MigrationReport::phases_ms: the phase under way, since when, and the
  // time of each phase so far in the order first entered.
  const char* phase_ = "connect";
  Clock::time_point phase_start_ = t_start_;
  std::vector<std::pair<std::string, double>> phases_ms_;
  Clock::time_point t_pause_;  // the epoch until the engine pauses
  const char* hold_ = "none";  // what the pause stopped: "seqs" or "engine"
  double pause_seconds_ = 0;   // once resumed after a commit
  const char* outcome_ = "aborted";
  double data_seconds_ = 0;
  uint64_t bytes_ = 0, writes_ = 0;
  bool mid_fault_done_ = false;
  // Cancellation (cancel()): the reason, and the flag the data pool's
  // write loop reads. committing_: COMMIT is going out, too late to cancel.
  std::optional<Status> cancelled_;
  std::atomic<bool> cancel_flag_{false};
  bool committing_ = false;
  asio::steady_timer* pause_timer_ = nullptr;  // while finish_pause waits
  bool selection_refused_ = false;  // the hold's trip refused the request
  asio::steady_timer timeout_timer_;
  // What status lists while the run lives.
  ActiveMigration progress_;
  std::optional<ActiveListing> listing_;
};

}  // namespace kvmig

#endif  // KVMIG_SRC_MIGRATION_SOURCE_RUN_H_
