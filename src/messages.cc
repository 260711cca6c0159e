#include "messages.h"

#include <cstring>
#include <string>

#include "bytes.h"

namespace kvmig {
namespace {

// Reads a u32 count and checks it against a limit and against the bytes
// left, given the smallest encoding of one element.
Result<uint32_t> get_count(ByteReader& r, uint32_t limit, size_t min_elem,
                           std::string_view what) {
  KVMIG_ASSIGN_OR_RETURN(uint32_t n, r.get<uint32_t>(what));
  if (n > limit) {
    return Status::resource_exhausted(std::string(what) + ": " +
                                      std::to_string(n) + " exceeds limit " +
                                      std::to_string(limit));
  }
  if (min_elem > 0 && uint64_t{n} * min_elem > r.remaining()) {
    return Status::data_loss(std::string(what) + ": count " +
                             std::to_string(n) + " does not fit in " +
                             std::to_string(r.remaining()) + " bytes left");
  }
  return n;
}

void put_meta(ByteWriter& w, const CacheMeta& m) {
  w.put(m.page_size_tokens);
  w.put(m.n_layers);
  w.put(m.n_heads);
  w.put(m.head_dim);
  w.put(static_cast<uint8_t>(m.dtype));
}

Result<CacheMeta> get_meta(ByteReader& r) {
  CacheMeta m;
  KVMIG_ASSIGN_OR_RETURN(m.page_size_tokens, r.get<uint32_t>("meta tokens"));
  KVMIG_ASSIGN_OR_RETURN(m.n_layers, r.get<uint32_t>("meta layers"));
  KVMIG_ASSIGN_OR_RETURN(m.n_heads, r.get<uint32_t>("meta heads"));
  KVMIG_ASSIGN_OR_RETURN(m.head_dim, r.get<uint32_t>("meta head_dim"));
  KVMIG_ASSIGN_OR_RETURN(uint8_t dtype, r.get<uint8_t>("meta dtype"));
  m.dtype = static_cast<Dtype>(dtype);
  Status valid = m.validate();
  if (!valid.ok()) return Status::data_loss(valid.message());
  return m;
}

void put_seqs(ByteWriter& w, const std::vector<LogicalSeq>& seqs) {
  w.put(static_cast<uint32_t>(seqs.size()));
  for (const LogicalSeq& s : seqs) {
    w.put(s.seq_id);
    w.put(s.n_tokens);
    w.put(static_cast<uint32_t>(s.pages.size()));
    for (PageIndex p : s.pages) w.put(p);
  }
}

Result<std::vector<LogicalSeq>> get_seqs(ByteReader& r, const WireLimits& l) {
  KVMIG_ASSIGN_OR_RETURN(uint32_t n, get_count(r, l.max_seqs, 20, "seq count"));
  std::vector<LogicalSeq> seqs(n);
  for (LogicalSeq& s : seqs) {
    KVMIG_ASSIGN_OR_RETURN(s.seq_id, r.get<uint64_t>("seq id"));
    KVMIG_ASSIGN_OR_RETURN(s.n_tokens, r.get<uint64_t>("seq tokens"));
    KVMIG_ASSIGN_OR_RETURN(uint32_t np,
                           get_count(r, l.max_pages, 4, "seq page count"));
    s.pages.resize(np);
    for (PageIndex& p : s.pages) {
      KVMIG_ASSIGN_OR_RETURN(p, r.get<uint32_t>("seq page"));
    }
  }
  return seqs;
}

void put_ids(ByteWriter& w, const std::vector<SeqId>& ids) {
  w.put(static_cast<uint32_t>(ids.size()));
  for (SeqId id : ids) w.put(id);
}

Result<std::vector<SeqId>> get_ids(ByteReader& r, const WireLimits& l) {
  KVMIG_ASSIGN_OR_RETURN(uint32_t n, get_count(r, l.max_seqs, 8, "id count"));
  std::vector<SeqId> ids(n);
  for (SeqId& id : ids) {
    KVMIG_ASSIGN_OR_RETURN(id, r.get<uint64_t>("seq id"));
  }
  return ids;
}

void put_u32s(ByteWriter& w, const std::vector<uint32_t>& v) {
  w.put(static_cast<uint32_t>(v.size()));
  for (uint32_t x : v) w.put(x);
}

Result<std::vector<uint32_t>> get_u32s(ByteReader& r, uint32_t limit,
                                       std::string_view what) {
  KVMIG_ASSIGN_OR_RETURN(uint32_t n, get_count(r, limit, 4, what));
  std::vector<uint32_t> v(n);
  for (uint32_t& x : v) {
    KVMIG_ASSIGN_OR_RETURN(x, r.get<uint32_t>(what));
  }
  return v;
}

Result<std::vector<uint8_t>> get_blob_copy(ByteReader& r, uint32_t max,
                                           std::string_view what) {
  KVMIG_ASSIGN_OR_RETURN(auto b, r.get_blob(max, what));
  return std::vector<uint8_t>(b.begin(), b.end());
}

void put_double(ByteWriter& w, double d) {
  uint64_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  w.put(bits);
}

Result<double> get_double(ByteReader& r, std::string_view what) {
  KVMIG_ASSIGN_OR_RETURN(uint64_t bits, r.get<uint64_t>(what));
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}

void put_status(ByteWriter& w, const Status& s) {
  w.put(static_cast<uint8_t>(s.code()));
  w.put_string(s.message());
}

Result<ErrorMsg> get_status(ByteReader& r, const WireLimits& l) {
  KVMIG_ASSIGN_OR_RETURN(uint8_t code, r.get<uint8_t>("status code"));
  KVMIG_ASSIGN_OR_RETURN(std::string msg,
                         r.get_string(l.max_string * 16, "status message"));
  if (code == 0 || code > static_cast<uint8_t>(StatusCode::kUnauthenticated)) {
    return Status::data_loss("status code " + std::to_string(code) +
                             " out of range");
  }
  switch (static_cast<StatusCode>(code)) {
    case StatusCode::kInvalidArgument:
      return ErrorMsg{Status::invalid_argument(msg)};
    case StatusCode::kNotFound:
      return ErrorMsg{Status::not_found(msg)};
    case StatusCode::kAlreadyExists:
      return ErrorMsg{Status::already_exists(msg)};
    case StatusCode::kOutOfRange:
      return ErrorMsg{Status::out_of_range(msg)};
    case StatusCode::kResourceExhausted:
      return ErrorMsg{Status::resource_exhausted(msg)};
    case StatusCode::kFailedPrecondition:
      return ErrorMsg{Status::failed_precondition(msg)};
    case StatusCode::kDataLoss:
      return ErrorMsg{Status::data_loss(msg)};
    case StatusCode::kUnavailable:
      return ErrorMsg{Status::unavailable(msg)};
    case StatusCode::kDeadlineExceeded:
      return ErrorMsg{Status::deadline_exceeded(msg)};
    case StatusCode::kAborted:
      return ErrorMsg{Status::aborted(msg)};
    case StatusCode::kProtocol:
      return ErrorMsg{Status::protocol(msg)};
    case StatusCode::kUnimplemented:
      return ErrorMsg{Status::unimplemented(msg)};
    case StatusCode::kUnauthenticated:
      return ErrorMsg{Status::unauthenticated(msg)};
    default:
      return ErrorMsg{Status::internal(msg)};
  }
}

// Runs a decoder body over a reader and requires every byte consumed.
template <typename T, typename F>
Result<T> decode_all(std::span<const uint8_t> p, std::string_view what,
                     F&& body) {
  ByteReader r(p);
  Result<T> out = body(r);
  if (!out.ok()) return out.status().with_context(what);
  Status end = r.expect_end(what);
  if (!end.ok()) return end;
  return out;
}

}  // namespace

std::vector<uint8_t> encode(const PerfSetupMsg& m) {
  ByteWriter w;
  put_meta(w, m.meta);
  w.put(static_cast<uint8_t>(m.layout));
  w.put(m.capacity_pages);
  w.put(static_cast<uint8_t>(m.order));
  w.put(m.seed);
  return w.take();
}

Result<PerfSetupMsg> decode_perf_setup(std::span<const uint8_t> p,
                                       const WireLimits& l) {
  return decode_all<PerfSetupMsg>(
      p, "PERF_SETUP", [&](ByteReader& r) -> Result<PerfSetupMsg> {
        PerfSetupMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.meta, get_meta(r));
        KVMIG_ASSIGN_OR_RETURN(uint8_t layout, r.get<uint8_t>("perf layout"));
        if (layout > static_cast<uint8_t>(PoolLayout::kLayer)) {
          return Status::data_loss("perf layout out of range");
        }
        m.layout = static_cast<PoolLayout>(layout);
        KVMIG_ASSIGN_OR_RETURN(m.capacity_pages,
                               r.get<uint32_t>("perf capacity"));
        if (m.capacity_pages == 0 || m.capacity_pages > l.max_pages) {
          return Status::resource_exhausted(
              "perf capacity " + std::to_string(m.capacity_pages) +
              " pages: must be 1 to " + std::to_string(l.max_pages));
        }
        KVMIG_ASSIGN_OR_RETURN(uint8_t order, r.get<uint8_t>("perf order"));
        if (order > static_cast<uint8_t>(AllocationOrder::kRandom)) {
          return Status::data_loss("perf allocation order out of range");
        }
        m.order = static_cast<AllocationOrder>(order);
        KVMIG_ASSIGN_OR_RETURN(m.seed, r.get<uint64_t>("perf seed"));
        return m;
      });
}

