// How an inference engine embeds kvmig: it implements CachePager over its
// own cache and runs an Agent in-process. Here the "engine" keeps its pages
// somewhere kvmig cannot address (no layout()), so pages travel through
// read_page/write_page and a bounded staging buffer on each side.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "forwarding_pager.h"
#include "kvmig/kvmig.h"
#include "synthetic_pager.h"
#include "testutil.h"

namespace kvmig {
namespace {

// An engine's pager: every call forwards to the engine's own cache (a
// SyntheticPager stands in for it), and no zero-copy layout is offered.
class EnginePager final : public testing::ForwardingPager {
 public:
  explicit EnginePager(std::unique_ptr<SyntheticPager> cache)
      : ForwardingPager(*cache), cache_(std::move(cache)) {}
  std::optional<PagerLayout> layout() const override { return std::nullopt; }

 private:
  std::unique_ptr<SyntheticPager> cache_;
};

std::unique_ptr<SyntheticPager> make_cache(PoolLayout layout, uint32_t pages) {
  auto meta = preset_meta("tiny");
  auto cache = SyntheticPager::create(*meta, layout, pages);
  return cache.ok() ? std::move(*cache) : nullptr;
}

// An agent over pager, serving on a thread of its own; null (and a test
// failure) if it cannot be made or started.
std::unique_ptr<Agent> start_agent(CachePager& pager,
                                   const AgentOptions& options) {
  auto agent = Agent::create(pager, options);
  EXPECT_TRUE(agent.ok()) << agent.status().to_string();
  if (!agent.ok()) return nullptr;
  Status started = (*agent)->start();
  EXPECT_OK(started);
  return started.ok() ? std::move(*agent) : nullptr;
}

// One engine with its agent, serving on a thread of its own.
struct Engine {
  std::unique_ptr<CachePager> pager;
  std::unique_ptr<Agent> agent;
};

Engine start_engine(std::unique_ptr<CachePager> pager, uint64_t staging_pages) {
  AgentOptions options;
  options.listen_host = "127.0.0.1";
  options.listen_port = 0;  // any free port; agent->address() tells which
  options.staging_bytes = staging_pages * 2 * pager->meta().page_bytes();
  options.peer_timeout = std::chrono::seconds(5);
  Engine e;
  e.pager = std::move(pager);
  e.agent = start_agent(*e.pager, options);
  return e;
}

std::map<SeqId, std::string> digests(Agent& agent) {
  std::map<SeqId, std::string> out;
  auto st = agent.status();
  EXPECT_TRUE(st.ok()) << st.status().to_string();
  if (st.ok()) {
    for (const SeqStatus& s : st->seqs) out[s.id] = s.digest;
  }
  return out;
}

struct StagedCase {
  bool src_layout;
  bool dst_layout;
};

class EmbedStaged : public ::testing::TestWithParam<StagedCase> {};

TEST_P(EmbedStaged, PagesCrossThroughBoundedStaging) {
  const StagedCase c = GetParam();
  auto src_cache = make_cache(PoolLayout::kLayer, 128);
  ASSERT_TRUE(src_cache);
  ASSERT_OK(src_cache->populate(3, 100, 9, 32));  // 2 shared + 3 * 5 pages
  std::unique_ptr<CachePager> src_pager =
      c.src_layout ? std::unique_ptr<CachePager>(std::move(src_cache))
                   : std::make_unique<EnginePager>(std::move(src_cache));
  auto dst_cache = make_cache(PoolLayout::kPage, 128);
  ASSERT_TRUE(dst_cache);
  std::unique_ptr<CachePager> dst_pager =
      c.dst_layout ? std::unique_ptr<CachePager>(std::move(dst_cache))
                   : std::make_unique<EnginePager>(std::move(dst_cache));
  // Staging of 3 pages on each side: 17 pages take 6 batches.
  Engine src = start_engine(std::move(src_pager), 3);
  Engine dst = start_engine(std::move(dst_pager), 3);
  ASSERT_TRUE(src.agent && dst.agent);
  auto before = digests(*src.agent);
  ASSERT_EQ(before.size(), 3u);

  MigrateRequest req;
  req.to = dst.agent->address();
  req.all = true;
  ASSERT_OK_AND_ASSIGN(MigrationReport report, src.agent->migrate(req));
  EXPECT_EQ(report.pages, 17u);
  EXPECT_EQ(report.staged, !c.src_layout || !c.dst_layout);
  EXPECT_EQ(digests(*dst.agent), before);
  EXPECT_TRUE(digests(*src.agent).empty());
  ASSERT_OK_AND_ASSIGN(AgentStatus dst_status, dst.agent->status());
  EXPECT_EQ(dst_status.free_pages, 128u - 17u);
}

INSTANTIATE_TEST_SUITE_P(
    Sides, EmbedStaged,
    ::testing::Values(StagedCase{false, true}, StagedCase{true, false},
                      StagedCase{false, false}),
    [](const auto& info) {
      return std::string(info.param.src_layout ? "layout" : "staged") + "_to_" +
             (info.param.dst_layout ? "layout" : "staged");
    });

// A request that finishes while a live migration is under way stays out of
// it: the report names it and the destination gives its slots back.
TEST(EmbedExample, RequestFinishingMidLiveMigrationIsLeftBehind) {
  auto src_cache = make_cache(PoolLayout::kPage, 256);
  auto dst_cache = make_cache(PoolLayout::kLayer, 256);
  ASSERT_TRUE(src_cache && dst_cache);
  ASSERT_OK(src_cache->populate(3, 100, 4));  // 7 pages each
  SyntheticPager* src_raw = src_cache.get();
  AgentOptions options;
  options.peer_timeout = std::chrono::seconds(5);
  bool finished = false;
  options.fault_hook = [&](std::string_view point) {
    if (point == "src.live.final" && !finished) {
      finished = true;
      SeqId done[] = {2};
      EXPECT_OK(src_raw->drop_logical_seqs(done));  // request 2 completes
    }
  };
  auto src = start_agent(*src_cache, options);
  options.fault_hook = nullptr;
  auto dst = start_agent(*dst_cache, options);
  ASSERT_TRUE(src && dst);
  auto before = digests(*src);

  MigrateRequest req;
  req.to = dst->address();
  req.all = true;
  req.live = true;
  ASSERT_OK_AND_ASSIGN(MigrationReport report, src->migrate(req));
  EXPECT_TRUE(finished);
  EXPECT_EQ(report.left_behind, std::vector<SeqId>{2});
  EXPECT_EQ(report.seqs, (std::vector<SeqId>{1, 3}));
  auto after = digests(*dst);
  EXPECT_EQ(after.size(), 2u);
  EXPECT_EQ(after[1], before[1]);
  EXPECT_EQ(after[3], before[3]);
  // Request 2's slots went back: only 1 and 3's pages are held.
  ASSERT_OK_AND_ASSIGN(AgentStatus st, dst->status());
  EXPECT_EQ(st.free_pages, 256u - 14u);
  src->stop();
  dst->stop();
}

// A destination whose writes go wrong (one byte flipped per page): VERIFY
// catches it, the migration rolls back, nothing is lost or installed.
class CorruptingPager final : public testing::ForwardingPager {
 public:
  using ForwardingPager::ForwardingPager;
  // Pages arrive here only through staging: the destination has no layout.
  std::optional<PagerLayout> layout() const override { return std::nullopt; }
  Status write_page(PageIndex ix, const PageBytes& page) override {
    PageBytes bad = page;
    bad.v.back() ^= std::byte{0x40};
    return ForwardingPager::write_page(ix, bad);
  }
};

TEST(EmbedExample, CorruptedPagesAreCaughtAndRolledBack) {
  auto src_cache = make_cache(PoolLayout::kLayer, 64);
  auto dst_cache = make_cache(PoolLayout::kPage, 64);
  ASSERT_TRUE(src_cache && dst_cache);
  ASSERT_OK(src_cache->populate(2, 50, 3));
  CorruptingPager bad_dst(*dst_cache);
  AgentOptions options;
  options.peer_timeout = std::chrono::seconds(5);
  auto src = start_agent(*src_cache, options);
  auto dst = start_agent(bad_dst, options);
  ASSERT_TRUE(src && dst);
  auto before = digests(*src);
  MigrateRequest req;
  req.to = dst->address();
  req.all = true;
  auto report = src->migrate(req);
  ASSERT_FALSE(report.ok());
  EXPECT_NE(report.status().message().find("checksum mismatch"),
            std::string::npos)
      << report.status().to_string();
  EXPECT_EQ(digests(*src), before);
  ASSERT_OK_AND_ASSIGN(AgentStatus st, dst->status());
  EXPECT_TRUE(st.seqs.empty());
  EXPECT_EQ(st.free_pages, 64u);
  src->stop();
  dst->stop();
}

// A source engine that misreports one request: its token count says more
// pages than its table has (or, for 2^64 - 1 tokens in no pages, a count a
// naive ceil(n / page) wraps to zero). The table travels in COMMIT.
class MisreportingPager final : public testing::ForwardingPager {
 public:
  MisreportingPager(CachePager& inner, SeqId id, uint64_t tokens, bool no_pages)
      : ForwardingPager(inner), id_(id), tokens_(tokens), no_pages_(no_pages) {}
  Result<std::vector<LogicalSeq>> logical_seqs() override {
    KVMIG_ASSIGN_OR_RETURN(std::vector<LogicalSeq> seqs,
                           ForwardingPager::logical_seqs());
    for (LogicalSeq& seq : seqs) {
      if (seq.seq_id != id_) continue;
      seq.n_tokens = tokens_;
      if (no_pages_) seq.pages.clear();
    }
    return seqs;
  }

