// The cluster on a real etcd: `kvmig serve --etcd` registrations, `kvmig
// agents`, `kvmig drain` and `kvmig rebalance`, with agents as real
// processes, killed for real.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "agent_cli.h"
#include "etcd_server.h"
#include "process.h"
#include "prometheus_util.h"
#include "scope_exit.h"
#include "testutil.h"

namespace kvmig::testing {
namespace {

using json = nlohmann::json;
using std::chrono::milliseconds;
using std::chrono::seconds;
using std::chrono::steady_clock;

class ClusterE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    KVMIG_REQUIRE_ETCD();
    etcd_ = EtcdServer::start();
    ASSERT_NE(etcd_, nullptr);
    std::random_device rd;
    prefix_ = "/kvmig-test-" + std::to_string(rd());
  }

  std::vector<std::string> etcd_flags() const {
    return {"--etcd", etcd_->endpoint(), "--etcd-prefix", prefix_};
  }

  // An agent registered as name, with a TTL of ttl_s.
  std::unique_ptr<AgentProcess> agent(const std::string& name,
                                      std::vector<std::string> flags,
                                      int ttl_s = 3) {
    std::vector<std::string> args = etcd_flags();
    args.insert(args.end(),
                {"--name", name, "--etcd-ttl", std::to_string(ttl_s)});
    args.insert(args.end(), flags.begin(), flags.end());
    auto a = AgentProcess::start(args);
    EXPECT_TRUE(a) << name;
    return a;
  }

  // args (a kvmig command and its flags) with this test's etcd flags after
  // the command.
  std::vector<std::string> with_etcd(std::vector<std::string> args) const {
    std::vector<std::string> flags = etcd_flags();
    args.insert(args.begin() + 1, flags.begin(), flags.end());
    return args;
  }

  CliResult kvmig(std::vector<std::string> args) {
    return run_kvmig(with_etcd(std::move(args)));
  }

  // The same command as a child process, for a test that acts while it runs.
  std::unique_ptr<Child> spawn_kvmig(std::vector<std::string> args) {
    args = with_etcd(std::move(args));
    args.insert(args.begin(), kvmig_bin());
    return Child::spawn(args);
  }

  // `kvmig agents --json`: name -> record ({} when it failed).
  std::map<std::string, json> agents() {
    CliResult r = kvmig({"agents", "--json"});
    std::map<std::string, json> out;
    json j = json::parse(r.out, nullptr, false);
    if (r.code != 0 || !j.is_object() || !j.contains("agents")) {
      ADD_FAILURE() << "kvmig agents: " << r.code << " " << r.out << r.err;
      return out;
    }
    for (const auto& a : j["agents"]) out[a["name"]] = a;
    return out;
  }

  // For the rebalance cases: 80 of 100 pages used at "hot" (16 requests of
  // 5 pages), two idle agents of 100.
  void start_hot_and_idle() {
    hot_ = agent("hot", {"--capacity-pages", "100", "--populate", "16:80"});
    c1_ = agent("c1", {"--capacity-pages", "100"});
    c2_ = agent("c2", {"--capacity-pages", "100"});
    ASSERT_TRUE(hot_ && c1_ && c2_);
    ASSERT_TRUE(eventually([&] { return agents().size() == 3; }, seconds(10)));
  }

  std::unique_ptr<EtcdServer> etcd_;
  std::string prefix_;
  std::unique_ptr<AgentProcess> hot_, c1_, c2_;
};

// Every request id -> (agent, digest) over the given agents, failing on a
// request found in two places.
std::map<uint64_t, std::pair<std::string, std::string>> where(
    const std::vector<AgentProcess*>& agents) {
  std::map<uint64_t, std::pair<std::string, std::string>> out;
  for (AgentProcess* a : agents) {
    for (const auto& [id, digest] : digests(status_of(a->address()))) {
      auto [it, fresh] = out.try_emplace(id, a->address(), digest);
      EXPECT_TRUE(fresh) << "request " << id << " is live at "
                         << it->second.first << " and " << a->address();
    }
  }
  return out;
}

