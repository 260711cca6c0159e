#include "messages.h"

#include <algorithm>
#include <string>

namespace kvmig {

std::vector<uint8_t> encode(const HelloMsg& m) {
  ByteWriter w;
  w.put_string(m.migration_id);
  put_meta(w, m.meta);
  w.put(static_cast<uint8_t>((m.live ? 1 : 0) | (m.verify ? 2 : 0) |
                             (m.inline_pages ? 4 : 0) |
                             (m.pages_follow ? 8 : 0) | (m.resent ? 16 : 0)));
  w.put(m.n_pages);
  w.put(m.n_seqs);
  w.put(static_cast<uint32_t>(m.transports.size()));
  for (const auto& t : m.transports) w.put_string(t);
  w.put_blob(m.initiator_address);
  put_ids(w, m.seqs);
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
        if (flags > 31) return Status::data_loss("unknown HELLO flags");
        m.live = flags & 1;
        m.verify = flags & 2;
        m.inline_pages = flags & 4;
        m.pages_follow = flags & 8;
        m.resent = flags & 16;
        if (m.pages_follow && (!m.inline_pages || m.live)) {
          return Status::data_loss(
              "HELLO has pages follow without inline pages, or live");
        }
        if (m.resent && !m.pages_follow) {
          return Status::data_loss("HELLO is resent without pages follow");
        }
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
        KVMIG_ASSIGN_OR_RETURN(m.seqs, get_ids(r, l));
        if (m.seqs.size() != m.n_seqs) {
          return Status::data_loss(
              "HELLO lists " + std::to_string(m.seqs.size()) +
              " request ids for a seq count of " + std::to_string(m.n_seqs));
        }
        return m;
      });
}

std::vector<uint8_t> encode(const OfferMsg& m) {
  ByteWriter w;
  w.put_string(m.transport);
  put_u32s(w, m.slots);
  w.put(static_cast<uint32_t>(m.regions.size()));
  for (const RegionGeometry& g : m.regions) {
    w.put(g.stride);
    w.put(g.chunk);
    w.put(g.slots);
  }
  w.put(m.staging_slots);
  w.put_blob(m.target_address);
  w.put_string(m.memory);
  w.put(static_cast<uint8_t>(m.inline_pages ? 1 : 0));
  w.put(m.inline_limit);
  w.put(m.incarnation);
  return w.take();
}

Result<OfferMsg> decode_offer(std::span<const uint8_t> p, const WireLimits& l) {
  return decode_all<OfferMsg>(
      p, "OFFER", [&](ByteReader& r) -> Result<OfferMsg> {
        OfferMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.transport, r.get_string(64, "transport"));
        KVMIG_ASSIGN_OR_RETURN(m.slots, get_u32s(r, l.max_pages, "slots"));
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
        KVMIG_ASSIGN_OR_RETURN(m.memory, r.get_string(64, "memory"));
        KVMIG_ASSIGN_OR_RETURN(uint8_t flags, r.get<uint8_t>("flags"));
        if (flags > 1) return Status::data_loss("unknown OFFER flags");
        m.inline_pages = flags & 1;
        KVMIG_ASSIGN_OR_RETURN(m.inline_limit, r.get<uint64_t>("inline limit"));
        KVMIG_ASSIGN_OR_RETURN(m.incarnation, r.get<uint64_t>("incarnation"));
        return m;
      });
}

namespace {

void put_verify(ByteWriter& w, const VerifyMsg& m) {
  put_u32s(w, m.positions);
  w.put(static_cast<uint32_t>(m.checksums.size()));
  w.put_array(std::span<const uint64_t>(m.checksums));
}

Result<VerifyMsg> get_verify(ByteReader& r, const WireLimits& l) {
  VerifyMsg m;
  KVMIG_ASSIGN_OR_RETURN(m.positions, get_u32s(r, l.max_pages, "positions"));
  KVMIG_ASSIGN_OR_RETURN(uint32_t n,
                         get_count(r, l.max_pages, 8, "checksum count"));
  if (n != m.positions.size()) {
    return Status::data_loss(std::to_string(n) + " checksums for " +
                             std::to_string(m.positions.size()) + " positions");
  }
  m.checksums.resize(n);
  KVMIG_RETURN_IF_ERROR(r.get_array(std::span(m.checksums), "checksum"));
  return m;
}

}  // namespace

