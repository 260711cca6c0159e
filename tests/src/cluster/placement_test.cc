#include "placement.h"

#include <gtest/gtest.h>

#include <chrono>
#include <numeric>

#include "kvmig/cluster.h"

namespace kvmig {
namespace {

AgentStatus status_with(std::vector<std::pair<SeqId, uint32_t>> seqs) {
  AgentStatus st;
  for (auto [id, pages] : seqs)
    st.seqs.push_back({id, pages * 16ull, pages, ""});
  return st;
}

TEST(MoveUnits, GroupsGoTogetherAndInDoubtRequestsStay) {
  AgentStatus st = status_with({{1, 4}, {2, 4}, {3, 2}, {4, 1}, {5, 3}});
  st.shared_groups.push_back({{1, 2}, 6});  // 2 shared pages
  st.in_doubt.push_back({"m", {5}, "dst", "seqs"});
  const auto units = move_units(st);
  ASSERT_EQ(units.size(), 3u);
  EXPECT_EQ(units[0].seqs, (std::vector<SeqId>{1, 2}));
  EXPECT_EQ(units[0].pages, 6u);
  EXPECT_EQ(units[1].seqs, (std::vector<SeqId>{3}));
  EXPECT_EQ(units[2].seqs, (std::vector<SeqId>{4}));
}

TEST(MoveUnits, AGroupWithAnInDoubtMemberStays) {
  AgentStatus st = status_with({{1, 4}, {2, 4}});
  st.shared_groups.push_back({{1, 2}, 6});
  st.in_doubt.push_back({"m", {2}, "dst", "seqs"});
  EXPECT_TRUE(move_units(st).empty());
}

TEST(PlanDrain, LargestFirstOntoTheTargetWithMostRoom) {
  const std::vector<MoveUnit> units = {{{1}, 3}, {{2}, 10}, {{3}, 6}, {{4}, 1}};
  const auto placed = plan_drain(units, {8, 12});
  ASSERT_EQ(placed.size(), 4u);
  EXPECT_EQ(placed[1], 1u);            // 10 -> the 12 (2 left)
  EXPECT_EQ(placed[2], 0u);            // 6 -> the 8 (2 left)
  EXPECT_EQ(placed[0], std::nullopt);  // 3 fits neither
  EXPECT_EQ(placed[3], 0u);            // 1 -> a 2 (ties: the lower index)
}

TEST(PlanDrain, NothingFitsNothingMoves) {
  const auto placed = plan_drain({{{1}, 5}, {{2}, 5}}, {4, 4, 0});
  EXPECT_EQ(placed[0], std::nullopt);
  EXPECT_EQ(placed[1], std::nullopt);
  EXPECT_TRUE(plan_drain({{{1}, 1}}, {})[0] == std::nullopt);
}

TEST(PlanDrain, NeverOverfillsATarget) {
  std::vector<MoveUnit> units;
  for (SeqId i = 0; i < 500; ++i) units.push_back({{i}, 1 + i % 7});
  const std::vector<uint64_t> free = {100, 250, 3, 0, 400};
  const auto placed = plan_drain(units, free);
  std::vector<uint64_t> used(free.size(), 0);
  for (size_t u = 0; u < units.size(); ++u) {
    if (placed[u]) used[*placed[u]] += units[u].pages;
  }
  uint64_t total = 0;
  for (size_t t = 0; t < free.size(); ++t) {
    EXPECT_LE(used[t], free[t]) << t;
    total += used[t];
  }
  // Only what cannot fit is left: a unit stays only if no target has room.
  for (size_t u = 0; u < units.size(); ++u) {
    if (placed[u]) continue;
    for (size_t t = 0; t < free.size(); ++t) {
      EXPECT_LT(free[t] - used[t], units[u].pages);
    }
  }
  EXPECT_GT(total, 700u);
}

TEST(PlanRebalance, MovesShortestFirstUntilTheGapCloses) {
  // 80 of 100 used against 10 of 100: gap 0.7.
  const std::vector<MoveUnit> units = {
      {{1}, 30}, {{2}, 5}, {{3}, 10}, {{4}, 20}, {{5}, 15}};
  const auto chosen =
      plan_rebalance(units, {80, 100}, {10, 100}, 90, /*threshold=*/0.2);
  // 5, 10, 15 (gap 0.7 -> 0.6 -> 0.4 -> 0.1): the 20 would flip nothing but
  // the gap is already under the threshold.
  EXPECT_EQ(chosen, (std::vector<size_t>{1, 2, 4}));
}

TEST(PlanRebalance, NeverFlipsTheOrderOfTheLoads) {
  // 50 vs 20 of 100 each, one unit of 30: after it 20 vs 50, flipped.
  EXPECT_TRUE(
      plan_rebalance({{{1}, 30}}, {50, 100}, {20, 100}, 80, 0.1).empty());
  // A unit of 15 makes them equal: allowed.
  EXPECT_EQ(plan_rebalance({{{1}, 15}}, {50, 100}, {20, 100}, 80, 0.1),
            (std::vector<size_t>{0}));
}

TEST(PlanRebalance, RespectsRoomAndThreshold) {
  EXPECT_TRUE(plan_rebalance({{{1}, 10}}, {90, 100}, {0, 100}, 5, 0.1)
                  .empty());  // no room
  EXPECT_TRUE(plan_rebalance({{{1}, 1}}, {30, 100}, {20, 100}, 80, 0.1)
                  .empty());  // gap 0.1 is not above 0.1
}

TEST(PlanRebalance, MovedBackNeverPlansAMoveBack) {
  // After a pass, the reverse pair is never over the threshold in the
  // other direction: the plan is a fixed point.
  const std::vector<MoveUnit> units = {{{1}, 7}, {{2}, 7}, {{3}, 7}, {{4}, 7}};
  const auto chosen = plan_rebalance(units, {28, 40}, {0, 40}, 40, 0.05);
  uint64_t moved = 0;
  for (size_t u : chosen) moved += units[u].pages;
  const LoadSide a{28 - moved, 40}, b{moved, 40};
  EXPECT_GE(a.load(), b.load());
  std::vector<MoveUnit> at_b(chosen.size(), MoveUnit{{9}, 7});
  EXPECT_TRUE(plan_rebalance(at_b, b, a, 40 - a.used_pages, 0.05).empty());
}

TEST(AgentRecordJson, RoundTripsAndNamesABadField) {
  AgentRecord r;
  r.name = "a-1";
  r.address = "127.0.0.1:7470";
  r.meta = *preset_meta("tiny");
  r.capacity_pages = 100;
  r.free_pages = 25;
  r.requests = 3;
  r.transports = {"tcp", "ucx"};
  r.draining = true;
  r.version = "0.1.0";
  auto back = parse_agent_record(agent_record_json(r));
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_EQ(back->name, r.name);
  EXPECT_EQ(back->address, r.address);
  EXPECT_EQ(back->meta, r.meta);
  EXPECT_EQ(back->free_pages, 25u);
  EXPECT_EQ(back->transports, r.transports);
  EXPECT_TRUE(back->draining);
  EXPECT_DOUBLE_EQ(back->load(), 0.75);
  auto bad = parse_agent_record(R"({"name":"x","address":1})");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'address'"), std::string::npos);
  EXPECT_FALSE(parse_agent_record("not json").ok());
  EXPECT_FALSE(parse_agent_record("[]").ok());
}

}  // namespace
}  // namespace kvmig
