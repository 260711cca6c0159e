// Kept control connections (AgentOptions::kept_connection_idle), with two
// agents in this process on loopback: a committed migration's connection
// carries the next migration to the same destination (a small one in one
// exchange: HELLO, PAGES and COMMIT out, DONE back); a kept connection the
// destination closed is connected anew, before anything started there,
// also when it closes just as HELLO (or the whole exchange) goes out.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvmig/kvmig.h"
#include "synthetic_pager.h"
#include "testutil.h"

namespace kvmig {
namespace {

using namespace std::chrono_literals;

struct Side {
  std::unique_ptr<SyntheticPager> pager;
  std::unique_ptr<Agent> agent;
};

// An agent over a tiny pool of 64 pages with `seqs` requests of 40 tokens
// (3 pages each), serving on a thread of its own.
Result<Side> start_side(uint32_t seqs, AgentOptions options,
                        std::string transport = "tcp") {
  KVMIG_ASSIGN_OR_RETURN(CacheMeta meta, preset_meta("tiny"));
  Side s;
  KVMIG_ASSIGN_OR_RETURN(s.pager,
                         SyntheticPager::create(meta, PoolLayout::kPage, 64));
  if (seqs > 0) KVMIG_RETURN_IF_ERROR(s.pager->populate(seqs, 40, 5));
  options.listen_host = "127.0.0.1";
  options.transports = {std::move(transport)};
  options.peer_timeout = 5s;
  KVMIG_ASSIGN_OR_RETURN(s.agent, Agent::create(*s.pager, options));
  KVMIG_RETURN_IF_ERROR(s.agent->start());
  return s;
}

std::map<SeqId, std::string> digests_of(Agent& agent) {
  std::map<SeqId, std::string> out;
  auto st = agent.status();
  EXPECT_OK(st.status());
  if (st.ok()) {
    for (const SeqStatus& s : st->seqs) out[s.id] = s.digest;
  }
  return out;
}

Result<MigrationReport> move(Agent& from, Agent& to, SeqId id) {
  MigrateRequest req;
  req.to = to.address();
  req.seqs = {id};
  return from.migrate(req);
}

class KeptConnection : public ::testing::TestWithParam<std::string> {};

// Each move to the same destination after the first goes on the first's
// connection; a move back (the other direction) opens its own; a source
// that keeps nothing connects every time. Every request arrives intact.
TEST_P(KeptConnection, NextMigrationToTheSameAgentUsesIt) {
  ASSERT_OK_AND_ASSIGN(Side a, start_side(4, {}, GetParam()));
  ASSERT_OK_AND_ASSIGN(Side b, start_side(0, {}, GetParam()));
  const auto before = digests_of(*a.agent);
  ASSERT_EQ(before.size(), 4u);
  for (SeqId id : {1, 2, 3}) {
    ASSERT_OK_AND_ASSIGN(MigrationReport r, move(*a.agent, *b.agent, id));
    EXPECT_EQ(r.kept_connection, id > 1) << "request " << id;
    // 3 pages of 16 KiB, under the 64 KiB the first OFFER allowed.
    EXPECT_EQ(r.one_exchange, id > 1) << "request " << id;
    EXPECT_TRUE(r.inline_pages) << "request " << id;
  }
  ASSERT_OK_AND_ASSIGN(MigrationReport back, move(*b.agent, *a.agent, 2));
  EXPECT_FALSE(back.kept_connection);
  ASSERT_OK_AND_ASSIGN(back, move(*b.agent, *a.agent, 3));
  EXPECT_TRUE(back.kept_connection);
  auto at_a = digests_of(*a.agent);
  auto at_b = digests_of(*b.agent);
  EXPECT_EQ(at_b.size(), 1u);
  at_a.insert(at_b.begin(), at_b.end());
  EXPECT_EQ(at_a, before);

  AgentOptions keeps_nothing;
  keeps_nothing.kept_connection_idle = 0ms;
  ASSERT_OK_AND_ASSIGN(Side c, start_side(2, keeps_nothing, GetParam()));
  ASSERT_OK_AND_ASSIGN(Side d, start_side(0, {}, GetParam()));
  for (SeqId id : {1, 2}) {
    ASSERT_OK_AND_ASSIGN(MigrationReport r, move(*c.agent, *d.agent, id));
    EXPECT_FALSE(r.kept_connection) << "request " << id;
    EXPECT_FALSE(r.one_exchange) << "request " << id;
  }
  EXPECT_EQ(digests_of(*d.agent).size(), 2u);
  a.agent->stop();
  b.agent->stop();
  c.agent->stop();
  d.agent->stop();
}

// Status counts the connections a source keeps: one per destination
// after a committed move, none where nothing is kept; one past its idle
// time (the timer) or whose destination stopped (status) is closed and no
// longer counted.
TEST(KeptConnectionStatus, CountsWhatTheSourceKeeps) {
  auto kept = [](Agent& agent) -> uint32_t {
    auto st = agent.status(StatusOptions{.digests = false});
    EXPECT_OK(st.status());
    return st.ok() ? st->kept_connections : 99;
  };
  // Polls until `agent` keeps `n`, for at most 10 s.
  auto settles_at = [&](Agent& agent, uint32_t n) {
    return testing::eventually([&] { return kept(agent) == n; }, 10s);
  };
  AgentOptions short_idle;
  short_idle.kept_connection_idle = 300ms;
  ASSERT_OK_AND_ASSIGN(Side a, start_side(3, short_idle));
  ASSERT_OK_AND_ASSIGN(Side b, start_side(0, {}));
  ASSERT_OK_AND_ASSIGN(Side c, start_side(0, {}));
  EXPECT_EQ(kept(*a.agent), 0u);
  ASSERT_OK(move(*a.agent, *b.agent, 1).status());
  // DONE_ACK goes out before the io thread takes the status call.
  EXPECT_EQ(kept(*a.agent), 1u);
  EXPECT_EQ(kept(*b.agent), 0u);  // a destination keeps nothing as a source
  ASSERT_OK(move(*a.agent, *c.agent, 2).status());
  EXPECT_EQ(kept(*a.agent), 2u);
  // Idle past 300 ms: closed by the timer.
  EXPECT_TRUE(settles_at(*a.agent, 0));

  ASSERT_OK_AND_ASSIGN(Side d, start_side(1, {}));
  ASSERT_OK_AND_ASSIGN(Side f, start_side(0, {}));
  ASSERT_OK(move(*d.agent, *f.agent, 1).status());
  EXPECT_EQ(kept(*d.agent), 1u);
  f.agent->stop();  // closes its end of the kept connection
  EXPECT_TRUE(settles_at(*d.agent, 0));

  AgentOptions keeps_nothing;
  keeps_nothing.kept_connection_idle = 0ms;
  ASSERT_OK_AND_ASSIGN(Side e, start_side(1, keeps_nothing));
  ASSERT_OK(move(*e.agent, *c.agent, 1).status());
  EXPECT_EQ(kept(*e.agent), 0u);
  a.agent->stop();
  b.agent->stop();
  c.agent->stop();
  d.agent->stop();
  e.agent->stop();
}

INSTANTIATE_TEST_SUITE_P(Transports, KeptConnection,
                         ::testing::Values("tcp", "ucx"),
                         [](const auto& info) { return info.param; });

// The destination may keep one connection only (max_connections 1). As the
// source takes its kept connection for the second move, a status query
// reaches the destination: to admit it, the destination closes the idle
// kept connection (the query is answered, not refused). HELLO then goes
// out on a closed connection: the source connects again, once, and the
// move commits on the new connection with the request intact.
// The races run both ways: HELLO alone (the source sends no page inline,
// so HELLO/OFFER comes first) and in one exchange (HELLO with the pages
// and COMMIT).
class KeptConnectionRace : public ::testing::TestWithParam<bool> {
 protected:
  AgentOptions source_options() const {
    AgentOptions o;
    if (!GetParam()) o.inline_page_bytes = 0;
    return o;
  }
};

TEST_P(KeptConnectionRace, ClosedAsHelloGoesOutIsConnectedAgain) {
  std::atomic<bool> armed{false};
  std::atomic<int> retries{0};
  std::string b_address;
  Status queried = Status::internal("no query");
  AgentOptions a_options = source_options();
  a_options.fault_hook = [&](std::string_view point) {
    if (point == "src.kept_retry") ++retries;
    if (point != "src.kept_taken" || !armed.exchange(false)) return;
    queried = query_status(b_address).status();
  };
  ASSERT_OK_AND_ASSIGN(Side a, start_side(2, a_options));
  AgentOptions b_options;
  b_options.max_connections = 1;
  ASSERT_OK_AND_ASSIGN(Side b, start_side(0, b_options));
  b_address = b.agent->address();
  const auto before = digests_of(*a.agent);

  ASSERT_OK_AND_ASSIGN(MigrationReport first, move(*a.agent, *b.agent, 1));
  EXPECT_FALSE(first.kept_connection);
  armed = true;
  ASSERT_OK_AND_ASSIGN(MigrationReport second, move(*a.agent, *b.agent, 2));
  EXPECT_OK(queried);
  EXPECT_EQ(retries.load(), 1);
  EXPECT_FALSE(second.kept_connection);  // the new one
  EXPECT_EQ(second.one_exchange, GetParam());
  EXPECT_EQ(digests_of(*b.agent), before);
  EXPECT_TRUE(digests_of(*a.agent).empty());
  ASSERT_OK_AND_ASSIGN(AgentStatus st, b.agent->status());
  EXPECT_EQ(st.free_pages, st.capacity_pages - 6);
  a.agent->stop();
  b.agent->stop();
}

// A destination that stopped closed its end of the kept connection: the
// next move there fails as any move to an unreachable agent does (the
// request stays and runs); once an agent serves that address again, the
// source connects to it anew.
TEST_P(KeptConnectionRace, StoppedDestinationIsAnErrorThenConnectedAnew) {
  ASSERT_OK_AND_ASSIGN(Side a, start_side(2, source_options()));
  ASSERT_OK_AND_ASSIGN(Side b, start_side(0, {}));
  const auto before = digests_of(*a.agent);
  ASSERT_OK(move(*a.agent, *b.agent, 1).status());
  const uint16_t port = b.agent->port();
  b.agent->stop();
  MigrateRequest req;
  req.to = "127.0.0.1:" + std::to_string(port);
  req.seqs = {2};
  auto failed = a.agent->migrate(req);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), StatusCode::kUnavailable)
      << failed.status().to_string();
  auto left = digests_of(*a.agent);
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left.at(2), before.at(2));

  AgentOptions same_port;
  same_port.listen_port = port;
  ASSERT_OK_AND_ASSIGN(Side b2, start_side(0, same_port));
  ASSERT_OK_AND_ASSIGN(MigrationReport r, move(*a.agent, *b2.agent, 2));
  EXPECT_FALSE(r.kept_connection);
  EXPECT_EQ(digests_of(*b2.agent).at(2), before.at(2));
  a.agent->stop();
  b2.agent->stop();
}

