// A conformance suite every CachePager must pass.
//
// Use: include this header in exactly one test file of a binary and
// instantiate the suite with factories that each produce an empty pager of
// capacity >= 64 that supports the extensions (capacity(), release_pages(),
// drop_logical_seqs(), hold_seqs(); layout() and try_hold_seqs() are
// checked when present):
//
//   INSTANTIATE_TEST_SUITE_P(Mine, PagerConformanceTest,
//                            ::testing::Values(PagerFactory{"mine", make}),
//                            PagerFactoryName);
#ifndef KVMIG_TESTS_SRC_PAGER_CONFORMANCE_H_
#define KVMIG_TESTS_SRC_PAGER_CONFORMANCE_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvmig/pager.h"
#include "kvmig/status.h"
#include "kvmig/types.h"
#include "testutil.h"

namespace kvmig::testing {

struct PagerFactory {
  std::string name;  // a valid test-name suffix: letters, digits, '_'
  std::function<Result<std::unique_ptr<CachePager>>()> make;
};

inline std::string PagerFactoryName(
    const ::testing::TestParamInfo<PagerFactory>& info) {
  return info.param.name;
}

// A page whose bytes are a function of tag (distinct tags, distinct pages).
inline PageBytes pattern_page(const CacheMeta& meta, uint64_t tag) {
  PageBytes page;
  page.k.resize(meta.page_bytes());
  page.v.resize(meta.page_bytes());
  uint64_t x = tag * 0x9e3779b97f4a7c15ull + 1;
  for (auto* half : {&page.k, &page.v}) {
    for (std::byte& b : *half) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      b = static_cast<std::byte>(x);
    }
  }
  return page;
}

inline bool same_bytes(const PageBytes& a, const PageBytes& b) {
  return a.k == b.k && a.v == b.v;
}

class PagerConformanceTest : public ::testing::TestWithParam<PagerFactory> {
 protected:
  void SetUp() override {
    auto made = GetParam().make();
    ASSERT_TRUE(made.ok()) << made.status().to_string();
    pager_ = std::move(made).value();
    meta_ = pager_->meta();
    auto cap = pager_->capacity();
    ASSERT_TRUE(cap.has_value()) << "the suite needs capacity()";
    ASSERT_GE(cap->capacity_pages, 64u);
    ASSERT_EQ(cap->free_pages, cap->capacity_pages) << "pager must be empty";
  }

  uint64_t free_pages() { return pager_->capacity()->free_pages; }
  std::vector<PageIndex> occupied() {
    auto r = pager_->occupied_pages();
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    return r.ok() ? *r : std::vector<PageIndex>{};
  }
  std::vector<LogicalSeq> seqs() {
    auto r = pager_->logical_seqs();
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    return r.ok() ? *r : std::vector<LogicalSeq>{};
  }
  // Allocates n slots and writes pattern_page(tag_base + i) into slot i.
  std::vector<PageIndex> allocate_written(uint32_t n, uint64_t tag_base) {
    auto r = pager_->allocate_pages(n);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    if (!r.ok()) return {};
    EXPECT_EQ(r->size(), n);
    for (size_t i = 0; i < r->size(); ++i) {
      EXPECT_OK(pager_->write_page((*r)[i], pattern_page(meta_, tag_base + i)));
    }
    return *r;
  }
  uint64_t tokens_for_pages(size_t n) {
    return uint64_t{meta_.page_size_tokens} * (n - 1) + 1;
  }

  std::unique_ptr<CachePager> pager_;
  CacheMeta meta_;
};

TEST_P(PagerConformanceTest, AllocateWriteReadRoundTrip) {
  std::vector<PageIndex> ixs = allocate_written(3, 100);
  ASSERT_EQ(ixs.size(), 3u);
  EXPECT_EQ(free_pages(), pager_->capacity()->capacity_pages - 3);
  std::vector<PageIndex> occ = occupied();
  for (PageIndex ix : ixs) {
    EXPECT_NE(std::find(occ.begin(), occ.end(), ix), occ.end());
  }
  EXPECT_TRUE(std::is_sorted(occ.begin(), occ.end()));
  for (size_t i = 0; i < ixs.size(); ++i) {
    ASSERT_OK_AND_ASSIGN(PageBytes got, pager_->read_page(ixs[i]));
    EXPECT_TRUE(same_bytes(got, pattern_page(meta_, 100 + i))) << "slot " << i;
  }
  // Overwriting replaces the content.
  ASSERT_OK(pager_->write_page(ixs[0], pattern_page(meta_, 7)));
  ASSERT_OK_AND_ASSIGN(PageBytes again, pager_->read_page(ixs[0]));
  EXPECT_TRUE(same_bytes(again, pattern_page(meta_, 7)));
}

