#include "synthetic_pager.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kvmig/digest.h"
#include "pager_conformance.h"
#include "testutil.h"

namespace kvmig {
namespace {

using testing::PagerConformanceTest;
using testing::PagerFactory;

PagerFactory synthetic_factory(const std::string& preset, PoolLayout layout,
                               uint32_t capacity,
                               PoolMemoryKind memory = PoolMemoryKind::kHost) {
  std::string name = preset + "_" + std::string(pool_layout_name(layout));
  if (memory != PoolMemoryKind::kHost) {
    name += "_" + std::string(pool_memory_kind_name(memory));
  }
  for (char& c : name) {
    if (c == '-') c = '_';
  }
  return {name, [=]() -> Result<std::unique_ptr<CachePager>> {
            KVMIG_ASSIGN_OR_RETURN(CacheMeta meta, preset_meta(preset));
            KVMIG_ASSIGN_OR_RETURN(
                auto pager,
                SyntheticPager::create(meta, layout, capacity, memory));
            return std::unique_ptr<CachePager>(std::move(pager));
          }};
}

INSTANTIATE_TEST_SUITE_P(
    Synthetic, PagerConformanceTest,
    ::testing::Values(synthetic_factory("tiny", PoolLayout::kPage, 64),
                      synthetic_factory("tiny", PoolLayout::kLayer, 96),
                      synthetic_factory("llama3-8b", PoolLayout::kPage, 64),
                      synthetic_factory("llama3-8b", PoolLayout::kLayer, 64),
                      synthetic_factory("tiny", PoolLayout::kPage, 64,
                                        PoolMemoryKind::kSimDevice),
                      synthetic_factory("tiny", PoolLayout::kLayer, 96,
                                        PoolMemoryKind::kSimDevice)),
    testing::PagerFactoryName);

CacheMeta tiny() { return *preset_meta("tiny"); }

std::unique_ptr<SyntheticPager> make(PoolLayout layout, uint32_t capacity,
                                     CacheMeta meta = tiny()) {
  auto r = SyntheticPager::create(meta, layout, capacity);
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return r.ok() ? std::move(r).value() : nullptr;
}

std::vector<LogicalSeq> seqs_of(SyntheticPager& pager) {
  auto r = pager.logical_seqs();
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return r.ok() ? *r : std::vector<LogicalSeq>{};
}

uint64_t free_of(SyntheticPager& pager) { return pager.capacity()->free_pages; }

// seq id -> digest of every live sequence.
std::map<SeqId, Digest> digests(SyntheticPager& pager) {
  std::map<SeqId, Digest> out;
  for (const LogicalSeq& seq : seqs_of(pager)) {
    auto d = seq_digest(pager, seq);
    EXPECT_TRUE(d.ok()) << d.status().to_string();
    if (d.ok()) out[seq.seq_id] = *d;
  }
  return out;
}

TEST(SyntheticPagerTest, CreateRejectsBadArguments) {
  auto r = SyntheticPager::create(tiny(), PoolLayout::kPage, 0);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  CacheMeta bad = tiny();
  bad.n_heads = 0;
  r = SyntheticPager::create(bad, PoolLayout::kLayer, 16);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  bad = tiny();
  bad.dtype = static_cast<Dtype>(9);
  r = SyntheticPager::create(bad, PoolLayout::kPage, 16);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
}

TEST(SyntheticPagerTest, ParsesLayoutNames) {
  for (PoolLayout l : {PoolLayout::kPage, PoolLayout::kLayer}) {
    ASSERT_OK_AND_ASSIGN(PoolLayout parsed,
                         parse_pool_layout(pool_layout_name(l)));
    EXPECT_EQ(parsed, l);
  }
  EXPECT_EQ(parse_pool_layout("rows").status().code(),
            StatusCode::kInvalidArgument);
}

TEST(SyntheticPagerTest, LayoutShapes) {
  auto page = make(PoolLayout::kPage, 8);
  auto layer = make(PoolLayout::kLayer, 8);
  const CacheMeta m = tiny();
  ASSERT_EQ(page->layout()->size(), 1u);
  EXPECT_EQ(page->layout()->front().chunk, 2 * m.page_bytes());
  EXPECT_EQ(page->layout()->front().stride, 2 * m.page_bytes());
  ASSERT_EQ(layer->layout()->size(), 2u * m.n_layers);
  const PagerLayout regions = *layer->layout();
  for (const StridedRegion& r : regions) {
    EXPECT_EQ(r.chunk, m.layer_chunk_bytes());
    EXPECT_EQ(r.stride, m.layer_chunk_bytes());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(r.base) % 4096, 0u);
  }
}

TEST(SyntheticPagerTest, ErrorMessagesNameIndexAndBound) {
  auto pager = make(PoolLayout::kPage, 16);
  auto r = pager->read_page(5000);
  EXPECT_EQ(r.status().message(),
            "read_page: index 5000 out of range (capacity 16)");
  ASSERT_OK(pager->allocate_pages(13));
  auto a = pager->allocate_pages(10);
  EXPECT_EQ(a.status().message(), "allocate_pages: need 10, 3 free");
  EXPECT_EQ(pager->write_page(14, testing::pattern_page(tiny(), 1)).message(),
            "write_page: slot 14 is free");
}

TEST(SyntheticPagerTest, InstallRefusesBadTablesAndInstallsNothing) {
  auto pager = make(PoolLayout::kPage, 16);
  ASSERT_OK_AND_ASSIGN(auto p, pager->allocate_pages(3));  // 0, 1, 2
  const uint64_t two_pages = tiny().page_size_tokens + 1;
  struct Case {
    std::vector<LogicalSeq> seqs;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{{1, two_pages, {p[0], 5000}}},
       "install_logical_seqs: seq 1: page index 5000 out of range "
       "(capacity 16)"},
      {{{1, two_pages, {p[0], 9}}},
       "install_logical_seqs: seq 1: slot 9 is free"},
      {{{1, two_pages, {p[1], p[1]}}},
       "install_logical_seqs: seq 1: slot 1 appears twice"},
      // The second request is refused after the first was checked.
      {{{1, two_pages, {p[0], p[1]}}, {2, two_pages, {p[2], p[2]}}},
       "install_logical_seqs: seq 2: slot 2 appears twice"},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(pager->install_logical_seqs(c.seqs).message(), c.message);
    EXPECT_TRUE(seqs_of(*pager).empty()) << c.message;
  }
  // Nothing a refusal marked is left behind: two requests that share a
  // slot (as a shared prefix does) install.
  ASSERT_OK(pager->install_logical_seqs(
      {{1, two_pages, {p[0], p[1]}}, {2, two_pages, {p[1], p[2]}}}));
  EXPECT_EQ(seqs_of(*pager).size(), 2u);
}

