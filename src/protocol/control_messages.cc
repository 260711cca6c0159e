#include "control_messages.h"

#include <iterator>
#include <string>

#include "ids.h"

namespace kvmig {
namespace {

// CancelReport::outcome on the wire.
constexpr const char* kCancelOutcomes[] = {"cancelled", "aborted", "committed",
                                           "in_doubt"};

}  // namespace

std::vector<uint8_t> encode(const SettleReqMsg& m) {
  ByteWriter w;
  w.put_string(m.migration_id);
  w.put(static_cast<uint8_t>(m.committed));
  return w.take();
}

Result<SettleReqMsg> decode_settle_req(std::span<const uint8_t> p,
                                       const WireLimits& l) {
  return decode_all<SettleReqMsg>(
      p, "SETTLE_REQ", [&](ByteReader& r) -> Result<SettleReqMsg> {
        SettleReqMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.migration_id,
                               r.get_string(l.max_string, "migration id"));
        KVMIG_RETURN_IF_ERROR(check_migration_id(m.migration_id));
        KVMIG_ASSIGN_OR_RETURN(uint8_t committed, r.get<uint8_t>("outcome"));
        if (committed > 1) return Status::data_loss("outcome out of range");
        m.committed = committed != 0;
        return m;
      });
}

std::vector<uint8_t> encode(const CancelReqMsg& m) {
  ByteWriter w;
  w.put_string(m.migration_id);
  return w.take();
}

Result<CancelReqMsg> decode_cancel_req(std::span<const uint8_t> p,
                                       const WireLimits& l) {
  return decode_all<CancelReqMsg>(
      p, "CANCEL_REQ", [&](ByteReader& r) -> Result<CancelReqMsg> {
        CancelReqMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.migration_id,
                               r.get_string(l.max_string, "migration id"));
        KVMIG_RETURN_IF_ERROR(check_migration_id(m.migration_id));
        return m;
      });
}

std::vector<uint8_t> encode(const CancelReport& m) {
  ByteWriter w;
  w.put_string(m.migration_id);
  uint8_t code = 0;
  for (uint8_t k = 0; k < std::size(kCancelOutcomes); ++k) {
    if (m.outcome == kCancelOutcomes[k]) code = k;
  }
  w.put(code);
  w.put_string(m.detail);
  return w.take();
}

Result<CancelReport> decode_cancel_report(std::span<const uint8_t> p,
                                          const WireLimits& l) {
  return decode_all<CancelReport>(
      p, "CANCEL_RESP", [&](ByteReader& r) -> Result<CancelReport> {
        CancelReport m;
        KVMIG_ASSIGN_OR_RETURN(m.migration_id,
                               r.get_string(l.max_string, "migration id"));
        KVMIG_ASSIGN_OR_RETURN(uint8_t code, r.get<uint8_t>("outcome"));
        if (code >= std::size(kCancelOutcomes)) {
          return Status::data_loss("cancel outcome " + std::to_string(code) +
                                   " out of range");
        }
        m.outcome = kCancelOutcomes[code];
        KVMIG_ASSIGN_OR_RETURN(m.detail,
                               r.get_string(l.max_string * 16, "detail"));
        return m;
      });
}

std::vector<uint8_t> encode(const SnapshotReqMsg& m) {
  ByteWriter w;
  w.put(static_cast<uint8_t>(m.load));
  w.put_string(m.path);
  return w.take();
}

Result<SnapshotReqMsg> decode_snapshot_req(std::span<const uint8_t> p,
                                           const WireLimits& l) {
  return decode_all<SnapshotReqMsg>(
      p, "SNAPSHOT_REQ", [&](ByteReader& r) -> Result<SnapshotReqMsg> {
        SnapshotReqMsg m;
        KVMIG_ASSIGN_OR_RETURN(uint8_t load, r.get<uint8_t>("snapshot op"));
        if (load > 1) return Status::data_loss("snapshot op out of range");
        m.load = load != 0;
        KVMIG_ASSIGN_OR_RETURN(m.path, r.get_string(l.max_string, "path"));
        if (m.path.empty()) return Status::data_loss("empty snapshot path");
        return m;
      });
}

