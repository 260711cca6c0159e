// Snapshots through agents (`kvmig snapshot save|load --agent`), with real
// `kvmig serve` processes: the snapshot directory an agent is confined to,
// and the summary the agent answers with.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "agent_cli.h"
#include "kvmig/snapshot.h"
#include "process.h"

namespace kvmig::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;

// A fresh directory under /tmp, removed with everything in it at the end.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/kvmig-snap-e2e-XXXXXX";
    path_ = fs::canonical(mkdtemp(tmpl)).string();
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const {
    return path_ + "/" + name;
  }

 private:
  std::string path_;
};

std::vector<std::string> save_args(const std::string& agent,
                                   const std::string& path) {
  return {"snapshot", "save", "--agent", agent, "--out", path};
}

std::vector<std::string> load_args(const std::string& agent,
                                   const std::string& path) {
  return {"snapshot", "load", "--agent", agent, "--in", path};
}

// Request id -> digest of what a snapshot file holds (it verifies first).
std::map<uint64_t, std::string> file_digests(const std::string& path) {
  std::map<uint64_t, std::string> out;
  auto info = inspect_snapshot(path);
  EXPECT_TRUE(info.ok()) << path << ": " << info.status().to_string();
  if (!info.ok()) return out;
  for (const SnapshotSeqInfo& s : info->seqs) out[s.seq_id] = s.digest.hex();
  return out;
}

// The names in a directory.
std::set<std::string> names_in(const std::string& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    out.insert(e.path().filename().string());
  }
  return out;
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// ---- where an agent may read and write snapshots ---------------------------

TEST(SnapshotE2E, RefusedWithoutASnapshotDir) {
  TempDir dir;
  auto agent = AgentProcess::start({"--populate", "2:40"});
  ASSERT_TRUE(agent);
  const json before = status_of(agent->address());
  const std::string disabled =
      "snapshots are disabled on this agent: start it with --snapshot-dir";
  for (const auto& args : {save_args(agent->address(), dir / "a.snap"),
                           save_args(agent->address(), "a.snap"),
                           load_args(agent->address(), dir / "a.snap")}) {
    SCOPED_TRACE(args[1]);
    CliResult r = run_kvmig(args);
    EXPECT_EQ(r.code, 1) << r.out << r.err;
    EXPECT_TRUE(contains(r.err, "FailedPrecondition")) << r.err;
    EXPECT_TRUE(contains(r.err, disabled)) << r.err;
  }
  EXPECT_TRUE(names_in(dir.path()).empty());
  EXPECT_EQ(digests(status_of(agent->address())), digests(before));
}

TEST(SnapshotE2E, PathsOutsideTheSnapshotDirAreRefused) {
  TempDir root;
  const std::string snaps = root / "snaps";
  const std::string outside = root / "outside";
  fs::create_directories(snaps + "/sub");
  fs::create_directories(outside);
  // A valid snapshot outside: only where it is makes a load refuse it.
  CliResult made =
      run_kvmig({"snapshot", "save", "--preset", "tiny", "--populate", "1:16",
                 "--out", outside + "/real.snap"});
  ASSERT_EQ(made.code, 0) << made.err;
  fs::create_directory_symlink(outside, snaps + "/escape");
  fs::create_symlink(outside + "/real.snap", snaps + "/link.snap");

  auto agent =
      AgentProcess::start({"--populate", "3:40", "--snapshot-dir", snaps});
  auto empty = AgentProcess::start({"--snapshot-dir", snaps});
  ASSERT_TRUE(agent && empty);
  const json before = status_of(agent->address());
  struct Case {
    std::vector<std::string> args;
    std::string why;
  };
  const std::vector<Case> cases = {
      {save_args(agent->address(), "../outside/x.snap"), "'..'"},
      {save_args(agent->address(), "sub/../../outside/x.snap"), "'..'"},
      {save_args(agent->address(), outside + "/x.snap"), "outside"},
      {save_args(agent->address(), "/tmp/kvmig-never.snap"), "outside"},
      {save_args(agent->address(), "escape/x.snap"), "outside"},
      {save_args(agent->address(), snaps + "/escape/x.snap"), "outside"},
      {load_args(empty->address(), "../outside/real.snap"), "'..'"},
      {load_args(empty->address(), outside + "/real.snap"), "outside"},
      {load_args(empty->address(), "escape/real.snap"), "outside"},
      {load_args(empty->address(), "link.snap"), "symlink"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args[1] + " " + c.args[5]);
    CliResult r = run_kvmig(c.args);
    EXPECT_EQ(r.code, 1) << r.out << r.err;
    EXPECT_TRUE(contains(r.err, "InvalidArgument")) << r.err;
    EXPECT_TRUE(contains(r.err, "snapshot path '" + c.args[5] + "'")) << r.err;
    EXPECT_TRUE(contains(r.err, c.why)) << r.err;
    EXPECT_TRUE(contains(r.err, "snapshot directory " + snaps)) << r.err;
  }
  EXPECT_EQ(names_in(outside), std::set<std::string>{"real.snap"});
  EXPECT_FALSE(fs::exists("/tmp/kvmig-never.snap"));
  EXPECT_TRUE(status_of(empty->address())["seqs"].empty());

  // Inside: relative to the directory, or absolute in it; save and load.
  CliResult rel = run_kvmig(save_args(agent->address(), "rel.snap"));
  ASSERT_EQ(rel.code, 0) << rel.err;
  CliResult abs = run_kvmig(save_args(agent->address(), snaps + "/sub/a.snap"));
  ASSERT_EQ(abs.code, 0) << abs.err;
  EXPECT_EQ(file_digests(snaps + "/rel.snap"), digests(before));
  EXPECT_EQ(file_digests(snaps + "/sub/a.snap"), digests(before));
  CliResult loaded = run_kvmig(load_args(empty->address(), "sub/a.snap"));
  ASSERT_EQ(loaded.code, 0) << loaded.err;
  EXPECT_EQ(digests(status_of(empty->address())), digests(before));
  EXPECT_EQ(digests(status_of(agent->address())), digests(before));
}

