// `kvmig serve --metrics-listen`: two real agents, real migrations, their
// /metrics scraped over HTTP and parsed sample by sample; the exposition
// checked by promtool and scraped by a real Prometheus server.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "agent_cli.h"
#include "process.h"
#include "prometheus_util.h"

namespace kvmig::testing {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr char kPromtool[] = "/usr/bin/promtool";

// The body of GET /metrics; a failure fails the test and gives "".
std::string scrape(const std::string& address) {
  int code = 0;
  std::string body;
  EXPECT_TRUE(http_get(address, "/metrics", code, body)) << address;
  EXPECT_EQ(code, 200) << address << ": " << body;
  return body;
}

// One sample of the text exposition: name{labels} value.
struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

// Every sample line (comments aside), parsed strictly: a line that does not
// parse fails the test.
std::vector<Sample> parse_exposition(const std::string& text) {
  std::vector<Sample> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    Sample s;
    size_t at = line.find_first_of("{ ");
    s.name = line.substr(0, at);
    if (at != std::string::npos && line[at] == '{') {
      ++at;
      while (at < line.size() && line[at] != '}') {
        const size_t eq = line.find("=\"", at);
        const size_t close = line.find('"', eq + 2);
        if (eq == std::string::npos || close == std::string::npos) break;
        s.labels[line.substr(at, eq - at)] =
            line.substr(eq + 2, close - eq - 2);
        at = close + 1;
        if (at < line.size() && line[at] == ',') ++at;
      }
      if (at >= line.size() || line[at] != '}') {
        ADD_FAILURE() << "bad labels: " << line;
        continue;
      }
      ++at;
    }
    if (at >= line.size() || line[at] != ' ') {
      ADD_FAILURE() << "no value: " << line;
      continue;
    }
    size_t used = 0;
    const std::string value = line.substr(at + 1);
    s.value = std::stod(value, &used);
    EXPECT_EQ(used, value.size()) << "bad value: " << line;
    out.push_back(std::move(s));
  }
  return out;
}

// The value of the one sample called name with exactly these labels; -1
// (and a failure) when there is none or more than one.
double sample(const std::vector<Sample>& samples, const std::string& name,
              const std::map<std::string, std::string>& labels = {}) {
  const Sample* found = nullptr;
  int matches = 0;
  for (const Sample& s : samples) {
    if (s.name == name && s.labels == labels) {
      found = &s;
      ++matches;
    }
  }
  std::string want = name + "{";
  for (const auto& [k, v] : labels) want += k + "=" + v + ",";
  EXPECT_EQ(matches, 1) << want << "}";
  return matches == 1 ? found->value : -1;
}

// "HOST:PORT" of the agent's metrics, from its "kvmig metrics on" line.
// `kvmig serve` with flags after "--listen 127.0.0.1:0", to completion.
CliResult serve(std::vector<std::string> flags) {
  std::vector<std::string> args = {"serve", "--listen", "127.0.0.1:0"};
  args.insert(args.end(), flags.begin(), flags.end());
  return run_kvmig(args, 30s);
}

// Empty when kvmig has metrics; otherwise what it says instead.
const std::string& metrics_unbuilt() {
  static const std::string why = [] {
    CliResult r = serve({"--metrics-listen", "0.0.0.0:0"});
    return r.err.find("built without Prometheus") != std::string::npos
               ? r.err
               : std::string();
  }();
  return why;
}

json migrate(const std::string& src, const std::string& dst,
             std::vector<std::string> extra, int& code) {
  std::vector<std::string> args = {"migrate", "--agent", src,
                                   "--to",    dst,       "--json"};
  args.insert(args.end(), extra.begin(), extra.end());
  CliResult r = run_kvmig(args);
  code = r.code;
  json j = json::parse(r.out, nullptr, false);
  EXPECT_TRUE(j.is_object()) << r.out << r.err;
  return j;
}

