// `kvmig perf` end to end: a real perf server process and real clients on
// loopback, driven through the command line as a user or a script would.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kvmig/transport.h"
#include "process.h"

namespace kvmig::testing {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

// `kvmig perf --server` on an ephemeral loopback port.
class PerfServer {
 public:
  // The default: `kvmig perf --server`; or any other command line that
  // starts an agent printing "listening on HOST:PORT".
  static std::unique_ptr<PerfServer> start(std::vector<std::string> argv = {
                                               "perf", "--server", "--listen",
                                               "127.0.0.1:0"}) {
    auto s = std::unique_ptr<PerfServer>(new PerfServer());
    argv.insert(argv.begin(), kvmig_bin());
    s->child_ = Child::spawn(argv);
    if (!s->child_) return nullptr;
    const std::string marker = "listening on ";
    if (!s->child_->wait_for(marker, 30s)) {
      ADD_FAILURE() << "perf server did not start: " << s->child_->err();
      return nullptr;
    }
    std::string out = s->child_->out();
    size_t at = out.find(marker) + marker.size();
    s->address_ = out.substr(at, out.find_first_of(" \n", at) - at);
    return s;
  }
  const std::string& address() const { return address_; }
  Child& child() { return *child_; }

 private:
  PerfServer() = default;
  std::unique_ptr<Child> child_;
  std::string address_;
};

std::vector<std::string> data_transports() {
  std::vector<std::string> out;
  for (const auto& t : built_transports()) {
    if (t != "verbs") out.push_back(t);
  }
  return out;
}

class PerfTransport : public ::testing::TestWithParam<std::string> {};

TEST_P(PerfTransport, TinyRunReportsSaneJson) {
  auto server = PerfServer::start();
  ASSERT_TRUE(server);
  for (const std::string order : {"contiguous", "random"}) {
    SCOPED_TRACE(order);
    // The transport's data path (its writes are counted below).
    CliResult r =
        run_kvmig({"perf", server->address(), "--transport", GetParam(),
                   "--preset", "tiny", "--iters", "3", "--pages", "16",
                   "--dst-order", order, "--src-layout", "layer",
                   "--dst-layout", "layer", "--inline-kib", "0", "--json"});
    ASSERT_EQ(r.code, 0) << r.out << r.err << server->child().err();
    json j = json::parse(r.out, nullptr, false);
    ASSERT_TRUE(j.is_object()) << r.out;
    EXPECT_TRUE(j["ok"].get<bool>());
    EXPECT_EQ(j["transport"], GetParam());
    EXPECT_EQ(j["preset"], "tiny");
    EXPECT_EQ(j["page_bytes"], 8192);
    EXPECT_EQ(j["pages"], 16);
    EXPECT_EQ(j["bytes"], 16 * 2 * 8192);
    EXPECT_EQ(j["iters"], 3);
    EXPECT_EQ(j["mode"], "copy");
    EXPECT_EQ(j["dst_order"], order);
    EXPECT_EQ(j["inline_pages"], false);
    EXPECT_GT(j["gbps"].get<double>(), 0.0);
    EXPECT_GT(j["pages_per_s"].get<double>(), 0.0);
    EXPECT_GT(j["seconds"].get<double>(), 0.0);
    const json& lat = j["latency_ms"];
    EXPECT_GT(lat["min"].get<double>(), 0.0);
    EXPECT_LE(lat["min"].get<double>(), lat["p50"].get<double>());
    EXPECT_LE(lat["p50"].get<double>(), lat["p99"].get<double>());
    EXPECT_LE(lat["p99"].get<double>(), lat["max"].get<double>());
    const json& pause = j["pause_ms"];
    EXPECT_GE(pause["p50"].get<double>(), 0.0);
    EXPECT_LE(pause["p50"].get<double>(), pause["max"].get<double>());
    EXPECT_LE(pause["max"].get<double>(), lat["max"].get<double>());
    // Each phase's median, never more than the median migration.
    const json& phases = j["phases_ms"];
    for (const char* p : {"connect", "offer", "data", "commit"}) {
      ASSERT_TRUE(phases.contains(p)) << p << " missing: " << j.dump();
      EXPECT_GE(phases[p].get<double>(), 0.0) << p;
      EXPECT_LE(phases[p].get<double>(), lat["max"].get<double>()) << p;
    }
    // Layer layouts: 4 chunks a page. Contiguous slots merge into one
    // write per region; random ones merge (almost) never.
    if (order == "contiguous") {
      EXPECT_EQ(j["writes"], 4);
    } else {
      EXPECT_GT(j["writes"].get<int>(), 32);
    }
  }
  // One page goes inline (on the control connection) unless --inline-kib 0.
  for (const std::string kib : {"64", "0"}) {
    SCOPED_TRACE("--inline-kib " + kib);
    CliResult one = run_kvmig({"perf", server->address(), "--transport",
                               GetParam(), "--preset", "tiny", "--iters", "3",
                               "--pages", "1", "--inline-kib", kib, "--json"});
    ASSERT_EQ(one.code, 0) << one.out << one.err << server->child().err();
    json j = json::parse(one.out, nullptr, false);
    ASSERT_TRUE(j.is_object()) << one.out;
    EXPECT_EQ(j["inline_pages"], kib != "0") << one.out;
    // Inline on a kept connection: one exchange, no OFFER.
    EXPECT_EQ(j["one_exchanges"], kib != "0" ? j["kept_connections"] : json(0))
        << one.out;
    EXPECT_EQ(j["bytes"], 2 * 8192);
  }
  // 16 pages (256 KiB) under the default --inline-kib 1024: inline over
  // tcp; over ucx at most 64 KiB go inline (kInlinePageBytesOverRdma), so
  // these take ucx's data path.
  CliResult big = run_kvmig({"perf", server->address(), "--transport",
                             GetParam(), "--preset", "tiny", "--iters", "3",
                             "--pages", "16", "--json"});
  ASSERT_EQ(big.code, 0) << big.out << big.err << server->child().err();
  json jb = json::parse(big.out, nullptr, false);
  ASSERT_TRUE(jb.is_object()) << big.out;
  EXPECT_EQ(jb["inline_pages"], GetParam() == "tcp") << big.out;
  EXPECT_EQ(jb["bytes"], 16 * 2 * 8192);
  // The human table, when not a terminal: a header and one row, no
  // progress line.
  CliResult r = run_kvmig({"perf", server->address(), "--transport", GetParam(),
                           "--preset", "tiny", "--iters", "2", "--pages", "4"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("GB/s"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find('\r'), std::string::npos) << r.out;
}

TEST_P(PerfTransport, ServerKilledMidRunFailsTheClientInBoundedTime) {
  auto server = PerfServer::start();
  ASSERT_TRUE(server);
  // Long enough that it is surely mid-run when the server dies: 64 MiB
  // migrations, 100000 of them.
  auto client = Child::spawn({kvmig_bin(), "perf", server->address(),
                              "--transport", GetParam(), "--preset",
                              "llama3-8b", "--pages", "32", "--iters", "100000",
                              "--warmup", "0", "--timeout-ms", "5000"});
  ASSERT_TRUE(client);
  ASSERT_TRUE(server->child().wait_for("perf session from", 30s, true))
      << server->child().err();
  std::this_thread::sleep_for(500ms);
  ASSERT_FALSE(client->wait_exit(0ms)) << client->err();
  server->child().kill(SIGKILL);
  const auto killed = std::chrono::steady_clock::now();
  ASSERT_TRUE(client->wait_exit(60s)) << "client hung after the server died";
  const auto took = std::chrono::steady_clock::now() - killed;
  EXPECT_EQ(client->exit_code(), 1) << client->err();
  EXPECT_LT(took, 30s);
  const std::string err = client->err();
  EXPECT_NE(err.find("kvmig perf: "), std::string::npos) << err;
  EXPECT_TRUE(err.find("failed") != std::string::npos ||
              err.find("perf server") != std::string::npos)
      << err;
  EXPECT_TRUE(client->out().empty()) << client->out();
}

INSTANTIATE_TEST_SUITE_P(Transports, PerfTransport,
                         ::testing::ValuesIn(data_transports()),
                         [](const auto& info) { return info.param; });

// UCX writes its own log to stdout, where `--json` goes; kvmig sends it to
// its log on stderr instead. UCX_MM_ERROR_HANDLING=y with UCX_TLS=tcp makes
// UCX warn that no transport read it; with UCX_TLS=tcp alone kvmig no
// longer sets it (it did, and UCX's "invalid configuration" warning broke
// the JSON), so UCX has nothing to say.
TEST(PerfE2E, UcxLogGoesToStderrAndLeavesTheJson) {
  const auto built = built_transports();
  if (std::find(built.begin(), built.end(), "ucx") == built.end()) {
    GTEST_SKIP() << "this build has no ucx";
  }
  for (const bool named : {true, false}) {
    SCOPED_TRACE(named ? "UCX_MM_ERROR_HANDLING=y named" : "UCX_TLS only");
    setenv("UCX_TLS", "tcp", 1);  // the server and the client inherit them
    if (named) setenv("UCX_MM_ERROR_HANDLING", "y", 1);
    auto server = PerfServer::start();
    CliResult r = server ? run_kvmig({"perf", server->address(), "--transport",
                                      "ucx", "--preset", "tiny", "--iters", "3",
                                      "--pages", "16", "--json"})
                         : CliResult{};
    unsetenv("UCX_TLS");
    unsetenv("UCX_MM_ERROR_HANDLING");
    ASSERT_TRUE(server);
    ASSERT_EQ(r.code, 0) << r.out << r.err;
    json j = json::parse(r.out, nullptr, false);
    ASSERT_TRUE(j.is_object()) << r.out;
    EXPECT_EQ(j["transport"], "ucx");
    // Named: "unused env variable: UCX_MM_ERROR_HANDLING", on stderr.
    const bool warned =
        r.err.find("[ucx] [warning] UCX ") != std::string::npos &&
        r.err.find("MM_ERROR_HANDLING") != std::string::npos;
    EXPECT_EQ(warned, named) << r.err;
    EXPECT_EQ(r.err.find("MM_ERROR_HANDLING") != std::string::npos, named)
        << r.err;
  }
}

TEST(PerfE2E, BadFlagsAreUsageErrors) {
  const std::vector<std::vector<std::string>> bad = {
      {"perf"},
      {"perf", "127.0.0.1:1", "--transport", "pigeon"},
      {"perf", "127.0.0.1:1", "--pages", "0"},
      {"perf", "127.0.0.1:1", "--inline-kib", "1025"},
      {"perf", "127.0.0.1:1", "--dst-order", "sideways"},
      {"perf", "127.0.0.1:1", "--src-layout", "rows"},
      {"perf", "127.0.0.1:1", "--preset", "tiny", "--page-kib", "4"},
      {"perf", "127.0.0.1:1", "--decode-rate", "10"},
      {"perf", "127.0.0.1:1", "--server"},
      {"perf", "127.0.0.1:1", "--listen", "127.0.0.1:0"},
      {"perf", "no-port-here"},
      {"perf", "127.0.0.1:1", "--iters", "many"},
      // Negative and non-finite numbers (CLI11 takes "-1" for 2^64 - 1 in
      // a uint64_t, and "nan" passes any range).
      {"perf", "127.0.0.1:1", "--seed", "-1"},
      {"perf", "127.0.0.1:1", "--pages", "-1"},
      {"perf", "127.0.0.1:1", "--live", "--decode-rate", "nan"},
      {"perf", "127.0.0.1:1", "--live", "--decode-rate", "inf"},
      {"perf", "127.0.0.1:1", "--live", "--decode-rate", "-1"},
      {"perf", "127.0.0.1:1", "--secret-file", ""},
  };
  for (const auto& args : bad) {
    CliResult r = run_kvmig(args, 20s);
    std::string joined;
    for (const auto& a : args) joined += a + " ";
    EXPECT_EQ(r.code, 2) << joined << "\n" << r.out << r.err;
    EXPECT_FALSE(r.err.empty()) << joined;
  }
}

TEST(PerfE2E, UnreachableServerFailsClearly) {
  auto start = std::chrono::steady_clock::now();
  CliResult r = run_kvmig(
      {"perf", "127.0.0.1:1", "--preset", "tiny", "--pages", "2", "--json"},
      60s);
  EXPECT_EQ(r.code, 1) << r.out << r.err;
  json j = json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_FALSE(j["ok"].get<bool>());
  EXPECT_NE(j["error"].get<std::string>().find("perf server 127.0.0.1:1"),
            std::string::npos)
      << j.dump();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 30s);
}

TEST(PerfE2E, LiveRunsWhileTheSourceDecodes) {
  auto server = PerfServer::start();
  ASSERT_TRUE(server);
  CliResult r =
      run_kvmig({"perf", server->address(), "--preset", "tiny", "--pages", "8",
                 "--iters", "2", "--live", "--decode-rate", "50", "--json"});
  json j = json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out << r.err;
  ASSERT_EQ(r.code, 0) << j.dump();
  EXPECT_TRUE(j["live"].get<bool>());
  EXPECT_GT(j["pause_ms"]["max"].get<double>(), 0.0);
  EXPECT_EQ(j["iters"], 2);
}

// Perf sessions build caches of the client's size: an ordinary agent serves
// them only when asked (serve --allow-perf).
TEST(PerfE2E, ServeRefusesPerfSessionsUnlessAllowed) {
  auto plain = PerfServer::start({"serve", "--listen", "127.0.0.1:0"});
  ASSERT_TRUE(plain);
  CliResult refused = run_kvmig({"perf", plain->address(), "--preset", "tiny",
                                 "--iters", "1", "--pages", "4", "--json"});
  EXPECT_NE(refused.code, 0) << refused.out;
  EXPECT_NE(plain->child().err().find("unexpected PERF_SETUP"),
            std::string::npos)
      << plain->child().err();
  auto allowed =
      PerfServer::start({"serve", "--listen", "127.0.0.1:0", "--allow-perf"});
  ASSERT_TRUE(allowed);
  CliResult r = run_kvmig({"perf", allowed->address(), "--preset", "tiny",
                           "--iters", "1", "--pages", "4", "--json"});
  ASSERT_EQ(r.code, 0) << r.out << r.err << allowed->child().err();
  json j = json::parse(r.out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.out;
  EXPECT_TRUE(j["ok"].get<bool>());
}

}  // namespace
}  // namespace kvmig::testing