 private:
  const SeqId id_;
  const uint64_t tokens_;
  const bool no_pages_;
};

struct MisreportCase {
  std::string name;
  bool live;
  uint64_t tokens;  // request 2's reported tokens (it holds 40 in 3 pages)
  bool no_pages;
  uint64_t pages;  // the pages its reported table has
};

class EmbedMisreport : public ::testing::TestWithParam<MisreportCase> {};

std::vector<LogicalSeq> seqs_of(SyntheticPager& cache) {
  auto seqs = cache.logical_seqs();
  EXPECT_TRUE(seqs.ok()) << seqs.status().to_string();
  return seqs.ok() ? *seqs : std::vector<LogicalSeq>{};
}

std::map<SeqId, std::string> cache_digests(SyntheticPager& cache) {
  std::map<SeqId, std::string> out;
  for (const LogicalSeq& seq : seqs_of(cache)) {
    auto d = seq_digest(cache, seq);
    EXPECT_TRUE(d.ok()) << d.status().to_string();
    if (d.ok()) out[seq.seq_id] = d->hex();
  }
  return out;
}

TEST_P(EmbedMisreport, DestinationRefusesTablesThatDoNotFitTheTokens) {
  const MisreportCase c = GetParam();
  auto src_cache = make_cache(PoolLayout::kPage, 64);
  auto dst_cache = make_cache(PoolLayout::kLayer, 64);
  ASSERT_TRUE(src_cache && dst_cache);
  ASSERT_OK(src_cache->populate(2, 40, 6));  // 3 pages each
  MisreportingPager lying(*src_cache, 2, c.tokens, c.no_pages);
  AgentOptions options;
  options.peer_timeout = std::chrono::seconds(5);
  auto src = start_agent(lying, options);
  auto dst = start_agent(*dst_cache, options);
  ASSERT_TRUE(src && dst);
  const std::vector<LogicalSeq> seqs_before = seqs_of(*src_cache);
  const auto digests_before = cache_digests(*src_cache);

  MigrateRequest req;
  req.to = dst->address();
  req.all = true;
  req.live = c.live;
  auto report = src->migrate(req);
  ASSERT_FALSE(report.ok()) << "the destination installed request 2 with "
                            << c.tokens << " tokens in " << c.pages << " pages";
  const std::string err = report.status().to_string();
  for (const std::string& word :
       {std::string("destination aborted: InvalidArgument"),
        std::string("request 2 has ") + std::to_string(c.tokens) +
            " tokens in " + std::to_string(c.pages) + " pages"}) {
    EXPECT_NE(err.find(word), std::string::npos) << err;
  }
  // Both sides as before: the source keeps (and serves) its requests, the
  // destination gave every slot back and installed nothing.
  EXPECT_EQ(seqs_of(*src_cache), seqs_before);
  EXPECT_EQ(cache_digests(*src_cache), digests_before);
  EXPECT_EQ(src_cache->capacity()->free_pages, 64u - 6u);
  ASSERT_OK_AND_ASSIGN(AgentStatus st, dst->status());
  EXPECT_TRUE(st.seqs.empty());
  EXPECT_EQ(st.free_pages, 64u);
  EXPECT_TRUE(seqs_of(*dst_cache).empty());
  src->stop();
  dst->stop();
}

INSTANTIATE_TEST_SUITE_P(
    Tables, EmbedMisreport,
    ::testing::Values(
        MisreportCase{"wrapping_stop_and_copy", false, UINT64_MAX, true, 0},
        MisreportCase{"wrapping_live", true, UINT64_MAX, true, 0},
        MisreportCase{"one_page_short_stop_and_copy", false, 40 + 16, false, 3},
        MisreportCase{"one_page_short_live", true, 40 + 16, false, 3}),
    [](const auto& info) { return info.param.name; });

TEST(EmbedExample, LiveMigrationIntoAStagedEngine) {
  auto src_cache = make_cache(PoolLayout::kLayer, 256);
  ASSERT_TRUE(src_cache);
  ASSERT_OK(src_cache->populate(3, 100, 8, 32));
  SyntheticPager* src_raw = src_cache.get();
  Engine src = start_engine(std::move(src_cache), 4);
  Engine dst = start_engine(
      std::make_unique<EnginePager>(make_cache(PoolLayout::kPage, 256)), 2);
  ASSERT_TRUE(src.agent && dst.agent);
  src_raw->start_decoding(300);
  MigrateRequest req;
  req.to = dst.agent->address();
  req.all = true;
  req.live = true;
  req.record_digests = true;
  ASSERT_OK_AND_ASSIGN(MigrationReport report, src.agent->migrate(req));
  src_raw->stop_decoding();
  EXPECT_TRUE(report.staged);
  EXPECT_GE(report.rounds, 2u);
  std::map<SeqId, std::string> at_pause(report.digests.begin(),
                                        report.digests.end());
  EXPECT_EQ(digests(*dst.agent), at_pause);
}

// An engine that cannot hold single requests (no hold_seqs).
class NoHoldPager final : public testing::ForwardingPager {
 public:
  using ForwardingPager::ForwardingPager;
  Status hold_seqs(std::span<const SeqId> ids) override {
    return CachePager::hold_seqs(ids);
  }
  Status try_hold_seqs(std::span<const SeqId> ids) override {
    return CachePager::try_hold_seqs(ids);
  }
  Status unhold_seqs(std::span<const SeqId> ids) override {
    return CachePager::unhold_seqs(ids);
  }
};

// A source (three requests of 40 tokens in `cache`, behind a NoHoldPager
// when asked) and a destination that installs, then stops answering past the
// source's timeouts (its agent thread stuck for 2.5 s): moving requests 1 and 2
// is in doubt until it wakes, and then committed.
struct InDoubtMove {
  std::unique_ptr<SyntheticPager> cache = make_cache(PoolLayout::kPage, 64);
  std::unique_ptr<SyntheticPager> dst_cache = make_cache(PoolLayout::kPage, 64);
  std::unique_ptr<CachePager> no_hold;  // declared before the agents using it
  std::unique_ptr<Agent> src, dst;

