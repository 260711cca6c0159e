// Every limit an agent enforces, hit for real: a clear error, nothing
// changed, and the agent keeps serving.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <nlohmann/json.hpp>
#include <string>

#include "frame.h"
#include "process.h"

namespace kvmig::testing {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

json status_json(const std::string& agent) {
  CliResult r = run_kvmig({"status", "--agent", agent, "--json"});
  return json::parse(r.out, nullptr, false);
}

json migrate_all(const std::string& src, const std::string& dst) {
  CliResult r =
      run_kvmig({"migrate", "--agent", src, "--to", dst, "--all", "--json"});
  return json::parse(r.out, nullptr, false);
}

// Milliseconds until the agent closes fd (read returns 0 or an error), or
// -1 if it is still open after `limit`.
int ms_until_closed(int fd, std::chrono::milliseconds limit) {
  auto start = std::chrono::steady_clock::now();
  pollfd p{fd, POLLIN, 0};
  if (poll(&p, 1, static_cast<int>(limit.count())) <= 0) return -1;
  char c;
  if (read(fd, &c, 1) > 0) return -1;
  return static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                              std::chrono::steady_clock::now() - start)
                              .count());
}

TEST(LimitsE2E, PagesAndRequestsPerMigration) {
  auto src = AgentProcess::start({"--populate", "2:100", "--max-seqs", "1"});
  auto dst = AgentProcess::start({"--max-pages", "5"});
  auto big = AgentProcess::start({});
  ASSERT_TRUE(src && dst && big);
  json sb = status_json(src->address());
  json db = status_json(dst->address());
  // The source's own limit: 2 requests, it moves at most 1.
  json r = migrate_all(src->address(), big->address());
  EXPECT_NE(r["error"].get<std::string>().find("exceed the limit of 1"),
            std::string::npos)
      << r.dump();
  // The destination's limit: 7 pages in, it takes at most 5.
  CliResult one = run_kvmig({"migrate", "--agent", src->address(), "--to",
                             dst->address(), "--seqs", "1", "--json"});
  r = json::parse(one.out, nullptr, false);
  ASSERT_TRUE(r.is_object());
  EXPECT_FALSE(r["ok"].get<bool>());
  EXPECT_NE(r["error"].get<std::string>().find("takes 1 to 5"),
            std::string::npos)
      << r.dump();
  EXPECT_EQ(status_json(src->address()), sb);
  EXPECT_EQ(status_json(dst->address()), db);
}

TEST(LimitsE2E, ConnectionsAndIdleTimeout) {
  auto agent = AgentProcess::start(
      {"--max-connections", "2", "--peer-timeout-ms", "700"});
  ASSERT_TRUE(agent);
  int a = dial_tcp(agent->address());
  int b = dial_tcp(agent->address());
  ASSERT_GE(a, 0);
  ASSERT_GE(b, 0);
  // A third connection is closed at once while two are open. The agent
  // accepts in the order the kernel queued the connections, one at a time,
  // so a and b are counted before c whenever it gets to them.
  int c = dial_tcp(agent->address());
  ASSERT_GE(c, 0);
  int closed_after = ms_until_closed(c, 500ms);
  EXPECT_GE(closed_after, 0) << "third connection was not refused";
  EXPECT_LT(closed_after, 300);
  // Idle connections are closed at the peer timeout.
  EXPECT_GE(ms_until_closed(a, 3s), 0);
  EXPECT_GE(ms_until_closed(b, 3s), 0);
  close(a);
  close(b);
  close(c);
  EXPECT_TRUE(agent->child().wait_for("refusing a connection", 5s, true));
  EXPECT_TRUE(status_json(agent->address()).contains("seqs"));
}

TEST(LimitsE2E, FrameSize) {
  auto agent = AgentProcess::start({"--max-frame-mib", "1"});
  ASSERT_TRUE(agent);
  int fd = dial_tcp(agent->address());
  ASSERT_GE(fd, 0);
  auto frame = encode_frame(MsgType::kStatusReq, {});
  frame[8] = 0x00, frame[9] = 0x00, frame[10] = 0x20,
  frame[11] = 0x00;  // 2 MiB
  ASSERT_EQ(write(fd, frame.data(), frame.size()),
            static_cast<ssize_t>(frame.size()));
  EXPECT_GE(ms_until_closed(fd, 3s), 0);
  close(fd);
  EXPECT_TRUE(agent->child().wait_for("exceeds the limit of 1048576", 5s, true))
      << agent->child().err();
  EXPECT_TRUE(status_json(agent->address()).contains("seqs"));
}

}  // namespace
}  // namespace kvmig::testing