TEST(SyntheticPagerTest, AllocatesLowestFreeSlotsFirst) {
  auto pager = make(PoolLayout::kLayer, 16);
  ASSERT_OK_AND_ASSIGN(auto a, pager->allocate_pages(4));
  EXPECT_EQ(a, (std::vector<PageIndex>{0, 1, 2, 3}));
  const std::vector<PageIndex> rel = {1, 2};
  ASSERT_OK(pager->release_pages(rel));
  ASSERT_OK_AND_ASSIGN(auto b, pager->allocate_pages(3));
  EXPECT_EQ(b, (std::vector<PageIndex>{1, 2, 4}));
}

TEST(SyntheticPagerTest, PopulateIsDeterministicAcrossLayoutsAndPagers) {
  auto a = make(PoolLayout::kPage, 64);
  auto b = make(PoolLayout::kLayer, 64);
  auto c = make(PoolLayout::kPage, 64);
  auto d = make(PoolLayout::kPage, 64);
  // Occupy low slots of c so its requests land elsewhere.
  ASSERT_OK(c->allocate_pages(5));
  ASSERT_OK(a->populate(3, 50, 7));
  ASSERT_OK(b->populate(3, 50, 7));
  ASSERT_OK(c->populate(3, 50, 7));
  ASSERT_OK(d->populate(3, 50, 8));
  auto da = digests(*a);
  ASSERT_EQ(da.size(), 3u);
  EXPECT_EQ(da, digests(*b));
  EXPECT_EQ(da, digests(*c));
  auto dd = digests(*d);
  for (const auto& [id, digest] : da) EXPECT_NE(digest, dd[id]) << id;
  // Different requests have different content.
  EXPECT_NE(da[1], da[2]);
  // Ids are 1..3; 4 pages each.
  std::vector<LogicalSeq> seqs = seqs_of(*a);
  EXPECT_EQ(seqs[0].seq_id, 1u);
  EXPECT_EQ(seqs[2].seq_id, 3u);
  EXPECT_EQ(seqs[0].pages, (std::vector<PageIndex>{0, 1, 2, 3}));
  EXPECT_EQ(free_of(*a), 64u - 12);
}

