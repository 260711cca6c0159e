#include "frame.h"

#include <fmt/format.h>

#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#include <xxhash.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "bytes.h"

namespace kvmig {
namespace {

bool known_type(uint16_t t) {
  switch (static_cast<MsgType>(t)) {
    case MsgType::kHello:
    case MsgType::kOffer:
    case MsgType::kCommit:
    case MsgType::kDone:
    case MsgType::kAbort:
    case MsgType::kBatch:
    case MsgType::kBatchAck:
    case MsgType::kRound:
    case MsgType::kRoundOffer:
    case MsgType::kVerify:
    case MsgType::kVerifyAck:
    case MsgType::kProgress:
    case MsgType::kDoneAck:
    case MsgType::kPages:
    case MsgType::kStatusReq:
    case MsgType::kStatusResp:
    case MsgType::kMigrateReq:
    case MsgType::kMigrateResp:
    case MsgType::kOutcomeReq:
    case MsgType::kOutcomeResp:
    case MsgType::kSnapshotReq:
    case MsgType::kSnapshotResp:
    case MsgType::kPerfSetup:
    case MsgType::kPerfReady:
    case MsgType::kPerfReset:
    case MsgType::kAuthHello:
    case MsgType::kAuthChallenge:
    case MsgType::kAuthProof:
    case MsgType::kAuthOk:
    case MsgType::kError:
    case MsgType::kCancelReq:
    case MsgType::kCancelResp:
    case MsgType::kSettleReq:
    case MsgType::kSettleResp:
      return true;
  }
  return false;
}

uint64_t frame_checksum(std::span<const uint8_t> prefix,
                        std::span<const uint8_t> payload) {
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, prefix.data(), prefix.size());
  XXH3_64bits_update(&state, payload.data(), payload.size());
  return XXH3_64bits_digest(&state);
}

}  // namespace

std::string msg_type_name(MsgType type) {
  switch (type) {
    case MsgType::kHello:
      return "HELLO";
    case MsgType::kOffer:
      return "OFFER";
    case MsgType::kCommit:
      return "COMMIT";
    case MsgType::kDone:
      return "DONE";
    case MsgType::kAbort:
      return "ABORT";
    case MsgType::kBatch:
      return "BATCH";
    case MsgType::kBatchAck:
      return "BATCH_ACK";
    case MsgType::kRound:
      return "ROUND";
    case MsgType::kRoundOffer:
      return "ROUND_OFFER";
    case MsgType::kVerify:
      return "VERIFY";
    case MsgType::kVerifyAck:
      return "VERIFY_ACK";
    case MsgType::kProgress:
      return "PROGRESS";
    case MsgType::kDoneAck:
      return "DONE_ACK";
    case MsgType::kPages:
      return "PAGES";
    case MsgType::kStatusReq:
      return "STATUS_REQ";
    case MsgType::kStatusResp:
      return "STATUS_RESP";
    case MsgType::kMigrateReq:
      return "MIGRATE_REQ";
    case MsgType::kMigrateResp:
      return "MIGRATE_RESP";
    case MsgType::kOutcomeReq:
      return "OUTCOME_REQ";
    case MsgType::kOutcomeResp:
      return "OUTCOME_RESP";
    case MsgType::kSnapshotReq:
      return "SNAPSHOT_REQ";
    case MsgType::kSnapshotResp:
      return "SNAPSHOT_RESP";
    case MsgType::kPerfSetup:
      return "PERF_SETUP";
    case MsgType::kPerfReady:
      return "PERF_READY";
    case MsgType::kPerfReset:
      return "PERF_RESET";
    case MsgType::kAuthHello:
      return "AUTH_HELLO";
    case MsgType::kAuthChallenge:
      return "AUTH_CHALLENGE";
    case MsgType::kAuthProof:
      return "AUTH_PROOF";
    case MsgType::kAuthOk:
      return "AUTH_OK";
    case MsgType::kError:
      return "ERROR";
    case MsgType::kCancelReq:
      return "CANCEL_REQ";
    case MsgType::kCancelResp:
      return "CANCEL_RESP";
    case MsgType::kSettleReq:
      return "SETTLE_REQ";
    case MsgType::kSettleResp:
      return "SETTLE_RESP";
  }
  return "UNKNOWN(" + std::to_string(static_cast<uint16_t>(type)) + ")";
}

