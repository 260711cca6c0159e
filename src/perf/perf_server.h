// kvmig perf over the control protocol: the server's session handler and
// the client's session.
//
// Design. `kvmig perf --server` is an ordinary agent (over a one-page
// SyntheticPager that nothing migrates into) that also accepts perf
// sessions. A session is one control connection. The client sends
// PERF_SETUP (cache shape, pool layout, capacity, slot allocation order);
// the server builds an empty SyntheticPager of that shape and a second Agent
// over it (same listen host and transports, a free port) and answers
// PERF_READY with that agent's address. The client then runs real
// migrations into it from an in-process source agent (Agent::migrate, the
// code `kvmig migrate` runs), in copy mode so its pages stay put, and sends
// PERF_RESET between iterations: the target drops every request it holds,
// so its capacity never runs out. The target lives exactly as long as the
// session: a new PERF_SETUP replaces it, and when the connection closes (the
// client finished, or died) it is torn down. No perf state outlives a
// connection or lives in the agent itself.
#ifndef KVMIG_SRC_PERF_SERVER_H_
#define KVMIG_SRC_PERF_SERVER_H_

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "channel.h"
#include "context.h"
#include "kvmig/agent.h"
#include "perf_messages.h"
#include "session.h"

namespace kvmig {

// Largest pool a perf session may ask for, K and V included.
inline constexpr uint64_t kMaxPerfPoolBytes = 32ull << 30;
// The most page bytes `kvmig perf --inline-kib` may ask to send inline. A
// session's target agrees to any migration up to it: the client's flag
// decides (a server started with a smaller --inline-kib would silently send
// larger ones through the data path).
inline constexpr uint32_t kMaxPerfInlineBytes = 1u << 20;

// Makes agent serve perf sessions (kvmig perf --server, serve
// --allow-perf): connections whose first frame is PERF_SETUP. Call before
// the agent serves. Without it an agent refuses them.
void enable_perf_sessions(Agent& agent);

// Serves one perf session on channel, whose first frame (a PERF_SETUP) has
// been read; returns when the client closes the connection, sends something
// unexpected, or stays silent for longer than a migration could take (10
// minutes). Runs on ctx's io thread; blocking work goes to its data pool.
asio::awaitable<void> serve_perf_session(MigrationContext& ctx,
                                         FrameChannel& channel, Frame first);

// The client's end of a perf session. Blocking calls, each bounded by the
// timeout given at open(). Not thread-safe.
class PerfSession {
 public:
  // Connects to the perf server at "HOST:PORT" and asks for a target of
  // setup's shape. The server's refusal comes back as its Status.
  // `secret`: the server's shared secret, if it has one.
  static Result<std::unique_ptr<PerfSession>> open(
      std::string_view server, const PerfSetupMsg& setup,
      std::chrono::milliseconds timeout, const std::string& secret = "");
  ~PerfSession();
  PerfSession(const PerfSession&) = delete;
  PerfSession& operator=(const PerfSession&) = delete;

  // The target agent's control address: migrate there.
  const std::string& target() const { return target_; }
  // Free page slots on the target after the last setup or reset.
  uint32_t free_pages() const { return free_pages_; }

  // Drops every request the target holds. Unavailable (or DeadlineExceeded)
  // when the server went away.
  Status reset();

 private:
  PerfSession(std::string server, std::chrono::milliseconds timeout);
  // Sends one frame and waits for PERF_READY.
  Status exchange(MsgType type, std::vector<uint8_t> payload);

  const std::string server_;
  const std::chrono::milliseconds timeout_;
  std::string target_;
  uint32_t free_pages_ = 0;
  // Declared before channel_: the channel's socket must go first.
  asio::io_context io_;
  std::unique_ptr<FrameChannel> channel_;
};

}  // namespace kvmig

#endif  // KVMIG_SRC_PERF_SERVER_H_