TEST(SyntheticPagerTest, PopulateTailIsZeroAndIdsFollowLargest) {
  auto pager = make(PoolLayout::kLayer, 64);
  ASSERT_OK(pager->install_logical_seqs({}));
  ASSERT_OK(pager->populate(1, 20, 1));
  ASSERT_OK(pager->populate(2, 20, 1));
  std::vector<LogicalSeq> seqs = seqs_of(*pager);
  ASSERT_EQ(seqs.size(), 3u);
  EXPECT_EQ(seqs[2].seq_id, 3u);
  const CacheMeta m = tiny();
  ASSERT_OK_AND_ASSIGN(PageBytes last, pager->read_page(seqs[0].pages[1]));
  // Tokens 4..15 of each layer chunk of the last page are zero.
  for (const auto* half : {&last.k, &last.v}) {
    for (uint32_t l = 0; l < m.n_layers; ++l) {
      const uint64_t start = l * m.layer_chunk_bytes();
      for (uint64_t i = 4 * m.token_bytes_per_layer();
           i < m.layer_chunk_bytes(); ++i) {
        ASSERT_EQ((*half)[start + i], std::byte{0}) << "layer " << l;
      }
      EXPECT_NE((*half)[start], std::byte{0});  // covered token (likely != 0)
    }
  }
}

TEST(SyntheticPagerTest, PopulateIsAllOrNothing) {
  auto pager = make(PoolLayout::kPage, 64);
  Status s = pager->populate(5, 16 * 13, 1);  // 65 pages
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.to_string();
  EXPECT_EQ(free_of(*pager), 64u);
  EXPECT_TRUE(seqs_of(*pager).empty());
  s = pager->populate(1, 16 * 65, 1);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.to_string();
  EXPECT_EQ(pager->populate(1, 0, 1).code(), StatusCode::kInvalidArgument);
  // Exactly full works.
  ASSERT_OK(pager->populate(4, 16 * 16, 1));
  EXPECT_EQ(free_of(*pager), 0u);
}

// `kvmig serve --populate 1:-1` asked for 2^64 - 1 tokens: a page count that
// wraps to zero made a request with no pages, and decoding it crashed.
TEST(SyntheticPagerTest, PopulateRefusesTokenCountsThatWrap) {
  auto pager = make(PoolLayout::kPage, 64);
  for (uint64_t tokens : {UINT64_MAX, UINT64_MAX - 14}) {
    Status s = pager->populate(1, tokens, 1, UINT64_MAX);
    EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.to_string();
    EXPECT_NE(s.message().find(std::to_string(tokens)), std::string::npos)
        << s.to_string();
  }
  EXPECT_TRUE(seqs_of(*pager).empty());
  EXPECT_EQ(free_of(*pager), 64u);
  EXPECT_EQ(pager->decode_step(), 0u);
}

