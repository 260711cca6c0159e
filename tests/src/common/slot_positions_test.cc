#include "slot_positions.h"

#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <vector>

// SlotPositions finds every slot of an allocation at its position and no
// other slot, through the table (a dense allocation) and through the
// binary search (a sparse one) alike.
namespace kvmig {
namespace {

void expect_finds_exactly(const std::vector<PageIndex>& slots, PageIndex pool) {
  const SlotPositions positions(slots);
  std::vector<uint32_t> want(pool, SlotPositions::kNone);
  for (uint32_t pos = 0; pos < slots.size(); ++pos) want[slots[pos]] = pos;
  for (PageIndex p = 0; p < pool; ++p) {
    ASSERT_EQ(positions.find(p), want[p]) << "slot " << p;
  }
  EXPECT_EQ(positions.find(pool + 1000), SlotPositions::kNone);
}

std::vector<PageIndex> shuffled_draw(PageIndex pool, size_t n, uint64_t seed) {
  std::vector<PageIndex> all(pool);
  std::iota(all.begin(), all.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(n);
  return all;
}

TEST(SlotPositionsTest, DenseAllocationUsesTheTable) {
  // A run in the middle of the pool, in any order, with a gap.
  std::vector<PageIndex> slots = {107, 100, 101, 105, 103, 102};
  EXPECT_TRUE(SlotPositions(slots).dense());
  expect_finds_exactly(slots, 200);
  const std::vector<PageIndex> many = shuffled_draw(20000, 12000, 1);
  EXPECT_TRUE(SlotPositions(many).dense());
  expect_finds_exactly(many, 20000);
}

TEST(SlotPositionsTest, SparseAllocationUsesTheSearch) {
  // Two slots far apart: a table would span the pool.
  const std::vector<PageIndex> two = {1u << 20, 3};
  EXPECT_FALSE(SlotPositions(two).dense());
  expect_finds_exactly(two, (1u << 20) + 1);
  const std::vector<PageIndex> scattered = shuffled_draw(100000, 1000, 2);
  EXPECT_FALSE(SlotPositions(scattered).dense());
  expect_finds_exactly(scattered, 100000);
}

TEST(SlotPositionsTest, NoSlotsFindNothing) {
  const SlotPositions none(std::vector<PageIndex>{});
  EXPECT_EQ(none.find(0), SlotPositions::kNone);
  EXPECT_EQ(none.find(7), SlotPositions::kNone);
}

}  // namespace
}  // namespace kvmig