// The kept connection is open when the source takes it, and the
// destination stops right then: HELLO finds it closed, and the one
// connect again finds nothing listening. The move fails as a move to an
// unreachable agent does, naming the destination; the request stays and
// runs, and the next move (to an agent that serves) commits.
TEST_P(KeptConnectionRace, StoppedAsHelloGoesOutAndNotThereToReconnect) {
  std::atomic<bool> armed{false};
  std::atomic<int> retries{0};
  Agent* stop_me = nullptr;
  AgentOptions a_options = source_options();
  a_options.fault_hook = [&](std::string_view point) {
    if (point == "src.kept_retry") ++retries;
    if (point != "src.kept_taken" || !armed.exchange(false)) return;
    stop_me->stop();
  };
  ASSERT_OK_AND_ASSIGN(Side a, start_side(2, a_options));
  ASSERT_OK_AND_ASSIGN(Side b, start_side(0, {}));
  stop_me = b.agent.get();
  const auto before = digests_of(*a.agent);
  ASSERT_OK(move(*a.agent, *b.agent, 1).status());

  armed = true;
  MigrateRequest req;
  req.to = b.agent->address();
  req.seqs = {2};
  auto failed = a.agent->migrate(req);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), StatusCode::kUnavailable)
      << failed.status().to_string();
  EXPECT_NE(failed.status().message().find("destination"), std::string::npos)
      << failed.status().to_string();
  EXPECT_EQ(retries.load(), 1);
  auto left = digests_of(*a.agent);
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left.at(2), before.at(2));

  ASSERT_OK_AND_ASSIGN(Side c, start_side(0, {}));
  ASSERT_OK(move(*a.agent, *c.agent, 2).status());
  EXPECT_EQ(digests_of(*c.agent).at(2), before.at(2));
  EXPECT_TRUE(digests_of(*a.agent).empty());
  a.agent->stop();
  c.agent->stop();
}