TEST(SyntheticPagerTest, SharedPrefixPagesAreShared) {
  auto pager = make(PoolLayout::kLayer, 64);
  ASSERT_OK(pager->populate(3, 100, 5, 70));  // 4 shared pages of 7
  std::vector<LogicalSeq> seqs = seqs_of(*pager);
  ASSERT_EQ(seqs.size(), 3u);
  for (const LogicalSeq& s : seqs) {
    ASSERT_EQ(s.pages.size(), 7u);
    EXPECT_TRUE(std::equal(s.pages.begin(), s.pages.begin() + 4,
                           seqs[0].pages.begin()));
  }
  EXPECT_NE(seqs[1].pages[4], seqs[0].pages[4]);
  EXPECT_EQ(free_of(*pager), 64u - (4 + 3 * 3));

  // Shared tokens have the same content in every request: the digests of
  // the 64-token prefixes agree, the whole requests differ.
  auto prefix = [&](const LogicalSeq& s) {
    LogicalSeq p{s.seq_id, 64, {s.pages.begin(), s.pages.begin() + 4}};
    return *seq_digest(*pager, p);
  };
  EXPECT_EQ(prefix(seqs[0]), prefix(seqs[2]));
  auto before = digests(*pager);
  EXPECT_NE(before[1], before[2]);

  // A request's bytes do not depend on the slots it lands in.
  auto other = make(PoolLayout::kPage, 64);
  ASSERT_OK(other->allocate_pages(9));
  ASSERT_OK(other->populate(3, 100, 5, 70));
  EXPECT_EQ(digests(*other), before);

  const std::vector<SeqId> drop = {1};
  ASSERT_OK(pager->drop_logical_seqs(drop));
  EXPECT_EQ(free_of(*pager), 64u - (4 + 2 * 3));
  auto after = digests(*pager);
  EXPECT_EQ(after.size(), 2u);
  EXPECT_EQ(after[2], before[2]);
  EXPECT_EQ(after[3], before[3]);
}

TEST(SyntheticPagerTest, SharedPrefixIsClampedToFullPages) {
  auto pager = make(PoolLayout::kPage, 64);
  ASSERT_OK(pager->populate(3, 40, 5, 512));  // 3 pages, 2 full
  std::vector<LogicalSeq> seqs = seqs_of(*pager);
  ASSERT_EQ(seqs.size(), 3u);
  EXPECT_EQ(seqs[0].pages[1], seqs[2].pages[1]);
  EXPECT_NE(seqs[0].pages[2], seqs[2].pages[2]);
  EXPECT_EQ(free_of(*pager), 64u - (2 + 3));
  // Exactly full pages can all be shared.
  auto full = make(PoolLayout::kPage, 64);
  ASSERT_OK(full->populate(4, 32, 5, 32));
  EXPECT_EQ(free_of(*full), 62u);
}

TEST(SyntheticPagerTest, DecodeAppendsAndAllocates) {
  auto pager = make(PoolLayout::kLayer, 64);
  ASSERT_OK(pager->populate(2, 16, 3));
  auto before = digests(*pager);
  EXPECT_EQ(pager->decode_step(), 2u);
  std::vector<LogicalSeq> seqs = seqs_of(*pager);
  for (const LogicalSeq& s : seqs) {
    EXPECT_EQ(s.n_tokens, 17u);
    EXPECT_EQ(s.pages.size(), 2u);
    // The first 16 tokens did not change.
    LogicalSeq head{s.seq_id, 16, {s.pages[0]}};
    EXPECT_EQ(*seq_digest(*pager, head), before[s.seq_id]);
  }
  EXPECT_EQ(free_of(*pager), 60u);
  for (int i = 0; i < 15; ++i) EXPECT_EQ(pager->decode_step(), 2u);
  seqs = seqs_of(*pager);
  EXPECT_EQ(seqs[0].n_tokens, 32u);
  EXPECT_EQ(seqs[0].pages.size(), 2u);
  EXPECT_EQ(free_of(*pager), 60u);
}