std::map<uint64_t, std::string> digests_only(
    const std::map<uint64_t, std::pair<std::string, std::string>>& w) {
  std::map<uint64_t, std::string> out;
  for (const auto& [id, at] : w) out[id] = at.second;
  return out;
}

TEST_F(ClusterE2E, AgentsRegisterAndAreListedWithTheirState) {
  auto a = agent("alpha", {"--capacity-pages", "100", "--populate", "3:40"});
  auto b = agent("beta", {"--capacity-pages", "50"});
  ASSERT_TRUE(a && b);
  std::map<std::string, json> listed;
  ASSERT_TRUE(eventually(
      [&] {
        listed = agents();
        return listed.size() == 2;
      },
      seconds(10)));
  const json& r = listed["alpha"];
  EXPECT_EQ(r["address"], a->address());
  EXPECT_EQ(r["capacity_pages"], 100);
  EXPECT_EQ(r["free_pages"], 100 - 3 * 3);
  EXPECT_EQ(r["requests"], 3);
  EXPECT_EQ(r["draining"], false);
  EXPECT_EQ(r["meta"]["page_size_tokens"], 16);
  EXPECT_EQ(r["transports"], json::array({"tcp"}));
  EXPECT_FALSE(r["version"].get<std::string>().empty());
  EXPECT_EQ(listed["beta"]["requests"], 0);

  // The table names both, and nothing in etcd is a secret.
  CliResult table = kvmig({"agents"});
  EXPECT_EQ(table.code, 0) << table.err;
  EXPECT_NE(table.out.find("alpha"), std::string::npos);
  EXPECT_NE(table.out.find(b->address()), std::string::npos);
  EXPECT_NE(table.out.find("91/100"), std::string::npos) << table.out;

  // A migration shows in both records within a refresh or two.
  CliResult moved = run_kvmig({"migrate", "--agent", a->address(), "--to",
                               b->address(), "--all", "--json"});
  ASSERT_EQ(moved.code, 0) << moved.out << moved.err;
  EXPECT_TRUE(eventually(
      [&] {
        listed = agents();
        return listed["alpha"]["requests"] == 0 &&
               listed["beta"]["requests"] == 3 &&
               listed["beta"]["free_pages"] == 50 - 9;
      },
      seconds(5)))
      << listed["alpha"] << listed["beta"];
}

TEST_F(ClusterE2E, AKilledAgentExpiresWithItsLeaseAndAStoppedOneAtOnce) {
  auto killed = agent("killed", {}, /*ttl_s=*/3);
  auto stopped = agent("stopped", {}, /*ttl_s=*/60);
  ASSERT_TRUE(killed && stopped);
  ASSERT_TRUE(eventually([&] { return agents().size() == 2; }, seconds(10)));

  killed->child().kill(SIGKILL);
  const auto killed_at = steady_clock::now();
  ASSERT_TRUE(
      eventually([&] { return agents().count("killed") == 0; }, seconds(10)));
  const double gone_s =
      std::chrono::duration<double>(steady_clock::now() - killed_at).count();
  EXPECT_LE(gone_s, 3 + 1.0) << "TTL 3 s";
  EXPECT_EQ(agents().count("stopped"), 1u);

  // A clean stop deletes the key: long before its 60 s TTL.
  stopped->child().kill(SIGTERM);
  ASSERT_TRUE(stopped->child().wait_exit(seconds(10)));
  EXPECT_EQ(stopped->child().exit_code(), 0) << stopped->child().err();
  EXPECT_TRUE(agents().empty());
}