INSTANTIATE_TEST_SUITE_P(HelloAloneAndOneExchange, KeptConnectionRace,
                         ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "OneExchange" : "HelloAlone";
                         });

// One exchange: the kept connection is open when the source checks it, and
// the destination closes it (to admit a status query: it keeps one
// connection only) right as HELLO, the pages and COMMIT go out. The
// destination read none of it, and says so when asked on a new
// connection: the source sends the exchange again there, once, and the
// move commits with the request intact.
class ExchangeRace : public ::testing::TestWithParam<bool> {};

TEST_P(ExchangeRace, ClosedAsTheExchangeGoesOutIsSentAgain) {
  // With GetParam(), the destination started over a request of its own
  // (id 1): an id it has no record of is "forgotten" (an earlier agent may
  // have installed it), but it is the agent of the connection's OFFER and
  // forgot nothing of its own, so the source still knows it never read it.
  const bool own_request = GetParam();
  std::atomic<bool> armed{false};
  std::atomic<int> retries{0};
  std::string b_address;
  Status queried = Status::internal("no query");
  AgentOptions a_options;
  a_options.fault_hook = [&](std::string_view point) {
    if (point == "src.kept_retry") ++retries;
    if (point != "src.one_exchange" || !armed.exchange(false)) return;
    queried = query_status(b_address).status();
  };
  ASSERT_OK_AND_ASSIGN(Side a, start_side(3, a_options));
  AgentOptions b_options;
  b_options.max_connections = 1;
  ASSERT_OK_AND_ASSIGN(Side b, start_side(own_request ? 1 : 0, b_options));
  b_address = b.agent->address();
  auto expected = digests_of(*a.agent);
  if (own_request) expected[1] = digests_of(*b.agent).at(1);

  ASSERT_OK_AND_ASSIGN(MigrationReport first, move(*a.agent, *b.agent, 2));
  EXPECT_FALSE(first.one_exchange);
  armed = true;
  ASSERT_OK_AND_ASSIGN(MigrationReport second, move(*a.agent, *b.agent, 3));
  EXPECT_OK(queried);
  EXPECT_EQ(retries.load(), 1);
  EXPECT_TRUE(second.one_exchange);
  EXPECT_FALSE(second.kept_connection);  // sent again on a new one
  auto at_b = digests_of(*b.agent);
  EXPECT_EQ(at_b.at(2), expected.at(2));
  EXPECT_EQ(at_b.at(3), expected.at(3));
  if (own_request) {
    EXPECT_EQ(at_b.at(1), expected.at(1));
  }
  ASSERT_OK_AND_ASSIGN(AgentStatus st, a.agent->status());
  EXPECT_TRUE(st.in_doubt.empty());
  ASSERT_OK_AND_ASSIGN(st, b.agent->status());
  EXPECT_EQ(st.free_pages, st.capacity_pages - (own_request ? 9 : 6));
  a.agent->stop();
  b.agent->stop();
}

