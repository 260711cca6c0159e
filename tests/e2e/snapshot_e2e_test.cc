// Snapshots through agents (`kvmig snapshot save|load --agent`), with real
// `kvmig serve` processes: the snapshot directory an agent is confined to,
// the summary the agent answers with, and a snapshot as one point in time
// (no migration from or into an agent while it reads or writes one, and no
// snapshot while a migration is under way there).
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

// `kvmig args...` started, not waited for.
std::unique_ptr<Child> start_kvmig(std::vector<std::string> args) {
  args.insert(args.begin(), kvmig_bin());
  return Child::spawn(args);
}

// Waits for a child started by start_kvmig and gives its outcome.
CliResult finish(Child& c, std::chrono::seconds limit = 120s) {
  CliResult r;
  if (!c.wait_exit(limit)) {
    c.kill(SIGKILL);
    c.wait_exit(5s);
    r.err = "timed out";
    return r;
  }
  r.code = c.exit_code();
  r.out = c.out();
  r.err = c.err();
  return r;
}

std::vector<std::string> migrate_args(const std::string& src,
                                      const std::string& dst, SeqId id) {
  return {"migrate", "--agent",          src,     "--to", dst,
          "--seqs",  std::to_string(id), "--json"};
}

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

// ---- a snapshot is one point in time ---------------------------------------

// While an agent writes a snapshot (held at the agent.snapshot fault point),
// migrations from it and into it, and another snapshot of it, are refused
// naming the snapshot; then the snapshot completes with what it had.
TEST(SnapshotE2E, MigrationsAreRefusedWhileASnapshotIsSaved) {
  TempDir snaps;
  auto a = AgentProcess::start({"--populate", "3:40", "--seed", "3",
                                "--snapshot-dir", snaps.path(), "--fault",
                                "agent.snapshot=stall:6000"});
  auto b = AgentProcess::start({"--snapshot-dir", snaps.path()});
  ASSERT_TRUE(a && b);
  // B gets request 3, which could move back into A but for the snapshot.
  CliResult moved = run_kvmig(migrate_args(a->address(), b->address(), 3));
  ASSERT_EQ(moved.code, 0) << moved.out;
  const json a_before = status_of(a->address());
  const json b_before = status_of(b->address());
  ASSERT_EQ(a_before["seqs"].size(), 2u);

  auto save = start_kvmig(save_args(a->address(), "a.snap"));
  ASSERT_TRUE(save);
  ASSERT_TRUE(a->child().wait_for("reached agent.snapshot", 30s, true))
      << a->child().err();
  const std::string under_way =
      "a snapshot of this agent is under way (save to " + snaps / "a.snap" +
      ")";
  CliResult from = run_kvmig(migrate_args(a->address(), b->address(), 1));
  EXPECT_EQ(from.code, 1) << from.out;
  EXPECT_TRUE(contains(from.out, "FailedPrecondition")) << from.out;
  EXPECT_TRUE(contains(from.out, under_way + ": migrations from it are "
                                             "refused until it ends"))
      << from.out;
  CliResult into = run_kvmig(migrate_args(b->address(), a->address(), 3));
  EXPECT_EQ(into.code, 1) << into.out;
  EXPECT_TRUE(contains(into.out, "destination refused")) << into.out;
  EXPECT_TRUE(contains(into.out, under_way + ": migrations into it are "
                                             "refused until it ends"))
      << into.out;
  CliResult again = run_kvmig(save_args(a->address(), "b.snap"));
  EXPECT_EQ(again.code, 1) << again.err;
  EXPECT_TRUE(contains(again.err, "another snapshot is under way (save to " +
                                      snaps / "a.snap" + ")"))
      << again.err;
  // Still held: the refusals came while the snapshot was under way.
  EXPECT_FALSE(save->wait_exit(0ms));

  CliResult saved = finish(*save);
  ASSERT_EQ(saved.code, 0) << saved.out << saved.err;
  EXPECT_EQ(file_digests(snaps / "a.snap"), digests(a_before));
  EXPECT_FALSE(fs::exists(snaps / "b.snap"));
  EXPECT_EQ(digests(status_of(a->address())), digests(a_before));
  EXPECT_EQ(digests(status_of(b->address())), digests(b_before));
  // And migrations go again once it is over.
  CliResult back = run_kvmig(migrate_args(b->address(), a->address(), 3));
  EXPECT_EQ(back.code, 0) << back.out;
}