TEST(SnapshotE2E, AgentWithAMissingSnapshotDirDoesNotStart) {
  TempDir dir;
  CliResult r = run_kvmig(
      {"serve", "--listen", "127.0.0.1:0", "--snapshot-dir", dir / "missing"},
      30s);
  EXPECT_EQ(r.code, 1) << r.out << r.err;
  EXPECT_TRUE(contains(r.err, dir / "missing")) << r.err;
  EXPECT_FALSE(contains(r.out, "listening on")) << r.out;
}

// ---- what the client prints: the agent's summary ---------------------------

// The client runs in a directory of its own, where the relative path does
// not exist: it prints what the agent answered, never opening the file (it
// used to, and a save to an agent on another host always failed).
TEST(SnapshotE2E, RemoteSaveAndLoadPrintTheAgentsSummary) {
  TempDir snaps;
  TempDir client_cwd;
  fs::create_directories(snaps / "only-on-the-agent");
  auto src = AgentProcess::start({"--populate", "3:50", "--share-prefix", "16",
                                  "--snapshot-dir", snaps.path()});
  auto dst = AgentProcess::start(
      {"--layout", "layer", "--snapshot-dir", snaps.path()});
  ASSERT_TRUE(src && dst);
  const json before = status_of(src->address());
  const std::string rel = "only-on-the-agent/a.snap";
  CliResult saved =
      run_kvmig(save_args(src->address(), rel), 120s, client_cwd.path());
  ASSERT_EQ(saved.code, 0) << saved.out << saved.err;
  const std::string file = snaps / rel;
  auto info = inspect_snapshot(file);
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  // 3 requests of 50 tokens (4 pages each) sharing their first page.
  EXPECT_EQ(info->seqs.size(), 3u);
  EXPECT_EQ(info->n_pages, 10u);
  const std::string summary = "saved " + file + " on " + src->address() +
                              " (3 requests, 10 pages, " +
                              std::to_string(info->file_bytes) + " bytes)\n";
  EXPECT_EQ(saved.out, summary);
  EXPECT_EQ(file_digests(file), digests(before));
  EXPECT_TRUE(names_in(client_cwd.path()).empty());

  CliResult loaded =
      run_kvmig(load_args(dst->address(), rel), 120s, client_cwd.path());
  ASSERT_EQ(loaded.code, 0) << loaded.out << loaded.err;
  EXPECT_EQ(loaded.out, "loaded " + file + " on " + dst->address() +
                            " (3 requests, 10 pages, " +
                            std::to_string(info->file_bytes) + " bytes)\n");
  EXPECT_EQ(digests(status_of(dst->address())), digests(before));
}

}  // namespace
}  // namespace kvmig::testing
