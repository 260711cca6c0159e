#include "precopy.h"

#include <gtest/gtest.h>

#include <vector>

namespace kvmig {
namespace {

constexpr uint32_t kPageTokens = 16;
constexpr bool kRunning = false;
constexpr bool kPaused = true;

std::vector<PageIndex> slots_for(const PrecopyState::Round& r, PageIndex base) {
  std::vector<PageIndex> out;
  for (size_t i = 0; i < r.new_pages.size(); ++i) {
    out.push_back(base + static_cast<PageIndex>(i));
  }
  return out;
}

TEST(PrecopyTest, PausedRoundSendsEveryPageOnceIncludingSharedOnes) {
  PrecopyState st(kPageTokens);
  std::vector<LogicalSeq> cur = {
      {1, 40, {7, 8, 9}}, {2, 40, {7, 8, 10}}, {3, 5, {11}}};
  auto r = st.plan(cur, {1, 2}, kPaused);
  EXPECT_EQ(r.new_pages, (std::vector<PageIndex>{7, 8, 9, 10}));
  EXPECT_TRUE(r.resend.empty());
  EXPECT_TRUE(r.dropped.empty());
  st.commit_round(r, cur, {1, 2}, slots_for(r, 100));
  EXPECT_EQ(st.positions(), 4u);
  EXPECT_EQ(st.slot_at(static_cast<uint32_t>(st.position_of(10))), 103u);
  EXPECT_EQ(st.tables().size(), 2u);
  EXPECT_EQ(st.plan(cur, {1, 2}, kPaused).pages(), 2u);  // the two tails
}

// Pages spread over a large pool (the positions then go through a binary
// search, not a table over the pages' span) and a later round that fills
// the gaps: every page sent is found at its position, no other page.
TEST(PrecopyTest, PositionsHoldForPagesSpreadOverALargePool) {
  PrecopyState st(kPageTokens);
  std::vector<LogicalSeq> cur = {{1, 48, {4000000000u, 5, 3000000}},
                                 {2, 40, {70000, 6, 7}}};
  auto r1 = st.plan(cur, {1, 2}, kRunning);
  EXPECT_EQ(r1.new_pages,
            (std::vector<PageIndex>{4000000000u, 5, 3000000, 70000, 6}));
  st.commit_round(r1, cur, {1, 2}, slots_for(r1, 10));
  // The second request filled page 7 and took pages 8 to 2007.
  cur[1].n_tokens = 2008 * kPageTokens;
  for (PageIndex p = 8; p < 2008; ++p) cur[1].pages.push_back(p);
  auto r2 = st.plan(cur, {1, 2}, kPaused);
  EXPECT_EQ(r2.new_pages.size(), 2001u);
  st.commit_round(r2, cur, {1, 2}, slots_for(r2, 20));
  std::vector<PageIndex> sent = r1.new_pages;
  sent.insert(sent.end(), r2.new_pages.begin(), r2.new_pages.end());
  ASSERT_EQ(st.positions(), sent.size());
  for (uint32_t pos = 0; pos < sent.size(); ++pos) {
    ASSERT_EQ(st.position_of(sent[pos]), int64_t{pos}) << "page " << sent[pos];
    ASSERT_EQ(st.source_page_at(pos), sent[pos]);
  }
  for (PageIndex never : {0u, 4u, 2008u, 69999u, 3999999999u, 4294967295u}) {
    EXPECT_EQ(st.position_of(never), -1) << "page " << never;
  }
  EXPECT_EQ(st.plan(cur, {1, 2}, kPaused).pages(), 0u);  // all sent, full
}

TEST(PrecopyTest, SharedPagesAreNewOnceWhereFirstSeen) {
  PrecopyState st(kPageTokens);
  std::vector<LogicalSeq> cur = {
      {1, 40, {9, 3, 20}}, {2, 40, {3, 5, 9}}, {3, 40, {20, 9, 1}}};
  auto r = st.plan(cur, {1, 2, 3}, kPaused);
  EXPECT_EQ(r.new_pages, (std::vector<PageIndex>{9, 3, 20, 5, 1}));
  // Without sharing, in table order.
  EXPECT_EQ(st.plan(cur, {3}, kPaused).new_pages,
            (std::vector<PageIndex>{20, 9, 1}));
}

TEST(PrecopyTest, RunningRoundsSendOnlyFullPagesTheTailWaitsForThePause) {
  PrecopyState st(kPageTokens);
  // 40 tokens: pages 7 and 8 full, 9 holds 8 tokens and is being written.
  std::vector<LogicalSeq> cur = {{1, 40, {7, 8, 9}}};
  auto r1 = st.plan(cur, {1}, kRunning);
  EXPECT_EQ(r1.new_pages, (std::vector<PageIndex>{7, 8}));
  st.commit_round(r1, cur, {1}, slots_for(r1, 0));
  // Nothing changed: nothing to send while running.
  EXPECT_EQ(st.plan(cur, {1}, kRunning).pages(), 0u);
  // Decoding filled page 9 and started page 12: 9 goes now, 12 waits.
  std::vector<LogicalSeq> grown = {{1, 50, {7, 8, 9, 12}}};
  auto r2 = st.plan(grown, {1}, kRunning);
  EXPECT_EQ(r2.new_pages, (std::vector<PageIndex>{9}));
  EXPECT_TRUE(r2.resend.empty());
  st.commit_round(r2, grown, {1}, slots_for(r2, 50));
  // Paused: the tail goes, full pages already sent do not.
  auto last = st.plan(grown, {1}, kPaused);
  EXPECT_EQ(last.new_pages, (std::vector<PageIndex>{12}));
  EXPECT_TRUE(last.resend.empty());
  st.commit_round(last, grown, {1}, slots_for(last, 60));
  // A tail sent while paused is resent if the engine ran on afterwards.
  std::vector<LogicalSeq> more = {{1, 51, {7, 8, 9, 12}}};
  EXPECT_EQ(st.plan(more, {1}, kPaused).resend,
            (std::vector<uint32_t>{static_cast<uint32_t>(st.position_of(12))}));
}

TEST(PrecopyTest, RequestsThatStopExtendingAreDropped) {
  PrecopyState st(kPageTokens);
  std::vector<LogicalSeq> cur = {
      {1, 48, {7, 8, 9}}, {2, 32, {4, 5}}, {3, 32, {20, 21}}};
  auto r1 = st.plan(cur, {1, 2, 3}, kRunning);
  st.commit_round(r1, cur, {1, 2, 3}, slots_for(r1, 0));
  // 1 finished; 2 was preempted and rebuilt elsewhere; 3 grew normally.
  std::vector<LogicalSeq> later = {{2, 32, {30, 5}}, {3, 48, {20, 21, 22}}};
  auto r2 = st.plan(later, {1, 2, 3}, kRunning);
  EXPECT_EQ(r2.dropped, (std::vector<SeqId>{1, 2}));
  EXPECT_EQ(r2.new_pages, (std::vector<PageIndex>{22}));
  st.commit_round(r2, later, {1, 2, 3}, slots_for(r2, 10));
  ASSERT_EQ(st.tables().size(), 1u);
  EXPECT_EQ(st.tables().begin()->first, 3u);
}

TEST(PrecopyTest, AFreedPageReusedByAMovingRequestIsSentAgain) {
  PrecopyState st(kPageTokens);
  std::vector<LogicalSeq> cur = {{1, 32, {7, 8}}, {2, 16, {9}}};
  auto r1 = st.plan(cur, {1, 2}, kRunning);
  st.commit_round(r1, cur, {1, 2}, slots_for(r1, 0));
  // Request 2 finished; its page 9 was freed and request 1 filled it.
  std::vector<LogicalSeq> later = {{1, 48, {7, 8, 9}}};
  auto r2 = st.plan(later, {1, 2}, kRunning);
  EXPECT_EQ(r2.dropped, (std::vector<SeqId>{2}));
  EXPECT_TRUE(r2.new_pages.empty());
  EXPECT_EQ(r2.resend,
            (std::vector<uint32_t>{static_cast<uint32_t>(st.position_of(9))}));
}

}  // namespace
}  // namespace kvmig