std::vector<uint8_t> encode(const CommitMsg& m) {
  ByteWriter w;
  put_seqs(w, m.seqs);
  put_verify(w, m.verify);
  w.put<uint64_t>(m.data_mark);
  return w.take();
}

Result<CommitMsg> decode_commit(std::span<const uint8_t> p,
                                const WireLimits& l) {
  return decode_all<CommitMsg>(
      p, "COMMIT", [&](ByteReader& r) -> Result<CommitMsg> {
        CommitMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.seqs, get_seqs(r, l));
        KVMIG_ASSIGN_OR_RETURN(m.verify, get_verify(r, l));
        KVMIG_ASSIGN_OR_RETURN(m.data_mark, r.get<uint64_t>("data mark"));
        return m;
      });
}

std::vector<uint8_t> encode(const VerifyMsg& m) {
  ByteWriter w;
  put_verify(w, m);
  return w.take();
}

Result<VerifyMsg> decode_verify(std::span<const uint8_t> p,
                                const WireLimits& l) {
  return decode_all<VerifyMsg>(p, "VERIFY",
                               [&](ByteReader& r) { return get_verify(r, l); });
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

std::vector<uint8_t> encode(const PagesMsg& m) {
  ByteWriter w;
  put_u32s(w, m.positions);
  std::vector<uint8_t> payload = w.take();
  payload.insert(payload.end(), m.bytes.begin(), m.bytes.end());
  return payload;
}

Result<PagesMsg> decode_pages(std::span<const uint8_t> p, const WireLimits& l) {
  return decode_all<PagesMsg>(
      p, "PAGES", [&](ByteReader& r) -> Result<PagesMsg> {
        PagesMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.positions,
                               get_u32s(r, l.max_pages, "positions"));
        KVMIG_ASSIGN_OR_RETURN(m.bytes, r.get_bytes(r.remaining(), "bytes"));
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

std::vector<uint8_t> encode(const ProgressMsg& m) {
  ByteWriter w;
  w.put(m.bytes);
  return w.take();
}

Result<ProgressMsg> decode_progress(std::span<const uint8_t> p) {
  return decode_all<ProgressMsg>(
      p, "PROGRESS", [&](ByteReader& r) -> Result<ProgressMsg> {
        ProgressMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.bytes, r.get<uint64_t>("bytes posted"));
        return m;
      });
}

std::vector<uint8_t> encode(const RoundOfferMsg& m) {
  ByteWriter w;
  put_u32s(w, m.slots);
  w.put_blob(m.target_update);
  return w.take();
}

Result<RoundOfferMsg> decode_round_offer(std::span<const uint8_t> p,
                                         const WireLimits& l) {
  return decode_all<RoundOfferMsg>(
      p, "ROUND_OFFER", [&](ByteReader& r) -> Result<RoundOfferMsg> {
        RoundOfferMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.slots, get_u32s(r, l.max_pages, "slots"));
        KVMIG_ASSIGN_OR_RETURN(m.target_update,
                               get_blob_copy(r, l.max_blob, "target update"));
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
  w.put(m.incarnation);
  w.put(static_cast<uint8_t>(m.remembers_all ? 1 : 0));
  return w.take();
}

Result<OutcomeRespMsg> decode_outcome_resp(std::span<const uint8_t> p) {
  return decode_all<OutcomeRespMsg>(
      p, "OUTCOME_RESP", [&](ByteReader& r) -> Result<OutcomeRespMsg> {
        KVMIG_ASSIGN_OR_RETURN(uint8_t o, r.get<uint8_t>("outcome"));
        if (o > static_cast<uint8_t>(Outcome::kForgotten)) {
          return Status::data_loss("outcome " + std::to_string(o) +
                                   " out of range");
        }
        OutcomeRespMsg m;
        m.outcome = static_cast<Outcome>(o);
        KVMIG_ASSIGN_OR_RETURN(m.incarnation, r.get<uint64_t>("incarnation"));
        KVMIG_ASSIGN_OR_RETURN(uint8_t flags, r.get<uint8_t>("flags"));
        if (flags > 1) return Status::data_loss("unknown OUTCOME_RESP flags");
        m.remembers_all = flags & 1;
        return m;
      });
}

}  // namespace kvmig