TEST(SyntheticPagerTest, DecodedTokensAreDeterministic) {
  auto a = make(PoolLayout::kPage, 16);
  auto b = make(PoolLayout::kLayer, 16);
  ASSERT_OK(b->allocate_pages(3));
  ASSERT_OK(a->populate(2, 10, 3));
  ASSERT_OK(b->populate(2, 10, 3));
  for (int i = 0; i < 20; ++i) {
    a->decode_step();
    b->decode_step();
  }
  EXPECT_EQ(digests(*a), digests(*b));
}

TEST(SyntheticPagerTest, DecodeSkipsRequestsWithoutRoom) {
  auto pager = make(PoolLayout::kPage, 3);
  ASSERT_OK(pager->populate(2, 16, 3));
  EXPECT_EQ(pager->decode_step(), 1u);  // one free page for two requests
  EXPECT_EQ(free_of(*pager), 0u);
  std::vector<LogicalSeq> seqs = seqs_of(*pager);
  EXPECT_EQ(seqs[0].n_tokens, 17u);
  EXPECT_EQ(seqs[1].n_tokens, 16u);
  EXPECT_EQ(pager->decode_step(), 1u);
}

TEST(SyntheticPagerTest, DecodeCopiesASharedTailPage) {
  auto pager = make(PoolLayout::kLayer, 16);
  ASSERT_OK_AND_ASSIGN(auto p, pager->allocate_pages(1));
  ASSERT_OK(pager->write_page(p[0], testing::pattern_page(tiny(), 4)));
  ASSERT_OK(pager->install_logical_seqs({{1, 5, {p[0]}}, {2, 5, {p[0]}}}));
  auto before = digests(*pager);
  EXPECT_EQ(pager->decode_step(), 2u);
  std::vector<LogicalSeq> seqs = seqs_of(*pager);
  EXPECT_NE(seqs[0].pages[0], seqs[1].pages[0]);
  EXPECT_EQ(free_of(*pager), 14u);  // one copy; one keeps the old page
  for (const LogicalSeq& s : seqs) {
    LogicalSeq head{s.seq_id, 5, s.pages};
    EXPECT_EQ(*seq_digest(*pager, head), before[s.seq_id]);
  }
}