// Two agents with metrics and, between them: a move and a copy (committed),
// a move the destination has no room for (aborted at both sides, after the
// source paused), and a request for an unknown id (refused at the source
// before HELLO).
class MetricsE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!metrics_unbuilt().empty()) GTEST_SKIP() << metrics_unbuilt();
    // 100 tokens: 7 pages a request. The destination has room for 2.
    src_ = AgentProcess::start({"--capacity-pages", "256", "--populate",
                                "4:100", "--metrics-listen", "127.0.0.1:0"});
    dst_ = AgentProcess::start(
        {"--capacity-pages", "20", "--metrics-listen", "127.0.0.1:0"});
    ASSERT_TRUE(src_ && dst_);
    src_metrics_ = metrics_address(*src_);
    dst_metrics_ = metrics_address(*dst_);
    ASSERT_FALSE(src_metrics_.empty());
    ASSERT_FALSE(dst_metrics_.empty());
  }

  void run_migrations() {
    int code = -1;
    json moved =
        migrate(src_->address(), dst_->address(), {"--seqs", "1"}, code);
    ASSERT_EQ(code, 0) << moved.dump();
    json copied = migrate(src_->address(), dst_->address(),
                          {"--seqs", "2", "--mode", "copy"}, code);
    ASSERT_EQ(code, 0) << copied.dump();
    committed_bytes_ =
        moved["bytes"].get<uint64_t>() + copied["bytes"].get<uint64_t>();
    EXPECT_EQ(committed_bytes_, 2u * 7 * 2 * 8192);
    json full =
        migrate(src_->address(), dst_->address(), {"--seqs", "3"}, code);
    ASSERT_EQ(code, 1) << full.dump();
    EXPECT_NE(full.dump().find("destination full"), std::string::npos)
        << full.dump();
    json unknown =
        migrate(src_->address(), dst_->address(), {"--seqs", "99"}, code);
    ASSERT_EQ(code, 1) << unknown.dump();
  }

  std::unique_ptr<AgentProcess> src_, dst_;
  std::string src_metrics_, dst_metrics_;
  uint64_t committed_bytes_ = 0;
};

void expect_gauges_match_status(const std::vector<Sample>& m,
                                const json& status) {
  const double capacity = status["capacity_pages"].get<double>();
  const double free = status["free_pages"].get<double>();
  EXPECT_EQ(sample(m, "kvmig_pages", {{"state", "free"}}), free);
  EXPECT_EQ(sample(m, "kvmig_pages", {{"state", "used"}}), capacity - free);
  EXPECT_EQ(sample(m, "kvmig_requests"), double(status["seqs"].size()));
  EXPECT_EQ(sample(m, "kvmig_in_doubt_requests"), 0);
  EXPECT_GE(sample(m, "kvmig_control_connections"), 0);
  EXPECT_EQ(sample(m, "kvmig_kept_connections"),
            status["kept_connections"].get<double>());
  EXPECT_EQ(sample(m, "kvmig_etcd_registered"), 0);
}