TEST_F(ClusterE2E, ADuplicateNameIsRefusedAtStart) {
  auto first = agent("same", {});
  ASSERT_TRUE(first);
  auto second =
      spawn_kvmig({"serve", "--listen", "127.0.0.1:0", "--name", "same"});
  ASSERT_TRUE(second);
  ASSERT_TRUE(second->wait_exit(seconds(20)));
  EXPECT_EQ(second->exit_code(), 1);
  EXPECT_NE(second->err().find("'same' is taken"), std::string::npos)
      << second->err();
  EXPECT_NE(second->err().find(first->address()), std::string::npos);
  // The first is still the one listed.
  EXPECT_EQ(agents()["same"]["address"], first->address());
  // Usage: --etcd without --name.
  CliResult usage = run_kvmig(
      {"serve", "--listen", "127.0.0.1:0", "--etcd", etcd_->endpoint()});
  EXPECT_EQ(usage.code, 2) << usage.err;
  EXPECT_NE(usage.err.find("--name"), std::string::npos);
}

TEST_F(ClusterE2E, AgentsKeepMigratingWhileEtcdIsDownAndRegisterWhenBack) {
  auto a = agent("a", {"--populate", "2:50"});
  auto b = agent("b", {});
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(eventually([&] { return agents().size() == 2; }, seconds(10)));

  etcd_->kill();
  CliResult moved = run_kvmig({"migrate", "--agent", a->address(), "--to",
                               b->address(), "--all", "--json"});
  EXPECT_EQ(moved.code, 0) << moved.out << moved.err;
  CliResult down = kvmig({"agents", "--json"});
  EXPECT_EQ(down.code, 1);
  EXPECT_NE(down.out.find("Unavailable"), std::string::npos) << down.out;

  ASSERT_TRUE(etcd_->restart());
  const auto back_at = steady_clock::now();
  std::map<std::string, json> listed;
  EXPECT_TRUE(eventually(
      [&] {
        listed = agents();
        return listed.size() == 2 && listed["a"]["requests"] == 0 &&
               listed["b"]["requests"] == 2;
      },
      seconds(10)))
      << listed["a"] << listed["b"];
  const double back_s =
      std::chrono::duration<double>(steady_clock::now() - back_at).count();
  EXPECT_LT(back_s, 5.0);
  EXPECT_NE(a->child().err().find("etcd"), std::string::npos)
      << "the agent logs that etcd went away";
}

TEST_F(ClusterE2E,
       DrainMovesEveryRequestToEqualMetasKeepingSharedPagesTogether) {
  // src: 6 requests, the first 32 tokens (2 pages) shared by all.
  auto src = agent("src", {"--capacity-pages", "200", "--populate", "6:100",
                           "--share-prefix", "32"});
  auto d1 = agent("d1", {"--capacity-pages", "200"});
  auto d2 = agent("d2", {"--capacity-pages", "31"});
  auto other =
      agent("other", {"--preset", "llama3-8b", "--capacity-pages", "200"});
  ASSERT_TRUE(src && d1 && d2 && other);
  ASSERT_TRUE(eventually([&] { return agents().size() == 4; }, seconds(10)));
  const auto before = where({src.get(), d1.get(), d2.get()});
  ASSERT_EQ(before.size(), 6u);

  CliResult r = kvmig({"drain", "--agent", "src", "--json"});
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  json report = json::parse(r.out);
  EXPECT_EQ(report["ok"], true);
  EXPECT_EQ(report["agent"], "src");
  ASSERT_EQ(report["moved"].size(), 6u) << report;
  EXPECT_TRUE(report["unplaced"].empty());
  std::set<std::string> destinations;
  for (const auto& m : report["moved"]) {
    destinations.insert(m["to"].get<std::string>());
    EXPECT_FALSE(m["migration_id"].get<std::string>().empty());
  }
  // One group (every request shares the prefix), and only d1 has room for
  // its 2 + 6 * 5 = 32 pages (d2 has 31): all went there together.
  EXPECT_EQ(destinations, (std::set<std::string>{"d1"}));

  const auto after = where({src.get(), d1.get(), d2.get(), other.get()});
  EXPECT_EQ(digests_only(after), digests_only(before));
  for (const auto& m : report["moved"]) {
    EXPECT_EQ(after.at(m["seq"].get<uint64_t>()).first, d1->address());
  }
  EXPECT_TRUE(status_of(other->address())["seqs"].empty());
  auto listed = agents();
  EXPECT_EQ(listed["src"]["draining"], true);
  EXPECT_EQ(listed["d1"]["draining"], false);

  // A drained agent receives nothing: draining d1 now can only go to d2
  // (too small) and never back to src.
  CliResult again = kvmig({"drain", "--agent", "d1", "--json"});
  EXPECT_EQ(again.code, 1) << again.out;
  json second = json::parse(again.out);
  EXPECT_EQ(second["moved"].size(), 0u);
  EXPECT_EQ(second["unplaced"].size(), 6u);
  EXPECT_TRUE(status_of(src->address())["seqs"].empty());
  EXPECT_EQ(digests_only(where({src.get(), d1.get(), d2.get()})),
            digests_only(before));

  // --undo clears the mark.
  CliResult undo = kvmig({"drain", "--agent", "src", "--undo"});
  EXPECT_EQ(undo.code, 0) << undo.err;
  EXPECT_TRUE(eventually([&] { return agents()["src"]["draining"] == false; },
                         seconds(5)));
}