std::vector<uint8_t> encode(const SnapshotReport& m) {
  if (!m.summarized) return {};
  ByteWriter w;
  w.put_string(m.path);
  w.put(m.requests);
  w.put(m.pages);
  w.put(m.bytes);
  return w.take();
}

Result<SnapshotReport> decode_snapshot_resp(std::span<const uint8_t> p,
                                            const WireLimits& l) {
  if (p.empty()) {
    SnapshotReport older;
    older.summarized = false;
    return older;
  }
  return decode_all<SnapshotReport>(
      p, "SNAPSHOT_RESP", [&](ByteReader& r) -> Result<SnapshotReport> {
        SnapshotReport m;
        KVMIG_ASSIGN_OR_RETURN(m.path, r.get_string(l.max_string, "path"));
        KVMIG_ASSIGN_OR_RETURN(m.requests, r.get<uint64_t>("requests"));
        KVMIG_ASSIGN_OR_RETURN(m.pages, r.get<uint64_t>("pages"));
        KVMIG_ASSIGN_OR_RETURN(m.bytes, r.get<uint64_t>("bytes"));
        if (m.path.empty() || m.path.front() != '/') {
          return Status::data_loss("snapshot path not absolute");
        }
        // Every stored page belongs to a request, and each takes more than
        // a byte of the file.
        if ((m.requests == 0 && m.pages != 0) || m.pages >= m.bytes) {
          return Status::data_loss("snapshot counts inconsistent");
        }
        return m;
      });
}

std::vector<uint8_t> encode(const MigrateRequest& m) {
  ByteWriter w;
  w.put_string(m.to);
  put_ids(w, m.seqs);
  w.put(static_cast<uint8_t>(m.all));
  w.put(static_cast<uint8_t>(m.mode));
  w.put(static_cast<uint8_t>(m.live));
  w.put_string(m.transport);
  w.put(static_cast<uint8_t>(m.verify));
  w.put(static_cast<uint8_t>(m.record_digests));
  w.put(m.live_max_rounds);
  w.put(m.live_converge_pages);
  w.put(static_cast<uint8_t>(m.live_abort_if_not_converged));
  w.put_string(m.migration_id);
  w.put(static_cast<uint64_t>(m.timeout.count()));
  return w.take();
}

Result<MigrateRequest> decode_migrate_request(std::span<const uint8_t> p,
                                              const WireLimits& l) {
  return decode_all<MigrateRequest>(
      p, "MIGRATE_REQ", [&](ByteReader& r) -> Result<MigrateRequest> {
        MigrateRequest m;
        KVMIG_ASSIGN_OR_RETURN(m.to, r.get_string(l.max_string, "to"));
        KVMIG_ASSIGN_OR_RETURN(m.seqs, get_ids(r, l));
        KVMIG_ASSIGN_OR_RETURN(uint8_t all, r.get<uint8_t>("all"));
        KVMIG_ASSIGN_OR_RETURN(uint8_t mode, r.get<uint8_t>("mode"));
        KVMIG_ASSIGN_OR_RETURN(uint8_t live, r.get<uint8_t>("live"));
        KVMIG_ASSIGN_OR_RETURN(m.transport, r.get_string(64, "transport"));
        KVMIG_ASSIGN_OR_RETURN(uint8_t verify, r.get<uint8_t>("verify"));
        KVMIG_ASSIGN_OR_RETURN(uint8_t digests, r.get<uint8_t>("digests"));
        KVMIG_ASSIGN_OR_RETURN(m.live_max_rounds,
                               r.get<uint32_t>("max rounds"));
        KVMIG_ASSIGN_OR_RETURN(m.live_converge_pages,
                               r.get<uint32_t>("converge pages"));
        KVMIG_ASSIGN_OR_RETURN(uint8_t abort_nc, r.get<uint8_t>("abort flag"));
        KVMIG_ASSIGN_OR_RETURN(m.migration_id,
                               r.get_string(kMaxMigrationIdBytes, "id"));
        if (!m.migration_id.empty()) {
          KVMIG_RETURN_IF_ERROR(check_migration_id(m.migration_id));
        }
        KVMIG_ASSIGN_OR_RETURN(uint64_t timeout_ms, r.get<uint64_t>("timeout"));
        if (timeout_ms > uint64_t{1} << 40) {
          return Status::data_loss("timeout out of range");
        }
        m.timeout = std::chrono::milliseconds(timeout_ms);
        if (all > 1 || mode > 1 || live > 1 || verify > 1 || digests > 1 ||
            abort_nc > 1) {
          return Status::data_loss("flag out of range");
        }
        m.record_digests = digests;
        m.live_abort_if_not_converged = abort_nc;
        m.all = all;
        m.mode = static_cast<MigrationMode>(mode);
        m.live = live;
        m.verify = verify;
        return m;
      });
}