std::vector<uint8_t> encode(const PerfReadyMsg& m) {
  ByteWriter w;
  w.put_string(m.address);
  w.put(m.free_pages);
  return w.take();
}

Result<PerfReadyMsg> decode_perf_ready(std::span<const uint8_t> p,
                                       const WireLimits& l) {
  return decode_all<PerfReadyMsg>(
      p, "PERF_READY", [&](ByteReader& r) -> Result<PerfReadyMsg> {
        PerfReadyMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.address,
                               r.get_string(l.max_string, "perf address"));
        if (m.address.empty()) return Status::data_loss("empty perf address");
        KVMIG_ASSIGN_OR_RETURN(m.free_pages, r.get<uint32_t>("perf free"));
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

std::vector<uint8_t> encode(const HelloMsg& m) {
  ByteWriter w;
  w.put_string(m.migration_id);
  put_meta(w, m.meta);
  w.put(static_cast<uint8_t>((m.live ? 1 : 0) | (m.verify ? 2 : 0)));
  w.put(m.n_pages);
  w.put(m.n_seqs);
  w.put(static_cast<uint32_t>(m.transports.size()));
  for (const auto& t : m.transports) w.put_string(t);
  w.put_blob(m.initiator_address);
  return w.take();
}

Result<HelloMsg> decode_hello(std::span<const uint8_t> p, const WireLimits& l) {
  return decode_all<HelloMsg>(
      p, "HELLO", [&](ByteReader& r) -> Result<HelloMsg> {
        HelloMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.migration_id,
                               r.get_string(l.max_string, "migration id"));
        KVMIG_ASSIGN_OR_RETURN(m.meta, get_meta(r));
        KVMIG_ASSIGN_OR_RETURN(uint8_t flags, r.get<uint8_t>("flags"));
        if (flags > 3) return Status::data_loss("unknown HELLO flags");
        m.live = flags & 1;
        m.verify = flags & 2;
        KVMIG_ASSIGN_OR_RETURN(m.n_pages, r.get<uint32_t>("page count"));
        KVMIG_ASSIGN_OR_RETURN(m.n_seqs, r.get<uint32_t>("seq count"));
        KVMIG_ASSIGN_OR_RETURN(uint32_t nt,
                               get_count(r, 8, 4, "transport count"));
        m.transports.resize(nt);
        for (auto& t : m.transports) {
          KVMIG_ASSIGN_OR_RETURN(t, r.get_string(64, "transport name"));
        }
        KVMIG_ASSIGN_OR_RETURN(
            m.initiator_address,
            get_blob_copy(r, l.max_blob, "initiator address"));
        return m;
      });
}

std::vector<uint8_t> encode(const OfferMsg& m) {
  ByteWriter w;
  w.put_string(m.transport);
  w.put(static_cast<uint32_t>(m.slots.size()));
  for (PageIndex s : m.slots) w.put(s);
  w.put(static_cast<uint32_t>(m.regions.size()));
  for (const RegionGeometry& g : m.regions) {
    w.put(g.stride);
    w.put(g.chunk);
    w.put(g.slots);
  }
  w.put(m.staging_slots);
  w.put_blob(m.target_address);
  return w.take();
}

Result<OfferMsg> decode_offer(std::span<const uint8_t> p, const WireLimits& l) {
  return decode_all<OfferMsg>(
      p, "OFFER", [&](ByteReader& r) -> Result<OfferMsg> {
        OfferMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.transport, r.get_string(64, "transport"));
        KVMIG_ASSIGN_OR_RETURN(uint32_t n,
                               get_count(r, l.max_pages, 4, "slots"));
        m.slots.resize(n);
        for (PageIndex& s : m.slots) {
          KVMIG_ASSIGN_OR_RETURN(s, r.get<uint32_t>("slot"));
        }
        KVMIG_ASSIGN_OR_RETURN(uint32_t nr,
                               get_count(r, l.max_regions, 20, "regions"));
        m.regions.resize(nr);
        for (RegionGeometry& g : m.regions) {
          KVMIG_ASSIGN_OR_RETURN(g.stride, r.get<uint64_t>("region stride"));
          KVMIG_ASSIGN_OR_RETURN(g.chunk, r.get<uint64_t>("region chunk"));
          KVMIG_ASSIGN_OR_RETURN(g.slots, r.get<uint32_t>("region slots"));
        }
        KVMIG_ASSIGN_OR_RETURN(m.staging_slots,
                               r.get<uint32_t>("staging slots"));
        KVMIG_ASSIGN_OR_RETURN(m.target_address,
                               get_blob_copy(r, l.max_blob, "target address"));
        return m;
      });
}

