// Agent internals shared by agent.cc (serving, status, outcomes),
// source.cc (the source state machine) and destination.cc (the destination
// state machine).
//
// Threading: one io_context thread runs the control plane (every coroutine
// and every member below marked "io thread"); blocking data-plane work (the
// transport's writes and flushes, page copies, checksums) is offloaded to
// data_pool and its result handed back to the awaiting coroutine.
#ifndef KVMIG_SRC_AGENT_IMPL_H_
#define KVMIG_SRC_AGENT_IMPL_H_

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "asio.h"
#include "channel.h"
#include "kvmig/agent.h"
#include "log.h"
#include "messages.h"

namespace kvmig {

struct Agent::Impl {
  Impl(CachePager& pager, AgentOptions options);
  ~Impl();

  // --- agent.cc
  asio::awaitable<void> accept_loop();
  asio::awaitable<void> serve_connection(asio::ip::tcp::socket socket);
  asio::awaitable<Result<AgentStatus>> compute_status();
  OutcomeRespMsg answer_outcome_query(const std::string& migration_id);
  void remember_outcome(const std::string& migration_id, Outcome outcome);
  // The transport called name, or a clear error if this agent lacks it.
  Result<Transport*> transport_named(std::string_view name);
  void fault(std::string_view point) const;
  Deadline peer_deadline() const { return Clock::now() + options.peer_timeout; }

  // Runs f() on the data pool and resumes the caller with its result.
  template <typename F>
  auto offload(F f) -> asio::awaitable<decltype(f())> {
    using R = decltype(f());
    // co_spawn needs a default-constructible result: carry it in optional.
    std::optional<R> out = co_await asio::co_spawn(
        data_pool,
        [f = std::move(f)]() mutable -> asio::awaitable<std::optional<R>> {
          co_return std::optional<R>(f());
        },
        asio::use_awaitable);
    co_return std::move(*out);
  }

  // --- source.cc
  asio::awaitable<Result<MigrationReport>> run_source(MigrateRequest request);
  // Asks the destination `to` once for the outcome of migration_id, by
  // `deadline`. kCommitted, kAborted (the destination rolled back, or holds
  // nothing of it), or kUnknown when it does not answer.
  asio::awaitable<Outcome> ask_outcome(const std::string& to,
                                       const std::string& migration_id,
                                       Deadline deadline);
  // After COMMIT went out and DONE did not come back: ask the destination
  // until peer_timeout. kCommitted, kAborted, or kUnknown when unreachable.
  asio::awaitable<Outcome> resolve_outcome(const std::string& to,
                                           const std::string& migration_id);
  // Records `entry` as in doubt (its requests already held as entry.hold
  // says) and starts asking its destination in the background.
  void enter_in_doubt(AgentStatus::InDoubt entry);
  // Asks the destination of in-doubt migration_id with backoff until it
  // answers, then settles it.
  asio::awaitable<void> settle_in_doubt(std::string migration_id);
  // Applies a learned outcome to an in-doubt migration: drops its requests
  // (a committed move) or lets them run again, and forgets the entry.
  void settle(const std::string& migration_id, Outcome outcome);

  // --- destination.cc
  asio::awaitable<void> run_destination(FrameChannel& channel, HelloMsg hello);

  CachePager& pager;
  const AgentOptions options;
  WireLimits limits;
  std::shared_ptr<spdlog::logger> log;
  std::optional<PagerLayout> layout;
  std::vector<std::span<std::byte>> pager_regions;  // registered everywhere

  // Declared before io and data_pool: destroyed after them, so coroutine
  // frames and pool work never outlive the transports they use.
  std::map<std::string, std::unique_ptr<Transport>, std::less<>> transports;
  asio::io_context io{1};
  asio::ip::tcp::acceptor acceptor{io};
  std::thread serve_thread;
  std::atomic<bool> stopping{false};

  // io thread only.
  uint32_t open_connections = 0;
  bool source_busy = false;
  struct DstRecord {
    Outcome outcome = Outcome::kPending;
    bool committing = false;  // COMMIT accepted, install under way
    bool fenced = false;      // an outcome query decided "aborted" first
  };
  std::map<std::string, DstRecord> dst_records;
  std::deque<std::string> dst_record_order;  // oldest first, bounded
  // Migrations in doubt; entries with hold "engine" own one pager pause.
  std::vector<AgentStatus::InDoubt> in_doubt;

  // Declared last: destroyed (stopped and joined) first.
  asio::thread_pool data_pool{2};
};

// A fresh random migration id: 32 hex digits.
std::string new_migration_id();

}  // namespace kvmig

#endif  // KVMIG_SRC_AGENT_IMPL_H_
