// The cluster's etcd keys, and what an agent name may be.
//
//   PREFIX/agents/NAME   an AgentRecord (JSON), on the agent's lease
//   PREFIX/locks/NAME    a scheduler's lock on agent NAME, on its lease
#ifndef KVMIG_SRC_CLUSTER_CLUSTER_KEYS_H_
#define KVMIG_SRC_CLUSTER_CLUSTER_KEYS_H_

#include <string>

#include "kvmig/status.h"

namespace kvmig {

// InvalidArgument unless name is 1 to 128 of [A-Za-z0-9._-].
Status check_agent_name(const std::string& name);

std::string agents_prefix(const std::string& prefix);  // "PREFIX/agents/"
std::string agent_key(const std::string& prefix, const std::string& name);
std::string lock_key(const std::string& prefix, const std::string& name);

}  // namespace kvmig

#endif  // KVMIG_SRC_CLUSTER_CLUSTER_KEYS_H_