TEST_F(ClusterE2E, DrainWithEveryDestinationFullMovesNothingAndSaysWhy) {
  auto src = agent("src", {"--populate", "4:200"});  // 13 pages each
  auto full = agent("full", {"--capacity-pages", "12"});
  ASSERT_TRUE(src && full);
  ASSERT_TRUE(eventually([&] { return agents().size() == 2; }, seconds(10)));
  const auto before = where({src.get(), full.get()});

  CliResult r = kvmig({"drain", "--agent", "src", "--json"});
  EXPECT_EQ(r.code, 1) << r.out << r.err;
  json report = json::parse(r.out);
  EXPECT_EQ(report["ok"], false);
  EXPECT_TRUE(report["moved"].empty());
  ASSERT_EQ(report["unplaced"].size(), 4u);
  for (const auto& u : report["unplaced"]) {
    EXPECT_NE(u["error"].get<std::string>().find("room"), std::string::npos)
        << u;
  }
  EXPECT_EQ(report["migrations"], 0);
  EXPECT_EQ(where({src.get(), full.get()}), before);
  EXPECT_EQ(status_of(full->address())["free_pages"], 12);

  // No agent at all: the text report names each request.
  CliResult text = kvmig({"drain", "--agent", "full"});
  EXPECT_EQ(text.code, 0) << "nothing to move is a success: " << text.out;
  CliResult unknown = kvmig({"drain", "--agent", "nobody", "--json"});
  EXPECT_EQ(unknown.code, 1);
  EXPECT_NE(unknown.out.find("not registered"), std::string::npos);
}

TEST_F(ClusterE2E, DrainSkipsADestinationThatDiesMidMove) {
  // The roomiest destination is tried first, and dies once it has offered
  // its slots; the requests go to the other. The source waits after OFFER
  // until the test creates `release`, once the dying agent is reaped (its
  // sockets closed): released at once, the source could send COMMIT before
  // the close reached it and rightly stay in doubt (seen once in CI), not
  // the roll-back and second destination this test is about.
  char dir_tmpl[] = "/tmp/kvmig-drain-XXXXXX";
  const std::string dir = mkdtemp(dir_tmpl);
  const std::string release = dir + "/release";
  ScopeExit cleanup([&] { std::filesystem::remove_all(dir); });
  auto src = agent("src", {"--populate", "4:100", "--fault",
                           "src.after_offer=hold:" + release});
  auto dying = agent(
      "dying", {"--capacity-pages", "4096", "--fault", "dst.after_offer=exit"});
  auto spare = agent("spare", {"--capacity-pages", "100"});
  // Released however the test ends, before the agents stop.
  ScopeExit let_go([&] { std::ofstream(release).put('\n'); });
  ASSERT_TRUE(src && dying && spare);
  ASSERT_TRUE(eventually([&] { return agents().size() == 3; }, seconds(10)));
  const auto before = where({src.get(), spare.get()});

  auto drain = spawn_kvmig({"drain", "--agent", "src", "--json"});
  ASSERT_TRUE(drain);
  ASSERT_TRUE(src->child().wait_for("reached src.after_offer", seconds(30),
                                    /*in_stderr=*/true))
      << src->child().err();
  ASSERT_TRUE(dying->child().wait_exit(seconds(30))) << src->child().err();
  EXPECT_EQ(dying->child().exit_code(), 99);
  let_go.release();
  std::ofstream(release).put('\n');
  ASSERT_TRUE(drain->wait_exit(seconds(60)));
  ASSERT_EQ(drain->exit_code(), 0) << drain->out() << drain->err();
  json report = json::parse(drain->out());
  EXPECT_EQ(report["migrations"], 2);
  ASSERT_EQ(report["moved"].size(), 4u);
  for (const auto& m : report["moved"]) EXPECT_EQ(m["to"], "spare");
  // Each request in exactly one place, digests unchanged.
  const auto after = where({src.get(), spare.get()});
  EXPECT_EQ(digests_only(after), digests_only(before));
  for (const auto& [id, at] : after) EXPECT_EQ(at.first, spare->address());
}

