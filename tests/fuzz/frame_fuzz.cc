// libFuzzer target: the control-plane frame header and payload checks on
// arbitrary bytes. The first 24 bytes are the header, the rest the payload.
// Property: a frame that passes both checks is exactly what encode_frame()
// makes of its type and payload.
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
  std::span<const uint8_t> payload(data + kFrameHeaderBytes,
                                   size - kFrameHeaderBytes);
  if (!check_frame_payload(*header, payload).ok()) return 0;
  // Valid: the sender's encoding must reproduce these bytes exactly.
  std::vector<uint8_t> again = encode_frame(header->type, payload);
  if (again.size() != size || !std::equal(again.begin(), again.end(), data)) {
    std::abort();
  }
  (void)msg_type_name(header->type);
  return 0;
}