TEST_F(MetricsE2E, CountsEveryMigrationOnBothSides) {
  // Before any migration: every series of the transport at 0.
  auto before = parse_exposition(scrape(src_metrics_));
  EXPECT_EQ(
      sample(
          before, "kvmig_migrations_total",
          {{"role", "source"}, {"transport", "tcp"}, {"outcome", "committed"}}),
      0);
  EXPECT_EQ(sample(before, "kvmig_migration_duration_seconds_count",
                   {{"role", "source"}}),
            0);
  run_migrations();

  auto src = parse_exposition(scrape(src_metrics_));
  auto dst = parse_exposition(scrape(dst_metrics_));
  auto total = [](const std::vector<Sample>& m, const char* role,
                  const char* transport, const char* outcome) {
    return sample(
        m, "kvmig_migrations_total",
        {{"role", role}, {"transport", transport}, {"outcome", outcome}});
  };
  EXPECT_EQ(total(src, "source", "tcp", "committed"), 2);
  // Destination full, and the unknown id (transport chosen, then refused).
  EXPECT_EQ(total(src, "source", "tcp", "aborted"), 2);
  EXPECT_EQ(total(src, "source", "tcp", "in_doubt"), 0);
  EXPECT_EQ(total(src, "destination", "tcp", "committed"), 0);
  EXPECT_EQ(total(dst, "destination", "tcp", "committed"), 2);
  EXPECT_EQ(total(dst, "destination", "tcp", "aborted"), 1);
  EXPECT_EQ(total(dst, "source", "tcp", "committed"), 0);

  auto bytes = [](const std::vector<Sample>& m, const char* role) {
    return sample(m, "kvmig_migration_bytes_total",
                  {{"role", role}, {"transport", "tcp"}});
  };
  EXPECT_EQ(bytes(src, "source"), double(committed_bytes_));
  EXPECT_EQ(bytes(dst, "destination"), double(committed_bytes_));
  EXPECT_EQ(bytes(src, "destination"), 0);

  // Every migration timed; pauses: the two committed and the one refused
  // by the full destination (stop-and-copy pauses before HELLO).
  auto duration_count = [](const std::vector<Sample>& m, const char* role) {
    return sample(m, "kvmig_migration_duration_seconds_count",
                  {{"role", role}});
  };
  EXPECT_EQ(duration_count(src, "source"), 4);
  EXPECT_EQ(duration_count(dst, "destination"), 3);
  EXPECT_EQ(sample(src, "kvmig_migration_duration_seconds_bucket",
                   {{"role", "source"}, {"le", "+Inf"}}),
            4);
  EXPECT_GT(
      sample(src, "kvmig_migration_duration_seconds_sum", {{"role", "source"}}),
      0);
  EXPECT_EQ(sample(src, "kvmig_migration_pause_seconds_count"), 3);
  EXPECT_GT(sample(src, "kvmig_migration_pause_seconds_sum"), 0);
  EXPECT_EQ(sample(dst, "kvmig_migration_pause_seconds_count"), 0);

  // No request or migration ids in any label.
  for (const auto* m : {&src, &dst}) {
    for (const Sample& s : *m) {
      for (const auto& [k, v] : s.labels) {
        EXPECT_LT(v.size(), 16u) << s.name << " " << k << "=" << v;
      }
    }
  }

  // Gauges as status reports them: src kept 3 of 4 requests (21 pages),
  // dst holds 2 (14 pages of 20).
  json src_status = status_of(src_->address());
  json dst_status = status_of(dst_->address());
  auto src_now = parse_exposition(scrape(src_metrics_));
  auto dst_now = parse_exposition(scrape(dst_metrics_));
  expect_gauges_match_status(src_now, src_status);
  expect_gauges_match_status(dst_now, dst_status);
  EXPECT_EQ(sample(src_now, "kvmig_requests"), 3);
  EXPECT_EQ(sample(dst_now, "kvmig_pages", {{"state", "used"}}), 14);

  // Anything but /metrics is not found.
  int code = 0;
  std::string body;
  ASSERT_TRUE(http_get(src_metrics_, "/nothing", code, body));
  EXPECT_EQ(code, 404);
}

TEST_F(MetricsE2E, PromtoolFindsNoProblems) {
  if (access(kPromtool, X_OK) != 0) GTEST_SKIP() << kPromtool << " missing";
  run_migrations();
  const std::string dir = temp_dir();
  for (const std::string& address : {src_metrics_, dst_metrics_}) {
    const std::string file = dir + "/metrics.txt";
    std::ofstream(file) << scrape(address);
    auto check = Child::spawn(
        {"/bin/sh", "-c",
         std::string("exec ") + kPromtool + " check metrics < " + file});
    ASSERT_TRUE(check);
    ASSERT_TRUE(check->wait_exit(60s));
    EXPECT_EQ(check->exit_code(), 0) << check->out() << check->err();
    EXPECT_EQ(check->out() + check->err(), "") << address;
  }
  std::filesystem::remove_all(dir);
}

TEST_F(MetricsE2E, PrometheusScrapesBothAgents) {
  if (access(kPrometheus, X_OK) != 0) {
    GTEST_SKIP() << kPrometheus << " missing";
  }
  run_migrations();
  auto prometheus = PrometheusServer::start({src_metrics_, dst_metrics_});
  ASSERT_TRUE(prometheus);

  // Committed migrations per role, as Prometheus has them.
  auto committed = [&](std::map<std::string, double>& out) {
    json result;
    if (!prometheus->query(
            "kvmig_migrations_total%7Boutcome%3D%22committed%22%7D", result)) {
      return false;
    }
    out.clear();
    for (const auto& r : result) {
      out[r["metric"]["role"].get<std::string>() + "@" +
          r["metric"]["instance"].get<std::string>()] =
          std::stod(r["value"][1].get<std::string>());
    }
    return true;
  };
  const std::map<std::string, double> want = {
      {"source@" + src_metrics_, 2},
      {"destination@" + src_metrics_, 0},
      {"source@" + dst_metrics_, 0},
      {"destination@" + dst_metrics_, 2}};
  std::map<std::string, double> got;
  const auto end = std::chrono::steady_clock::now() + 30s;
  while (!(committed(got) && got == want) &&
         std::chrono::steady_clock::now() < end && !prometheus->exited()) {
    std::this_thread::sleep_for(200ms);
  }
  EXPECT_EQ(got, want) << prometheus->log();
}