// The same while an agent loads a snapshot: nothing moves into it (or out).
TEST(SnapshotE2E, MigrationsAreRefusedWhileASnapshotIsLoaded) {
  TempDir snaps;
  CliResult made =
      run_kvmig({"snapshot", "save", "--preset", "tiny", "--populate", "2:40",
                 "--out", snaps / "in.snap"});
  ASSERT_EQ(made.code, 0) << made.err;
  auto a = AgentProcess::start(
      {"--snapshot-dir", snaps.path(), "--fault", "agent.snapshot=stall:6000"});
  auto c = AgentProcess::start({"--populate", "1:40", "--seed", "9"});
  ASSERT_TRUE(a && c);
  const json c_before = status_of(c->address());

  auto load = start_kvmig(load_args(a->address(), "in.snap"));
  ASSERT_TRUE(load);
  ASSERT_TRUE(a->child().wait_for("reached agent.snapshot", 30s, true))
      << a->child().err();
  const std::string under_way =
      "a snapshot of this agent is under way (load from " + snaps / "in.snap" +
      ")";
  CliResult into = run_kvmig(migrate_args(c->address(), a->address(), 1));
  EXPECT_EQ(into.code, 1) << into.out;
  EXPECT_TRUE(contains(into.out, under_way)) << into.out;
  CliResult from = run_kvmig({"migrate", "--agent", a->address(), "--to",
                              c->address(), "--all", "--json"});
  EXPECT_EQ(from.code, 1) << from.out;
  EXPECT_TRUE(contains(from.out, under_way)) << from.out;
  EXPECT_FALSE(load->wait_exit(0ms));

  CliResult loaded = finish(*load);
  ASSERT_EQ(loaded.code, 0) << loaded.out << loaded.err;
  EXPECT_EQ(digests(status_of(a->address())), file_digests(snaps / "in.snap"));
  EXPECT_EQ(digests(status_of(c->address())), digests(c_before));
}

// While a migration is under way (the source held mid-data), a snapshot of
// either side is refused naming the migration; the migration completes.
TEST(SnapshotE2E, SnapshotsAreRefusedWhileAMigrationIsUnderWay) {
  TempDir snaps;
  auto a = AgentProcess::start({"--layout", "layer", "--populate", "3:40",
                                "--snapshot-dir", snaps.path(), "--fault",
                                "src.data.mid=stall:5000"});
  auto b = AgentProcess::start({"--snapshot-dir", snaps.path()});
  ASSERT_TRUE(a && b);
  const json a_before = status_of(a->address());

  auto migration = start_kvmig({"migrate", "--agent", a->address(), "--to",
                                b->address(), "--all", "--json"});
  ASSERT_TRUE(migration);
  ASSERT_TRUE(a->child().wait_for("reached src.data.mid", 30s, true))
      << a->child().err();
  const json a_during = status_of(a->address());
  ASSERT_EQ(a_during["migrations"].size(), 1u) << a_during.dump();
  const std::string id =
      a_during["migrations"][0]["migration_id"].get<std::string>();
  const std::string later = ": snapshots are refused until it ends";

  CliResult src_save = run_kvmig(save_args(a->address(), "a.snap"));
  EXPECT_EQ(src_save.code, 1) << src_save.err;
  EXPECT_TRUE(contains(src_save.err, "FailedPrecondition")) << src_save.err;
  EXPECT_TRUE(contains(src_save.err, "a migration is under way here (" + id +
                                         ", source, to " + b->address() + ")" +
                                         later))
      << src_save.err;
  CliResult dst_save = run_kvmig(save_args(b->address(), "b.snap"));
  EXPECT_EQ(dst_save.code, 1) << dst_save.err;
  EXPECT_TRUE(contains(dst_save.err, "a migration is under way here (" + id +
                                         ", destination, from "))
      << dst_save.err;
  CliResult dst_load = run_kvmig(load_args(b->address(), "b.snap"));
  EXPECT_EQ(dst_load.code, 1) << dst_load.err;
  EXPECT_TRUE(contains(dst_load.err, "a migration is under way here (" + id))
      << dst_load.err;
  EXPECT_FALSE(migration->wait_exit(0ms));

  CliResult moved = finish(*migration);
  ASSERT_EQ(moved.code, 0) << moved.out << moved.err;
  EXPECT_TRUE(names_in(snaps.path()).empty());
  EXPECT_EQ(digests(status_of(b->address())), digests(a_before));
  EXPECT_TRUE(status_of(a->address())["seqs"].empty());
}

// Request id -> digest at an agent, and the same with one request gone or
// set.
using Digests = std::map<uint64_t, std::string>;
Digests without(Digests d, uint64_t id) {
  d.erase(id);
  return d;
}
Digests with(Digests d, uint64_t id, const std::string& digest) {
  d[id] = digest;
  return d;
}

