#include "write_windows.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

// windows_for covers exactly the bytes of the given slots in every region:
// checked byte by byte against the slots' pieces, for chunks that fill
// their stride (runs of slots joined) and chunks that do not, with slots in
// any order.
namespace kvmig {
namespace {

PagerLayout layout_of(const std::vector<std::pair<uint64_t, uint64_t>>& sc,
                      uint32_t slots) {
  PagerLayout out;
  for (auto [stride, chunk] : sc) {
    out.push_back({nullptr, stride, chunk, slots});
  }
  return out;
}

void expect_covers_exactly(const PagerLayout& layout,
                           const std::vector<PageIndex>& slots) {
  const std::vector<WriteWindow> windows = windows_for(layout, slots);
  for (uint32_t r = 0; r < layout.size(); ++r) {
    std::vector<bool> want(layout[r].span_bytes(), false);
    for (PageIndex s : slots) {
      for (uint64_t b = 0; b < layout[r].chunk; ++b) {
        want[s * layout[r].stride + b] = true;
      }
    }
    std::vector<bool> got(want.size(), false);
    for (const WriteWindow& w : windows) {
      if (w.region != r) continue;
      ASSERT_LE(w.offset + w.length, got.size()) << "region " << r;
      for (uint64_t b = w.offset; b < w.offset + w.length; ++b) got[b] = true;
    }
    EXPECT_EQ(got, want) << "region " << r;
  }
  // Sorted by region, then offset.
  EXPECT_TRUE(std::is_sorted(windows.begin(), windows.end(),
                             [](const WriteWindow& a, const WriteWindow& b) {
                               return a.region != b.region
                                          ? a.region < b.region
                                          : a.offset < b.offset;
                             }));
}

TEST(WriteWindowsTest, ConsecutiveSlotsAreOneWindowWhereChunksFillTheStride) {
  const PagerLayout layout = layout_of({{16, 16}, {8, 8}}, 64);
  const std::vector<PageIndex> slots = {12, 10, 11, 3, 4, 40};
  expect_covers_exactly(layout, slots);
  // Runs {3, 4}, {10..12}, {40}: three windows per region.
  EXPECT_EQ(windows_for(layout, slots).size(), 6u);
}

TEST(WriteWindowsTest, SlotsWithGapsInTheStrideAreOneWindowEach) {
  // A page-major pool whose chunks leave room between slots.
  const PagerLayout layout = layout_of({{32, 24}}, 64);
  const std::vector<PageIndex> slots = {5, 6, 7, 1};
  expect_covers_exactly(layout, slots);
  EXPECT_EQ(windows_for(layout, slots).size(), 4u);
}

TEST(WriteWindowsTest, ShuffledSlotsAreCoveredExactly) {
  const PagerLayout layout = layout_of({{16, 16}, {16, 12}, {4, 4}}, 512);
  std::vector<PageIndex> all(512);
  std::iota(all.begin(), all.end(), 0);
  std::mt19937_64 rng(7);
  std::shuffle(all.begin(), all.end(), rng);
  for (size_t n : {size_t{1}, size_t{37}, size_t{300}, size_t{512}}) {
    SCOPED_TRACE(n);
    expect_covers_exactly(layout, {all.begin(), all.begin() + n});
  }
  // Every slot: one window per region that fills its stride.
  EXPECT_EQ(windows_for(layout, all).size(), 1u + 512u + 1u);
}

}  // namespace
}  // namespace kvmig