TEST(SyntheticPagerTest, PausedPagerDoesNotDecode) {
  auto pager = make(PoolLayout::kPage, 16);
  ASSERT_OK(pager->populate(2, 5, 3));
  ASSERT_OK(pager->pause());
  EXPECT_EQ(pager->decode_step(), 0u);
  EXPECT_EQ(pager->populate(1, 5, 3).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(seqs_of(*pager)[0].n_tokens, 5u);
  ASSERT_OK(pager->resume());
  EXPECT_EQ(pager->decode_step(), 2u);
}

TEST(SyntheticPagerTest, HeldRequestsDoNotDecodeTheOthersDo) {
  auto pager = make(PoolLayout::kPage, 16);
  ASSERT_OK(pager->populate(3, 5, 3));
  const std::vector<SeqId> held = {2};
  ASSERT_OK(pager->hold_seqs(held));
  EXPECT_EQ(pager->decode_step(), 2u);
  auto s = seqs_of(*pager);
  EXPECT_EQ(s[0].n_tokens, 6u);
  EXPECT_EQ(s[1].n_tokens, 5u);
  EXPECT_EQ(s[2].n_tokens, 6u);
  ASSERT_OK(pager->unhold_seqs(held));
  EXPECT_EQ(pager->decode_step(), 3u);
  EXPECT_EQ(seqs_of(*pager)[1].n_tokens, 6u);
}

TEST(SyntheticPagerTest, TryHoldHoldsAtOnceAllOrNothing) {
  auto pager = make(PoolLayout::kPage, 16);
  ASSERT_OK(pager->populate(3, 5, 3));
  const std::vector<SeqId> held = {2};
  ASSERT_OK(pager->try_hold_seqs(held));
  const std::vector<SeqId> unknown = {1, 99};
  Status s = pager->try_hold_seqs(unknown);
  EXPECT_EQ(s.code(), StatusCode::kNotFound) << s.to_string();
  EXPECT_EQ(pager->decode_step(), 2u);  // 1 is not held, 2 is
  EXPECT_EQ(seqs_of(*pager)[1].n_tokens, 5u);
  ASSERT_OK(pager->unhold_seqs(held));
  EXPECT_EQ(pager->decode_step(), 3u);
}

// While a decode step has the state, try_hold_seqs says so instead of
// waiting: with a decode thread stepping without pause, some try meets
// one.
TEST(SyntheticPagerTest, TryHoldDuringADecodeStepSaysItWouldWait) {
  auto pager = make(PoolLayout::kPage, 4096);
  ASSERT_OK(pager->populate(64, 5, 3));
  pager->start_decoding(1e7);
  const std::vector<SeqId> ids = {1};
  int tries = 0;
  Status s;
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < deadline) {
    ++tries;
    s = pager->try_hold_seqs(ids);
    if (s.code() == StatusCode::kUnavailable) break;
    ASSERT_OK(s);
    ASSERT_OK(pager->unhold_seqs(ids));
  }
  pager->stop_decoding();
  EXPECT_EQ(s.code(), StatusCode::kUnavailable)
      << s.to_string() << " after " << tries << " tries";
}

