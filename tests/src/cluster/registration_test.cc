// Registration and Cluster in-process, on a real etcd: in-process agents
// over synthetic caches, what a watcher sees, a lease lost under an agent,
// and the draining mark kept across the agent's own writes.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cluster/etcd_server.h"
#include "etcd_client.h"
#include "kvmig/cluster.h"
#include "kvmig/kvmig.h"
#include "synthetic_pager.h"
#include "testutil.h"

namespace kvmig {
namespace {

using namespace std::chrono_literals;
using testing::EtcdServer;
using testing::eventually;

// An in-process agent over a tiny synthetic cache.
struct LocalAgent {
  std::unique_ptr<SyntheticPager> pager;
  std::unique_ptr<Agent> agent;
};

LocalAgent local_agent(uint32_t seqs) {
  LocalAgent a;
  auto pager =
      SyntheticPager::create(*preset_meta("tiny"), PoolLayout::kPage, 64);
  EXPECT_OK(pager);
  a.pager = std::move(*pager);
  if (seqs > 0) EXPECT_OK(a.pager->populate(seqs, 40, 1));
  auto agent = Agent::create(*a.pager, AgentOptions{});
  EXPECT_OK(agent);
  a.agent = std::move(*agent);
  EXPECT_OK(a.agent->start());
  return a;
}

class RegistrationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    KVMIG_REQUIRE_ETCD();
    etcd_ = EtcdServer::start();
    ASSERT_NE(etcd_, nullptr);
    config_.endpoints = {etcd_->endpoint()};
    config_.prefix = "/reg-test";
    ClusterOptions co;
    co.etcd = config_;
    ASSERT_OK_AND_ASSIGN(cluster_, Cluster::connect(co));
    ASSERT_OK_AND_ASSIGN(etcd_client_,
                         EtcdClient::create(EtcdOptions{{etcd_->endpoint()}}));
  }

  std::unique_ptr<Registration> registration(Agent& agent,
                                             const std::string& name) {
    RegistrationOptions ro;
    ro.etcd = config_;
    ro.name = name;
    ro.ttl = 3s;
    ro.refresh = 50ms;
    auto r = Registration::start(agent, ro);
    EXPECT_OK(r);
    return r.ok() ? std::move(*r) : nullptr;
  }

  std::map<std::string, AgentRecord> listed() {
    std::map<std::string, AgentRecord> out;
    auto agents = cluster_->agents();
    EXPECT_OK(agents);
    if (agents.ok()) {
      for (auto& r : *agents) out[r.name] = r;
    }
    return out;
  }

  std::unique_ptr<EtcdServer> etcd_;
  EtcdConfig config_;
  std::unique_ptr<Cluster> cluster_;
  std::unique_ptr<EtcdClient> etcd_client_;
};

TEST_F(RegistrationTest, AWatcherSeesAgentsComeChangeAndGo) {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::map<std::string, AgentRecord>> views;  // mu
  ASSERT_OK_AND_ASSIGN(
      auto watch, cluster_->watch([&](const std::vector<AgentRecord>& now) {
        std::map<std::string, AgentRecord> view;
        for (const auto& r : now) view[r.name] = r;
        std::lock_guard lock(mu);
        views.push_back(std::move(view));
        cv.notify_all();
      }));
  auto seen = [&](auto pred) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, 10s,
                       [&] { return !views.empty() && pred(views.back()); });
  };
  EXPECT_TRUE(seen([](const auto& v) { return v.empty(); }));

  LocalAgent a = local_agent(2);
  auto reg = registration(*a.agent, "a");
  ASSERT_TRUE(reg);
  EXPECT_TRUE(reg->registered());
  EXPECT_TRUE(seen([&](const auto& v) {
    return v.count("a") && v.at("a").requests == 2 &&
           v.at("a").address == a.agent->address();
  }));
  // A change of the agent's state reaches the watcher by itself.
  EXPECT_OK(a.pager->populate(1, 20, 9));
  EXPECT_TRUE(seen(
      [](const auto& v) { return v.count("a") && v.at("a").requests == 3; }));
  ASSERT_OK(cluster_->set_draining("a", true));
  EXPECT_TRUE(
      seen([](const auto& v) { return v.count("a") && v.at("a").draining; }));
  reg->stop();
  EXPECT_FALSE(reg->registered());
  EXPECT_TRUE(seen([](const auto& v) { return v.empty(); }));
}

TEST_F(RegistrationTest, TheDrainingMarkSurvivesTheAgentsOwnWrites) {
  LocalAgent a = local_agent(1);
  auto reg = registration(*a.agent, "a");
  ASSERT_TRUE(reg);
  ASSERT_OK(cluster_->set_draining("a", true));
  // The agent's state changes after the mark: its compare-and-swap fails,
  // it reads the value back and writes again with the mark kept.
  EXPECT_OK(a.pager->populate(2, 20, 3));
  ASSERT_TRUE(eventually([&] { return listed()["a"].requests == 3; }, 5s));
  EXPECT_TRUE(listed()["a"].draining);
  ASSERT_OK(cluster_->set_draining("a", false));
  EXPECT_OK(a.pager->populate(1, 20, 4));
  ASSERT_TRUE(eventually([&] { return listed()["a"].requests == 4; }, 5s));
  EXPECT_FALSE(listed()["a"].draining);
  EXPECT_EQ(cluster_->set_draining("nobody", true).code(),
            StatusCode::kNotFound);
}

TEST_F(RegistrationTest, ALeaseLostUnderTheAgentIsReplacedByANewOne) {
  LocalAgent a = local_agent(1);
  auto reg = registration(*a.agent, "a");
  ASSERT_TRUE(reg);
  ASSERT_OK_AND_ASSIGN(auto kv, etcd_client_->get("/reg-test/agents/a"));
  ASSERT_TRUE(kv.has_value());
  const int64_t first_lease = kv->lease;
  // As if etcd had expired it (etcd was away longer than the TTL).
  ASSERT_OK(etcd_client_->lease_revoke(first_lease));
  ASSERT_TRUE(eventually(
      [&] {
        auto now = etcd_client_->get("/reg-test/agents/a");
        return now.ok() && now->has_value() && (*now)->lease != 0 &&
               (*now)->lease != first_lease;
      },
      10s));
  EXPECT_TRUE(eventually([&] { return reg->registered(); }, 5s));
}

TEST_F(RegistrationTest, NamesAndOptionsAreChecked) {
  LocalAgent a = local_agent(0);
  RegistrationOptions ro;
  ro.etcd = config_;
  for (const std::string& bad :
       std::vector<std::string>{"", "a/b", "x y", std::string(129, 'n')}) {
    ro.name = bad;
    EXPECT_EQ(Registration::start(*a.agent, ro).status().code(),
              StatusCode::kInvalidArgument)
        << bad;
  }
  ro.name = "ok";
  ro.ttl = 0s;
  EXPECT_EQ(Registration::start(*a.agent, ro).status().code(),
            StatusCode::kInvalidArgument);
  // An unreachable etcd is not an error: the registration keeps trying.
  ro.ttl = 3s;
  ro.etcd.endpoints = {"127.0.0.1:" +
                       std::to_string(testing::free_loopback_port())};
  ro.etcd.timeout = 200ms;
  ASSERT_OK_AND_ASSIGN(auto reg, Registration::start(*a.agent, ro));
  EXPECT_FALSE(reg->registered());
}

}  // namespace
}  // namespace kvmig
