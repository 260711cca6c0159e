// libFuzzer target: the control-plane frame header and payload checks on
// arbitrary bytes. The first 24 bytes are the header, the rest the payload.
// Property: a frame that passes both checks is exactly what encode_frame()
// makes of its type, payload and bulk (the payload's last bytes, outside the
// checksum).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

#include "frame.h"

namespace {

// The agent's default AgentOptions::max_frame_bytes.
constexpr uint32_t kMaxPayload = 64u << 20;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvmig;
  if (size < kFrameHeaderBytes) return 0;
  std::span<const uint8_t, kFrameHeaderBytes> head(data, kFrameHeaderBytes);
  auto header = decode_frame_header(head, kMaxPayload);
  if (!header.ok()) return 0;
  if (header->length > kMaxPayload) std::abort();
  if (header->bulk > header->length) std::abort();
  std::span<const uint8_t> payload(data + kFrameHeaderBytes,
                                   size - kFrameHeaderBytes);
  if (payload.size() != header->length) return 0;
  const size_t covered = header->length - header->bulk;
  if (!check_frame_payload(*header, payload.first(covered)).ok()) return 0;
  // Valid: the sender's encoding must reproduce these bytes exactly.
  std::vector<uint8_t> again = encode_frame(
      header->type, payload.first(covered), payload.subspan(covered));
  if (again.size() != size || !std::equal(again.begin(), again.end(), data)) {
    std::abort();
  }
  (void)msg_type_name(header->type);
  return 0;
}