std::array<uint8_t, kFrameHeaderBytes> encode_frame_header(
    MsgType type, std::span<const uint8_t> payload, uint32_t bulk_bytes) {
  std::array<uint8_t, kFrameHeaderBytes> header{};
  store_le(header.data(), kFrameMagic);
  store_le(header.data() + 4, kProtocolVersion);
  store_le(header.data() + 6, static_cast<uint16_t>(type));
  store_le(header.data() + 8,
           static_cast<uint32_t>(payload.size() + bulk_bytes));
  store_le(header.data() + 12, bulk_bytes);
  store_le(header.data() + 16,
           frame_checksum(std::span(header).first(16), payload));
  return header;
}

std::vector<uint8_t> encode_frame(MsgType type,
                                  std::span<const uint8_t> payload,
                                  std::span<const uint8_t> bulk) {
  const auto header =
      encode_frame_header(type, payload, static_cast<uint32_t>(bulk.size()));
  std::vector<uint8_t> frame(header.begin(), header.end());
  frame.insert(frame.end(), payload.begin(), payload.end());
  frame.insert(frame.end(), bulk.begin(), bulk.end());
  return frame;
}

Result<FrameHeader> decode_frame_header(
    std::span<const uint8_t, kFrameHeaderBytes> bytes, uint32_t max_payload) {
  ByteReader r(bytes);
  KVMIG_ASSIGN_OR_RETURN(uint32_t magic, r.get<uint32_t>("frame magic"));
  KVMIG_ASSIGN_OR_RETURN(uint16_t version, r.get<uint16_t>("frame version"));
  KVMIG_ASSIGN_OR_RETURN(uint16_t type, r.get<uint16_t>("frame type"));
  KVMIG_ASSIGN_OR_RETURN(uint32_t length, r.get<uint32_t>("frame length"));
  KVMIG_ASSIGN_OR_RETURN(uint32_t bulk, r.get<uint32_t>("frame bulk"));
  KVMIG_ASSIGN_OR_RETURN(uint64_t checksum, r.get<uint64_t>("frame checksum"));
  if (magic != kFrameMagic) {
    return Status::protocol(
        fmt::format("frame: bad magic 0x{:08x} (not a kvmig peer?)", magic));
  }
  if (version != kProtocolVersion) {
    return Status::protocol("frame: protocol version " +
                            std::to_string(version) + ", this agent speaks " +
                            std::to_string(kProtocolVersion));
  }
  if (!known_type(type)) {
    return Status::protocol("frame: unknown message type " +
                            std::to_string(type));
  }
  if (bulk != 0 && static_cast<MsgType>(type) != MsgType::kPages) {
    return Status::protocol(
        "frame: " + msg_type_name(static_cast<MsgType>(type)) + " carries " +
        std::to_string(bulk) + " bulk bytes; only PAGES may");
  }
  if (bulk > length) {
    return Status::protocol("frame: " + std::to_string(bulk) +
                            " bulk bytes in a payload of " +
                            std::to_string(length));
  }
  if (length > max_payload) {
    return Status::resource_exhausted(
        "frame: " + msg_type_name(static_cast<MsgType>(type)) + " of " +
        std::to_string(length) + " bytes exceeds the limit of " +
        std::to_string(max_payload));
  }
  FrameHeader h;
  h.type = static_cast<MsgType>(type);
  h.length = length;
  h.bulk = bulk;
  h.checksum = checksum;
  std::copy(bytes.begin(), bytes.begin() + 16, h.prefix.begin());
  return h;
}

Status check_frame_payload(const FrameHeader& header,
                           std::span<const uint8_t> covered) {
  if (covered.size() != header.length - header.bulk) {
    return Status::data_loss("frame: " + msg_type_name(header.type) +
                             " payload is " + std::to_string(covered.size()) +
                             " bytes, header says " +
                             std::to_string(header.length - header.bulk));
  }
  if (frame_checksum(header.prefix, covered) != header.checksum) {
    return Status::data_loss("frame: " + msg_type_name(header.type) +
                             " checksum mismatch");
  }
  return Status();
}

}  // namespace kvmig