TEST_F(ClusterE2E, TwoRebalancersAtOnceNeverMoveARequestTwice) {
  ASSERT_NO_FATAL_FAILURE(start_hot_and_idle());
  const auto before = where({hot_.get(), c1_.get(), c2_.get()});
  ASSERT_EQ(before.size(), 16u);

  auto rebalancer = [&] {
    return spawn_kvmig({"rebalance", "--once", "--json", "--threshold", "0.1"});
  };
  auto r1 = rebalancer();
  auto r2 = rebalancer();
  ASSERT_TRUE(r1 && r2);
  ASSERT_TRUE(r1->wait_exit(seconds(60)) && r2->wait_exit(seconds(60)));
  // Each request's path, pass by pass: it never returns to an agent it left.
  std::map<uint64_t, std::vector<std::string>> path;
  auto follow = [&](const json& report) {
    for (const auto& m : report["moves"]) {
      EXPECT_EQ(m["error"], "") << m;
      for (const auto& id : m["seqs"]) {
        auto& p = path[id.get<uint64_t>()];
        if (p.empty()) p.push_back(m["from"]);
        EXPECT_EQ(p.back(), m["from"]) << id;
        EXPECT_EQ(std::count(p.begin(), p.end(), m["to"]), 0)
            << "request " << id << " moved back to " << m["to"];
        p.push_back(m["to"]);
      }
    }
  };
  size_t moved = 0;
  for (Child* c : {r1.get(), r2.get()}) {
    EXPECT_EQ(c->exit_code(), 0) << c->out() << c->err();
    json report = json::parse(c->out(), nullptr, false);
    ASSERT_TRUE(report.is_object()) << c->out();
    for (const auto& m : report["moves"]) moved += m["seqs"].size();
    follow(report);
  }
  // The two passes together moved each request at most once.
  EXPECT_GE(moved, 1u);
  EXPECT_EQ(moved, path.size());
  const auto after = where({hot_.get(), c1_.get(), c2_.get()});
  EXPECT_EQ(digests_only(after), digests_only(before));

  // Until balanced; then passes move nothing.
  size_t last_moves = 1;
  for (int pass = 0; pass < 6 && last_moves > 0; ++pass) {
    CliResult r =
        kvmig({"rebalance", "--once", "--json", "--threshold", "0.1"});
    EXPECT_EQ(r.code, 0) << r.out << r.err;
    json report = json::parse(r.out, nullptr, false);
    ASSERT_TRUE(report.is_object()) << r.out;
    last_moves = report["moves"].size();
    follow(report);
  }
  EXPECT_EQ(last_moves, 0u) << "a pass that moves nothing";
  EXPECT_EQ(digests_only(where({hot_.get(), c1_.get(), c2_.get()})),
            digests_only(before));
  // Every request moved at most once in all passes (hysteresis: what just
  // arrived stays), the hot agent is no longer the hot one, and no page
  // was lost or duplicated.
  for (const auto& [id, p] : path) EXPECT_EQ(p.size(), 2u) << id;
  const json hot_now = status_of(hot_->address());
  const json c2_now = status_of(c2_->address());
  EXPECT_GE(hot_now["free_pages"].get<int>(), 60) << "load at most 0.4";
  EXPECT_GT(c2_now["seqs"].size(), 0u) << "both idle agents took some";
}

