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
        Case{12, 0x01, StatusCode::kProtocol, "reserved"},
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

}  // namespace
}  // namespace kvmig
