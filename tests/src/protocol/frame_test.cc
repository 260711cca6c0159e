#include "frame.h"

#include <gtest/gtest.h>

#include <vector>

#include "testutil.h"

namespace kvmig {
namespace {

std::span<const uint8_t, kFrameHeaderBytes> header_of(
    const std::vector<uint8_t>& frame) {
  return std::span<const uint8_t, kFrameHeaderBytes>(frame.data(),
                                                     kFrameHeaderBytes);
}

TEST(FrameTest, RoundTrip) {
  std::vector<uint8_t> payload = {1, 2, 3, 4, 5};
  auto frame = encode_frame(MsgType::kHello, payload);
  ASSERT_EQ(frame.size(), kFrameHeaderBytes + payload.size());
  ASSERT_OK_AND_ASSIGN(FrameHeader h,
                       decode_frame_header(header_of(frame), 1024));
  EXPECT_EQ(h.type, MsgType::kHello);
  EXPECT_EQ(h.length, payload.size());
  EXPECT_OK(
      check_frame_payload(h, std::span(frame).subspan(kFrameHeaderBytes)));
}

TEST(FrameTest, RejectsBadHeaders) {
  auto good = encode_frame(MsgType::kOffer, std::vector<uint8_t>(10, 7));
  struct Case {
    size_t byte;
    uint8_t value;
    StatusCode code;
    const char* words;
  };
  for (const Case& c :
       {Case{0, 0x00, StatusCode::kProtocol, "magic"},
        Case{4, kProtocolVersion + 1, StatusCode::kProtocol, "version"},
        Case{6, 0x63, StatusCode::kProtocol, "type"},
        // Bulk on a type other than PAGES.
        Case{12, 0x01, StatusCode::kProtocol, "OFFER carries 1 bulk bytes"},
        Case{11, 0x7f, StatusCode::kResourceExhausted, "limit"}}) {
    auto bad = good;
    bad[c.byte] = c.value;
    auto h = decode_frame_header(header_of(bad), 1 << 20);
    ASSERT_FALSE(h.ok()) << "byte " << c.byte;
    EXPECT_EQ(h.status().code(), c.code) << h.status().to_string();
    EXPECT_NE(h.status().message().find(c.words), std::string::npos)
        << h.status().to_string();
  }
}

TEST(FrameTest, ChecksumCoversPayloadAndHeader) {
  auto frame = encode_frame(MsgType::kCommit, std::vector<uint8_t>(100, 1));
  ASSERT_OK_AND_ASSIGN(FrameHeader h,
                       decode_frame_header(header_of(frame), 1024));
  auto payload =
      std::vector<uint8_t>(frame.begin() + kFrameHeaderBytes, frame.end());
  payload[50] ^= 1;
  Status s = check_frame_payload(h, payload);
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  payload[50] ^= 1;
  payload.pop_back();
  EXPECT_EQ(check_frame_payload(h, payload).code(), StatusCode::kDataLoss);
  // A type changed in flight (still a valid type) fails the checksum.
  auto retyped = frame;
  retyped[6] = static_cast<uint8_t>(MsgType::kDone);
  ASSERT_OK_AND_ASSIGN(FrameHeader h2,
                       decode_frame_header(header_of(retyped), 1024));
  EXPECT_EQ(
      check_frame_payload(h2, std::span(retyped).subspan(kFrameHeaderBytes))
          .code(),
      StatusCode::kDataLoss);
}

// PAGES' bulk (protocol 13): the payload's last bytes, which the checksum
// leaves out, so a receiver can read them straight into place. The rest is
// checked as before; bulk on another type, or longer than the payload, is
// refused from the header alone.
TEST(FrameTest, BulkBytesAreLeftOutOfTheChecksum) {
  const std::vector<uint8_t> head = {1, 2, 3, 4};
  const std::vector<uint8_t> bulk(64, 9);
  auto frame = encode_frame(MsgType::kPages, head, bulk);
  ASSERT_EQ(frame.size(), kFrameHeaderBytes + head.size() + bulk.size());
  ASSERT_OK_AND_ASSIGN(FrameHeader h,
                       decode_frame_header(header_of(frame), 1024));
  EXPECT_EQ(h.length, head.size() + bulk.size());
  EXPECT_EQ(h.bulk, bulk.size());
  const auto covered = std::span(frame).subspan(kFrameHeaderBytes, head.size());
  EXPECT_OK(check_frame_payload(h, covered));
  // The whole payload is not what the checksum covers.
  EXPECT_EQ(check_frame_payload(h, std::span(frame).subspan(kFrameHeaderBytes))
                .code(),
            StatusCode::kDataLoss);
  // A covered byte changed: caught. A bulk byte: not the frame's to catch.
  frame[kFrameHeaderBytes + 1] ^= 1;
  EXPECT_EQ(check_frame_payload(h, covered).code(), StatusCode::kDataLoss);
  frame[kFrameHeaderBytes + 1] ^= 1;
  frame.back() ^= 1;
  EXPECT_OK(check_frame_payload(h, covered));

  // Bulk beyond the payload.
  auto beyond = encode_frame(MsgType::kPages, head, bulk);
  beyond[12] = 0xff;  // bulk 255, length 68
  auto refused = decode_frame_header(header_of(beyond), 1024);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kProtocol);
  EXPECT_NE(
      refused.status().message().find("255 bulk bytes in a payload of 68"),
      std::string::npos)
      << refused.status().to_string();
  // On another type.
  auto other = encode_frame(MsgType::kCommit, head, bulk);
  refused = decode_frame_header(header_of(other), 1024);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("COMMIT carries 64 bulk bytes"),
            std::string::npos)
      << refused.status().to_string();
}

}  // namespace
}  // namespace kvmig