INSTANTIATE_TEST_SUITE_P(DestinationStartedEmptyOrNot, ExchangeRace,
                         ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "OverItsOwnRequest" : "Empty";
                         });

// One exchange, and the destination is replaced as it goes out: the agent
// that made the kept connection's OFFER (inline limit 256 KiB) stops, and
// another starts at its address with a limit of 64 KiB. The new agent has
// no record of the id, so the exchange goes to it again and commits. What
// the old agent offered is not kept with the new connection: the next
// move there (two requests, 96 KiB) does not send its pages unasked on
// the strength of the old limit (the new agent would refuse them), but
// asks with HELLO, and the new agent takes them over the data path.
TEST(ExchangeRestart, TheNewAgentsOfferGovernsTheNextMove) {
  std::atomic<bool> armed{false};
  std::atomic<int> retries{0};
  Agent* stop_me = nullptr;
  std::optional<Side> b2;
  Status restarted = Status::internal("not restarted");
  AgentOptions a_options;
  a_options.inline_page_bytes = 256u << 10;
  a_options.fault_hook = [&](std::string_view point) {
    if (point == "src.kept_retry") ++retries;
    if (point != "src.one_exchange" || !armed.exchange(false)) return;
    const uint16_t port = stop_me->port();
    stop_me->stop();
    AgentOptions same_port;
    same_port.listen_port = port;
    same_port.inline_page_bytes = 64u << 10;
    auto started = start_side(0, same_port);
    restarted = started.status();
    if (started.ok()) b2.emplace(std::move(*started));
  };
  ASSERT_OK_AND_ASSIGN(Side a, start_side(4, a_options));
  AgentOptions b_options;
  b_options.inline_page_bytes = 256u << 10;
  ASSERT_OK_AND_ASSIGN(Side b, start_side(0, b_options));
  stop_me = b.agent.get();
  const auto before = digests_of(*a.agent);

  ASSERT_OK_AND_ASSIGN(MigrationReport first, move(*a.agent, *b.agent, 1));
  EXPECT_FALSE(first.one_exchange);
  armed = true;
  MigrateRequest req;
  req.to = b.agent->address();
  req.seqs = {2};
  ASSERT_OK_AND_ASSIGN(MigrationReport second, a.agent->migrate(req));
  ASSERT_OK(restarted);
  EXPECT_EQ(retries.load(), 1);
  EXPECT_TRUE(second.one_exchange);
  EXPECT_FALSE(second.kept_connection);  // sent again on a new one

  req.seqs = {3, 4};  // 6 pages of 16 KiB: over the new agent's limit
  ASSERT_OK_AND_ASSIGN(MigrationReport third, a.agent->migrate(req));
  EXPECT_TRUE(third.kept_connection);
  EXPECT_FALSE(third.one_exchange);
  EXPECT_FALSE(third.inline_pages);
  auto at_b2 = digests_of(*b2->agent);
  ASSERT_EQ(at_b2.size(), 3u);
  for (SeqId id : {2, 3, 4}) EXPECT_EQ(at_b2.at(id), before.at(id)) << id;
  ASSERT_OK_AND_ASSIGN(AgentStatus st, a.agent->status());
  EXPECT_TRUE(st.in_doubt.empty());
  ASSERT_EQ(st.seqs.size(), 0u);
  a.agent->stop();
  b2->agent->stop();
}

