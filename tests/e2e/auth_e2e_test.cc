// Mutual authentication between real agent processes: a shared secret
// lets migrations and status calls through; a wrong or missing one is
// refused with a clear error on both sides, and nothing changes.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "process.h"

namespace kvmig::testing {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

class AuthE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kvmig-auth-XXXXXX";
    dir_ = mkdtemp(tmpl);
    good_ = write("good", "correct horse battery staple\n");
    other_ = write("other", "a different secret of 32 bytes!!");
    short_ = write("short", "tiny");
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& content) {
    std::string path = (dir_ / name).string();
    std::ofstream(path) << content;
    std::filesystem::permissions(path, std::filesystem::perms::owner_read |
                                           std::filesystem::perms::owner_write);
    return path;
  }

  // `kvmig status` with an optional secret file; returns the result.
  CliResult status(const std::string& agent, const std::string& secret) {
    std::vector<std::string> args = {"status", "--agent", agent, "--json"};
    if (!secret.empty()) {
      args.push_back("--secret-file");
      args.push_back(secret);
    }
    return run_kvmig(args);
  }

  std::filesystem::path dir_;
  std::string good_, other_, short_;
};

TEST_F(AuthE2E, SharedSecretLetsMigrationsThrough) {
  auto src =
      AgentProcess::start({"--populate", "3:40", "--secret-file", good_});
  auto dst = AgentProcess::start({"--layout", "layer", "--secret-file", good_});
  ASSERT_TRUE(src && dst);
  CliResult before = status(src->address(), good_);
  ASSERT_EQ(before.code, 0) << before.err;
  CliResult moved =
      run_kvmig({"migrate", "--agent", src->address(), "--to", dst->address(),
                 "--all", "--json", "--secret-file", good_});
  ASSERT_EQ(moved.code, 0) << moved.out << moved.err;
  CliResult after = status(dst->address(), good_);
  ASSERT_EQ(after.code, 0) << after.err;
  // The same requests (the destination adds when each arrived).
  json arrived = json::parse(after.out)["seqs"];
  for (auto& s : arrived) {
    EXPECT_GE(s["arrived_ms_ago"].get<int64_t>(), 0);
    s.erase("arrived_ms_ago");
  }
  EXPECT_EQ(arrived, json::parse(before.out)["seqs"]);
}

TEST_F(AuthE2E, WrongOrMissingSecretsAreRefusedOnBothSides) {
  auto agent =
      AgentProcess::start({"--populate", "2:40", "--secret-file", good_});
  auto open_agent = AgentProcess::start({});
  ASSERT_TRUE(agent && open_agent);
  // No secret at a client of an agent that has one.
  CliResult none = status(agent->address(), "");
  EXPECT_EQ(none.code, 1);
  EXPECT_NE(none.out.find("Unauthenticated"), std::string::npos) << none.out;
  EXPECT_NE(none.out.find("requires authentication"), std::string::npos);
  // The wrong secret: the client sees the agent cannot prove ours.
  CliResult wrong = status(agent->address(), other_);
  EXPECT_EQ(wrong.code, 1);
  EXPECT_NE(wrong.out.find("Unauthenticated"), std::string::npos) << wrong.out;
  // A secret sent to an agent that has none.
  CliResult unexpected = status(open_agent->address(), good_);
  EXPECT_EQ(unexpected.code, 1);
  EXPECT_NE(unexpected.out.find("has no secret"), std::string::npos)
      << unexpected.out;
  // The agent logged every refusal and still serves the right client.
  EXPECT_TRUE(agent->child().wait_for("refusing", 5s, true));
  EXPECT_TRUE(agent->child().wait_for("authentication failed", 5s, true))
      << agent->child().err();
  EXPECT_EQ(status(agent->address(), good_).code, 0);
}

TEST_F(AuthE2E, AgentsWithDifferentSecretsDoNotMigrate) {
  auto src =
      AgentProcess::start({"--populate", "2:40", "--secret-file", good_});
  auto dst = AgentProcess::start({"--secret-file", other_});
  ASSERT_TRUE(src && dst);
  CliResult before = status(src->address(), good_);
  CliResult moved =
      run_kvmig({"migrate", "--agent", src->address(), "--to", dst->address(),
                 "--all", "--json", "--secret-file", good_});
  EXPECT_EQ(moved.code, 1);
  EXPECT_NE(moved.out.find("Unauthenticated"), std::string::npos) << moved.out;
  EXPECT_EQ(status(src->address(), good_).out, before.out);
  CliResult dst_now = status(dst->address(), other_);
  ASSERT_EQ(dst_now.code, 0);
  EXPECT_TRUE(json::parse(dst_now.out)["seqs"].empty());
}

