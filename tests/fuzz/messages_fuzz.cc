// libFuzzer target: every control-message decoder on arbitrary bytes. The
// first byte picks the decoder, the rest is the payload, decoded with the
// default WireLimits. Property (round trip): whatever a decoder accepts,
// encode() turns into bytes the same decoder accepts again, giving an equal
// message whose encoding is the same bytes.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "control_messages.h"
#include "messages.h"

namespace kvmig {
namespace {

// Bitwise, so that NaNs compare equal to themselves.
bool same_double(double a, double b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

bool same(const SnapshotReqMsg& a, const SnapshotReqMsg& b) {
  return a.load == b.load && a.path == b.path;
}
bool same(const SnapshotReport& a, const SnapshotReport& b) {
  return a.path == b.path && a.requests == b.requests && a.pages == b.pages &&
         a.bytes == b.bytes && a.summarized == b.summarized;
}
bool same(const HelloMsg& a, const HelloMsg& b) {
  return a.migration_id == b.migration_id && a.meta == b.meta &&
         a.live == b.live && a.verify == b.verify && a.n_pages == b.n_pages &&
         a.n_seqs == b.n_seqs && a.transports == b.transports &&
         a.initiator_address == b.initiator_address && a.seqs == b.seqs &&
         a.inline_pages == b.inline_pages;
}
bool same(const OfferMsg& a, const OfferMsg& b) {
  return a.transport == b.transport && a.slots == b.slots &&
         a.regions == b.regions && a.staging_slots == b.staging_slots &&
         a.target_address == b.target_address &&
         a.inline_pages == b.inline_pages;
}
bool same(const CommitMsg& a, const CommitMsg& b) { return a.seqs == b.seqs; }
bool same(const BatchMsg& a, const BatchMsg& b) {
  return a.positions == b.positions;
}
bool same(const PagesMsg& a, const PagesMsg& b) {
  return a.positions == b.positions && std::ranges::equal(a.bytes, b.bytes);
}
bool same(const RoundMsg& a, const RoundMsg& b) {
  return a.n_pages == b.n_pages;
}
bool same(const RoundOfferMsg& a, const RoundOfferMsg& b) {
  return a.slots == b.slots && a.target_update == b.target_update;
}
bool same(const VerifyMsg& a, const VerifyMsg& b) {
  return a.positions == b.positions && a.checksums == b.checksums;
}
bool same(const AbortMsg& a, const AbortMsg& b) { return a.reason == b.reason; }
bool same(const ErrorMsg& a, const ErrorMsg& b) { return a.status == b.status; }
bool same(const OutcomeReqMsg& a, const OutcomeReqMsg& b) {
  return a.migration_id == b.migration_id;
}
bool same(const OutcomeRespMsg& a, const OutcomeRespMsg& b) {
  return a.outcome == b.outcome && a.incarnation == b.incarnation &&
         a.remembers_all == b.remembers_all;
}
bool same(const MigrateRequest& a, const MigrateRequest& b) {
  return a.to == b.to && a.seqs == b.seqs && a.all == b.all &&
         a.mode == b.mode && a.transport == b.transport &&
         a.verify == b.verify && a.record_digests == b.record_digests &&
         a.live == b.live && a.live_max_rounds == b.live_max_rounds &&
         a.live_converge_pages == b.live_converge_pages &&
         a.live_abort_if_not_converged == b.live_abort_if_not_converged &&
         a.migration_id == b.migration_id && a.timeout == b.timeout;
}
bool same(const ProgressMsg& a, const ProgressMsg& b) {
  return a.bytes == b.bytes;
}
bool same(const SettleReqMsg& a, const SettleReqMsg& b) {
  return a.migration_id == b.migration_id && a.committed == b.committed;
}
bool same(const CancelReqMsg& a, const CancelReqMsg& b) {
  return a.migration_id == b.migration_id;
}
bool same(const CancelReport& a, const CancelReport& b) {
  return a.migration_id == b.migration_id && a.outcome == b.outcome &&
         a.detail == b.detail;
}
bool same(const MigrationReport& a, const MigrationReport& b) {
  return a.migration_id == b.migration_id && a.seqs == b.seqs &&
         a.pages == b.pages && a.bytes == b.bytes && a.writes == b.writes &&
         same_double(a.seconds, b.seconds) && same_double(a.gbps, b.gbps) &&
         same_double(a.pause_ms, b.pause_ms) && a.rounds == b.rounds &&
         a.round_pages == b.round_pages && a.transport == b.transport &&
         a.staged == b.staged && a.inline_pages == b.inline_pages &&
         a.left_behind == b.left_behind && a.digests == b.digests;
}
bool same(const AgentStatus& a, const AgentStatus& b) {
  if (a.meta != b.meta || a.capacity_pages != b.capacity_pages ||
      a.free_pages != b.free_pages || a.transports != b.transports ||
      a.seqs.size() != b.seqs.size() ||
      a.in_doubt.size() != b.in_doubt.size()) {
    return false;
  }
  for (size_t i = 0; i < a.seqs.size(); ++i) {
    const SeqStatus &x = a.seqs[i], &y = b.seqs[i];
    if (x.id != y.id || x.tokens != y.tokens || x.pages != y.pages ||
        x.digest != y.digest) {
      return false;
    }
  }
  for (size_t i = 0; i < a.in_doubt.size(); ++i) {
    if (a.in_doubt[i].migration_id != b.in_doubt[i].migration_id ||
        a.in_doubt[i].seqs != b.in_doubt[i].seqs) {
      return false;
    }
  }
  return true;
}

// Decodes p; if accepted, checks the round-trip property (aborts if not).
template <typename Decode>
void check(std::span<const uint8_t> p, Decode decode) {
  auto first = decode(p);
  if (!first.ok()) return;
  const std::vector<uint8_t> bytes = encode(*first);
  // As a span: decoders may return views (PAGES) into what they were given,
  // and `auto` would hand them a copy that dies with the call.
  auto second = decode(std::span<const uint8_t>(bytes));
  if (!second.ok()) std::abort();  // our own encoding refused
  if (!same(*first, *second)) std::abort();
  if (encode(*second) != bytes) std::abort();
}

}  // namespace
}  // namespace kvmig

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvmig;
  if (size == 0) return 0;
  const WireLimits l;
  std::span<const uint8_t> p(data + 1, size - 1);
  // The decoders, numbered in messages.h order; first byte modulo the count.
  switch (data[0] % 21) {
    case 0:
      check(p, [&](auto b) { return decode_snapshot_req(b, l); });
      break;
    case 1:
      check(p, [&](auto b) { return decode_hello(b, l); });
      break;
    case 2:
      check(p, [&](auto b) { return decode_offer(b, l); });
      break;
    case 3:
      check(p, [&](auto b) { return decode_commit(b, l); });
      break;
    case 4:
      check(p, [&](auto b) { return decode_batch(b, l); });
      break;
    case 5:
      check(p, [&](auto b) { return decode_round(b); });
      break;
    case 6:
      check(p, [&](auto b) { return decode_verify(b, l); });
      break;
    case 7:
      check(p, [&](auto b) { return decode_round_offer(b, l); });
      break;
    case 8:
      check(p, [&](auto b) { return decode_abort(b, l); });
      break;
    case 9:
      check(p, [&](auto b) { return decode_error(b, l); });
      break;
    case 10:
      check(p, [&](auto b) { return decode_outcome_req(b, l); });
      break;
    case 11:
      check(p, [&](auto b) { return decode_outcome_resp(b); });
      break;
    case 12:
      check(p, [&](auto b) { return decode_migrate_request(b, l); });
      break;
    case 13:
      check(p, [&](auto b) { return decode_migration_report(b, l); });
      break;
    case 14:
      check(p, [&](auto b) { return decode_agent_status(b, l); });
      break;
    case 15:
      check(p, [&](auto b) { return decode_snapshot_resp(b, l); });
      break;
    case 16:
      check(p, [&](auto b) { return decode_progress(b); });
      break;
    case 17:
      check(p, [&](auto b) { return decode_cancel_req(b, l); });
      break;
    case 18:
      check(p, [&](auto b) { return decode_cancel_report(b, l); });
      break;
    case 19:
      check(p, [&](auto b) { return decode_settle_req(b, l); });
      break;
    case 20:
      check(p, [&](auto b) { return decode_pages(b, l); });
      break;
  }
  return 0;
}