  // Starts both agents and moves 1 and 2: in doubt, held as `hold` says
  // ("engine": the source's pager cannot hold single requests).
  void start(const std::string& hold) {
    ASSERT_TRUE(cache && dst_cache);
    if (hold == "engine") no_hold = std::make_unique<NoHoldPager>(*cache);
    CachePager& pager = no_hold ? *no_hold : *cache;
    ASSERT_OK(cache->populate(3, 40, 4));
    AgentOptions src_options;
    src_options.peer_timeout = std::chrono::milliseconds(400);
    AgentOptions dst_options;
    dst_options.fault_hook = [](std::string_view point) {
      if (point == "dst.before_done") {
        std::this_thread::sleep_for(std::chrono::milliseconds(2500));
      }
    };
    src = start_agent(pager, src_options);
    dst = start_agent(*dst_cache, dst_options);
    ASSERT_TRUE(src && dst);
    before = digests(*src);
    MigrateRequest req;
    req.to = dst->address();
    req.seqs = {1, 2};
    auto moved = src->migrate(req);
    ASSERT_EQ(moved.status().code(), StatusCode::kUnavailable)
        << moved.status().to_string();
    EXPECT_NE(moved.status().message().find("in doubt"), std::string::npos);
    ASSERT_OK_AND_ASSIGN(AgentStatus st, src->status());
    ASSERT_EQ(st.in_doubt.size(), 1u);
    EXPECT_EQ(st.in_doubt[0].hold, hold);
    EXPECT_EQ(st.in_doubt[0].seqs, (std::vector<SeqId>{1, 2}));
  }

  // Waits (20 s at most) until the source has settled by itself: request 3
  // is all it has left.
  void expect_settled_committed() {
    auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    AgentStatus st;
    do {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      ASSERT_OK_AND_ASSIGN(st, src->status());
    } while (!st.in_doubt.empty() && std::chrono::steady_clock::now() < end);
    ASSERT_TRUE(st.in_doubt.empty());
    ASSERT_OK_AND_ASSIGN(auto left, cache->logical_seqs());
    ASSERT_EQ(left.size(), 1u);
    EXPECT_EQ(left[0].seq_id, 3u);
  }

  ~InDoubtMove() {
    if (src) src->stop();
    if (dst) dst->stop();
  }