std::vector<uint8_t> encode(const MigrationReport& m) {
  ByteWriter w;
  w.put_string(m.migration_id);
  put_ids(w, m.seqs);
  w.put(m.pages);
  w.put(m.bytes);
  w.put(m.writes);
  put_double(w, m.seconds);
  put_double(w, m.gbps);
  put_double(w, m.pause_ms);
  w.put(m.rounds);
  w.put(static_cast<uint32_t>(m.round_pages.size()));
  for (uint64_t n : m.round_pages) w.put(n);
  w.put_string(m.transport);
  w.put(static_cast<uint8_t>((m.staged ? 1 : 0) | (m.inline_pages ? 2 : 0) |
                             (m.kept_connection ? 4 : 0) |
                             (m.one_exchange ? 8 : 0)));
  put_ids(w, m.left_behind);
  w.put(static_cast<uint32_t>(m.digests.size()));
  for (const auto& [id, hex] : m.digests) {
    w.put(id);
    w.put_string(hex);
  }
  w.put_string(m.hold);
  w.put(static_cast<uint32_t>(m.phases_ms.size()));
  for (const auto& [name, ms] : m.phases_ms) {
    w.put_string(name);
    put_double(w, ms);
  }
  w.put_string(m.src_memory);
  w.put_string(m.dst_memory);
  return w.take();
}