// A save of A started together with A->B then C->A of one request id (C has
// its own request under each of A's ids), in 12 timings: each step either
// succeeds or is refused cleanly, a saved file verifies and holds exactly
// what A had at one point (before, between or after the two migrations),
// and every request keeps its digest, in one place. A save used to fail
// ("reading slot 7000: read_page: slot 7000 is free"), or hold C's request
// under the id of A's that had left. The moved request is A's last, whose
// pages a capture reads last.
TEST(SnapshotE2E, SaveAndMigrationsAtOnceStayConsistent) {
  TempDir snaps;
  const std::vector<std::string> big = {"--capacity-pages", "16384",
                                        "--snapshot-dir", snaps.path()};
  auto start = [&](std::vector<std::string> flags) {
    flags.insert(flags.end(), big.begin(), big.end());
    return AgentProcess::start(flags);
  };
  auto a = start({"--populate", "12:8000", "--seed", "5"});
  auto b = start({});
  auto c = start({"--populate", "12:8000", "--seed", "6"});
  ASSERT_TRUE(a && b && c);
  Digests at_a = digests(status_of(a->address()));
  Digests at_b;
  Digests at_c = digests(status_of(c->address()));
  ASSERT_EQ(at_a.size(), 12u);
  const std::string refused_snapshot = "a snapshot of this agent is under way";
  const std::string refused_migration = "a migration is under way here";
  int saved = 0;
  int moved_out = 0;
  int moved_in = 0;
  for (int run = 0; run < 12; ++run) {
    SCOPED_TRACE("run " + std::to_string(run));
    // The highest id that A has and C has too.
    uint64_t id = 0;
    for (const auto& [i, d] : at_a) {
      if (at_c.count(i)) id = i;
    }
    ASSERT_NE(id, 0u);
    const std::string file = "run" + std::to_string(run) + ".snap";
    std::unique_ptr<Child> save;
    CliResult out;
    CliResult in;
    // Which starts first, and how far apart, varies with the run.
    const auto apart = (run / 2) * 10ms;
    if (run % 2 == 0) {
      save = start_kvmig(save_args(a->address(), file));
      std::this_thread::sleep_for(apart);
      out = run_kvmig(migrate_args(a->address(), b->address(), id));
    } else {
      auto first = start_kvmig(migrate_args(a->address(), b->address(), id));
      std::this_thread::sleep_for(apart);
      save = start_kvmig(save_args(a->address(), file));
      ASSERT_TRUE(first);
      out = finish(*first);
    }
    if (out.code == 0) {
      in = run_kvmig(migrate_args(c->address(), a->address(), id));
    }
    ASSERT_TRUE(save);
    CliResult s = finish(*save);

    const Digests before = at_a;
    const Digests between = without(at_a, id);
    const Digests after = with(between, id, at_c[id]);
    if (out.code == 0) {
      ++moved_out;
      at_b[id] = at_a[id];
      at_a.erase(id);
      if (in.code == 0) {
        ++moved_in;
        at_a[id] = at_c[id];
        at_c.erase(id);
      } else {
        EXPECT_EQ(in.code, 1) << in.out << in.err;
        EXPECT_TRUE(contains(in.out, "destination refused")) << in.out;
        EXPECT_TRUE(contains(in.out, refused_snapshot)) << in.out;
      }
    } else {
      EXPECT_EQ(out.code, 1) << out.out << out.err;
      EXPECT_TRUE(contains(out.out, refused_snapshot)) << out.out;
    }
    if (s.code == 0) {
      ++saved;
      const Digests held = file_digests(snaps / file);
      EXPECT_TRUE(held == before || held == between || held == after)
          << "the file holds " << held.size() << " requests; " << s.out;
    } else {
      EXPECT_EQ(s.code, 1) << s.out << s.err;
      EXPECT_TRUE(contains(s.err, refused_migration)) << s.err;
      EXPECT_FALSE(fs::exists(snaps / file));
    }
    EXPECT_TRUE(s.code == 0 || out.code == 0) << "both refused";
    // Every request once, intact, where the migrations said it went.
    EXPECT_EQ(digests(status_of(a->address())), at_a);
    EXPECT_EQ(digests(status_of(b->address())), at_b);
    EXPECT_EQ(digests(status_of(c->address())), at_c);
    fs::remove(snaps / file);
  }
  std::cout << "12 runs: " << saved << " saves, " << moved_out
            << " moves out of A and " << moved_in
            << " moves into A succeeded; the rest were refused\n";
  EXPECT_TRUE(names_in(snaps.path()).empty());
}

}  // namespace
}  // namespace kvmig::testing