TEST(MetricsInDoubt, CountedAtTheSourceWithItsHeldRequests) {
  if (!metrics_unbuilt().empty()) GTEST_SKIP() << metrics_unbuilt();
  // The destination installs, then dies before DONE: nobody can answer.
  auto src = AgentProcess::start({"--populate", "2:100", "--peer-timeout-ms",
                                  "1000", "--metrics-listen", "127.0.0.1:0"});
  auto dst = AgentProcess::start({"--fault", "dst.before_done=exit"});
  ASSERT_TRUE(src && dst);
  const std::string src_metrics = metrics_address(*src);
  int code = -1;
  json r = migrate(src->address(), dst->address(), {"--all"}, code);
  EXPECT_EQ(code, 1) << r.dump();
  EXPECT_NE(r.dump().find("in doubt"), std::string::npos) << r.dump();
  auto m = parse_exposition(scrape(src_metrics));
  EXPECT_EQ(
      sample(
          m, "kvmig_migrations_total",
          {{"role", "source"}, {"transport", "tcp"}, {"outcome", "in_doubt"}}),
      1);
  EXPECT_EQ(
      sample(
          m, "kvmig_migrations_total",
          {{"role", "source"}, {"transport", "tcp"}, {"outcome", "aborted"}}),
      0);
  EXPECT_EQ(sample(m, "kvmig_migration_bytes_total",
                   {{"role", "source"}, {"transport", "tcp"}}),
            2 * 7 * 2 * 8192);
  EXPECT_EQ(sample(m, "kvmig_in_doubt_requests"), 2);
  EXPECT_EQ(sample(m, "kvmig_requests"), 2);
}

TEST(MetricsListen, AddressesAreChecked) {
  if (!metrics_unbuilt().empty()) GTEST_SKIP() << metrics_unbuilt();
  // Not loopback, no --insecure: refused at once (no authentication).
  CliResult open = serve({"--metrics-listen", "0.0.0.0:0"});
  EXPECT_EQ(open.code, 1) << open.out << open.err;
  EXPECT_NE(open.err.find("refusing to serve /metrics on 0.0.0.0"),
            std::string::npos)
      << open.err;
  EXPECT_NE(open.err.find("--insecure"), std::string::npos) << open.err;
  EXPECT_EQ(open.out.find("listening on"), std::string::npos) << open.out;

  // Not HOST:PORT with an IP host: a usage error.
  for (const char* bad :
       {"nonsense", "127.0.0.1:70000", "127.0.0.1:", "localhost:9100"}) {
    CliResult r = serve({"--metrics-listen", bad});
    EXPECT_EQ(r.code, 2) << bad << ": " << r.out << r.err;
    EXPECT_NE(r.err.find("--metrics-listen"), std::string::npos) << r.err;
  }

  // With --insecure a wildcard address serves; a port in use is refused.
  // (AgentProcess adds --insecure itself off loopback.)
  std::vector<std::string> flags = {"--metrics-listen", "0.0.0.0:0"};
  if (agent_host() == "127.0.0.1") flags.push_back("--insecure");
  auto agent = AgentProcess::start(flags);
  ASSERT_TRUE(agent);
  const std::string address = metrics_address(*agent);
  ASSERT_EQ(address.rfind("0.0.0.0:", 0), 0u) << address;
  const std::string port = address.substr(address.find(':') + 1);
  EXPECT_NE(scrape("127.0.0.1:" + port).find("kvmig_requests 0"),
            std::string::npos);
  CliResult taken = serve({"--metrics-listen", "127.0.0.1:" + port});
  EXPECT_EQ(taken.code, 1) << taken.out << taken.err;
  EXPECT_NE(taken.err.find("metrics: cannot listen on 127.0.0.1:" + port),
            std::string::npos)
      << taken.err;
}

}  // namespace
}  // namespace kvmig::testing
