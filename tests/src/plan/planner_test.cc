#include "planner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "testutil.h"

namespace kvmig {
namespace {

// tiny: page_bytes 8192, 2 layers, layer chunk 4096.
constexpr uint64_t kPage = 8192;
constexpr uint64_t kChunk = 4096;
constexpr uint32_t kSlots = 16;

std::vector<RegionGeometry> page_geometry() {
  return {{2 * kPage, 2 * kPage, kSlots}};
}
std::vector<RegionGeometry> layer_geometry() {
  return std::vector<RegionGeometry>(4, {kChunk, kChunk, kSlots});
}

// Applies a plan between simulated memories and checks every pair's page
// arrived in canonical order.
void check_plan_moves_pages(const std::vector<RegionGeometry>& src,
                            const std::vector<RegionGeometry>& dst,
                            const std::vector<PagePair>& pairs,
                            uint64_t max_write) {
  auto region_bytes = [](const RegionGeometry& g) {
    return g.stride * g.slots;
  };
  std::vector<std::vector<uint8_t>> smem, dmem;
  std::mt19937 rng(7);
  for (const auto& g : src) {
    smem.emplace_back(region_bytes(g));
    for (auto& b : smem.back()) b = static_cast<uint8_t>(rng());
  }
  for (const auto& g : dst) dmem.emplace_back(region_bytes(g), 0);
  ASSERT_OK_AND_ASSIGN(auto plan,
                       plan_writes(src, dst, pairs, 2 * kPage, max_write));
  for (const PlannedWrite& w : plan) {
    if (max_write) {
      ASSERT_LE(w.length, max_write);
    }
    ASSERT_LE(w.src_offset + w.length, smem[w.src_region].size());
    ASSERT_LE(w.dst_offset + w.length, dmem[w.dst_region].size());
    std::memcpy(dmem[w.dst_region].data() + w.dst_offset,
                smem[w.src_region].data() + w.src_offset, w.length);
  }
  auto canonical = [](const std::vector<std::vector<uint8_t>>& mem,
                      const std::vector<RegionGeometry>& geo, uint32_t slot) {
    std::vector<uint8_t> out;
    for (size_t r = 0; r < geo.size(); ++r) {
      const uint8_t* p = mem[r].data() + slot * geo[r].stride;
      out.insert(out.end(), p, p + geo[r].chunk);
    }
    return out;
  };
  for (const PagePair& p : pairs) {
    EXPECT_EQ(canonical(smem, src, p.src), canonical(dmem, dst, p.dst))
        << "page " << p.src << " -> " << p.dst;
  }
}

TEST(PlannerTest, EveryLayoutCombinationMovesPagesIntact) {
  std::vector<PagePair> pairs = {{0, 3}, {1, 4}, {2, 5}, {7, 0}, {9, 15}};
  for (auto src : {page_geometry(), layer_geometry()}) {
    for (auto dst : {page_geometry(), layer_geometry()}) {
      check_plan_moves_pages(src, dst, pairs, 0);
      check_plan_moves_pages(src, dst, pairs, 1000);
    }
  }
}

// Pairs in any order (a destination's slots come in the pager's order):
// the plan is in source order (region, then offset), moves every page
// intact, and still merges what is contiguous on both sides.
TEST(PlannerTest, PairsInAnyOrderArePlannedInSourceOrder) {
  std::vector<PagePair> pairs;
  for (uint32_t k = 0; k < kSlots; ++k) pairs.push_back({k, k});
  std::mt19937 rng(11);
  std::vector<uint32_t> dst_slots(kSlots);
  for (uint32_t k = 0; k < kSlots; ++k) dst_slots[k] = k;
  std::shuffle(dst_slots.begin(), dst_slots.end(), rng);
  for (uint32_t k = 0; k < kSlots; ++k) pairs[k].dst = dst_slots[k];
  std::shuffle(pairs.begin(), pairs.end(), rng);
  for (auto src : {page_geometry(), layer_geometry()}) {
    for (auto dst : {page_geometry(), layer_geometry()}) {
      for (uint64_t max_write : {uint64_t{0}, uint64_t{1000}}) {
        check_plan_moves_pages(src, dst, pairs, max_write);
        ASSERT_OK_AND_ASSIGN(
            auto plan, plan_writes(src, dst, pairs, 2 * kPage, max_write));
        for (size_t w = 1; w < plan.size(); ++w) {
          const PlannedWrite& a = plan[w - 1];
          const PlannedWrite& b = plan[w];
          EXPECT_TRUE(a.src_region < b.src_region ||
                      (a.src_region == b.src_region &&
                       a.src_offset + a.length <= b.src_offset))
              << "write " << w;
        }
      }
    }
  }
  // Slots 3, 4 and 5 to 7, 8 and 9, given out of order: one write per
  // layer region.
  const std::vector<PagePair> run = {{5, 9}, {3, 7}, {4, 8}};
  ASSERT_OK_AND_ASSIGN(
      auto plan,
      plan_writes(layer_geometry(), layer_geometry(), run, 2 * kPage, 0));
  ASSERT_EQ(plan.size(), 4u);
  for (uint32_t r = 0; r < 4; ++r) {
    EXPECT_EQ(plan[r],
              (PlannedWrite{r, 3 * kChunk, r, 7 * kChunk, 3 * kChunk}));
  }
}

TEST(PlannerTest, MergesRunsContiguousOnBothSides) {
  std::vector<PagePair> run = {{0, 3}, {1, 4}, {2, 5}, {3, 6}};
  ASSERT_OK_AND_ASSIGN(
      auto page_plan,
      plan_writes(page_geometry(), page_geometry(), run, 2 * kPage, 0));
  ASSERT_EQ(page_plan.size(), 1u);
  EXPECT_EQ(page_plan[0].length, 4 * 2 * kPage);
  // Layer to layer: one write per region for the whole run.
  ASSERT_OK_AND_ASSIGN(
      auto layer_plan,
      plan_writes(layer_geometry(), layer_geometry(), run, 2 * kPage, 0));
  EXPECT_EQ(layer_plan.size(), 4u);
  // Not contiguous at the destination: no merging across the gap.
  std::vector<PagePair> gap = {{0, 3}, {1, 5}};
  ASSERT_OK_AND_ASSIGN(
      auto gap_plan,
      plan_writes(page_geometry(), page_geometry(), gap, 2 * kPage, 0));
  EXPECT_EQ(gap_plan.size(), 2u);
  // Page to layer: one piece per layer chunk per page, merged per region.
  ASSERT_OK_AND_ASSIGN(
      auto mixed,
      plan_writes(page_geometry(), layer_geometry(), run, 2 * kPage, 0));
  EXPECT_EQ(mixed.size(), 4u * 4u);
}

TEST(PlannerTest, RejectsBadInput) {
  std::vector<PagePair> out_of_range = {{0, kSlots}};
  auto r =
      plan_writes(page_geometry(), page_geometry(), out_of_range, 2 * kPage, 0);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("out of range"), std::string::npos);
  std::vector<RegionGeometry> short_geo = {{kPage, kPage, kSlots}};
  std::vector<PagePair> one = {{0, 0}};
  EXPECT_FALSE(plan_writes(short_geo, page_geometry(), one, 2 * kPage, 0).ok());
  std::vector<RegionGeometry> overlap = {{100, 2 * kPage, kSlots}};
  EXPECT_FALSE(plan_writes(overlap, page_geometry(), one, 2 * kPage, 0).ok());
  EXPECT_FALSE(plan_writes({}, page_geometry(), one, 2 * kPage, 0).ok());
}

}  // namespace
}  // namespace kvmig
