// Session handlers: how a layer above the agent (kvmig perf) serves
// connections of its own on an agent's port, without the agent knowing it.
#ifndef KVMIG_SRC_AGENT_SESSION_H_
#define KVMIG_SRC_AGENT_SESSION_H_

#include <functional>

#include "asio.h"
#include "channel.h"
#include "context.h"
#include "kvmig/agent.h"

namespace kvmig {

// Serves one connection whose first frame (already read and, with a
// secret, after authentication) is `first`; runs on ctx's io thread.
using SessionHandler = std::function<asio::awaitable<void>(
    MigrationContext& ctx, FrameChannel& channel, Frame first)>;

// Serves connections whose first frame has type `type` with handler.
// Call before the agent serves (run() or start()); not thread-safe.
void add_session_handler(Agent& agent, MsgType type, SessionHandler handler);

}  // namespace kvmig

#endif  // KVMIG_SRC_AGENT_SESSION_H_