TEST_F(AuthE2E, WithoutASecretAnAgentStaysOnLoopback) {
  CliResult refused = run_kvmig({"serve", "--listen", "0.0.0.0:0"}, 30s);
  EXPECT_EQ(refused.code, 1);
  EXPECT_NE(refused.err.find("without a shared secret"), std::string::npos)
      << refused.err;
  auto insecure = Child::spawn(
      {kvmig_bin(), "serve", "--listen", "0.0.0.0:0", "--insecure"});
  ASSERT_TRUE(insecure);
  EXPECT_TRUE(insecure->wait_for("listening on", 30s));
  auto with_secret = Child::spawn(
      {kvmig_bin(), "serve", "--listen", "0.0.0.0:0", "--secret-file", good_});
  ASSERT_TRUE(with_secret);
  EXPECT_TRUE(with_secret->wait_for("listening on", 30s));
}

TEST_F(AuthE2E, ShortOrMissingSecretFilesAreClearErrors) {
  CliResult too_short =
      run_kvmig({"serve", "--listen", "127.0.0.1:0", "--secret-file", short_});
  EXPECT_EQ(too_short.code, 1);
  EXPECT_NE(too_short.err.find("at least 16"), std::string::npos)
      << too_short.err;
  CliResult missing = run_kvmig(
      {"status", "--agent", "127.0.0.1:1", "--secret-file", "/nonexistent"});
  EXPECT_EQ(missing.code, 1);
  EXPECT_NE((missing.out + missing.err).find("/nonexistent"),
            std::string::npos);
}

// /dev/zero used to be read forever, "" silently meant no secret, and a
// directory read as "0 bytes": each is now a clear error, at once.
TEST_F(AuthE2E, SecretFilesThatAreNotSmallRegularFilesAreRefused) {
  const std::string big = write("big", std::string(5000, 'x'));
  std::filesystem::create_directory(dir_ / "dir");
  const std::string dir = (dir_ / "dir").string();
  struct Case {
    std::string file;
    std::vector<std::string> words;
  };
  const std::vector<Case> cases = {
      {"/dev/zero", {"/dev/zero", "not a regular file"}},
      {dir, {dir, "not a regular file", "directory"}},
      {big, {big, "larger than the limit of 4096 bytes"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.file);
    for (const std::vector<std::string>& args :
         {std::vector<std::string>{"status", "--agent", "127.0.0.1:1"},
          std::vector<std::string>{"serve", "--listen", "127.0.0.1:0"}}) {
      std::vector<std::string> with_secret = args;
      with_secret.push_back("--secret-file");
      with_secret.push_back(c.file);
      CliResult r = run_kvmig(with_secret, 10s);
      EXPECT_EQ(r.code, 1) << args[0] << ": " << r.out << r.err;
      for (const std::string& w : c.words) {
        EXPECT_NE(r.err.find(w), std::string::npos) << args[0] << ": " << r.err;
      }
    }
  }
  // Given but empty: a usage error, never "no secret" (an agent that would
  // serve unauthenticated, a client that would not authenticate).
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"status", "--agent", "127.0.0.1:1"},
        std::vector<std::string>{"serve", "--listen", "127.0.0.1:0"},
        std::vector<std::string>{"migrate", "--agent", "127.0.0.1:1", "--to",
                                 "127.0.0.1:1", "--all"},
        std::vector<std::string>{"snapshot", "load", "--agent", "127.0.0.1:1",
                                 "--in", "x"},
        std::vector<std::string>{"perf", "127.0.0.1:1"}}) {
    std::vector<std::string> with_secret = args;
    with_secret.push_back("--secret-file");
    with_secret.push_back("");
    CliResult r = run_kvmig(with_secret, 20s);
    EXPECT_EQ(r.code, 2) << args[0] << ": " << r.out << r.err;
    EXPECT_NE(r.err.find("--secret-file: must not be empty"), std::string::npos)
        << args[0] << ": " << r.err;
    EXPECT_EQ(r.out.find("listening on"), std::string::npos) << r.out;
  }
}

}  // namespace
}  // namespace kvmig::testing
