// Agent internals shared by agent.cc (lifecycle), connection.cc (accept,
// authentication, dispatch) and status.cc.
//
// Threading: the migration context's io thread runs the control plane (every
// coroutine, and every member marked "io thread"); see context.h.
#ifndef KVMIG_SRC_AGENT_AGENT_IMPL_H_
#define KVMIG_SRC_AGENT_AGENT_IMPL_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "asio.h"
#include "channel.h"
#include "context.h"
#include "kvmig/agent.h"
#include "session.h"

namespace kvmig {

struct Agent::Impl {
  Impl(CachePager& pager, AgentOptions options)
      : ctx(pager, std::move(options)) {}
  ~Impl();

  // connection.cc
  asio::awaitable<void> accept_loop();
  asio::awaitable<void> serve_connection(asio::ip::tcp::socket socket);
  // A committed migration's connection, kept: waits (listed in
  // idle_channels) for the source's next frame, at most
  // AgentOptions::kept_connection_idle; nothing when it ends instead.
  asio::awaitable<std::optional<Frame>> await_kept(FrameChannel& channel);
  // status.cc
  // digests: read every request's pages (engine paused) for its digest.
  asio::awaitable<Result<AgentStatus>> compute_status(bool digests = true);
  // agent.cc. Io thread: stops accepting, cancels every migration that has
  // not reached its decision point (they roll back: slots released, the
  // engine resumed), lets the rest end as decided, closes the other
  // connections, then stops the io_context; at most two peer timeouts.
  void begin_stop();
  asio::awaitable<void> drain(Deadline until);

  // Declared first: destroyed last, after everything that uses it.
  MigrationContext ctx;
  asio::ip::tcp::acceptor acceptor{ctx.io};
  std::thread serve_thread;
  // Handlers for first frames the agent does not serve itself (perf), set
  // before serving: read-only afterwards.
  std::map<MsgType, SessionHandler> session_handlers;
  uint32_t open_connections = 0;  // io thread
  // Every served connection's channel, to cut off at stop (io thread).
  std::set<FrameChannel*> channels;
  // Of those, the ones kept open after a committed migration and waiting
  // for their source's next HELLO, oldest first: closed first when
  // max_connections is reached (io thread).
  std::deque<FrameChannel*> idle_channels;
  bool stop_begun = false;  // io thread
  // From start() (or run()) until run() returns.
  std::atomic<bool> serving{false};

  // In-process calls (migrate, status) waiting for the io thread: each
  // registers how to abort it, and run() aborts what is left when it
  // returns (a stopped io thread never finishes them). Thread-safe.
  // False when the agent already stopped: the caller aborts at once.
  bool add_pending(uint64_t& key, std::function<void()> abort);
  void remove_pending(uint64_t key);
  void abort_pending();  // and refuse new ones
  std::mutex pending_mu;
  std::map<uint64_t, std::function<void()>> pending;  // pending_mu
  uint64_t next_pending = 0;                          // pending_mu
  bool pending_closed = false;                        // pending_mu
};

// Reaches an Agent's internals (Agent befriends it).
struct AgentInternals {
  using Impl = Agent::Impl;
  static Impl& impl(Agent& agent) { return *agent.impl_; }
};
using AgentImpl = AgentInternals::Impl;

}  // namespace kvmig

#endif  // KVMIG_SRC_AGENT_AGENT_IMPL_H_