  std::map<SeqId, std::string> before;
};

// An engine without hold_seqs stays paused as a whole (request 3 too) while
// the move is in doubt; then the source drops 1 and 2 by itself and the
// engine runs on.
TEST(EmbedExample, EngineWithoutHoldStaysPausedWhileInDoubt) {
  InDoubtMove m;
  ASSERT_NO_FATAL_FAILURE(m.start("engine"));
  EXPECT_EQ(m.cache->decode_step(), 0u);  // the whole engine is paused
  ASSERT_NO_FATAL_FAILURE(m.expect_settled_committed());
  EXPECT_EQ(m.cache->decode_step(), 1u);  // request 3 runs again
  auto there = digests(*m.dst);
  EXPECT_EQ(there.size(), 2u);
  EXPECT_EQ(there[1], m.before[1]);
  EXPECT_EQ(there[2], m.before[2]);
}

// While a move is in doubt the engine ends one of the held requests (its
// client went away). When the destination answers "committed" the source
// drops the other one: nothing is left running in two places.
TEST(EmbedExample, RequestEndedWhileInDoubtDoesNotBlockSettling) {
  InDoubtMove m;
  ASSERT_NO_FATAL_FAILURE(m.start("seqs"));
  const SeqId ended[] = {2};
  ASSERT_OK(m.cache->drop_logical_seqs(ended));
  ASSERT_NO_FATAL_FAILURE(m.expect_settled_committed());
  EXPECT_EQ(digests(*m.dst).size(), 2u);
}

// The destination installs, then its agent is recreated over the same
// pager before the source learns the outcome: the new agent cannot tell
// (it was not there), says so, and the source stays in doubt with the
// requests held, rather than run them again beside the installed copies.
// An operator settles it by hand.
TEST(EmbedExample, RecreatedDestinationLeavesTheSourceInDoubtUntilSettled) {
  auto cache = make_cache(PoolLayout::kPage, 64);
  auto dst_cache = make_cache(PoolLayout::kPage, 64);
  ASSERT_TRUE(cache && dst_cache);
  ASSERT_OK(cache->populate(3, 40, 4));
  AgentOptions src_options;
  src_options.peer_timeout = std::chrono::milliseconds(200);
  auto src = start_agent(*cache, src_options);
  std::atomic<bool> stalled{false};
  AgentOptions dst_options;
  dst_options.fault_hook = [&](std::string_view point) {
    if (point == "dst.before_done") {  // installed; DONE comes too late
      std::this_thread::sleep_for(std::chrono::milliseconds(600));
      stalled = true;
    }
  };
  auto dst = start_agent(*dst_cache, dst_options);
  ASSERT_TRUE(src && dst);
  const uint16_t port = dst->port();
  const auto before = digests(*src);
  MigrateRequest req;
  req.to = dst->address();
  req.seqs = {1, 2};
  auto moved = src->migrate(req);
  ASSERT_EQ(moved.status().code(), StatusCode::kUnavailable)
      << moved.status().to_string();
  ASSERT_OK_AND_ASSIGN(AgentStatus st, src->status());
  ASSERT_EQ(st.in_doubt.size(), 1u);
  const std::string id = st.in_doubt[0].migration_id;
  while (!stalled) std::this_thread::yield();
  dst.reset();  // the embedder recreates its agent over the same pager
  std::atomic<int> queries{0};
  dst_options.listen_port = port;
  dst_options.fault_hook = [&](std::string_view point) {
    if (point == "dst.outcome_query") ++queries;
  };
  dst = start_agent(*dst_cache, dst_options);
  ASSERT_TRUE(dst);
  // Two queries answered: the first answer was read before the second
  // query went out.
  testing::eventually([&] { return queries >= 2; }, std::chrono::seconds(30));
  ASSERT_GE(queries.load(), 2);
  ASSERT_OK_AND_ASSIGN(st, src->status());
  ASSERT_EQ(st.in_doubt.size(), 1u);
  EXPECT_EQ(cache->decode_step(), 1u);  // 1 and 2 held: only 3 decodes
  // Both copies exist, one held: the operator knows the destination has
  // them, and settles.
  EXPECT_EQ(digests(*dst).size(), 2u);
  EXPECT_EQ(src->settle("nope", true).code(), StatusCode::kNotFound);
  ASSERT_OK(src->settle(id, true));
  ASSERT_OK_AND_ASSIGN(st, src->status());
  EXPECT_TRUE(st.in_doubt.empty());
  ASSERT_OK_AND_ASSIGN(auto left, cache->logical_seqs());
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left[0].seq_id, 3u);
  auto there = digests(*dst);
  EXPECT_EQ(there[1], before.at(1));
  EXPECT_EQ(there[2], before.at(2));
  ASSERT_OK_AND_ASSIGN(CancelReport ended, src->cancel(id));
  EXPECT_EQ(ended.outcome, "committed");
  src->stop();
  dst->stop();
}

TEST(EmbedExample, CallsOnANonServingAgentFailAtOnce) {
  auto cache = make_cache(PoolLayout::kPage, 16);
  ASSERT_TRUE(cache);
  ASSERT_OK(cache->populate(1, 20, 1));
  auto agent = Agent::create(*cache, AgentOptions{});
  ASSERT_OK(agent.status());
  MigrateRequest req;
  req.to = "127.0.0.1:1";
  req.all = true;
  // Never started: nothing would run the call, so it must not wait.
  EXPECT_EQ((*agent)->migrate(req).status().code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ((*agent)->status().status().code(),
            StatusCode::kFailedPrecondition);
  ASSERT_OK((*agent)->start());
  ASSERT_OK((*agent)->status().status());
  (*agent)->stop();
  EXPECT_EQ((*agent)->status().status().code(),
            StatusCode::kFailedPrecondition);
}

// Counts the calls that stop and restart requests, forwarding them (with
// or without hold_seqs, as the wrapped pager has it). Says its bookkeeping
// never waits when `quick`: kvmig then tries try_hold_seqs first.
class PauseCountingPager final : public testing::ForwardingPager {
 public:
  explicit PauseCountingPager(CachePager& inner, bool quick = false)
      : ForwardingPager(inner), quick_(quick) {}
  bool bookkeeping_never_waits() const override { return quick_; }
  Status pause() override {
    pauses++;
    return ForwardingPager::pause();
  }
  Status resume() override {
    resumes++;
    return ForwardingPager::resume();
  }
  Status hold_seqs(std::span<const SeqId> ids) override {
    holds++;
    return ForwardingPager::hold_seqs(ids);
  }
  Status try_hold_seqs(std::span<const SeqId> ids) override {
    Status s = ForwardingPager::try_hold_seqs(ids);
    if (s.ok()) holds++;
    return s;
  }
  Status unhold_seqs(std::span<const SeqId> ids) override {
    unholds++;
    return ForwardingPager::unhold_seqs(ids);
  }
  // holds: hold_seqs calls, and try_hold_seqs calls that held.
  std::atomic<int> pauses{0}, resumes{0}, holds{0}, unholds{0};

 private:
  const bool quick_;
};

// A stop-and-copy holds the requests that move while the control
// connection opens. When the destination cannot be reached they are
// unheld before migrate() returns; an engine that cannot hold single
// requests is never paused at all, and after the first try kvmig stops
// asking it to hold.
TEST(EmbedExample, UnreachableDestinationLeavesTheEngineRunning) {
  for (const auto& [can_hold, quick] :
       {std::pair{true, false}, {false, false}, {true, true}, {false, true}}) {
    SCOPED_TRACE(std::string(can_hold ? "hold_seqs" : "no hold_seqs") +
                 (quick ? ", never waits" : ""));
    auto cache = make_cache(PoolLayout::kPage, 64);
    ASSERT_TRUE(cache);
    ASSERT_OK(cache->populate(3, 40, 4));
    std::unique_ptr<CachePager> no_hold;
    if (!can_hold) no_hold = std::make_unique<NoHoldPager>(*cache);
    PauseCountingPager pager(no_hold ? *no_hold : *cache, quick);
    auto src = start_agent(pager, AgentOptions{});
    ASSERT_TRUE(src);
    MigrateRequest req;
    req.to = "127.0.0.1:1";  // nothing listens there: refused at once
    req.seqs = {1, 2};
    for (int attempt = 0; attempt < 2; ++attempt) {
      auto moved = src->migrate(req);
      EXPECT_EQ(moved.status().code(), StatusCode::kUnavailable)
          << moved.status().to_string();
      EXPECT_NE(moved.status().message().find("destination"), std::string::npos)
          << moved.status().to_string();
    }
    EXPECT_EQ(pager.pauses, 0);
    EXPECT_EQ(pager.resumes, 0);
    // One hold per attempt, each undone; without hold_seqs only the first
    // attempt asks.
    EXPECT_EQ(pager.holds, can_hold ? 2 : 1);
    EXPECT_EQ(pager.unholds, can_hold ? 2 : 0);
    EXPECT_EQ(cache->decode_step(), 3u);  // every request decodes
    ASSERT_OK_AND_ASSIGN(AgentStatus st, src->status());
    EXPECT_TRUE(st.in_doubt.empty());
    EXPECT_TRUE(st.migrations.empty());
    EXPECT_EQ(digests(*src).size(), 3u);
    src->stop();
  }
}

// A pager whose logical_seqs() fails once armed: an engine that cannot
// list its requests.
class ListFailingPager final : public testing::ForwardingPager {
 public:
  using ForwardingPager::ForwardingPager;
  Result<std::vector<LogicalSeq>> logical_seqs() override {
    if (armed) return Status::internal("the engine lost its tables");
    return ForwardingPager::logical_seqs();
  }
  std::atomic<bool> armed{false};
};

// Named requests moved stop-and-copy are checked against the pager on the
// hold's trip, which overlaps the connect (or on the control thread, before
// try_hold_seqs, when the pager's bookkeeping never waits): an unknown id is
// the error (before an unreachable destination's), and nothing is held, paused
// or sent; a pager that cannot list its requests fails the move naming
// logical_seqs, nothing held either.
TEST(EmbedExample, UnknownIdsFailBeforeAnythingIsHeld) {
  for (const bool quick : {false, true}) {
    SCOPED_TRACE(quick ? "never waits" : "may wait");
    auto cache = make_cache(PoolLayout::kPage, 64);
    auto dst_cache = make_cache(PoolLayout::kPage, 64);
    ASSERT_TRUE(cache && dst_cache);
    ASSERT_OK(cache->populate(3, 40, 4));
    ListFailingPager listing(*cache);
    PauseCountingPager pager(listing, quick);
    auto src = start_agent(pager, AgentOptions{});
    auto dst = start_agent(*dst_cache, AgentOptions{});
    ASSERT_TRUE(src && dst);
    const auto before = digests(*src);  // pauses the engine once
    pager.pauses = 0;
    pager.resumes = 0;
    MigrateRequest req;
    req.seqs = {1, 99, 2, 98};
    for (const bool reachable : {false, true}) {
      SCOPED_TRACE(reachable ? "reachable destination" : "unreachable");
      req.to = reachable ? dst->address() : "127.0.0.1:1";
      auto moved = src->migrate(req);
      EXPECT_EQ(moved.status().code(), StatusCode::kNotFound)
          << moved.status().to_string();
      EXPECT_EQ(moved.status().message(), "unknown request ids: 99,98")
          << moved.status().to_string();
    }
    listing.armed = true;
    req.seqs = {1, 2};
    auto moved = src->migrate(req);
    EXPECT_EQ(moved.status().code(), StatusCode::kInternal)
        << moved.status().to_string();
    EXPECT_NE(moved.status().message().find(
                  "logical_seqs: the engine lost its tables"),
              std::string::npos)
        << moved.status().to_string();
    listing.armed = false;
    EXPECT_EQ(pager.holds, 0);
    EXPECT_EQ(pager.pauses, 0);
    EXPECT_EQ(digests(*src), before);
    EXPECT_TRUE(digests(*dst).empty());
    ASSERT_OK_AND_ASSIGN(AgentStatus st, dst->status());
    EXPECT_TRUE(st.migrations.empty());
    // The requests still move afterwards.
    ASSERT_OK(src->migrate(req).status());
    EXPECT_EQ(digests(*dst).size(), 2u);
    EXPECT_EQ(pager.holds, 1);
    src->stop();
    dst->stop();
  }
}

// Records the thread of each bookkeeping call it forwards, says its
// bookkeeping never waits when `quick`, and, when `busy`, that a hold
// would wait (a step under way).
class ThreadRecordingPager final : public testing::ForwardingPager {
 public:
  ThreadRecordingPager(CachePager& inner, bool quick, bool busy = false)
      : ForwardingPager(inner), quick_(quick), busy_(busy) {}
  bool bookkeeping_never_waits() const override { return quick_; }
  Result<std::vector<PageIndex>> allocate_pages(uint32_t n) override {
    record("allocate_pages");
    return ForwardingPager::allocate_pages(n);
  }
  Status install_logical_seqs(const std::vector<LogicalSeq>& seqs) override {
    record("install_logical_seqs");
    return ForwardingPager::install_logical_seqs(seqs);
  }
  Status drop_logical_seqs(std::span<const SeqId> ids) override {
    record("drop_logical_seqs");
    return ForwardingPager::drop_logical_seqs(ids);
  }
  Status hold_seqs(std::span<const SeqId> ids) override {
    record("hold_seqs");
    return ForwardingPager::hold_seqs(ids);
  }
  Status try_hold_seqs(std::span<const SeqId> ids) override {
    record("try_hold_seqs");
    if (busy_) return Status::unavailable("a step is under way");
    return ForwardingPager::try_hold_seqs(ids);
  }
  // The thread of each call's last use; a default id for a call not made.
  std::thread::id thread_of(const std::string& call) const {
    std::lock_guard lock(mu_);
    auto it = threads_.find(call);
    return it == threads_.end() ? std::thread::id() : it->second;
  }

 private:
  void record(const std::string& call) {
    std::lock_guard lock(mu_);
    threads_[call] = std::this_thread::get_id();
  }
  const bool quick_;
  const bool busy_;
  mutable std::mutex mu_;
  std::map<std::string, std::thread::id> threads_;
};

// A pager whose bookkeeping never waits has it made on the agent's control
// thread (the one that reports a migration's end), without the data pool's
// trips: the source's hold that does not wait (try_hold_seqs) and drop, the
// destination's allocation, and over tcp, whose targets open at once, its
// install. Over ucx, whose target may wait while it opens (here: a fresh
// connection, no kept one to adopt) and keeps it, the open and the install
// stay on a data thread, as does hold_seqs (it waits for the engine's
// step: called when try_hold_seqs says it would wait) and every call of a
// pager that does not say so.
TEST(EmbedExample, BookkeepingThatNeverWaitsRunsOnTheControlThread) {
  std::vector<std::string> transports = {"tcp"};
  const auto built = built_transports();
  if (std::find(built.begin(), built.end(), "ucx") != built.end()) {
    transports.push_back("ucx");
  }
  for (const std::string& transport : transports) {
    for (const auto& [quick, busy] :
         {std::pair{true, false}, {true, true}, {false, false}}) {
      SCOPED_TRACE(transport + (quick ? ", never waits" : ", may wait") +
                   (busy ? ", would wait to hold" : ""));
      auto src_cache = make_cache(PoolLayout::kPage, 64);
      auto dst_cache = make_cache(PoolLayout::kPage, 64);
      ASSERT_TRUE(src_cache && dst_cache);
      ASSERT_OK(src_cache->populate(3, 40, 4));
      ThreadRecordingPager src_pager(*src_cache, quick, busy);
      ThreadRecordingPager dst_pager(*dst_cache, quick);
      std::mutex mu;
      std::map<MigrationEvent::Role, std::thread::id> control;
      AgentOptions options;
      options.transports = {transport};
      options.inline_page_bytes = 0;  // the transport's data path
      options.on_migration_end = [&](const MigrationEvent& e) {
        std::lock_guard lock(mu);
        control[e.role] = std::this_thread::get_id();
      };
      auto src = start_agent(src_pager, options);
      auto dst = start_agent(dst_pager, options);
      ASSERT_TRUE(src && dst);
      const auto before = digests(*src);
      MigrateRequest req;
      req.to = dst->address();
      req.seqs = {1, 2};
      ASSERT_OK(src->migrate(req).status());
      const auto moved = digests(*dst);
      ASSERT_EQ(moved.size(), 2u);
      EXPECT_EQ(moved.at(1), before.at(1));
      EXPECT_EQ(moved.at(2), before.at(2));
      EXPECT_EQ(digests(*src).size(), 1u);
      src->stop();
      dst->stop();
      std::lock_guard lock(mu);
      const auto src_control = control[MigrationEvent::Role::kSource];
      const auto dst_control = control[MigrationEvent::Role::kDestination];
      ASSERT_NE(src_control, std::thread::id());
      ASSERT_NE(dst_control, std::thread::id());
      // Held at once on the control thread, else on a data thread.
      EXPECT_EQ(src_pager.thread_of("try_hold_seqs"),
                quick ? src_control : std::thread::id());
      if (quick && !busy) {
        EXPECT_EQ(src_pager.thread_of("hold_seqs"), std::thread::id());
      } else {
        ASSERT_NE(src_pager.thread_of("hold_seqs"), std::thread::id());
        EXPECT_NE(src_pager.thread_of("hold_seqs"), src_control);
      }
      EXPECT_EQ(src_pager.thread_of("drop_logical_seqs") == src_control, quick);
      for (const char* call : {"allocate_pages", "install_logical_seqs"}) {
        SCOPED_TRACE(call);
        const bool dst_inline =
            quick &&
            (transport == "tcp" || call == std::string("allocate_pages"));
        ASSERT_NE(dst_pager.thread_of(call), std::thread::id());
        EXPECT_EQ(dst_pager.thread_of(call) == dst_control, dst_inline);
      }
    }
  }
}

// A pager whose logical_seqs() blocks, once armed, until released: a slow
// engine.
class BlockingPager final : public testing::ForwardingPager {
 public:
  using ForwardingPager::ForwardingPager;
  Result<std::vector<LogicalSeq>> logical_seqs() override {
    if (armed) {
      std::unique_lock lock(mu);
      entered = true;
      cv.notify_all();
      cv.wait(lock, [this] { return released; });
    }
    return ForwardingPager::logical_seqs();
  }
  void release() {
    std::lock_guard lock(mu);
    released = true;
    cv.notify_all();
  }
  std::atomic<bool> armed{false};
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false;   // mu
  bool released = false;  // mu
};

TEST(EmbedExample, StopEndsACallThatIsWaitingOnTheAgent) {
  auto cache = make_cache(PoolLayout::kPage, 16);
  ASSERT_TRUE(cache);
  ASSERT_OK(cache->populate(1, 20, 1));
  BlockingPager pager(*cache);
  auto agent = start_agent(pager, AgentOptions{});
  ASSERT_TRUE(agent);
  pager.armed = true;
  Status seen;
  std::thread caller(
      [&] { seen = agent->status({.digests = false}).status(); });
  {
    std::unique_lock lock(pager.mu);
    ASSERT_TRUE(pager.cv.wait_for(lock, std::chrono::seconds(10),
                                  [&] { return pager.entered; }));
  }
  // The call is inside the pager; stop() must end it, not leave it waiting
  // until the agent is destroyed.
  agent->stop();
  caller.join();
  EXPECT_EQ(seen.code(), StatusCode::kAborted) << seen.to_string();
  EXPECT_EQ(agent->status().status().code(), StatusCode::kFailedPrecondition);
  pager.release();
}

// A pager whose logical_seqs() calls back into its own agent once armed, as
// an engine might from inside a pager method.
class ReentrantPager final : public testing::ForwardingPager {
 public:
  using ForwardingPager::ForwardingPager;
  Result<std::vector<LogicalSeq>> logical_seqs() override {
    if (agent && armed.exchange(false)) {
      inner_status = agent->status().status();
    }
    return ForwardingPager::logical_seqs();
  }
  Agent* agent = nullptr;
  std::atomic<bool> armed{false};
  Status inner_status;
};

// A gate a fault hook waits at until the test opens it (bounded, so a
// broken test fails instead of hanging).
class Gate {
 public:
  void reach() {
    std::unique_lock lock(mu_);
    reached_ = true;
    cv_.notify_all();
    cv_.wait_for(lock, std::chrono::seconds(30), [&] { return open_; });
  }
  bool wait_reached() {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(30),
                        [&] { return reached_; });
  }
  void open() {
    std::lock_guard lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool reached_ = false;
  bool open_ = false;
};

// Each live request's digest, read from the pager itself (works on a pager
// whose agent has stopped).
std::map<SeqId, std::string> pager_digests(CachePager& pager) {
  std::map<SeqId, std::string> out;
  auto seqs = pager.logical_seqs();
  EXPECT_TRUE(seqs.ok()) << seqs.status().to_string();
  if (!seqs.ok()) return out;
  for (const LogicalSeq& seq : *seqs) {
    auto d = seq_digest(pager, seq);
    EXPECT_TRUE(d.ok()) << d.status().to_string();
    if (d.ok()) out[seq.seq_id] = d->hex();
  }
  return out;
}

uint64_t free_pages(const CachePager& pager) {
  auto cap = pager.capacity();
  return cap ? cap->free_pages : 0;
}

// Two in-process engines and a move of two requests (7 pages each) from
// src to dst on a scheduler's thread, held half-way through the data at a
// gate (the source's data thread waits there) until the test opens it.
struct GatedMove {
  void start(PoolLayout src_layout, PoolLayout dst_layout,
             const std::string& transport = "tcp") {
    src_cache = make_cache(src_layout, 64);
    dst_cache = make_cache(dst_layout, 64);
    ASSERT_TRUE(src_cache && dst_cache);
    ASSERT_OK(src_cache->populate(2, 100, 9));
    AgentOptions options;
    options.peer_timeout = std::chrono::seconds(5);
    options.inline_page_bytes = 0;  // the data path, which has a middle
    options.transports = {transport};
    options.fault_hook = [this](std::string_view point) {
      if (point == "src.data.mid") mid.reach();
    };
    src = start_agent(*src_cache, options);
    options.fault_hook = nullptr;
    dst = start_agent(*dst_cache, options);
    ASSERT_TRUE(src && dst);
    before = pager_digests(*src_cache);
    scheduler = std::thread([this] {
      MigrateRequest req;
      req.to = dst->address();
      req.all = true;
      result = src->migrate(req);
    });
    ASSERT_TRUE(mid.wait_reached());
  }
  ~GatedMove() {
    mid.open();
    if (scheduler.joinable()) scheduler.join();
    if (src) src->stop();
    if (dst) dst->stop();
  }

  std::unique_ptr<SyntheticPager> src_cache, dst_cache;
  Gate mid;
  std::unique_ptr<Agent> src, dst;  // after the caches: stopped first
  std::map<SeqId, std::string> before;
  std::thread scheduler;
  Result<MigrationReport> result = Status::internal("not run");
};

// stop() on the destination mid-migration gives every slot back before it
// returns, and the source rolls back: nothing is lost or installed. The
// source learns why from the destination's ABORT, although it meets the
// cut data path first (its writes resume once stop() has returned).
TEST(EmbedExample, StoppingTheDestinationMidMigrationReleasesItsSlots) {
  std::vector<std::string> transports = {"tcp"};
  const auto built = built_transports();
  if (std::find(built.begin(), built.end(), "ucx") != built.end()) {
    transports.push_back("ucx");
  }
  for (const std::string& transport : transports) {
    SCOPED_TRACE(transport);
    GatedMove m;
    ASSERT_NO_FATAL_FAILURE(
        m.start(PoolLayout::kPage, PoolLayout::kLayer, transport));
    EXPECT_EQ(free_pages(*m.dst_cache), 64u - 14u);  // slots offered
    m.dst->stop();
    // Given back by the time stop() returns, and nothing installed.
    EXPECT_EQ(free_pages(*m.dst_cache), 64u);
    EXPECT_TRUE(pager_digests(*m.dst_cache).empty());
    m.mid.open();
    m.scheduler.join();
    ASSERT_FALSE(m.result.ok());
    EXPECT_EQ(m.result.status().code(), StatusCode::kAborted)
        << m.result.status().to_string();
    EXPECT_NE(m.result.status().message().find(
                  "destination aborted: Aborted: the agent is stopping"),
              std::string::npos)
        << m.result.status().to_string();
    // The source rolled back: every request intact and decoding again.
    EXPECT_EQ(pager_digests(*m.src_cache), m.before);
    EXPECT_GT(m.src_cache->decode_step(), 0u);
  }
}

// stop() on the source mid-migration cancels it: the engine is resumed
// with every request by the time stop() returns, the scheduler's call
// fails, and the destination gives its slots back.
TEST(EmbedExample, StoppingTheSourceMidMigrationRollsBack) {
  GatedMove m;
  ASSERT_NO_FATAL_FAILURE(m.start(PoolLayout::kLayer, PoolLayout::kPage));
  // The data thread waits at the gate; stop() cancels the run from the io
  // thread, then the gate opens and the write loop sees the cancel.
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    m.mid.open();
  });
  m.src->stop();
  opener.join();
  m.scheduler.join();
  ASSERT_FALSE(m.result.ok());
  EXPECT_NE(m.result.status().message().find("stopping"), std::string::npos)
      << m.result.status().to_string();
  EXPECT_EQ(pager_digests(*m.src_cache), m.before);
  EXPECT_GT(m.src_cache->decode_step(), 0u);  // resumed
  // The destination heard ABORT and gives its slots back.
  testing::eventually([&] { return free_pages(*m.dst_cache) == 64u; },
                      std::chrono::seconds(10));
  EXPECT_EQ(free_pages(*m.dst_cache), 64u);
  EXPECT_TRUE(pager_digests(*m.dst_cache).empty());
}

