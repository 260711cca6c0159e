// The JSON forms of the cluster's reports, one definition for the CLI
// (`kvmig agents|drain|rebalance --json`) and the Python binding.
#ifndef KVMIG_SRC_CLUSTER_CLUSTER_JSON_H_
#define KVMIG_SRC_CLUSTER_CLUSTER_JSON_H_

#include <nlohmann/json.hpp>
#include <vector>

#include "kvmig/cluster.h"

namespace kvmig {

// One record: the fields of the etcd value, plus "load".
nlohmann::ordered_json agent_record_object(const AgentRecord& r);
// {"ok": true, "agents": [record, ...]}
nlohmann::ordered_json agents_json(const std::vector<AgentRecord>& agents);
// {"ok", "agent", "moved": [{"seq","to","migration_id"}],
//  "unplaced": [{"seq","error"}], "finished", "migrations", "plan_ms"}
nlohmann::ordered_json drain_json(const DrainReport& r);
// {"ok", "moves": [{"from","to","seqs","pages","migration_id","error",
//  "load_from","load_to"}], "skipped": [...]}; ok is false when a move
// failed.
nlohmann::ordered_json rebalance_json(const RebalanceReport& r);

}  // namespace kvmig

#endif  // KVMIG_SRC_CLUSTER_CLUSTER_JSON_H_