// One exchange into a destination with too few free slots: it refuses at
// HELLO (ABORT), before it reads the pages; the source rolls back (the
// request stays and runs, nothing is taken there) and the next move there,
// connected anew, asks with HELLO/OFFER again.
TEST(OneExchange, RefusedByAFullDestinationChangesNothing) {
  ASSERT_OK_AND_ASSIGN(Side a, start_side(3, {}));
  ASSERT_OK_AND_ASSIGN(Side b, start_side(0, {}));
  const auto before = digests_of(*a.agent);
  ASSERT_OK_AND_ASSIGN(MigrationReport first, move(*a.agent, *b.agent, 1));
  ASSERT_OK_AND_ASSIGN(AgentStatus st, b.agent->status());
  // Leave 2 free slots there: request 2 needs 3.
  ASSERT_OK_AND_ASSIGN(auto filler, b.pager->allocate_pages(st.free_pages - 2));
  auto refused = move(*a.agent, *b.agent, 2);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("destination full"),
            std::string::npos)
      << refused.status().to_string();
  EXPECT_EQ(digests_of(*a.agent).at(2), before.at(2));
  ASSERT_OK_AND_ASSIGN(st, b.agent->status());
  EXPECT_EQ(st.free_pages, 2u);
  ASSERT_OK(b.pager->release_pages(filler));
  ASSERT_OK_AND_ASSIGN(MigrationReport third, move(*a.agent, *b.agent, 2));
  EXPECT_FALSE(third.kept_connection);
  EXPECT_FALSE(third.one_exchange);
  ASSERT_OK_AND_ASSIGN(third, move(*a.agent, *b.agent, 3));
  EXPECT_TRUE(third.one_exchange);
  EXPECT_EQ(digests_of(*b.agent), before);
  a.agent->stop();
  b.agent->stop();
}

}  // namespace
}  // namespace kvmig