Result<MigrationReport> decode_migration_report(std::span<const uint8_t> p,
                                                const WireLimits& l) {
  return decode_all<MigrationReport>(
      p, "MIGRATE_RESP", [&](ByteReader& r) -> Result<MigrationReport> {
        MigrationReport m;
        KVMIG_ASSIGN_OR_RETURN(m.migration_id,
                               r.get_string(l.max_string, "migration id"));
        KVMIG_ASSIGN_OR_RETURN(m.seqs, get_ids(r, l));
        KVMIG_ASSIGN_OR_RETURN(m.pages, r.get<uint64_t>("pages"));
        KVMIG_ASSIGN_OR_RETURN(m.bytes, r.get<uint64_t>("bytes"));
        KVMIG_ASSIGN_OR_RETURN(m.writes, r.get<uint64_t>("writes"));
        KVMIG_ASSIGN_OR_RETURN(m.seconds, get_double(r, "seconds"));
        KVMIG_ASSIGN_OR_RETURN(m.gbps, get_double(r, "gbps"));
        KVMIG_ASSIGN_OR_RETURN(m.pause_ms, get_double(r, "pause_ms"));
        KVMIG_ASSIGN_OR_RETURN(m.rounds, r.get<uint32_t>("rounds"));
        KVMIG_ASSIGN_OR_RETURN(uint32_t nr,
                               get_count(r, 1u << 16, 8, "round count"));
        m.round_pages.resize(nr);
        for (uint64_t& n : m.round_pages) {
          KVMIG_ASSIGN_OR_RETURN(n, r.get<uint64_t>("round pages"));
        }
        KVMIG_ASSIGN_OR_RETURN(m.transport, r.get_string(64, "transport"));
        KVMIG_ASSIGN_OR_RETURN(uint8_t how, r.get<uint8_t>("data path flags"));
        if (how > 15) return Status::data_loss("unknown data path flags");
        m.staged = how & 1;
        m.inline_pages = how & 2;
        m.kept_connection = how & 4;
        m.one_exchange = how & 8;
        KVMIG_ASSIGN_OR_RETURN(m.left_behind, get_ids(r, l));
        KVMIG_ASSIGN_OR_RETURN(uint32_t nd,
                               get_count(r, l.max_seqs, 12, "digest count"));
        m.digests.resize(nd);
        for (auto& [id, hex] : m.digests) {
          KVMIG_ASSIGN_OR_RETURN(id, r.get<uint64_t>("digest id"));
          KVMIG_ASSIGN_OR_RETURN(hex, r.get_string(64, "digest"));
        }
        KVMIG_ASSIGN_OR_RETURN(m.hold, r.get_string(16, "hold"));
        KVMIG_ASSIGN_OR_RETURN(uint32_t np,
                               get_count(r, 64, 12, "phase count"));
        m.phases_ms.resize(np);
        for (auto& [name, ms] : m.phases_ms) {
          KVMIG_ASSIGN_OR_RETURN(name, r.get_string(16, "phase"));
          KVMIG_ASSIGN_OR_RETURN(ms, get_double(r, "phase ms"));
        }
        KVMIG_ASSIGN_OR_RETURN(m.src_memory, r.get_string(16, "memory"));
        KVMIG_ASSIGN_OR_RETURN(m.dst_memory, r.get_string(16, "memory"));
        return m;
      });
}

std::vector<uint8_t> encode(const AgentStatus& m) {
  ByteWriter w;
  put_meta(w, m.meta);
  w.put(m.capacity_pages);
  w.put(m.free_pages);
  w.put(static_cast<uint32_t>(m.seqs.size()));
  for (const SeqStatus& s : m.seqs) {
    w.put(s.id);
    w.put(s.tokens);
    w.put(s.pages);
    w.put_string(s.digest);
    w.put(s.arrived_ms_ago);
  }
  w.put(static_cast<uint32_t>(m.transports.size()));
  for (const auto& t : m.transports) w.put_string(t);
  w.put_string(m.memory);
  w.put(static_cast<uint32_t>(m.in_doubt.size()));
  for (const auto& d : m.in_doubt) {
    w.put_string(d.migration_id);
    put_ids(w, d.seqs);
    w.put_string(d.to);
    w.put_string(d.hold);
  }
  w.put(static_cast<uint32_t>(m.shared_groups.size()));
  for (const auto& g : m.shared_groups) {
    put_ids(w, g.seqs);
    w.put(g.pages);
  }
  w.put(m.control_connections);
  w.put(m.kept_connections);
  w.put(static_cast<uint32_t>(m.migrations.size()));
  for (const auto& g : m.migrations) {
    w.put_string(g.migration_id);
    w.put_string(g.role);
    w.put_string(g.peer);
    w.put_string(g.phase);
    w.put(g.round);
    put_ids(w, g.seqs);
    w.put_string(g.transport);
    w.put(g.bytes);
    put_double(w, g.seconds);
  }
  return w.take();
}