TEST_P(PagerConformanceTest, AllocatePastCapacityAllocatesNothing) {
  std::vector<PageIndex> some = allocate_written(2, 1);
  const uint64_t free_before = free_pages();
  auto r = pager_->allocate_pages(static_cast<uint32_t>(free_before + 1));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(free_pages(), free_before);
  EXPECT_EQ(occupied(), some);
  // Exactly the free count still works.
  ASSERT_OK_AND_ASSIGN(
      auto all, pager_->allocate_pages(static_cast<uint32_t>(free_before)));
  EXPECT_EQ(all.size(), free_before);
  EXPECT_EQ(free_pages(), 0u);
}

TEST_P(PagerConformanceTest, InstallAndLogicalSeqs) {
  std::vector<PageIndex> p = allocate_written(4, 10);
  ASSERT_EQ(p.size(), 4u);
  LogicalSeq b{9, tokens_for_pages(3), {p[0], p[1], p[3]}};
  LogicalSeq a{4, tokens_for_pages(3), {p[0], p[1], p[2]}};
  ASSERT_OK(pager_->install_logical_seqs({b, a}));
  std::vector<LogicalSeq> got = seqs();
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0], a);  // ascending by id
  EXPECT_EQ(got[1], b);
  // Installed pages keep their bytes.
  ASSERT_OK_AND_ASSIGN(PageBytes page, pager_->read_page(p[3]));
  EXPECT_TRUE(same_bytes(page, pattern_page(meta_, 13)));

  // A live id is refused, and the whole batch with it.
  std::vector<PageIndex> q = allocate_written(1, 50);
  LogicalSeq fresh{20, 1, {q[0]}};
  LogicalSeq dup{4, 1, {q[0]}};
  Status s = pager_->install_logical_seqs({fresh, dup});
  EXPECT_EQ(s.code(), StatusCode::kAlreadyExists) << s.to_string();
  EXPECT_EQ(seqs().size(), 2u);
  // Allocated-not-installed slots can still be released afterwards.
  EXPECT_OK(pager_->release_pages(q));
}

TEST_P(PagerConformanceTest, InstallPointingAtFreeSlotChangesNothing) {
  std::vector<PageIndex> p = allocate_written(2, 0);
  const std::vector<PageIndex> occ_before = occupied();
  const uint64_t free_before = free_pages();
  PageIndex free_slot = 0;
  while (std::find(p.begin(), p.end(), free_slot) != p.end()) ++free_slot;
  LogicalSeq good{1, tokens_for_pages(2), {p[0], p[1]}};
  LogicalSeq bad{2, tokens_for_pages(2), {p[0], free_slot}};
  Status s = pager_->install_logical_seqs({good, bad});
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.to_string();
  EXPECT_TRUE(seqs().empty());
  EXPECT_EQ(occupied(), occ_before);
  EXPECT_EQ(free_pages(), free_before);
  // Nothing became owned: the slots can still be released.
  EXPECT_OK(pager_->release_pages(p));
}

TEST_P(PagerConformanceTest, InstallRejectsMalformedSeqs) {
  std::vector<PageIndex> p = allocate_written(2, 0);
  // Too many pages for the tokens.
  Status s = pager_->install_logical_seqs({{1, 1, {p[0], p[1]}}});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
  // Too few pages for the tokens.
  s = pager_->install_logical_seqs({{1, tokens_for_pages(3), {p[0], p[1]}}});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
  // The same page twice in one sequence.
  s = pager_->install_logical_seqs({{1, tokens_for_pages(2), {p[0], p[0]}}});
  EXPECT_FALSE(s.ok());
  // Out of range page.
  s = pager_->install_logical_seqs({{1, 1, {0xFFFFFFFFu}}});
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(seqs().empty());
  EXPECT_OK(pager_->release_pages(p));
}