std::vector<uint8_t> encode(const CommitMsg& m) {
  ByteWriter w;
  put_seqs(w, m.seqs);
  return w.take();
}

Result<CommitMsg> decode_commit(std::span<const uint8_t> p,
                                const WireLimits& l) {
  return decode_all<CommitMsg>(p, "COMMIT",
                               [&](ByteReader& r) -> Result<CommitMsg> {
                                 CommitMsg m;
                                 KVMIG_ASSIGN_OR_RETURN(m.seqs, get_seqs(r, l));
                                 return m;
                               });
}

std::vector<uint8_t> encode(const VerifyMsg& m) {
  ByteWriter w;
  put_u32s(w, m.positions);
  w.put(static_cast<uint32_t>(m.checksums.size()));
  for (uint64_t c : m.checksums) w.put(c);
  return w.take();
}

Result<VerifyMsg> decode_verify(std::span<const uint8_t> p,
                                const WireLimits& l) {
  return decode_all<VerifyMsg>(
      p, "VERIFY", [&](ByteReader& r) -> Result<VerifyMsg> {
        VerifyMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.positions,
                               get_u32s(r, l.max_pages, "positions"));
        KVMIG_ASSIGN_OR_RETURN(uint32_t n,
                               get_count(r, l.max_pages, 8, "checksum count"));
        if (n != m.positions.size()) {
          return Status::data_loss(std::to_string(n) + " checksums for " +
                                   std::to_string(m.positions.size()) +
                                   " positions");
        }
        m.checksums.resize(n);
        for (uint64_t& c : m.checksums) {
          KVMIG_ASSIGN_OR_RETURN(c, r.get<uint64_t>("checksum"));
        }
        return m;
      });
}