Result<AgentStatus> decode_agent_status(std::span<const uint8_t> p,
                                        const WireLimits& l) {
  return decode_all<AgentStatus>(
      p, "STATUS_RESP", [&](ByteReader& r) -> Result<AgentStatus> {
        AgentStatus m;
        KVMIG_ASSIGN_OR_RETURN(m.meta, get_meta(r));
        KVMIG_ASSIGN_OR_RETURN(m.capacity_pages, r.get<uint64_t>("capacity"));
        KVMIG_ASSIGN_OR_RETURN(m.free_pages, r.get<uint64_t>("free pages"));
        KVMIG_ASSIGN_OR_RETURN(uint32_t n,
                               get_count(r, l.max_seqs, 32, "seq count"));
        m.seqs.resize(n);
        for (SeqStatus& s : m.seqs) {
          KVMIG_ASSIGN_OR_RETURN(s.id, r.get<uint64_t>("seq id"));
          KVMIG_ASSIGN_OR_RETURN(s.tokens, r.get<uint64_t>("seq tokens"));
          KVMIG_ASSIGN_OR_RETURN(s.pages, r.get<uint32_t>("seq pages"));
          KVMIG_ASSIGN_OR_RETURN(s.digest, r.get_string(64, "seq digest"));
          KVMIG_ASSIGN_OR_RETURN(s.arrived_ms_ago,
                                 r.get<int64_t>("seq arrival"));
        }
        KVMIG_ASSIGN_OR_RETURN(uint32_t nt,
                               get_count(r, 8, 4, "transport count"));
        m.transports.resize(nt);
        for (auto& t : m.transports) {
          KVMIG_ASSIGN_OR_RETURN(t, r.get_string(64, "transport"));
        }
        KVMIG_ASSIGN_OR_RETURN(m.memory, r.get_string(16, "memory"));
        KVMIG_ASSIGN_OR_RETURN(uint32_t nd,
                               get_count(r, l.max_seqs, 8, "in-doubt count"));
        m.in_doubt.resize(nd);
        for (auto& d : m.in_doubt) {
          KVMIG_ASSIGN_OR_RETURN(d.migration_id,
                                 r.get_string(l.max_string, "migration id"));
          KVMIG_ASSIGN_OR_RETURN(d.seqs, get_ids(r, l));
          KVMIG_ASSIGN_OR_RETURN(d.to, r.get_string(l.max_string, "peer"));
          KVMIG_ASSIGN_OR_RETURN(d.hold, r.get_string(16, "hold"));
        }
        KVMIG_ASSIGN_OR_RETURN(
            uint32_t ng, get_count(r, l.max_seqs, 12, "shared group count"));
        m.shared_groups.resize(ng);
        for (auto& g : m.shared_groups) {
          KVMIG_ASSIGN_OR_RETURN(g.seqs, get_ids(r, l));
          KVMIG_ASSIGN_OR_RETURN(g.pages, r.get<uint64_t>("group pages"));
        }
        KVMIG_ASSIGN_OR_RETURN(m.control_connections,
                               r.get<uint32_t>("control connections"));
        KVMIG_ASSIGN_OR_RETURN(m.kept_connections,
                               r.get<uint32_t>("kept connections"));
        KVMIG_ASSIGN_OR_RETURN(uint32_t nm,
                               get_count(r, 1u << 16, 40, "migration count"));
        m.migrations.resize(nm);
        for (auto& g : m.migrations) {
          KVMIG_ASSIGN_OR_RETURN(g.migration_id,
                                 r.get_string(l.max_string, "migration id"));
          KVMIG_ASSIGN_OR_RETURN(g.role, r.get_string(16, "role"));
          KVMIG_ASSIGN_OR_RETURN(g.peer, r.get_string(l.max_string, "peer"));
          KVMIG_ASSIGN_OR_RETURN(g.phase, r.get_string(16, "phase"));
          KVMIG_ASSIGN_OR_RETURN(g.round, r.get<uint32_t>("round"));
          KVMIG_ASSIGN_OR_RETURN(g.seqs, get_ids(r, l));
          KVMIG_ASSIGN_OR_RETURN(g.transport, r.get_string(16, "transport"));
          KVMIG_ASSIGN_OR_RETURN(g.bytes, r.get<uint64_t>("bytes"));
          KVMIG_ASSIGN_OR_RETURN(g.seconds, get_double(r, "seconds"));
        }
        return m;
      });
}
}  // namespace kvmig