// A destination engine whose allocate_pages() blocks (it waits for its own
// step to end) delays only the migration that asked: the agent answers
// status meanwhile, and the migration completes once the engine does.
class SlowAllocatingPager final : public testing::ForwardingPager {
 public:
  SlowAllocatingPager(CachePager& inner, Gate& gate)
      : ForwardingPager(inner), gate_(gate) {}
  Result<std::vector<PageIndex>> allocate_pages(uint32_t n) override {
    gate_.reach();
    return ForwardingPager::allocate_pages(n);
  }

 private:
  Gate& gate_;
};

TEST(EmbedExample, ASlowPagerDoesNotStallTheAgent) {
  auto src_cache = make_cache(PoolLayout::kPage, 64);
  auto dst_cache = make_cache(PoolLayout::kPage, 64);
  ASSERT_TRUE(src_cache && dst_cache);
  ASSERT_OK(src_cache->populate(2, 100, 17));
  Gate allocating;
  SlowAllocatingPager slow(*dst_cache, allocating);
  AgentOptions options;
  options.peer_timeout = std::chrono::seconds(10);
  auto src = start_agent(*src_cache, options);
  auto dst = start_agent(slow, options);
  ASSERT_TRUE(src && dst);
  const auto before = digests(*src);
  Result<MigrationReport> result = Status::internal("not run");
  std::thread scheduler([&] {
    MigrateRequest req;
    req.to = dst->address();
    req.all = true;
    result = src->migrate(req);
  });
  ASSERT_TRUE(allocating.wait_reached());
  // The engine is inside allocate_pages(): the agent still answers.
  auto answered = std::async(std::launch::async,
                             [&] { return dst->status({.digests = false}); });
  const bool in_time =
      answered.wait_for(std::chrono::seconds(5)) == std::future_status::ready;
  allocating.open();
  scheduler.join();
  ASSERT_TRUE(in_time) << "status waited for the engine's allocate_pages()";
  auto st = answered.get();
  ASSERT_OK(st.status());
  ASSERT_EQ(st->migrations.size(), 1u);
  EXPECT_EQ(st->migrations[0].role, "destination");
  ASSERT_OK(result.status());
  EXPECT_EQ(digests(*dst), before);
  src->stop();
  dst->stop();
}

