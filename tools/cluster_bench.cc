// cluster_bench: the cluster's numbers against a running etcd
// (tools/bench-cluster.sh starts one).
//
//   cluster_bench --etcd URL [--agents 200] [--ttl 5] [--window 10]
//
// Starts N real agents in this process (tiny synthetic pools, tcp), each
// with its own Registration, then prints, as median [min-max]:
//   - the cluster view: Cluster::agents() (range + parse of N records),
//     interleaved with a bare etcd range of the same keys (the reference);
//   - etcd writes at rest, per agent per TTL/3, over --window seconds;
//   - planning a drain of 1,000 requests over the other N - 1 agents.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "etcd_client.h"
#include "kvmig/cluster.h"
#include "kvmig/kvmig.h"
#include "log.h"
#include "placement.h"
#include "synthetic_pager.h"
#include "text.h"

namespace kvmig {
namespace {

struct Stats {
  double median, lo, hi;
};
Stats stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front(), v.back()};
}

template <typename F>
double time_ms(F f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now() - t0)
      .count();
}

int run(int argc, char** argv) {
  std::string etcd;
  int n = 200, ttl = 5, window = 10;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const auto value = parse_u64(argv[i + 1]);
    if (flag == "--etcd") {
      etcd = argv[i + 1];
    } else if (flag == "--agents" && value && *value >= 2) {
      n = static_cast<int>(*value);
    } else if (flag == "--ttl" && value && *value >= 1) {
      ttl = static_cast<int>(*value);
    } else if (flag == "--window" && value && *value >= 1) {
      window = static_cast<int>(*value);
    } else {
      std::fprintf(stderr, "cluster_bench: bad flag %s %s\n", argv[i],
                   argv[i + 1]);
      return 2;
    }
  }
  if (etcd.empty()) {
    std::fprintf(stderr, "usage: cluster_bench --etcd URL [--agents N]\n");
    return 2;
  }
  set_log_level("warn");
  const std::string prefix = "/kvmig-bench";
  CacheMeta meta = *preset_meta("tiny");
  std::vector<std::unique_ptr<SyntheticPager>> pagers;
  std::vector<std::unique_ptr<Agent>> agents;
  std::vector<std::unique_ptr<Registration>> regs;
  const auto started = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) {
    auto pager = SyntheticPager::create(meta, PoolLayout::kPage, 64);
    if (!pager.ok()) return std::fprintf(stderr, "pager\n"), 1;
    AgentOptions options;
    auto agent = Agent::create(**pager, options);
    if (!agent.ok() || !(*agent)->start().ok()) {
      std::fprintf(stderr, "agent %d: %s\n", i,
                   agent.status().to_string().c_str());
      return 1;
    }
    RegistrationOptions ro;
    ro.etcd.endpoints = {etcd};
    ro.etcd.prefix = prefix;
    ro.name = "agent-" + std::to_string(i);
    ro.ttl = std::chrono::seconds(ttl);
    auto reg = Registration::start(**agent, ro);
    if (!reg.ok()) {
      std::fprintf(stderr, "register %d: %s\n", i,
                   reg.status().to_string().c_str());
      return 1;
    }
    pagers.push_back(std::move(*pager));
    agents.push_back(std::move(*agent));
    regs.push_back(std::move(*reg));
  }
  std::printf(
      "%d agents registered in %.1f s\n", n,
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started)
          .count());

  ClusterOptions co;
  co.etcd.endpoints = {etcd};
  co.etcd.prefix = prefix;
  auto cluster = Cluster::connect(co);
  auto raw = EtcdClient::create(EtcdOptions{{etcd}});
  if (!cluster.ok() || !raw.ok()) return 1;
  std::vector<double> view, range;
  size_t listed = 0;
  for (int i = 0; i < 40; ++i) {
    range.push_back(
        time_ms([&] { (void)(*raw)->get_prefix(prefix + "/agents/"); }));
    view.push_back(time_ms([&] {
      auto a = (*cluster)->agents();
      listed = a.ok() ? a->size() : 0;
    }));
  }
  const Stats v = stats(view), r = stats(range);
  std::printf(
      "cluster view (%zu agents): Cluster::agents() %.2f ms [%.2f-%.2f]; "
      "bare etcd range %.2f ms [%.2f-%.2f]\n",
      listed, v.median, v.lo, v.hi, r.median, r.lo, r.hi);

  // At rest: nothing changes, so only keepalives should be written.
  std::this_thread::sleep_for(std::chrono::seconds(1));
  uint64_t before = 0, after = 0;
  for (const auto& reg : regs) before += reg->etcd_writes();
  std::this_thread::sleep_for(std::chrono::seconds(window));
  for (const auto& reg : regs) after += reg->etcd_writes();
  const double per_agent_per_third =
      static_cast<double>(after - before) / n / (window / (ttl / 3.0));
  std::printf(
      "at rest: %llu etcd writes in %d s from %d agents = %.2f per agent per "
      "TTL/3 (%.1f writes/s in all)\n",
      static_cast<unsigned long long>(after - before), window, n,
      per_agent_per_third, static_cast<double>(after - before) / window);

  // Planning a drain: 1,000 requests (every tenth a group of three) over
  // the other agents.
  std::vector<MoveUnit> units;
  for (SeqId id = 1; units.size() < 1000; ++id) {
    if (id % 10 == 0) {
      units.push_back({{id, id + 1, id + 2}, 12});
      id += 2;
    } else {
      units.push_back({{id}, 1 + id % 9});
    }
  }
  std::vector<uint64_t> free(n - 1);
  for (size_t t = 0; t < free.size(); ++t) free[t] = 20 + (t * 37) % 100;
  std::vector<double> plan;
  size_t placed = 0;
  for (int i = 0; i < 200; ++i) {
    plan.push_back(time_ms([&] {
      auto p = plan_drain(units, free);
      placed = std::count_if(p.begin(), p.end(),
                             [](const auto& x) { return x.has_value(); });
    }));
  }
  const Stats p = stats(plan);
  std::printf(
      "drain plan: 1000 requests over %d agents: %.3f ms [%.3f-%.3f] "
      "(%zu placed)\n",
      n - 1, p.median, p.lo, p.hi, placed);

  regs.clear();
  for (auto& a : agents) a->stop();
  return 0;
}

}  // namespace
}  // namespace kvmig

int main(int argc, char** argv) { return kvmig::run(argc, argv); }