// A token count whose page count a naive ceil(n / page) wraps to zero (or
// to any other wrong count) is refused, naming the request and its tokens,
// and the whole batch with it.
TEST_P(PagerConformanceTest, InstallRejectsTokensThatDoNotFitThePages) {
  std::vector<PageIndex> p = allocate_written(2, 70);
  const uint64_t free_before = free_pages();
  LogicalSeq good{1, tokens_for_pages(2), {p[0], p[1]}};
  const std::vector<LogicalSeq> bad = {
      {4242, UINT64_MAX, {}},
      {4242, UINT64_MAX - meta_.page_size_tokens + 2, {}},
      {4242, UINT64_MAX, {p[0]}},
      {4242, tokens_for_pages(2) + meta_.page_size_tokens, {p[0], p[1]}},
  };
  for (const LogicalSeq& seq : bad) {
    SCOPED_TRACE(std::to_string(seq.n_tokens) + " tokens in " +
                 std::to_string(seq.pages.size()) + " pages");
    Status s = pager_->install_logical_seqs({good, seq});
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
    EXPECT_NE(s.message().find("4242"), std::string::npos) << s.to_string();
    EXPECT_NE(s.message().find(std::to_string(seq.n_tokens)), std::string::npos)
        << s.to_string();
    EXPECT_TRUE(seqs().empty());
    EXPECT_EQ(free_pages(), free_before);
  }
  // Nothing became owned: the slots can still be released.
  EXPECT_OK(pager_->release_pages(p));
}

TEST_P(PagerConformanceTest, WrongSizeWriteFailsAndKeepsPage) {
  std::vector<PageIndex> p = allocate_written(1, 5);
  PageBytes bad = pattern_page(meta_, 6);
  bad.k.pop_back();
  Status s = pager_->write_page(p[0], bad);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
  bad = pattern_page(meta_, 6);
  bad.v.push_back(std::byte{0});
  s = pager_->write_page(p[0], bad);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
  ASSERT_OK_AND_ASSIGN(PageBytes got, pager_->read_page(p[0]));
  EXPECT_TRUE(same_bytes(got, pattern_page(meta_, 5)));
}