// Agent::cancel: before the decision point the migration rolls back; an id
// it ran already is reported as it ended; an unknown id is NotFound and
// refused from then on.
TEST(EmbedExample, CancelRollsBackBeforeTheDecisionPoint) {
  auto src_cache = make_cache(PoolLayout::kPage, 64);
  auto dst_cache = make_cache(PoolLayout::kPage, 64);
  ASSERT_TRUE(src_cache && dst_cache);
  ASSERT_OK(src_cache->populate(2, 100, 13));
  Gate mid;
  std::atomic<bool> gate_armed{true};
  AgentOptions options;
  options.peer_timeout = std::chrono::seconds(5);
  options.inline_page_bytes = 0;  // the data path, which has a middle
  options.fault_hook = [&](std::string_view point) {
    if (point == "src.data.mid" && gate_armed) mid.reach();
  };
  auto src = start_agent(*src_cache, options);
  options.fault_hook = nullptr;
  auto dst = start_agent(*dst_cache, options);
  ASSERT_TRUE(src && dst);
  const auto before = pager_digests(*src_cache);

  MigrateRequest req;
  req.to = dst->address();
  req.all = true;
  req.migration_id = "sched-1";
  Result<MigrationReport> result = Status::internal("not run");
  std::thread scheduler([&] { result = src->migrate(req); });
  ASSERT_TRUE(mid.wait_reached());
  // Asked at the destination: refused, naming where to ask.
  auto at_dst = dst->cancel("sched-1");
  ASSERT_FALSE(at_dst.ok());
  EXPECT_EQ(at_dst.status().code(), StatusCode::kFailedPrecondition);
  Result<CancelReport> cancelled = Status::internal("not run");
  std::thread canceller([&] { cancelled = src->cancel("sched-1"); });
  // The cancel waits for the run to end, which waits at the gate: open it
  // once status shows the run cancelling.
  for (bool cancelling = false; !cancelling;) {
    ASSERT_OK_AND_ASSIGN(AgentStatus st, src->status({.digests = false}));
    ASSERT_EQ(st.migrations.size(), 1u);
    cancelling = st.migrations[0].phase == "cancelling";
  }
  mid.open();
  canceller.join();
  scheduler.join();
  ASSERT_OK(cancelled.status());
  EXPECT_EQ(cancelled->outcome, "cancelled");
  ASSERT_FALSE(result.ok());
  EXPECT_NE(result.status().message().find("cancelled"), std::string::npos)
      << result.status().to_string();
  EXPECT_EQ(pager_digests(*src_cache), before);
  ASSERT_OK_AND_ASSIGN(AgentStatus dst_status, dst->status());
  EXPECT_TRUE(dst_status.seqs.empty());

  // Asked again: as it ended. The same id is not run twice.
  ASSERT_OK_AND_ASSIGN(CancelReport again, src->cancel("sched-1"));
  EXPECT_EQ(again.outcome, "cancelled");
  auto reused = src->migrate(req);
  ASSERT_FALSE(reused.ok());
  EXPECT_EQ(reused.status().code(), StatusCode::kAlreadyExists);

  // Committed first: a cancel is too late and says so.
  gate_armed = false;
  req.migration_id = "sched-2";
  ASSERT_OK_AND_ASSIGN(MigrationReport moved, src->migrate(req));
  EXPECT_EQ(moved.migration_id, "sched-2");
  ASSERT_OK_AND_ASSIGN(CancelReport late, src->cancel("sched-2"));
  EXPECT_EQ(late.outcome, "committed");
  EXPECT_EQ(digests(*dst), before);

  // Never seen: NotFound, and the id is refused from then on.
  auto unknown = src->cancel("sched-3");
  EXPECT_EQ(unknown.status().code(), StatusCode::kNotFound);
  req.migration_id = "sched-3";
  EXPECT_EQ(src->migrate(req).status().code(), StatusCode::kAlreadyExists);
  req.migration_id = "bad id!";
  EXPECT_EQ(src->migrate(req).status().code(), StatusCode::kInvalidArgument);
  src->stop();
  dst->stop();
}

