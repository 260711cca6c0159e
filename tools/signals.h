// Running an agent until SIGINT or SIGTERM, for the command-line tools.
#ifndef KVMIG_TOOLS_SIGNALS_H_
#define KVMIG_TOOLS_SIGNALS_H_

#include <chrono>

#include "kvmig/agent.h"
#include "kvmig/status.h"

namespace kvmig {

// Blocks SIGINT and SIGTERM in the calling thread; threads started later
// inherit the block, so only run_until_signal() sees them. Call before
// creating an Agent (which starts threads).
void block_stop_signals();

// Serves `agent` on the calling thread until SIGINT or SIGTERM arrives (then
// stops it cleanly) or something else calls agent.stop().
Status run_until_signal(Agent& agent);
// After block_stop_signals(): waits up to `timeout` for SIGINT or SIGTERM;
// true when one arrived.
bool wait_for_stop_signal(std::chrono::milliseconds timeout);

}  // namespace kvmig

#endif  // KVMIG_TOOLS_SIGNALS_H_
