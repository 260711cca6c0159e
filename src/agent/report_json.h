// The JSON forms of what agents report: the fields of `kvmig status --json`
// and `kvmig migrate --json`, which scripts and the Python binding
// (agent.status(), agent.migrate()) depend on. A contract: add fields, never
// rename or drop one.
#ifndef KVMIG_AGENT_REPORT_JSON_H_
#define KVMIG_AGENT_REPORT_JSON_H_

#include <nlohmann/json.hpp>
#include <string>

#include "kvmig/agent.h"
#include "kvmig/status.h"
#include "kvmig/types.h"

namespace kvmig {

// {page_size_tokens, n_layers, n_heads, head_dim, dtype, page_bytes}.
nlohmann::ordered_json meta_json(const CacheMeta& meta);
// {meta, capacity_pages, free_pages, seqs: [{id, tokens, pages, digest}],
//  transports, in_doubt: [{migration_id, seqs, to, hold}]}.
nlohmann::ordered_json status_json(const AgentStatus& status);
// {ok: true, migration_id, seqs, pages, bytes, writes, seconds, gbps,
//  pause_ms, rounds, round_pages, transport, staged, left_behind[, digests]}.
nlohmann::ordered_json migration_json(const MigrationReport& report);
// {ok: true, migration_id, outcome, detail}.
nlohmann::ordered_json cancel_json(const CancelReport& report);
// {ok: false, error}.
nlohmann::ordered_json error_json(const Status& status);

// The one-line text of a JSON value. Never throws: bytes that are not valid
// UTF-8 (from a flag echoed in an error, say) become U+FFFD.
std::string json_text(const nlohmann::ordered_json& j);

}  // namespace kvmig

#endif  // KVMIG_AGENT_REPORT_JSON_H_