TEST(EmbedExample, CallFromThePagerOnTheAgentThreadFailsInsteadOfHanging) {
  auto src_cache = make_cache(PoolLayout::kPage, 16);
  auto dst_cache = make_cache(PoolLayout::kPage, 16);
  ASSERT_TRUE(src_cache && dst_cache);
  ASSERT_OK(src_cache->populate(1, 20, 1));
  ReentrantPager pager(*src_cache);
  AgentOptions options;
  options.peer_timeout = std::chrono::seconds(5);
  auto src = start_agent(pager, options);
  auto dst = start_agent(*dst_cache, options);
  ASSERT_TRUE(src && dst);
  pager.agent = src.get();
  pager.armed = true;
  MigrateRequest req;
  req.to = dst->address();
  req.all = true;
  ASSERT_OK(src->migrate(req).status());
  EXPECT_FALSE(pager.armed);
  EXPECT_EQ(pager.inner_status.code(), StatusCode::kFailedPrecondition)
      << pager.inner_status.to_string();
  ASSERT_OK_AND_ASSIGN(AgentStatus st, dst->status());
  EXPECT_EQ(st.seqs.size(), 1u);
  src->stop();
  dst->stop();
}

TEST(EmbedExample, AgentRefusesBadOptions) {
  auto cache = make_cache(PoolLayout::kPage, 8);
  ASSERT_TRUE(cache);
  AgentOptions options;
  options.transports = {};
  EXPECT_EQ(Agent::create(*cache, options).status().code(),
            StatusCode::kInvalidArgument);
  options.transports = {"tcp"};
  options.listen_host = "not-an-ip";
  EXPECT_FALSE(Agent::create(*cache, options).ok());
  options.listen_host = "127.0.0.1";
  options.max_pages_per_migration = 0;
  EXPECT_EQ(Agent::create(*cache, options).status().code(),
            StatusCode::kInvalidArgument);
  options.max_pages_per_migration = 1024;
  options.transports = {"verbs"};
  auto verbs = Agent::create(*cache, options);
  EXPECT_FALSE(verbs.ok());
  EXPECT_NE(verbs.status().message().find("verbs"), std::string::npos)
      << verbs.status().to_string();
}

}  // namespace
}  // namespace kvmig
