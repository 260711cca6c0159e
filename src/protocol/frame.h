// Control-plane framing: every message is a 24-byte header and a payload.
//
//   u32 magic "KVMG" | u16 version | u16 type | u32 payload length |
//   u32 bulk length | u64 XXH3-64 over header bytes 0..15 and the payload
//   but its bulk
//
// All little-endian. The payload's last `bulk length` bytes are bulk: page
// bytes the checksum does not cover, which a receiver may read straight
// into place (PAGES only; 0 for every other type). Like the data path's
// writes, they rely on TCP's checksum and, with --verify, on the per-page
// checksums. A receiver checks magic, version, type, bulk and the length
// limit from the header alone, before reading the payload, then the
// checksum. Stateless functions; thread-safe.
#ifndef KVMIG_SRC_FRAME_H_
#define KVMIG_SRC_FRAME_H_

#include <array>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvmig/status.h"

namespace kvmig {

inline constexpr uint32_t kFrameMagic = 0x474d564b;  // "KVMG"
// 2: PROGRESS, DONE_ACK, CANCEL_REQ/RESP, SETTLE_REQ/RESP; MIGRATE_REQ
// carries an id and a timeout; OUTCOME_RESP may say "forgotten".
// 3: MIGRATE_RESP carries the time of each phase; COMMIT carries the
// paused round's checksums (no VERIFY round trip for it).
// 4: OFFER says where the destination's pages live (host, cuda); the
// migrate report and status carry memory kinds.
// 5: ROUND_OFFER carries the target's window update (verbs binds a memory
// window per run of a migration's slots; a round's keys travel with it).
// 6: tcp data connections carry batch records (many small writes' headers
// before their payloads, which the target reads straight into place); a
// target of version 5 would refuse them mid-migration, so the first frame
// does.
// 7: COMMIT carries the data path's mark (tcp: a record behind the last
// writes, which the target notes without answering): the destination waits
// for it before it installs, instead of the source for a flush's answer.
// 8: a small stop-and-copy may send its pages in PAGES frames on the control
// connection (HELLO asks, OFFER agrees, no data path is opened): no write,
// mark or thread of the data path between OFFER and COMMIT.
// 9: a committed migration's control connection may carry the next HELLO
// (both sides keep it); MIGRATE_RESP's data path flags say so (4).
// 10: STATUS_RESP counts the control connections a source keeps.
// 11: OFFER says how many page bytes the destination takes inline, and which
// agent it is (incarnation); on a kept connection, a small stop-and-copy
// sends HELLO, PAGES and COMMIT at once (HELLO's pages_follow) and waits for
// DONE alone: one exchange. OUTCOME_RESP names the agent that answers and
// whether it still holds every commit it made.
// 12: an outcome query about an id the destination has no record of fences
// that id (a HELLO with it that comes later is refused), and a one exchange
// the source sends again after such an answer says so (HELLO's resent).
// 13: a frame's bulk bytes (the former reserved field): PAGES carries its
// pages outside the checksum, so neither side copies or hashes them (the
// source sends them from its page memory, the destination reads them into
// its slots).
inline constexpr uint16_t kProtocolVersion = 13;
inline constexpr size_t kFrameHeaderBytes = 24;

enum class MsgType : uint16_t {
  kHello = 1,           // src -> dst: start a migration
  kOffer = 2,           // dst -> src: slots and where to write
  kCommit = 3,          // src -> dst: page tables and checksums
  kDone = 4,            // dst -> src: installed
  kAbort = 5,           // either way: rolled back, with a reason
  kBatch = 6,           // src -> dst: a staged batch landed
  kBatchAck = 7,        // dst -> src: staged batch applied
  kRound = 8,           // src -> dst: a live round needs more slots
  kRoundOffer = 9,      // dst -> src: the slots for that round
  kVerify = 10,         // src -> dst: checksums of the pages a round sent
  kVerifyAck = 11,      // dst -> src: those pages check out
  kProgress = 12,       // src -> dst: still writing, bytes posted so far
  kDoneAck = 13,        // src -> dst: DONE arrived (the record may go)
  kPages = 14,          // src -> dst: pages' bytes, when OFFER took them so
  kStatusReq = 16,      // scheduler -> agent
  kStatusResp = 17,     // agent -> scheduler
  kMigrateReq = 18,     // scheduler -> source agent
  kMigrateResp = 19,    // source agent -> scheduler
  kOutcomeReq = 20,     // src -> dst: what became of migration id?
  kOutcomeResp = 21,    // dst -> src
  kSnapshotReq = 22,    // client -> agent: save or load a snapshot
  kSnapshotResp = 23,   // agent -> client: done
  kPerfSetup = 24,      // perf client -> perf server: (re)build the target
  kPerfReady = 25,      // perf server -> client: target agent ready and empty
  kPerfReset = 26,      // perf client -> server: drop every request
  kAuthHello = 27,      // client -> agent: nonce
  kAuthChallenge = 28,  // agent -> client: nonce and the agent's MAC
  kAuthProof = 29,      // client -> agent: the client's MAC
  kAuthOk = 30,         // agent -> client: authenticated
  kError = 31,          // agent -> client: request refused
  kCancelReq = 32,      // client -> source agent: cancel migration id
  kCancelResp = 33,     // source agent -> client: how it ended
  kSettleReq = 34,      // operator -> source agent: decide an in-doubt move
  kSettleResp = 35,     // source agent -> operator: settled
};

// "HELLO", "OFFER", ...; "UNKNOWN(n)" for other values.
std::string msg_type_name(MsgType type);

struct FrameHeader {
  MsgType type = MsgType::kError;
  uint32_t length = 0;
  uint32_t bulk = 0;  // the payload's last bytes, outside the checksum
  uint64_t checksum = 0;
  std::array<uint8_t, 16> prefix{};  // header bytes 0..15, for the checksum
};

// The header of a frame carrying payload then bulk_bytes of bulk (its
// checksum covers the payload).
std::array<uint8_t, kFrameHeaderBytes> encode_frame_header(
    MsgType type, std::span<const uint8_t> payload, uint32_t bulk_bytes = 0);
// The whole frame: header, payload, bulk.
std::vector<uint8_t> encode_frame(MsgType type,
                                  std::span<const uint8_t> payload,
                                  std::span<const uint8_t> bulk = {});

// Validates a header: Protocol for a bad magic, version or type, or bulk
// on a type other than PAGES or beyond the length; ResourceExhausted when
// length exceeds max_payload.
Result<FrameHeader> decode_frame_header(
    std::span<const uint8_t, kFrameHeaderBytes> bytes, uint32_t max_payload);

// DataLoss unless `covered` (the payload but its bulk) has the header's
// length less bulk and its checksum.
Status check_frame_payload(const FrameHeader& header,
                           std::span<const uint8_t> covered);

}  // namespace kvmig

#endif  // KVMIG_SRC_FRAME_H_