std::vector<uint8_t> encode(const BatchMsg& m) {
  ByteWriter w;
  put_u32s(w, m.positions);
  return w.take();
}

Result<BatchMsg> decode_batch(std::span<const uint8_t> p, const WireLimits& l) {
  return decode_all<BatchMsg>(
      p, "BATCH", [&](ByteReader& r) -> Result<BatchMsg> {
        BatchMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.positions,
                               get_u32s(r, l.max_pages, "positions"));
        return m;
      });
}

std::vector<uint8_t> encode(const RoundMsg& m) {
  ByteWriter w;
  w.put(m.n_pages);
  return w.take();
}

Result<RoundMsg> decode_round(std::span<const uint8_t> p) {
  return decode_all<RoundMsg>(
      p, "ROUND", [&](ByteReader& r) -> Result<RoundMsg> {
        RoundMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.n_pages, r.get<uint32_t>("round pages"));
        return m;
      });
}

std::vector<uint8_t> encode(const RoundOfferMsg& m) {
  ByteWriter w;
  put_u32s(w, m.slots);
  return w.take();
}

Result<RoundOfferMsg> decode_round_offer(std::span<const uint8_t> p,
                                         const WireLimits& l) {
  return decode_all<RoundOfferMsg>(
      p, "ROUND_OFFER", [&](ByteReader& r) -> Result<RoundOfferMsg> {
        RoundOfferMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.slots, get_u32s(r, l.max_pages, "slots"));
        return m;
      });
}

std::vector<uint8_t> encode(const AbortMsg& m) {
  ByteWriter w;
  w.put_string(m.reason);
  return w.take();
}

