#include "perf_messages.h"

#include <gtest/gtest.h>

#include "testutil.h"

namespace kvmig {
namespace {

WireLimits limits() { return WireLimits{}; }

TEST(MessagesTest, PerfSetupAndReadyRoundTrip) {
  PerfSetupMsg m;
  m.meta = {16, 32, 8, 128, Dtype::kBf16};
  m.layout = PoolLayout::kLayer;
  m.capacity_pages = 512;
  m.order = AllocationOrder::kRandom;
  m.seed = 42;
  m.memory = PoolMemoryKind::kSimDevice;
  ASSERT_OK_AND_ASSIGN(PerfSetupMsg back,
                       decode_perf_setup(encode(m), limits()));
  EXPECT_EQ(back.meta, m.meta);
  EXPECT_EQ(back.layout, m.layout);
  EXPECT_EQ(back.capacity_pages, 512u);
  EXPECT_EQ(back.order, m.order);
  EXPECT_EQ(back.seed, 42u);
  EXPECT_EQ(back.memory, PoolMemoryKind::kSimDevice);
  m.capacity_pages = 0;
  EXPECT_FALSE(decode_perf_setup(encode(m), limits()).ok());
  std::vector<uint8_t> bad = encode(
      PerfSetupMsg{m.meta, PoolLayout::kPage, 4, AllocationOrder::kRandom, 1});
  bad[bad.size() - 10] = 7;  // the order byte
  EXPECT_EQ(decode_perf_setup(bad, limits()).status().code(),
            StatusCode::kDataLoss);
  bad = encode(
      PerfSetupMsg{m.meta, PoolLayout::kPage, 4, AllocationOrder::kRandom, 1});
  bad.back() = 3;  // the memory kind
  EXPECT_EQ(decode_perf_setup(bad, limits()).status().code(),
            StatusCode::kDataLoss);
  ASSERT_OK_AND_ASSIGN(
      PerfReadyMsg ready,
      decode_perf_ready(encode(PerfReadyMsg{"h:1", 9}), limits()));
  EXPECT_EQ(ready.address, "h:1");
  EXPECT_EQ(ready.free_pages, 9u);
}

}  // namespace
}  // namespace kvmig
