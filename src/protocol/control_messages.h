// Scheduler messages: MIGRATE_REQ/RESP, CANCEL_REQ/RESP, SETTLE_REQ,
// STATUS_RESP and SNAPSHOT_REQ/RESP, the
// public request and report types on the wire. Decoders validate like the
// migration codecs (messages.h). Stateless; thread-safe.
#ifndef KVMIG_SRC_PROTOCOL_CONTROL_MESSAGES_H_
#define KVMIG_SRC_PROTOCOL_CONTROL_MESSAGES_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "codec.h"
#include "kvmig/agent.h"
#include "kvmig/status.h"

namespace kvmig {

// Asks an agent to capture its pager to, or restore it from, a file on the
// agent's host.
struct SnapshotReqMsg {
  bool load = false;
  std::string path;
};

// Asks a source agent to cancel a migration (CancelReport answers).
struct CancelReqMsg {
  std::string migration_id;
};

// Decides an in-doubt migration at its source (Agent::settle).
struct SettleReqMsg {
  std::string migration_id;
  bool committed = false;
};

std::vector<uint8_t> encode(const SnapshotReqMsg& m);
std::vector<uint8_t> encode(const SettleReqMsg& m);
std::vector<uint8_t> encode(const CancelReqMsg& m);
std::vector<uint8_t> encode(const CancelReport& m);
// SNAPSHOT_RESP is a SnapshotReport: string path | u64 requests | u64 pages |
// u64 bytes, or empty (an agent older than the summary; also what a report
// with summarized false encodes to).
std::vector<uint8_t> encode(const SnapshotReqMsg& m);
std::vector<uint8_t> encode(const SnapshotReport& m);
std::vector<uint8_t> encode(const MigrateRequest& m);
std::vector<uint8_t> encode(const MigrationReport& m);
std::vector<uint8_t> encode(const AgentStatus& m);
Result<SnapshotReqMsg> decode_snapshot_req(std::span<const uint8_t> p,
                                           const WireLimits& l);
Result<SettleReqMsg> decode_settle_req(std::span<const uint8_t> p,
                                       const WireLimits& l);
Result<CancelReqMsg> decode_cancel_req(std::span<const uint8_t> p,
                                       const WireLimits& l);
Result<CancelReport> decode_cancel_report(std::span<const uint8_t> p,
                                          const WireLimits& l);
Result<SnapshotReport> decode_snapshot_resp(std::span<const uint8_t> p,
                                            const WireLimits& l);
Result<MigrateRequest> decode_migrate_request(std::span<const uint8_t> p,
                                              const WireLimits& l);
Result<MigrationReport> decode_migration_report(std::span<const uint8_t> p,
                                                const WireLimits& l);
Result<AgentStatus> decode_agent_status(std::span<const uint8_t> p,
                                        const WireLimits& l);

}  // namespace kvmig

#endif  // KVMIG_SRC_PROTOCOL_CONTROL_MESSAGES_H_
