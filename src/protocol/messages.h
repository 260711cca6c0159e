// Migration messages (HELLO .. DONE, ROUND, VERIFY, BATCH, ABORT, ERROR and
// the outcome query): plain structs and their payload codecs. Decoders
// validate every count, length and enum against WireLimits before
// allocating, and fail with DataLoss (malformed) or ResourceExhausted (over
// a limit). Stateless; thread-safe.
#ifndef KVMIG_SRC_PROTOCOL_MESSAGES_H_
#define KVMIG_SRC_PROTOCOL_MESSAGES_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "codec.h"
#include "kvmig/status.h"
#include "kvmig/types.h"
#include "region_geometry.h"

namespace kvmig {

struct HelloMsg {
  std::string migration_id;
  CacheMeta meta;
  bool live = false;     // pre-copy: ROUND messages may follow OFFER
  bool verify = false;   // VERIFY covers every page before COMMIT
  uint32_t n_pages = 0;  // slots needed for the first round
  uint32_t n_seqs = 0;   // requests to move (at most, when live)
  std::vector<std::string> transports;  // acceptable, preferred first
  std::vector<uint8_t> initiator_address;
  // The requests' ids (n_seqs of them), so the destination refuses, before
  // any byte moves, a request that is already live there.
  std::vector<SeqId> seqs;
  // The source would rather send the pages in PAGES frames (a small
  // stop-and-copy): no data path to open, write or mark.
  bool inline_pages = false;
  // With inline_pages: PAGES and COMMIT follow HELLO at once, unasked, and
  // no OFFER answers it (one exchange, HELLO ... DONE). Their slots are slot
  // positions (0 .. n_pages - 1): the destination maps them to the slots it
  // allocates. A source sends this only on a kept connection whose OFFER
  // said the pages fit the destination's inline_limit.
  bool pages_follow = false;
  // With pages_follow: the source sends this exchange a second time, on a
  // new connection, because the destination answered an outcome query
  // about its id with "no record". That query fenced the id (a first
  // exchange still on its way is refused when it comes); the fence lets
  // this one in (protocol 12).
  bool resent = false;
};

// Slot positions: every slot the destination allocates for a migration gets
// the next position (0, 1, ...), in OFFER order then ROUND_OFFER order.
struct OfferMsg {
  std::string transport;
  std::vector<PageIndex> slots;  // positions 0 .. n_pages - 1
  // Where the source writes: the destination's layout geometry (region i is
  // the target's region i). With staging_slots > 0 the geometry is a staging
  // buffer of that many page slots, filled in batches (BATCH / BATCH_ACK).
  std::vector<RegionGeometry> regions;
  uint32_t staging_slots = 0;
  std::vector<uint8_t> target_address;
  // Where the destination's pages live, for reports: "host", "cuda" or
  // "cuda+host" (memory_kinds_name()).
  std::string memory;
  // HELLO's inline_pages taken: the pages come in PAGES frames, there is no
  // data path (target_address is empty).
  bool inline_pages = false;
  // The most page bytes this destination takes inline (0: none, its pages
  // are not host memory): what a source may send later on this connection
  // with HELLO's pages_follow.
  uint64_t inline_limit = 0;
  // A random id this agent drew when it started: which agent made the
  // connection's OFFERs (OutcomeRespMsg::incarnation).
  uint64_t incarnation = 0;
};

// A live round asks for n more slots.
struct RoundMsg {
  uint32_t n_pages = 0;
};
struct RoundOfferMsg {
  std::vector<PageIndex> slots;  // the next positions, in order
  // What the source's initiator needs to write them (the target's
  // window_update(): verbs memory-window keys); often empty.
  std::vector<uint8_t> target_update;
};

// After a round's data is flushed: XXH3-64 of each page it sent, in
// canonical order, by slot position. The destination checks them at once, so
// the final pause only covers the last round's pages.
struct VerifyMsg {
  std::vector<uint32_t> positions;
  std::vector<uint64_t> checksums;
};

struct CommitMsg {
  std::vector<LogicalSeq> seqs;  // page tables in destination slots
  // The last round's checksums when they travel with COMMIT instead of a
  // VERIFY of their own (the paused round: checked before install, one
  // round trip fewer); empty otherwise.
  VerifyMsg verify;
  // The data path's mark behind the last round's writes
  // (TransportInitiator::write_marked): the destination installs once it has
  // arrived. 0: every write was flushed before COMMIT.
  uint64_t data_mark = 0;
};

// A staged batch: staging slot k holds the page for slot position
// positions[k].
struct BatchMsg {
  std::vector<uint32_t> positions;
};

// Pages sent on the control connection (OFFER took inline_pages): bytes
// holds, for each positions[k] in turn, that slot's page in canonical order
// (the page's pieces in each region of the layout, in list order). bytes
// is a view: into the frame decode_pages() read, or the caller's buffer.
// On the wire the bytes are the frame's bulk (protocol 13): a source sends
// them from page memory, a destination reads them into its slots, and
// decode_pages() of the rest finds the positions and no bytes.
struct PagesMsg {
  std::vector<uint32_t> positions;
  std::span<const uint8_t> bytes;
};

// During a long data phase, every so often: the source is alive and has
// posted this many payload bytes so far (over the whole migration). The
// destination's deadline runs from the last frame that showed progress.
struct ProgressMsg {
  uint64_t bytes = 0;
};

struct AbortMsg {
  std::string reason;
};

enum class Outcome : uint8_t {
  // Never installed here: this agent never heard of it, and nothing it could
  // have installed before (it started over an empty pager) is in its pager.
  kUnknown = 0,
  kPending = 1,    // commit being applied; ask again
  kCommitted = 2,  // installed at the destination
  kAborted = 3,    // rolled back; will never be installed
  // This agent cannot tell: it forgot the record (evicted unacknowledged),
  // or it started over a pager that already held requests (an embedder
  // recreated it), which a migration it does not remember may have
  // installed. The source stays in doubt (kvmig settle decides by hand).
  kForgotten = 4,
};

struct OutcomeReqMsg {
  std::string migration_id;
};
struct OutcomeRespMsg {
  Outcome outcome = Outcome::kUnknown;
  // The answering agent's incarnation (MigrationContext::incarnation, as in
  // its OFFERs), and whether it still holds the record of every commit it
  // made (none evicted unacknowledged). With both, "no record" from the
  // agent a source sent a migration to means that agent never read its
  // HELLO, whatever it started over (protocol 11).
  uint64_t incarnation = 0;
  bool remembers_all = false;
};

std::vector<uint8_t> encode(const HelloMsg& m);
std::vector<uint8_t> encode(const OfferMsg& m);
std::vector<uint8_t> encode(const CommitMsg& m);
std::vector<uint8_t> encode(const BatchMsg& m);
// The positions, then the bytes. On the wire the bytes are the frame's
// bulk (encode_frame's, FrameChannel::OutFrame's): PAGES' payload is its
// positions, checksummed, and its bulk the pages.
std::vector<uint8_t> encode(const PagesMsg& m);
std::vector<uint8_t> encode(const RoundMsg& m);
std::vector<uint8_t> encode(const VerifyMsg& m);
std::vector<uint8_t> encode(const RoundOfferMsg& m);
std::vector<uint8_t> encode(const ProgressMsg& m);
std::vector<uint8_t> encode(const AbortMsg& m);
std::vector<uint8_t> encode(const ErrorMsg& m);
std::vector<uint8_t> encode(const OutcomeReqMsg& m);
std::vector<uint8_t> encode(const OutcomeRespMsg& m);
Result<HelloMsg> decode_hello(std::span<const uint8_t> p, const WireLimits& l);
Result<OfferMsg> decode_offer(std::span<const uint8_t> p, const WireLimits& l);
Result<CommitMsg> decode_commit(std::span<const uint8_t> p,
                                const WireLimits& l);
Result<BatchMsg> decode_batch(std::span<const uint8_t> p, const WireLimits& l);
// The bytes are the rest of the payload; their size is the destination's
// to check against its page size.
Result<PagesMsg> decode_pages(std::span<const uint8_t> p, const WireLimits& l);
Result<RoundMsg> decode_round(std::span<const uint8_t> p);
Result<VerifyMsg> decode_verify(std::span<const uint8_t> p,
                                const WireLimits& l);
Result<RoundOfferMsg> decode_round_offer(std::span<const uint8_t> p,
                                         const WireLimits& l);
Result<ProgressMsg> decode_progress(std::span<const uint8_t> p);
Result<AbortMsg> decode_abort(std::span<const uint8_t> p, const WireLimits& l);
Result<ErrorMsg> decode_error(std::span<const uint8_t> p, const WireLimits& l);
Result<OutcomeReqMsg> decode_outcome_req(std::span<const uint8_t> p,
                                         const WireLimits& l);
Result<OutcomeRespMsg> decode_outcome_resp(std::span<const uint8_t> p);

}  // namespace kvmig

#endif  // KVMIG_SRC_PROTOCOL_MESSAGES_H_