TEST_P(PagerConformanceTest, OutOfRangeAndFreeSlots) {
  const auto cap = static_cast<PageIndex>(pager_->capacity()->capacity_pages);
  for (PageIndex ix : {cap, PageIndex{0xFFFFFFFFu}}) {
    auto r = pager_->read_page(ix);
    EXPECT_EQ(r.status().code(), StatusCode::kOutOfRange) << ix;
    Status s = pager_->write_page(ix, pattern_page(meta_, 1));
    EXPECT_EQ(s.code(), StatusCode::kOutOfRange) << s.to_string();
  }
  // Slot 0 of an empty pager is free.
  EXPECT_EQ(pager_->read_page(0).status().code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(pager_->write_page(0, pattern_page(meta_, 1)).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_TRUE(occupied().empty());
}

TEST_P(PagerConformanceTest, ReleasePages) {
  std::vector<PageIndex> p = allocate_written(4, 0);
  const uint64_t cap = pager_->capacity()->capacity_pages;
  ASSERT_OK(pager_->install_logical_seqs({{1, 1, {p[3]}}}));
  // An owned slot in the batch: nothing is released.
  const std::vector<PageIndex> mixed = {p[0], p[3]};
  EXPECT_EQ(pager_->release_pages(mixed).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(free_pages(), cap - 4);
  const std::vector<PageIndex> two = {p[0], p[1]};
  ASSERT_OK(pager_->release_pages(two));
  EXPECT_EQ(free_pages(), cap - 2);
  EXPECT_EQ(occupied(), (std::vector<PageIndex>{p[2], p[3]}));
  // Releasing a free slot fails, all or nothing.
  const std::vector<PageIndex> again = {p[2], p[0]};
  EXPECT_EQ(pager_->release_pages(again).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(free_pages(), cap - 2);
  const std::vector<PageIndex> out_of_range = {0xFFFFFFFFu};
  EXPECT_FALSE(pager_->release_pages(out_of_range).ok());
}

TEST_P(PagerConformanceTest, DropFreesOnlyUnsharedPages) {
  std::vector<PageIndex> p = allocate_written(4, 30);
  const uint64_t cap = pager_->capacity()->capacity_pages;
  LogicalSeq a{1, tokens_for_pages(3), {p[0], p[1], p[2]}};
  LogicalSeq b{2, tokens_for_pages(3), {p[0], p[1], p[3]}};
  ASSERT_OK(pager_->install_logical_seqs({a, b}));

  // An unknown id in the batch: nothing is dropped.
  const std::vector<SeqId> with_unknown = {1, 77};
  EXPECT_EQ(pager_->drop_logical_seqs(with_unknown).code(),
            StatusCode::kNotFound);
  EXPECT_EQ(seqs().size(), 2u);

  const std::vector<SeqId> drop_a = {1};
  ASSERT_OK(pager_->drop_logical_seqs(drop_a));
  EXPECT_EQ(free_pages(), cap - 3);
  EXPECT_EQ(occupied(), (std::vector<PageIndex>{p[0], p[1], p[3]}));
  ASSERT_EQ(seqs(), std::vector<LogicalSeq>{b});
  for (size_t i : {0, 1}) {
    ASSERT_OK_AND_ASSIGN(PageBytes page, pager_->read_page(p[i]));
    EXPECT_TRUE(same_bytes(page, pattern_page(meta_, 30 + i)));
  }
  const std::vector<SeqId> drop_b = {2};
  ASSERT_OK(pager_->drop_logical_seqs(drop_b));
  EXPECT_EQ(free_pages(), cap);
  EXPECT_TRUE(occupied().empty());
  EXPECT_EQ(pager_->drop_logical_seqs(drop_b).code(), StatusCode::kNotFound);
}

TEST_P(PagerConformanceTest, HoldIsAllOrNothingAndDropsWithTheSeq) {
  std::vector<PageIndex> p = allocate_written(2, 40);
  LogicalSeq a{1, tokens_for_pages(1), {p[0]}};
  LogicalSeq b{2, tokens_for_pages(1), {p[1]}};
  ASSERT_OK(pager_->install_logical_seqs({a, b}));
  const std::vector<SeqId> with_unknown = {1, 77};
  EXPECT_EQ(pager_->hold_seqs(with_unknown).code(), StatusCode::kNotFound);
  EXPECT_EQ(pager_->unhold_seqs(with_unknown).code(), StatusCode::kNotFound);
  const std::vector<SeqId> both = {1, 2};
  ASSERT_OK(pager_->hold_seqs(both));
  ASSERT_OK(pager_->hold_seqs(both));  // holding again is a no-op
  // Held sequences stay readable and can be dropped (a move that turned
  // out committed) or let go (rolled back).
  EXPECT_EQ(seqs(), (std::vector<LogicalSeq>{a, b}));
  const std::vector<SeqId> drop_a = {1};
  ASSERT_OK(pager_->drop_logical_seqs(drop_a));
  EXPECT_EQ(pager_->unhold_seqs(both).code(), StatusCode::kNotFound);
  const std::vector<SeqId> only_b = {2};
  ASSERT_OK(pager_->unhold_seqs(only_b));
  ASSERT_OK(pager_->unhold_seqs(only_b));  // not held: a no-op
  EXPECT_EQ(seqs(), std::vector<LogicalSeq>{b});
}

// try_hold_seqs(), where the pager has it: on a quiet pager (no step under
// way) it holds at once, as hold_seqs() would, and it is NotFound for an
// unknown id.
TEST_P(PagerConformanceTest, TryHoldHoldsAtOnceOnAQuietPager) {
  std::vector<PageIndex> p = allocate_written(2, 50);
  LogicalSeq a{1, tokens_for_pages(1), {p[0]}};
  LogicalSeq b{2, tokens_for_pages(1), {p[1]}};
  ASSERT_OK(pager_->install_logical_seqs({a, b}));
  const std::vector<SeqId> with_unknown = {1, 77};
  Status tried = pager_->try_hold_seqs(with_unknown);
  if (tried.code() == StatusCode::kUnimplemented) {
    GTEST_SKIP() << "pager has no try_hold_seqs()";
  }
  EXPECT_EQ(tried.code(), StatusCode::kNotFound) << tried.to_string();
  const std::vector<SeqId> both = {1, 2};
  ASSERT_OK(pager_->try_hold_seqs(both));
  ASSERT_OK(pager_->try_hold_seqs(both));  // holding again is a no-op
  ASSERT_OK(pager_->hold_seqs(both));      // as is holding with hold_seqs
  EXPECT_EQ(seqs(), (std::vector<LogicalSeq>{a, b}));
  ASSERT_OK(pager_->unhold_seqs(both));
  EXPECT_EQ(seqs(), (std::vector<LogicalSeq>{a, b}));
}

TEST_P(PagerConformanceTest, LayoutAgreesWithReadPage) {
  std::optional<PagerLayout> layout = pager_->layout();
  if (!layout) GTEST_SKIP() << "pager has no layout()";
  ASSERT_OK(validate_layout(meta_, *layout));
  EXPECT_EQ(layout->front().slots, pager_->capacity()->capacity_pages);
  std::vector<PageIndex> p = allocate_written(3, 60);
  for (PageIndex ix : p) {
    std::vector<std::byte> from_layout;
    for (uint32_t i = 0; i < layout->size(); ++i) {
      const StridedRegion& r = (*layout)[i];
      if (r.kind == MemoryKind::kHost) {
        const std::byte* piece = r.base + uint64_t{ix} * r.stride;
        from_layout.insert(from_layout.end(), piece, piece + r.chunk);
        continue;
      }
      // Device memory: only through the pager's copies.
      std::vector<std::byte> piece(r.chunk);
      ASSERT_OK(pager_->copy_from_device(i, uint64_t{ix} * r.stride, piece));
      from_layout.insert(from_layout.end(), piece.begin(), piece.end());
    }
    ASSERT_OK_AND_ASSIGN(PageBytes page, pager_->read_page(ix));
    std::vector<std::byte> canonical = page.k;
    canonical.insert(canonical.end(), page.v.begin(), page.v.end());
    EXPECT_TRUE(from_layout == canonical) << "slot " << ix;
  }
  // The layout stays put.
  std::optional<PagerLayout> again = pager_->layout();
  ASSERT_TRUE(again.has_value());
  ASSERT_EQ(again->size(), layout->size());
  for (size_t i = 0; i < layout->size(); ++i) {
    EXPECT_EQ((*again)[i].base, (*layout)[i].base);
  }
}

// A layout with device regions: copy_to_device lands where read_page sees
// it, and ranges outside a region are refused.
TEST_P(PagerConformanceTest, DeviceCopiesAgreeWithReadPage) {
  std::optional<PagerLayout> layout = pager_->layout();
  if (!layout) GTEST_SKIP() << "pager has no layout()";
  const bool device = std::any_of(layout->begin(), layout->end(), [](auto& r) {
    return r.kind != MemoryKind::kHost;
  });
  if (!device) GTEST_SKIP() << "the layout is host memory only";
  std::vector<PageIndex> p = allocate_written(1, 61);
  const PageIndex ix = p[0];
  uint64_t canonical = 0;  // where region i's piece starts in the page
  for (uint32_t i = 0; i < layout->size(); ++i) {
    const StridedRegion& r = (*layout)[i];
    if (r.kind == MemoryKind::kHost) {
      canonical += r.chunk;
      continue;
    }
    std::vector<std::byte> in(r.chunk);
    for (size_t b = 0; b < in.size(); ++b) in[b] = std::byte(b * 7 + i);
    ASSERT_OK(pager_->copy_to_device(i, uint64_t{ix} * r.stride, in));
    ASSERT_OK_AND_ASSIGN(PageBytes page, pager_->read_page(ix));
    std::vector<std::byte> whole = page.k;
    whole.insert(whole.end(), page.v.begin(), page.v.end());
    EXPECT_TRUE(std::equal(in.begin(), in.end(), whole.begin() + canonical))
        << "region " << i;
    canonical += r.chunk;
    std::vector<std::byte> one(1);
    EXPECT_EQ(pager_->copy_from_device(i, r.span_bytes(), one).code(),
              StatusCode::kOutOfRange);
  }
  std::vector<std::byte> one(1);
  EXPECT_FALSE(
      pager_->copy_from_device(static_cast<uint32_t>(layout->size()), 0, one)
          .ok());
}

TEST_P(PagerConformanceTest, PauseResumeNests) {
  Status s = pager_->resume();
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.to_string();
  ASSERT_OK(pager_->pause());
  ASSERT_OK(pager_->pause());
  EXPECT_OK(pager_->resume());
  EXPECT_OK(pager_->resume());
  EXPECT_EQ(pager_->resume().code(), StatusCode::kFailedPrecondition);
}

}  // namespace kvmig::testing

#endif  // KVMIG_TESTS_SRC_PAGER_CONFORMANCE_H_