TEST_F(ClusterE2E, RebalanceWithSettleZeroKeepsBalancingAndConverges) {
  ASSERT_NO_FATAL_FAILURE(start_hot_and_idle());
  const auto before = where({hot_.get(), c1_.get(), c2_.get()});
  size_t last_moves = 1;
  int passes = 0;
  for (; passes < 8 && last_moves > 0; ++passes) {
    CliResult r = kvmig({"rebalance", "--once", "--json", "--threshold", "0.1",
                         "--settle-ms", "0"});
    ASSERT_EQ(r.code, 0) << r.out << r.err;
    json report = json::parse(r.out, nullptr, false);
    ASSERT_TRUE(report.is_object()) << r.out;
    last_moves = report["moves"].size();
  }
  EXPECT_EQ(last_moves, 0u) << "converged in " << passes << " passes";
  EXPECT_EQ(digests_only(where({hot_.get(), c1_.get(), c2_.get()})),
            digests_only(before));
  double lo = 1, hi = 0;
  for (AgentProcess* a : {hot_.get(), c1_.get(), c2_.get()}) {
    json st = status_of(a->address());
    const double load = 1.0 - st["free_pages"].get<double>() / 100.0;
    lo = std::min(lo, load);
    hi = std::max(hi, load);
  }
  EXPECT_LE(hi - lo, 0.1 + 1e-9) << "the gap closed to the threshold";
}

TEST_F(ClusterE2E, PrometheusSeesADrainAndTheRegistrations) {
  if (access(kPrometheus, X_OK) != 0) GTEST_SKIP() << kPrometheus << " missing";
  auto src =
      agent("src", {"--populate", "2:40", "--metrics-listen", "127.0.0.1:0"});
  auto dst = agent("dst", {"--metrics-listen", "127.0.0.1:0"});
  ASSERT_TRUE(src && dst);
  const std::string src_metrics = metrics_address(*src);
  const std::string dst_metrics = metrics_address(*dst);
  ASSERT_TRUE(eventually([&] { return agents().size() == 2; }, seconds(10)));
  CliResult drained = kvmig({"drain", "--agent", "src", "--json"});
  ASSERT_EQ(drained.code, 0) << drained.out << drained.err;

  auto prometheus = PrometheusServer::start({src_metrics, dst_metrics});
  ASSERT_TRUE(prometheus);
  // instance -> value of an instant query.
  auto values = [&](const std::string& expr) {
    std::map<std::string, double> out;
    json result;
    if (!prometheus->query(expr, result)) return out;
    for (const auto& r : result) {
      out[r["metric"]["instance"].get<std::string>()] =
          std::stod(r["value"][1].get<std::string>());
    }
    return out;
  };
  const std::map<std::string, double> moved = {{src_metrics, 1}};
  const std::map<std::string, double> arrived = {{dst_metrics, 1}};
  const std::map<std::string, double> registered = {{src_metrics, 1},
                                                    {dst_metrics, 1}};
  EXPECT_TRUE(eventually(
      [&] {
        return values(
                   "kvmig_migrations_total%7Brole%3D%22source%22%2C"
                   "outcome%3D%22committed%22%7D%3E0") == moved &&
               values(
                   "kvmig_migrations_total%7Brole%3D%22destination%22%2C"
                   "outcome%3D%22committed%22%7D%3E0") == arrived &&
               values("kvmig_etcd_registered") == registered;
      },
      seconds(30)))
      << prometheus->log();
}

}  // namespace
}  // namespace kvmig::testing