TEST(SyntheticPagerTest, DecodeThreadStartsAndStops) {
  auto pager = make(PoolLayout::kPage, 64);
  ASSERT_OK(pager->populate(2, 5, 3));
  pager->start_decoding(2000);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (seqs_of(*pager)[0].n_tokens < 20 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  pager->stop_decoding();
  const uint64_t n = seqs_of(*pager)[0].n_tokens;
  EXPECT_GE(n, 20u);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(seqs_of(*pager)[0].n_tokens, n);
  // Restartable; destruction stops a running thread.
  pager->start_decoding(1000);
}

TEST(SyntheticPagerTest, PauseGivesStablePagesWhileDecoding) {
  auto pager = make(PoolLayout::kLayer, 512);
  ASSERT_OK(pager->populate(4, 30, 9));
  pager->start_decoding(20000);
  for (int round = 0; round < 5; ++round) {
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
    ASSERT_OK(pager->pause());
    std::vector<LogicalSeq> seqs = seqs_of(*pager);
    std::vector<PageBytes> first;
    for (const LogicalSeq& s : seqs) {
      for (PageIndex ix : s.pages) {
        ASSERT_OK_AND_ASSIGN(PageBytes page, pager->read_page(ix));
        first.push_back(std::move(page));
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    EXPECT_EQ(seqs_of(*pager), seqs);
    size_t i = 0;
    for (const LogicalSeq& s : seqs) {
      for (PageIndex ix : s.pages) {
        ASSERT_OK_AND_ASSIGN(PageBytes page, pager->read_page(ix));
        EXPECT_TRUE(testing::same_bytes(page, first[i++]))
            << "round " << round << " slot " << ix;
      }
    }
    ASSERT_OK(pager->resume());
  }
  pager->stop_decoding();
  EXPECT_GT(seqs_of(*pager)[0].n_tokens, 30u);
}

TEST(SyntheticPagerTest, RandomAllocationOrderIsSeededAndAllOrNothing) {
  auto draw = [](uint64_t seed) {
    auto pager = make(PoolLayout::kPage, 64);
    pager->set_allocation_order(AllocationOrder::kRandom, seed);
    std::vector<PageIndex> out;
    for (int i = 0; i < 3; ++i) {
      auto a = pager->allocate_pages(10);
      EXPECT_TRUE(a.ok()) << a.status().to_string();
      if (a.ok()) out.insert(out.end(), a->begin(), a->end());
    }
    return out;
  };
  const std::vector<PageIndex> a = draw(7);
  ASSERT_EQ(a.size(), 30u);
  EXPECT_EQ(draw(7), a);  // the same seed, the same slots
  EXPECT_NE(draw(8), a);
  EXPECT_EQ(std::set<PageIndex>(a.begin(), a.end()).size(), a.size());
  EXPECT_FALSE(std::is_sorted(a.begin(), a.end()));
  for (PageIndex ix : a) EXPECT_LT(ix, 64u);

  auto pager = make(PoolLayout::kLayer, 16);
  pager->set_allocation_order(AllocationOrder::kRandom, 3);
  ASSERT_OK_AND_ASSIGN(auto first, pager->allocate_pages(12));
  // All or nothing: a request larger than what is free takes nothing.
  EXPECT_EQ(pager->allocate_pages(5).status().code(),
            StatusCode::kResourceExhausted);
  EXPECT_EQ(free_of(*pager), 4u);
  ASSERT_OK_AND_ASSIGN(auto rest, pager->allocate_pages(4));
  std::set<PageIndex> all(first.begin(), first.end());
  all.insert(rest.begin(), rest.end());
  EXPECT_EQ(all.size(), 16u);
  EXPECT_EQ(free_of(*pager), 0u);
  // Released slots come back; back to contiguous, the lowest first.
  ASSERT_OK(pager->release_pages(rest));
  pager->set_allocation_order(AllocationOrder::kContiguous);
  std::vector<PageIndex> sorted = rest;
  std::sort(sorted.begin(), sorted.end());
  ASSERT_OK_AND_ASSIGN(auto again, pager->allocate_pages(4));
  EXPECT_EQ(again, sorted);
}

TEST(SyntheticPagerTest, ParsesAllocationOrderNames) {
  for (AllocationOrder o :
       {AllocationOrder::kContiguous, AllocationOrder::kRandom}) {
    ASSERT_OK_AND_ASSIGN(AllocationOrder parsed,
                         parse_allocation_order(allocation_order_name(o)));
    EXPECT_EQ(parsed, o);
  }
  EXPECT_EQ(parse_allocation_order("lowest").status().code(),
            StatusCode::kInvalidArgument);
}

// --- Where the pool lives (PoolMemory) --------------------------------------

std::unique_ptr<SyntheticPager> make_on(PoolMemoryKind memory,
                                        PoolLayout layout, uint32_t capacity) {
  auto r = SyntheticPager::create(tiny(), layout, capacity, memory);
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return r.ok() ? std::move(r).value() : nullptr;
}

TEST(SimDeviceTest, ContentAndDecodeMatchHostMemory) {
  for (PoolLayout layout : {PoolLayout::kPage, PoolLayout::kLayer}) {
    auto host = make_on(PoolMemoryKind::kHost, layout, 64);
    auto dev = make_on(PoolMemoryKind::kSimDevice, layout, 64);
    ASSERT_OK(host->populate(3, 40, 5, 16));
    ASSERT_OK(dev->populate(3, 40, 5, 16));
    for (int i = 0; i < 20; ++i) {
      EXPECT_EQ(host->decode_step(), 3u);
      EXPECT_EQ(dev->decode_step(), 3u);
    }
    EXPECT_EQ(seqs_of(*host), seqs_of(*dev));
    EXPECT_EQ(digests(*host), digests(*dev));
    const PagerLayout dev_layout = *dev->layout();
    const PagerLayout host_layout = *host->layout();
    for (const StridedRegion& r : dev_layout) {
      EXPECT_EQ(r.kind, MemoryKind::kCuda);
    }
    for (const StridedRegion& r : host_layout) {
      EXPECT_EQ(r.kind, MemoryKind::kHost);
    }
  }
}

// The address kvmig is shown is not CPU memory: touching it kills the
// process at once (the point of the simulation: kvmig never does).
TEST(SimDeviceDeathTest, TheLayoutAddressFaultsOnCpuAccess) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto dev = make_on(PoolMemoryKind::kSimDevice, PoolLayout::kPage, 8);
  ASSERT_OK(dev->populate(1, 16, 1));
  const std::byte* base = dev->layout()->front().base;
  EXPECT_DEATH(
      {
        volatile std::byte b = *base;
        (void)b;
      },
      "");
  // The engine's own mapping has the bytes.
  std::vector<std::byte> first(8);
  ASSERT_OK(dev->copy_from_device(0, 0, first));
  ASSERT_OK_AND_ASSIGN(PageBytes page, dev->read_page(0));
  EXPECT_TRUE(std::equal(first.begin(), first.end(), page.k.begin()));
}

TEST(SimDeviceTest, DmabufExportWorksOrSaysWhy) {
  auto dev = make_on(PoolMemoryKind::kSimDevice, PoolLayout::kPage, 8);
  auto d = dev->export_dmabuf(0);
  if (d.ok()) {
    EXPECT_GE(d->fd, 0);
    EXPECT_EQ(d->offset, 0u);
  } else {
    EXPECT_EQ(d.status().code(), StatusCode::kUnimplemented);
    EXPECT_NE(d.status().message().find("udmabuf"), std::string::npos)
        << d.status().to_string();
  }
  auto host = make_on(PoolMemoryKind::kHost, PoolLayout::kPage, 8);
  EXPECT_EQ(host->export_dmabuf(0).status().code(), StatusCode::kUnimplemented);
  EXPECT_EQ(dev->export_dmabuf(1).status().code(), StatusCode::kOutOfRange);
}

TEST(SimDeviceTest, ParsesMemoryKindNames) {
  for (PoolMemoryKind k : {PoolMemoryKind::kHost, PoolMemoryKind::kSimDevice,
                           PoolMemoryKind::kCuda}) {
    ASSERT_OK_AND_ASSIGN(PoolMemoryKind parsed,
                         parse_pool_memory_kind(pool_memory_kind_name(k)));
    EXPECT_EQ(parsed, k);
  }
  EXPECT_EQ(parse_pool_memory_kind("gpu").status().code(),
            StatusCode::kInvalidArgument);
}

// On a host without a GPU (this one) the cuda kind refuses with a reason;
// with KVMIG_TEST_CUDA=1 (tools/gpu-check.sh) it must work.
TEST(CudaMemoryTest, WorksOnAGpuOrRefusesClearly) {
  auto r = SyntheticPager::create(tiny(), PoolLayout::kLayer, 16,
                                  PoolMemoryKind::kCuda, 0);
  if (std::getenv("KVMIG_TEST_CUDA") == nullptr) {
    if (r.ok()) GTEST_SKIP() << "a GPU is here; set KVMIG_TEST_CUDA=1";
    EXPECT_EQ(r.status().code(), StatusCode::kUnavailable)
        << r.status().to_string();
    EXPECT_NE(r.status().message().find("CUDA"), std::string::npos)
        << r.status().to_string();
    return;
  }
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  auto& gpu = *r;
  auto host = make_on(PoolMemoryKind::kHost, PoolLayout::kLayer, 16);
  ASSERT_OK(gpu->populate(2, 40, 3));
  ASSERT_OK(host->populate(2, 40, 3));
  EXPECT_EQ(gpu->decode_step(), 2u);
  EXPECT_EQ(host->decode_step(), 2u);
  EXPECT_EQ(digests(*gpu), digests(*host));
  const PagerLayout gpu_layout = *gpu->layout();
  for (const StridedRegion& reg : gpu_layout) {
    EXPECT_EQ(reg.kind, MemoryKind::kCuda);
  }
}

}  // namespace
}  // namespace kvmig