Result<AbortMsg> decode_abort(std::span<const uint8_t> p, const WireLimits& l) {
  return decode_all<AbortMsg>(
      p, "ABORT", [&](ByteReader& r) -> Result<AbortMsg> {
        AbortMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.reason,
                               r.get_string(l.max_string * 16, "reason"));
        return m;
      });
}

std::vector<uint8_t> encode(const ErrorMsg& m) {
  ByteWriter w;
  put_status(w, m.status);
  return w.take();
}

Result<ErrorMsg> decode_error(std::span<const uint8_t> p, const WireLimits& l) {
  return decode_all<ErrorMsg>(
      p, "ERROR",
      [&](ByteReader& r) -> Result<ErrorMsg> { return get_status(r, l); });
}

std::vector<uint8_t> encode(const OutcomeReqMsg& m) {
  ByteWriter w;
  w.put_string(m.migration_id);
  return w.take();
}

Result<OutcomeReqMsg> decode_outcome_req(std::span<const uint8_t> p,
                                         const WireLimits& l) {
  return decode_all<OutcomeReqMsg>(
      p, "OUTCOME_REQ", [&](ByteReader& r) -> Result<OutcomeReqMsg> {
        OutcomeReqMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.migration_id,
                               r.get_string(l.max_string, "migration id"));
        return m;
      });
}

std::vector<uint8_t> encode(const OutcomeRespMsg& m) {
  ByteWriter w;
  w.put(static_cast<uint8_t>(m.outcome));
  return w.take();
}

Result<OutcomeRespMsg> decode_outcome_resp(std::span<const uint8_t> p) {
  return decode_all<OutcomeRespMsg>(
      p, "OUTCOME_RESP", [&](ByteReader& r) -> Result<OutcomeRespMsg> {
        KVMIG_ASSIGN_OR_RETURN(uint8_t o, r.get<uint8_t>("outcome"));
        if (o > static_cast<uint8_t>(Outcome::kAborted)) {
          return Status::data_loss("outcome " + std::to_string(o) +
                                   " out of range");
        }
        return OutcomeRespMsg{static_cast<Outcome>(o)};
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
  w.put(static_cast<uint8_t>(m.staged));
  put_ids(w, m.left_behind);
  w.put(static_cast<uint32_t>(m.digests.size()));
  for (const auto& [id, hex] : m.digests) {
    w.put(id);
    w.put_string(hex);
  }
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
        KVMIG_ASSIGN_OR_RETURN(uint8_t staged, r.get<uint8_t>("staged"));
        m.staged = staged != 0;
        KVMIG_ASSIGN_OR_RETURN(m.left_behind, get_ids(r, l));
        KVMIG_ASSIGN_OR_RETURN(uint32_t nd,
                               get_count(r, l.max_seqs, 12, "digest count"));
        m.digests.resize(nd);
        for (auto& [id, hex] : m.digests) {
          KVMIG_ASSIGN_OR_RETURN(id, r.get<uint64_t>("digest id"));
          KVMIG_ASSIGN_OR_RETURN(hex, r.get_string(64, "digest"));
        }
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
  }
  w.put(static_cast<uint32_t>(m.transports.size()));
  for (const auto& t : m.transports) w.put_string(t);
  w.put(static_cast<uint32_t>(m.in_doubt.size()));
  for (const auto& d : m.in_doubt) {
    w.put_string(d.migration_id);
    put_ids(w, d.seqs);
    w.put_string(d.to);
    w.put_string(d.hold);
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
                               get_count(r, l.max_seqs, 24, "seq count"));
        m.seqs.resize(n);
        for (SeqStatus& s : m.seqs) {
          KVMIG_ASSIGN_OR_RETURN(s.id, r.get<uint64_t>("seq id"));
          KVMIG_ASSIGN_OR_RETURN(s.tokens, r.get<uint64_t>("seq tokens"));
          KVMIG_ASSIGN_OR_RETURN(s.pages, r.get<uint32_t>("seq pages"));
          KVMIG_ASSIGN_OR_RETURN(s.digest, r.get_string(64, "seq digest"));
        }
        KVMIG_ASSIGN_OR_RETURN(uint32_t nt,
                               get_count(r, 8, 4, "transport count"));
        m.transports.resize(nt);
        for (auto& t : m.transports) {
          KVMIG_ASSIGN_OR_RETURN(t, r.get_string(64, "transport"));
        }
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
        return m;
      });
}

}  // namespace kvmig
