// MigrationContext: everything a migration run needs from the agent that
// starts it, and nothing of the agent itself: the pager and its layout, the
// options and limits, the transports, the control plane's io_context and
// the data pool, the destination's outcome records and the source's
// in-doubt set. The agent owns one and hands it to every run, so that
// migration/ compiles without agent/.
//
// Threading: one io_context thread runs the control plane (every coroutine,
// and every member marked "io thread"); blocking data-plane work (the
// transport's writes and flushes, page copies, checksums) goes to
// data_pool through offload(), whose result resumes the awaiting coroutine.
#ifndef KVMIG_SRC_MIGRATION_CONTEXT_H_
#define KVMIG_SRC_MIGRATION_CONTEXT_H_

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "asio.h"
#include "in_doubt.h"
#include "kept_channels.h"
#include "kvmig/agent.h"
#include "kvmig/pager.h"
#include "kvmig/transport.h"
#include "log.h"
#include "messages.h"
#include "offload.h"
#include "outcome_records.h"
#include "random.h"

namespace kvmig {

// A migration under way, as status lists it (AgentStatus::migrations):
// owned by its run, listed in MigrationContext::active while an
// ActiveListing of it lives. Members are the io thread's, but bytes, which
// the data pool adds to.
struct ActiveMigration {
  std::string id;
  bool source = true;
  std::string peer;
  std::vector<SeqId> seqs;  // source: the requests; destination: none
  std::string transport;
  const char* phase = "connect";
  uint32_t round = 0;
  std::atomic<uint64_t> bytes{0};  // source: payload bytes posted so far
  Clock::time_point started = Clock::now();
  // Ends the run early with `why` if it has not reached the decision point
  // (source: sending COMMIT; destination: accepting it), by cancelling
  // what it waits on; a run past that point ends as decided. Set by the
  // run; io thread.
  std::function<void(const Status& why)> cancel;
};

// "host", "cuda" or "cuda+host": the memory kinds of a layout's regions
// (host without a layout: pages go through read_page/write_page).
std::string memory_kinds_name(const std::optional<PagerLayout>& layout);

class MigrationContext {
 public:
  MigrationContext(CachePager& pager, AgentOptions options);
  ~MigrationContext();
  MigrationContext(const MigrationContext&) = delete;
  MigrationContext& operator=(const MigrationContext&) = delete;

  // Reads the pager's layout and builds and registers every transport the
  // options name. Called once, before serving.
  Status init();

  // The transport called name, or a clear error if this agent lacks it.
  Result<Transport*> transport_named(std::string_view name);
  // The first of `offered` (a source's HELLO) this agent has, or a clear
  // error naming both sides' transports and, for an offered one this agent
  // left out (it cannot reach the pager's memory), why.
  Result<Transport*> common_transport(const std::vector<std::string>& offered);
  // "tcp,ucx": the transports this agent has.
  std::string transport_names(std::string_view separator) const;

  // FailedPrecondition naming the snapshot under way, for a migration
  // `direction` ("from" or "into") this agent; OK when none is.
  Status refuse_during_snapshot(std::string_view direction) const;

  // Calls the options' fault hook at a named protocol point.
  void fault(std::string_view point) const;
  Deadline peer_deadline() const { return Clock::now() + options.peer_timeout; }

  // Runs f() on the data pool and resumes the caller with its result.
  template <typename F>
  auto offload(F f) -> asio::awaitable<decltype(f())> {
    return kvmig::offload(data_pool, std::move(f));
  }

  // Runs the pager bookkeeping f() and resumes the caller with its result:
  // on this (the io) thread when the pager's bookkeeping never waits and
  // the caller says the rest of f() does not either (`quick`: any
  // transport call in it opens at once, at most kQuickPageBytes of page
  // bytes checksummed), saving the data pool's trip; otherwise there.
  template <typename F>
  auto bookkeeping(F f, bool quick = true) -> asio::awaitable<decltype(f())> {
    if (quick && pager_never_waits) co_return f();
    co_return co_await offload(std::move(f));
  }
  // Page bytes a bookkeeping trip may checksum on the io thread: tens of
  // microseconds of xxh3, less than the trip it saves.
  static constexpr uint64_t kQuickPageBytes = 256 << 10;

