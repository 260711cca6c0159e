#include <gtest/gtest.h>

#include <cstddef>
#include <span>
#include <vector>

#include "staging.h"
#include "testutil.h"

// host_page_chunks(): where a page lies in a host layout, one span per
// region in layout order (what an inline PAGES frame is sent from and read
// into), appended; a page beyond the layout or of the wrong size names
// itself and appends nothing.
namespace kvmig {
namespace {

TEST(HostPageChunksTest, OneSpanPerRegionInLayoutOrder) {
  // Two regions over one buffer: K (8-byte chunks, stride 8) then V
  // (4-byte chunks, stride 16, from byte 64): 4 slots, a page of 12 bytes.
  std::vector<std::byte> memory(128);
  const PagerLayout layout = {
      StridedRegion{memory.data(), 8, 8, 4},
      StridedRegion{memory.data() + 64, 16, 4, 4},
  };
  std::vector<std::span<uint8_t>> chunks(1);  // appended after this one
  ASSERT_OK(host_page_chunks(layout, 2, 12, chunks));
  ASSERT_EQ(chunks.size(), 3u);
  auto at = [&](size_t offset) {
    return reinterpret_cast<uint8_t*>(memory.data() + offset);
  };
  EXPECT_EQ(chunks[1].data(), at(16));
  EXPECT_EQ(chunks[1].size(), 8u);
  EXPECT_EQ(chunks[2].data(), at(64 + 32));
  EXPECT_EQ(chunks[2].size(), 4u);

  Status beyond = host_page_chunks(layout, 4, 12, chunks);
  EXPECT_EQ(beyond.code(), StatusCode::kOutOfRange) << beyond.to_string();
  EXPECT_NE(beyond.message().find("page 4"), std::string::npos);
  Status size = host_page_chunks(layout, 1, 16, chunks);
  EXPECT_EQ(size.code(), StatusCode::kInvalidArgument) << size.to_string();
  EXPECT_NE(size.message().find("12 bytes, not 16"), std::string::npos);
  EXPECT_EQ(chunks.size(), 3u);
}

}  // namespace
}  // namespace kvmig