  CachePager& pager;
  const AgentOptions options;
  WireLimits limits;
  std::shared_ptr<spdlog::logger> log;
  std::optional<PagerLayout> layout;
  // Each layout region's span, in layout order: the regions a target offers.
  // Registered with every transport, merged where they interleave.
  std::vector<std::span<std::byte>> pager_regions;
  // Where the pages live, for reports: memory_kinds_name(layout).
  std::string memory = "host";
  // A layout whose regions are all host memory: this side may copy pages
  // through it itself (small stop-and-copy moves go inline, PAGES).
  bool host_layout = false;
  // The pager's bookkeeping_never_waits(), read once by init().
  bool pager_never_waits = false;

  // Declared before io and data_pool: destroyed after them, so coroutine
  // frames and pool work never outlive what they use.
  std::map<std::string, std::unique_ptr<Transport>, std::less<>> transports;
  // Transports the options name that cannot reach the pager's device
  // memory, with the reason (migrations over them are refused with it).
  std::map<std::string, Status, std::less<>> unusable;
  OutcomeRecords dst_records;  // io thread
  // Drawn when the agent is made: which agent answers (OFFER, OUTCOME_RESP),
  // so a source tells this one from another at the same address.
  const uint64_t incarnation = random_token();
  InDoubtSet in_doubt;  // io thread
  // Source runs under way, from the request's checks to the end (at most
  // options.max_migrations), and the requests they move, with the id of
  // the migration moving each (io thread).
  uint32_t source_runs = 0;
  std::map<SeqId, std::string> moving;
  SourceOutcomes src_outcomes;  // io thread
  // The snapshot under way here, "save to PATH" or "load from PATH"; empty
  // when none (io thread). Set by the agent around a capture or restore:
  // while it is, migrations from and into this agent are refused (a
  // snapshot is one point in time), and in-doubt migrations wait to settle.
  std::string snapshot;
  // When each request that arrived by migration was installed (io thread):
  // status reports it, so a rebalancer leaves requests that just moved
  // alone. Entries of requests no longer here are dropped by status; at
  // most kMaxArrivals are kept (the oldest go first).
  static constexpr size_t kMaxArrivals = 1u << 16;
  std::unordered_map<SeqId, Clock::time_point> arrivals;
  // Migrations under way, by id and role (io thread).
  std::map<std::pair<std::string, bool>, ActiveMigration*> active;
  // Waits (on the io thread) until the source migration `id` is no longer
  // in `active`, or until `deadline`; true if it ended.
  asio::awaitable<bool> wait_source_end(const std::string& id,
                                        Deadline deadline);
  // Wakes the waiters of wait_source_end(id) (io thread).
  void source_ended(const std::string& id);
  // False once the pager has answered hold_seqs() with Unimplemented: a
  // stop-and-copy then no longer tries to hold while it connects.
  std::atomic<bool> pager_holds_seqs{true};
  std::atomic<bool> stopping{false};
  asio::io_context io{1};
  // Control connections kept for the next migration to the same
  // destination (io thread). Declared after io: closed before it goes.
  KeptChannels kept_channels;
  // Work a run leaves for after its caller has the reply (a committed
  // run's DONE_ACK): the caller's wake-up and this work overlap. Whoever
  // replies (the in-process calls, serve_migrate) runs it right after, on
  // the same turn of the io thread, so a next call finds it done.
  std::deque<asio::awaitable<void>> after_reply;
  asio::awaitable<void> run_after_reply();
  // wait_source_end's timers, by migration id (io thread). Declared after
  // io: destroyed before it.
  std::multimap<std::string, std::shared_ptr<asio::steady_timer>> end_waiters;
  // Declared last: destroyed (stopped and joined) first.
  asio::thread_pool data_pool{2};
};

// Lists an ActiveMigration in ctx.active for its own lifetime (io thread).
class ActiveListing {
 public:
  ActiveListing(MigrationContext& ctx, ActiveMigration& m)
      : ctx_(ctx), key_(m.id, m.source) {
    ctx_.active[key_] = &m;
  }
  ~ActiveListing() { ctx_.active.erase(key_); }
  ActiveListing(const ActiveListing&) = delete;
  ActiveListing& operator=(const ActiveListing&) = delete;

 private:
  MigrationContext& ctx_;
  const std::pair<std::string, bool> key_;
};

}  // namespace kvmig

#endif  // KVMIG_SRC_MIGRATION_CONTEXT_H_
