// The fault matrix: every fault at every point of a migration, with real
// `kvmig serve` processes on loopback and, between source and destination,
// a TCP proxy in the test process that carries the control connection and
// can hold, cut, stall or corrupt it at a chosen frame.
//
// After each fault, on both sides: every request is live in exactly one
// place with its original digest, or (peer unreachable at the decision
// point) kept at the source, held, and listed under "in_doubt" with its
// migration id, and refused to new migrations, until the destination can be
// asked again and the source settles it by itself; the destination's free
// pages are back to the baseline or reflect only what it installed; the
// agents still serve, and a retry to a fresh destination succeeds.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "agent_cli.h"
#include "kvmig/transport.h"
#include "process.h"
#include "scope_exit.h"

namespace kvmig::testing {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

// --- the control-connection proxy -------------------------------------------

// Forwards TCP connections from its own loopback port to `target`, frame by
// frame (24-byte kvmig headers: u16 type at offset 6, u32 length at offset
// 8), one thread per direction. The first connection is the migration's control
// connection; later ones (the source's outcome queries) are forwarded as they
// come. Thread-safe.
class ControlProxy {
 public:
  enum class Dir { kToDestination, kToSource };
  enum class Action {
    kHold,     // stop forwarding; a side that closes is closed on the other
    kCut,      // close both sides at once
    kStall,    // stop forwarding and never close: an unresponsive peer; new
               // connections are accepted and left unanswered too
    kCorrupt,  // flip one byte in the middle of a frame: its checksum no
               // longer matches, or, in PAGES' pages (outside the frame's
               // checksum, protocol 13), the page's checksum in COMMIT
  };

  static std::unique_ptr<ControlProxy> start(const std::string& target) {
    auto p = std::unique_ptr<ControlProxy>(new ControlProxy());
    auto colon = target.rfind(':');
    p->target_.sin_family = AF_INET;
    p->target_.sin_port =
        htons(static_cast<uint16_t>(std::stoi(target.substr(colon + 1))));
    inet_pton(AF_INET, target.substr(0, colon).c_str(), &p->target_.sin_addr);
    p->listen_fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr = p->target_.sin_addr;
    socklen_t len = sizeof sa;
    if (bind(p->listen_fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0 ||
        listen(p->listen_fd_, 16) != 0 ||
        getsockname(p->listen_fd_, reinterpret_cast<sockaddr*>(&sa), &len) !=
            0) {
      return nullptr;
    }
    p->address_ =
        target.substr(0, colon) + ":" + std::to_string(ntohs(sa.sin_port));
    p->accept_thread_ = std::thread([q = p.get()] { q->accept_loop(); });
    return p;
  }

  ~ControlProxy() {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
      for (auto& c : conns_) c->shut();
      cv_.notify_all();
    }
    shutdown(listen_fd_, SHUT_RDWR);
    accept_thread_.join();
    std::vector<std::unique_ptr<Conn>> conns;
    {
      std::lock_guard lock(mu_);
      conns.swap(conns_);
    }
    for (auto& c : conns) {
      for (auto& t : c->threads) t.join();
      close(c->client);
      if (c->server >= 0) close(c->server);
    }
    close(listen_fd_);
  }

  const std::string& address() const { return address_; }

  // Acts when the k-th frame (from 1) travelling `dir` on the first
  // connection arrives, not counting PROGRESS frames (how many a source
  // sends depends on how fast it writes): that frame is not forwarded
  // (hold, cut, stall) or goes on with a byte flipped (corrupt).
  void arm(Dir dir, int k, Action action) {
    std::lock_guard lock(mu_);
    armed_ = true;
    armed_dir_ = dir;
    armed_frame_ = k;
    armed_action_ = action;
  }

  // Frames k to k+n-1 towards the destination on the first connection are
  // kept back; the destination's side stays open and sees nothing. With
  // close_source, once the last of them is in, the source's side is closed
  // (a reset on the way); without, it stays open (a stalled path that will
  // heal). release_held() delivers them to the destination, late, once the
  // source's side has closed.
  void arm_delay(int k, int n, bool close_source) {
    std::lock_guard lock(mu_);
    delay_from_ = k;
    delay_frames_ = n;
    delay_closes_source_ = close_source;
  }

  // Delivers the frames arm_delay() kept back.
  void release_held() {
    std::lock_guard lock(mu_);
    released_ = true;
    cv_.notify_all();
  }

  // Acts on every open connection now; corrupt flips a byte of the next
  // frame of the first connection, either way.
  void act(Action action) {
    std::lock_guard lock(mu_);
    apply_locked(action, nullptr);
  }

  // After a hold: a side that has closed (or closes later) is closed on
  // the other too, as a real network would. Call it after killing a peer.
  void release_closes() {
    std::lock_guard lock(mu_);
    release_closes_ = true;
    cv_.notify_all();
  }

  // The network heals: connections from now on are forwarded again (the
  // ones a fault already caught stay as they are).
  void heal() {
    std::lock_guard lock(mu_);
    stall_new_ = false;
  }

  // True once an armed action fired (or act() ran).
  bool wait_fired(std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return fired_; });
  }

 private:
  struct Conn {
    int client = -1;  // the source's side
    int server = -1;  // the destination's side
    bool first = false;
    bool held = false;     // hold, stall or cut: nothing more is forwarded
    bool frozen = false;   // hold: closes wait for release_closes()
    bool stalled = false;  // stall: closes are never passed on
    bool corrupt_next = false;
    std::vector<std::vector<uint8_t>> delayed;  // arm_delay(): kept back
    int frames[2] = {0, 0};
    std::vector<std::thread> threads;
    void shut() const {
      shutdown(client, SHUT_RDWR);
      if (server >= 0) shutdown(server, SHUT_RDWR);
    }
  };

  ControlProxy() = default;

  // mu_ held. `conn` is the connection whose frame fired, or null (act()).
  void apply_locked(Action action, Conn* conn) {
    fired_ = true;
    cv_.notify_all();
    if (action == Action::kCorrupt) {
      for (auto& c : conns_) c->corrupt_next |= c->first && !conn;
      return;
    }
    if (action == Action::kStall) stall_new_ = true;
    for (auto& c : conns_) {
      if (conn && c.get() != conn) continue;
      if (action == Action::kCut) c->shut();
      c->held = true;
      c->frozen = action == Action::kHold;
      c->stalled = action == Action::kStall;
    }
  }

  void accept_loop() {
    for (;;) {
      int fd = accept(listen_fd_, nullptr, nullptr);
      if (fd < 0) return;
      std::lock_guard lock(mu_);
      if (stopping_) {
        close(fd);
        return;
      }
      auto c = std::make_unique<Conn>();
      c->client = fd;
      c->first = conns_.empty();
      if (stall_new_) {
        // Unresponsive: accepted, never answered, never closed.
        c->held = c->stalled = true;
        conns_.push_back(std::move(c));
        continue;
      }
      c->server = socket(AF_INET, SOCK_STREAM, 0);
      if (connect(c->server, reinterpret_cast<const sockaddr*>(&target_),
                  sizeof target_) != 0) {
        // Destination gone: the source sees its connection closed.
        shutdown(fd, SHUT_RDWR);
        conns_.push_back(std::move(c));
        continue;
      }
      Conn* raw = c.get();
      raw->threads.emplace_back(
          [this, raw] { pump(raw, Dir::kToDestination); });
      raw->threads.emplace_back([this, raw] { pump(raw, Dir::kToSource); });
      conns_.push_back(std::move(c));
    }
  }

  static bool send_all(int fd, const uint8_t* p, size_t n) {
    while (n > 0) {
      ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
      if (w <= 0) return false;
      p += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }

  // Forwards one direction of c, a whole frame at a time.
  void pump(Conn* c, Dir dir) {
    const int from = dir == Dir::kToDestination ? c->client : c->server;
    const int to = dir == Dir::kToDestination ? c->server : c->client;
    std::vector<uint8_t> buf;
    uint8_t chunk[64 * 1024];
    for (;;) {
      ssize_t n = recv(from, chunk, sizeof chunk, 0);
      if (n <= 0) {
        std::unique_lock lock(mu_);
        if (!c->delayed.empty()) {
          // Closed by arm_delay(): the kept frames go on once released,
          // and the destination's side stays open.
          cv_.wait(lock, [&] { return released_ || stopping_; });
          auto late = std::move(c->delayed);
          lock.unlock();
          for (const auto& f : late) send_all(to, f.data(), f.size());
          return;
        }
        // A side that closed is closed on the other: at once, after
        // release_closes() when held, never when stalled.
        cv_.wait(lock,
                 [&] { return !c->frozen || release_closes_ || stopping_; });
        if (!c->stalled) shutdown(to, SHUT_RDWR);
        return;
      }
      buf.insert(buf.end(), chunk, chunk + n);
      for (;;) {
        if (buf.size() < 24) break;
        uint32_t len;
        std::memcpy(&len, buf.data() + 8, 4);
        if (buf.size() < 24 + size_t{len}) break;
        std::vector<uint8_t> frame(buf.begin(), buf.begin() + 24 + len);
        buf.erase(buf.begin(), buf.begin() + 24 + len);
        uint16_t type;
        std::memcpy(&type, frame.data() + 6, 2);
        bool forward;
        {
          std::lock_guard lock(mu_);
          const int k = type == kProgressType
                            ? c->frames[static_cast<int>(dir)]
                            : ++c->frames[static_cast<int>(dir)];
          bool corrupt = false;
          if (c->first && armed_ && armed_dir_ == dir && armed_frame_ == k &&
              type != kProgressType) {
            armed_ = false;
            if (armed_action_ == Action::kCorrupt) {
              corrupt = true;
              fired_ = true;
              cv_.notify_all();
            } else {
              apply_locked(armed_action_, c);
            }
          }
          if (c->corrupt_next) {
            c->corrupt_next = false;
            corrupt = true;
          }
          // A payload byte, or else a checksum byte (offset 16).
          if (corrupt) frame[len > 0 ? 24 + len / 2 : 16] ^= 0x5a;
          forward = !c->held;
          if (c->first && dir == Dir::kToDestination && delay_frames_ > 0 &&
              k >= delay_from_ && type != kProgressType) {
            c->delayed.push_back(std::move(frame));
            forward = false;
            if (--delay_frames_ == 0) {
              fired_ = true;
              cv_.notify_all();
              if (delay_closes_source_) shutdown(c->client, SHUT_RDWR);
            }
          }
        }
        if (forward && !send_all(to, frame.data(), frame.size())) {
          shutdown(from, SHUT_RDWR);
          return;
        }
      }
    }
  }

  static constexpr uint16_t kProgressType = 12;  // MsgType::kProgress

  sockaddr_in target_{};
  int listen_fd_ = -1;
  std::string address_;
  std::thread accept_thread_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Conn>> conns_;
  bool stopping_ = false;
  bool stall_new_ = false;
  bool release_closes_ = false;
  bool fired_ = false;
  bool armed_ = false;
  int delay_from_ = 0;
  int delay_frames_ = 0;
  bool delay_closes_source_ = false;
  bool released_ = false;
  Dir armed_dir_ = Dir::kToSource;
  int armed_frame_ = 0;
  Action armed_action_ = Action::kHold;
};

// --- helpers ----------------------------------------------------------------

std::map<uint64_t, std::string> only(const std::map<uint64_t, std::string>& m,
                                     const std::set<uint64_t>& ids) {
  std::map<uint64_t, std::string> out;
  for (const auto& [id, d] : m) {
    if (ids.count(id)) out[id] = d;
  }
  return out;
}

std::string join(const std::set<uint64_t>& ids) {
  std::string out;
  for (uint64_t id : ids) out += (out.empty() ? "" : ",") + std::to_string(id);
  return out;
}

json migrate(const std::string& src, const std::string& dst,
             const std::set<uint64_t>& ids, int* code) {
  CliResult r = run_kvmig(
      {"migrate", "--agent", src, "--to", dst, "--seqs", join(ids), "--json"});
  *code = r.code;
  json j = json::parse(r.out, nullptr, false);
  return j.is_object() ? j : json{{"ok", false}, {"error", r.out + r.err}};
}

// Prints the agents' logs when the test failed (or KVMIG_E2E_LOGS is set),
// as the scope it guards ends.
class LogsOnFailure {
 public:
  explicit LogsOnFailure(std::vector<std::pair<std::string, AgentProcess*>> a)
      : agents_(std::move(a)) {}
  ~LogsOnFailure() {
    if (!::testing::Test::HasFailure() && !std::getenv("KVMIG_E2E_LOGS")) {
      return;
    }
    for (const auto& [name, agent] : agents_) {
      if (agent) {
        std::cerr << "--- " << name << " " << agent->address() << "\n"
                  << agent->child().err();
      }
    }
  }

 private:
  std::vector<std::pair<std::string, AgentProcess*>> agents_;
};

// --- the matrix -------------------------------------------------------------

enum class Fault { kKillSource, kKillDestination, kCut, kStall, kCorrupt };
enum class Point {
  kBeforeOffer,     // HELLO sent, slots allocated, OFFER not yet at the source
  kDuringData,      // the source is halfway through its writes
  kBeforeCommit,    // data landed and flushed, no COMMIT sent yet
  kCommitInFlight,  // COMMIT sent, not yet at the destination
  kBeforeDone,      // the destination installed; DONE not yet at the source
  kAfterDone,       // the migration completed
};
enum class Expect { kRolledBack, kCommitted, kInDoubt };

// The data transport of the migration (data_transports()): the faults hit
// the control connection and the processes while the data moves over tcp,
// ucx, or verbs where it can run; and where every agent's pool lives (serve
// --memory: host, or sim-device, which kvmig reaches only through the
// pager's copies).
using FaultCase = std::tuple<Fault, Point, std::string, std::string>;

// Each migration's control frames, stop-and-copy with verification:
// HELLO > , < OFFER, [data], COMMIT (with the checksums) > , < DONE, and
// PROGRESS > now and then while the data moves.
Expect expected(Fault f, Point p) {
  switch (p) {
    case Point::kBeforeOffer:
    case Point::kDuringData:
      return Expect::kRolledBack;
    case Point::kBeforeCommit:
      // No frame is left to wait for before COMMIT: a stalled connection
      // shows only after it (the destination gave up meanwhile, so the
      // source settles "rolled back" once it can ask).
      return f == Fault::kStall ? Expect::kInDoubt : Expect::kRolledBack;
    case Point::kCommitInFlight:
      // The destination never got COMMIT. A source that can still reach it
      // learns "aborted" (its query fences the migration); one that cannot
      // keeps the requests in doubt.
      return f == Fault::kKillDestination || f == Fault::kStall
                 ? Expect::kInDoubt
                 : Expect::kRolledBack;
    case Point::kBeforeDone:
      return f == Fault::kKillDestination || f == Fault::kStall
                 ? Expect::kInDoubt
                 : Expect::kCommitted;
    case Point::kAfterDone:
      return Expect::kCommitted;
  }
  return Expect::kRolledBack;
}

std::string fault_name(Fault f) {
  switch (f) {
    case Fault::kKillSource:
      return "KillSource";
    case Fault::kKillDestination:
      return "KillDestination";
    case Fault::kCut:
      return "Cut";
    case Fault::kStall:
      return "Stall";
    case Fault::kCorrupt:
      return "Corrupt";
  }
  return "?";
}

std::string point_name(Point p) {
  switch (p) {
    case Point::kBeforeOffer:
      return "BeforeOffer";
    case Point::kDuringData:
      return "DuringData";
    case Point::kBeforeCommit:
      return "BeforeCommit";
    case Point::kCommitInFlight:
      return "CommitInFlight";
    case Point::kBeforeDone:
      return "BeforeDone";
    case Point::kAfterDone:
      return "AfterDone";
  }
  return "?";
}

constexpr int kPagesPerSeq = 3;  // 40 tokens in 16-token pages
const std::set<uint64_t> kMoved = {1, 2};
const std::set<uint64_t> kAll = {1, 2, 3};
// Inside the Soft-RoCE guest everything runs emulated: a destination's
// first OFFER over verbs, or a 3-page flush over tcp, has taken more than
// a second there (about one case in 30-45, with and without the hold that
// overlaps the connect). So the peer timeout there is 3 s, and every stall
// that must outlast it, and every wait for it, is three times as long.
const int kSlow = in_rxe_guest() ? 3 : 1;
const std::string kPeerTimeoutMs = std::to_string(1000 * kSlow);
// A source fault hook that sleeps at `point` for ms (x kSlow).
std::string stall_at(const std::string& point, int ms) {
  return point + "=stall:" + std::to_string(ms * kSlow);
}

class FaultMatrix : public ::testing::TestWithParam<FaultCase> {};

TEST_P(FaultMatrix, EveryRequestLivesInExactlyOnePlace) {
  const auto [fault, point, transport, pool] = GetParam();
  // "host-inline": host pools, and the pages go inline (one PAGES frame on
  // the control connection, right before COMMIT): the data in flight is
  // that frame, so a fault during the data lands where one on COMMIT does.
  const bool inline_pages = pool == "host-inline";
  const std::string memory = inline_pages ? "host" : pool;
  const std::string inline_kib = inline_pages ? "128" : "0";
  const Expect expect =
      expected(fault, inline_pages && point == Point::kDuringData
                          ? Point::kCommitInFlight
                          : point);
  const bool kill_src = fault == Fault::kKillSource;
  const bool kill_dst = fault == Fault::kKillDestination;
  using Action = ControlProxy::Action;
  using Dir = ControlProxy::Dir;

  // The source in the layer layout (several writes a page, so the data
  // phase has a middle), tiny requests, short peer timeouts everywhere.
  std::vector<std::string> src_flags = {
      "--layout",          "layer",        "--capacity-pages", "64",
      "--populate",        "3:40",         "--seed",           "11",
      "--peer-timeout-ms", kPeerTimeoutMs, "--inline-kib",     inline_kib};
  if (point == Point::kDuringData && !inline_pages) {
    src_flags.insert(src_flags.end(),
                     {"--fault", stall_at("src.data.mid", 1500)});
  } else if (point == Point::kBeforeCommit) {
    src_flags.insert(src_flags.end(),
                     {"--fault", stall_at("src.before_commit", 1500)});
  }
  src_flags.insert(src_flags.end(),
                   {"--transports", "tcp," + transport, "--memory", memory});
  auto src = AgentProcess::start(src_flags);
  auto dst =
      AgentProcess::start({"--capacity-pages", "64", "--peer-timeout-ms",
                           kPeerTimeoutMs, "--transports", "tcp," + transport,
                           "--memory", memory, "--inline-kib", inline_kib});
  // The fresh destination for retries; it brings requests of its own to
  // move into the destination when the source will not be there.
  std::vector<std::string> fresh_flags = {
      "--capacity-pages", "64",   "--transports", "tcp," + transport,
      "--memory",         memory, "--inline-kib", inline_kib};
  if (kill_src) {
    fresh_flags.insert(fresh_flags.end(),
                       {"--populate", "3:40", "--seed", "23"});
  }
  auto fresh = AgentProcess::start(fresh_flags);
  LogsOnFailure logs({{"source", src.get()},
                      {"destination", dst.get()},
                      {"fresh", fresh.get()}});
  ASSERT_TRUE(src && dst && fresh);
  auto proxy = ControlProxy::start(dst->address());
  ASSERT_TRUE(proxy);

  const json sb = status_of(src->address());
  const json db = status_of(dst->address());
  ASSERT_EQ(sb["seqs"].size(), 3u);
  const int64_t src_free = sb["free_pages"];
  const int64_t dst_free = db["free_pages"];
  const auto original = digests(sb);

  // Land the fault at its point: an armed proxy action at a frame, or an
  // action on cue (the source stalled mid-data or just before COMMIT, or
  // the migration over).
  const Action action = kill_src || kill_dst     ? Action::kHold
                        : fault == Fault::kCut   ? Action::kCut
                        : fault == Fault::kStall ? Action::kStall
                                                 : Action::kCorrupt;
  switch (point) {
    case Point::kBeforeOffer:
      proxy->arm(Dir::kToSource, 1, action);
      break;
    case Point::kCommitInFlight:
      proxy->arm(Dir::kToDestination, inline_pages ? 3 : 2, action);
      break;
    case Point::kBeforeDone:
      proxy->arm(Dir::kToSource, 2, action);
      break;
    case Point::kDuringData:
      if (inline_pages) proxy->arm(Dir::kToDestination, 2, action);  // PAGES
      break;
    case Point::kBeforeCommit:
    case Point::kAfterDone:
      break;
  }
  auto cli = Child::spawn({kvmig_bin(), "migrate", "--agent", src->address(),
                           "--to", proxy->address(), "--seqs", join(kMoved),
                           "--transport", transport, "--json"});
  ASSERT_TRUE(cli);
  if ((point == Point::kDuringData && !inline_pages) ||
      point == Point::kBeforeCommit) {
    const std::string cue = point == Point::kDuringData
                                ? "reached src.data.mid"
                                : "reached src.before_commit";
    ASSERT_TRUE(src->child().wait_for(cue, 30s, true)) << src->child().err();
    if (!kill_src && !kill_dst) proxy->act(action);
  } else if (point == Point::kAfterDone) {
    ASSERT_TRUE(cli->wait_exit(30s));
    ASSERT_EQ(cli->exit_code(), 0) << cli->out();
  } else {
    ASSERT_TRUE(proxy->wait_fired(30s)) << src->child().err();
  }
  if (kill_src) src->child().kill(SIGKILL);
  if (kill_dst) dst->child().kill(SIGKILL);
  if (kill_src || kill_dst) {
    // Let the killed side's closed connection show on the other side.
    (kill_src ? src : dst)->child().wait_exit(5s);
    proxy->release_closes();
  }
  ASSERT_TRUE(cli->wait_exit(30s));
  json report = json::parse(cli->out(), nullptr, false);
  ASSERT_TRUE(report.is_object()) << cli->out() << cli->err();
  // The case ran the path it names (the destination says so at OFFER).
  EXPECT_EQ(dst->child().err().find("over the control connection") !=
                std::string::npos,
            inline_pages)
      << dst->child().err();

  // What the scheduler hears.
  std::string in_doubt_id;
  if (!kill_src) {
    if (expect == Expect::kCommitted) {
      EXPECT_EQ(cli->exit_code(), 0) << report.dump();
      EXPECT_TRUE(report["ok"].get<bool>()) << report.dump();
    } else {
      EXPECT_EQ(cli->exit_code(), 1) << report.dump();
      EXPECT_FALSE(report["ok"].get<bool>()) << report.dump();
    }
    if (expect == Expect::kInDoubt) {
      const std::string err = report.value("error", "");
      const std::string marker = "migration ";
      auto at = err.find(marker);
      ASSERT_NE(err.find("in doubt"), std::string::npos) << err;
      ASSERT_NE(at, std::string::npos) << err;
      in_doubt_id = err.substr(at + marker.size(), 32);
    }
  }

  // In doubt: the source keeps the requests, held, and refuses to move
  // them; once the destination can be asked again (the network heals, or
  // the killed destination restarts where it was) the source settles them
  // by itself: committed if the destination installed them (stall at
  // DONE), rolled back otherwise (a restarted agent holds nothing of it).
  Expect settled = expect;
  if (!kill_src && expect == Expect::kInDoubt) {
    json s = status_of(src->address());
    EXPECT_EQ(s["free_pages"], src_free) << s.dump();
    EXPECT_EQ(digests(s), original);
    ASSERT_EQ(s["in_doubt"].size(), 1u) << s.dump();
    EXPECT_EQ(s["in_doubt"][0]["migration_id"], in_doubt_id) << s.dump();
    EXPECT_EQ(s["in_doubt"][0]["seqs"], json(std::vector<uint64_t>{1, 2}));
    EXPECT_EQ(s["in_doubt"][0]["to"], proxy->address());
    EXPECT_EQ(s["in_doubt"][0]["hold"], "seqs");
    int code = -1;
    json r = migrate(src->address(), fresh->address(), {1}, &code);
    EXPECT_EQ(code, 1) << r.dump();
    EXPECT_NE(r.value("error", "").find("in doubt"), std::string::npos)
        << r.dump();

    std::unique_ptr<AgentProcess> restarted;
    if (kill_dst) {
      restarted = AgentProcess::start(
          {"--capacity-pages", "64", "--transports", "tcp," + transport,
           "--memory", memory, "--inline-kib", inline_kib},
          dst->address());
      ASSERT_TRUE(restarted);
    } else {
      proxy->heal();
    }
    settled = fault == Fault::kStall && point == Point::kBeforeDone
                  ? Expect::kCommitted
                  : Expect::kRolledBack;
    auto end = std::chrono::steady_clock::now() + 20s;
    while (!s["in_doubt"].empty() && std::chrono::steady_clock::now() < end) {
      std::this_thread::sleep_for(100ms);
      s = status_of(src->address());
    }
    ASSERT_TRUE(s["in_doubt"].empty()) << s.dump() << src->child().err();
    EXPECT_NE(src->child().err().find(
                  settled == Expect::kCommitted
                      ? "in doubt settled: committed at the destination"
                      : "in doubt settled: rolled back"),
              std::string::npos)
        << src->child().err();
  }

  // The source: everything back (rolled back) or only what stayed.
  std::set<uint64_t> at_src;  // requests the source may move on
  if (!kill_src) {
    const int64_t want_free =
        settled == Expect::kCommitted ? src_free + 2 * kPagesPerSeq : src_free;
    json s = status_of(src->address());
    EXPECT_EQ(s["free_pages"], want_free) << s.dump();
    if (settled == Expect::kCommitted) {
      EXPECT_EQ(digests(s), only(original, {3}));
    } else {
      EXPECT_EQ(digests(s), original);
    }
    EXPECT_TRUE(s["in_doubt"].empty()) << s.dump();
    at_src = settled == Expect::kCommitted ? std::set<uint64_t>{3} : kAll;
  }

  // The destination: nothing (its slots back) or exactly what it installed.
  std::set<uint64_t> at_dst;
  if (!kill_dst) {
    const bool installed = settled == Expect::kCommitted;
    if (installed) at_dst = kMoved;
    json d = wait_for_free_pages(
        dst->address(), dst_free - (installed ? 2 * kPagesPerSeq : 0), 10s);
    EXPECT_EQ(d["free_pages"],
              dst_free - static_cast<int64_t>(at_dst.size() * kPagesPerSeq))
        << d.dump() << dst->child().err();
    EXPECT_EQ(digests(d), only(original, at_dst)) << dst->child().err();
  }

  // What the source holds goes to a fresh destination.
  if (!kill_src) {
    int code = -1;
    json r = migrate(src->address(), fresh->address(), at_src, &code);
    ASSERT_EQ(code, 0) << r.dump() << src->child().err();
    EXPECT_EQ(digests(status_of(fresh->address())), only(original, at_src));
  }
  // And the destination takes new requests into the slots it gave back:
  // a late write from the failed migration would show in their digests.
  if (!kill_dst) {
    const auto fresh_has = digests(status_of(fresh->address()));
    std::set<uint64_t> onward;
    for (const auto& [id, d] : fresh_has) {
      if (!at_dst.count(id)) onward.insert(id);
    }
    ASSERT_FALSE(onward.empty());
    int code = -1;
    json r = migrate(fresh->address(), dst->address(), onward, &code);
    ASSERT_EQ(code, 0) << r.dump() << dst->child().err();
    json d = status_of(dst->address());
    auto want = only(original, at_dst);
    for (uint64_t id : onward) want[id] = fresh_has.at(id);
    EXPECT_EQ(digests(d), want);
    EXPECT_EQ(d["free_pages"],
              dst_free - static_cast<int64_t>(want.size() * kPagesPerSeq));
  }
}

std::string fault_case_name(const ::testing::TestParamInfo<FaultCase>& info) {
  std::string memory = std::get<3>(info.param);
  memory = memory == "host"          ? ""
           : memory == "host-inline" ? "_inline"
                                     : "_sim_device";
  return fault_name(std::get<0>(info.param)) + "_" +
         point_name(std::get<1>(info.param)) + "_" + std::get<2>(info.param) +
         memory;
}

// Kills land anywhere, AfterDone included: the survivor must hold exactly
// what the outcome gave it.
INSTANTIATE_TEST_SUITE_P(
    Kill, FaultMatrix,
    ::testing::Combine(
        ::testing::Values(Fault::kKillSource, Fault::kKillDestination),
        ::testing::Values(Point::kBeforeOffer, Point::kDuringData,
                          Point::kBeforeCommit, Point::kCommitInFlight,
                          Point::kBeforeDone, Point::kAfterDone),
        ::testing::ValuesIn(data_transports()), ::testing::Values("host")),
    fault_case_name);

// The kills once more with every pool on the simulated device, over tcp
// (the transport that reaches device memory here): the same outcomes, and
// no CPU access to the device on the way (it would kill the agent).
INSTANTIATE_TEST_SUITE_P(
    KillSimDevice, FaultMatrix,
    ::testing::Combine(
        ::testing::Values(Fault::kKillSource, Fault::kKillDestination),
        ::testing::Values(Point::kBeforeOffer, Point::kDuringData,
                          Point::kBeforeCommit, Point::kCommitInFlight,
                          Point::kBeforeDone, Point::kAfterDone),
        ::testing::Values("tcp"), ::testing::Values("sim-device")),
    fault_case_name);

// Faults of the control connection. AfterDone is left out: the connection
// is closed by then, so cutting, stalling or corrupting it changes nothing
// (identical to no fault). During the data phase only PROGRESS travels on
// the control connection: the fault lands there while the source is
// mid-data (or stalled before COMMIT) and hits the next frame, PROGRESS or
// COMMIT (or the destination's ABORT once it gave up).
INSTANTIATE_TEST_SUITE_P(
    Connection, FaultMatrix,
    ::testing::Combine(
        ::testing::Values(Fault::kCut, Fault::kStall, Fault::kCorrupt),
        ::testing::Values(Point::kBeforeOffer, Point::kDuringData,
                          Point::kBeforeCommit, Point::kCommitInFlight,
                          Point::kBeforeDone),
        ::testing::ValuesIn(data_transports()), ::testing::Values("host")),
    fault_case_name);

// The pages inline (protocol 8) over tcp: kills and connection faults on
// PAGES (DuringData), on COMMIT behind it (CommitInFlight) and on DONE, and
// a kill while the source stalls before COMMIT. A byte flipped in PAGES
// lands in a page (the frame's bulk): `migrate` verifies by default, and
// that page's checksum in COMMIT refuses it. (No kill of the destination
// on PAGES: COMMIT follows PAGES at once, so whether it left before the
// close showed is a race; CommitInFlight holds COMMIT itself.)
INSTANTIATE_TEST_SUITE_P(
    Inline, FaultMatrix,
    ::testing::Values(
        FaultCase{Fault::kKillSource, Point::kDuringData, "tcp", "host-inline"},
        FaultCase{Fault::kKillDestination, Point::kBeforeCommit, "tcp",
                  "host-inline"},
        FaultCase{Fault::kKillDestination, Point::kCommitInFlight, "tcp",
                  "host-inline"},
        FaultCase{Fault::kKillSource, Point::kBeforeDone, "tcp", "host-inline"},
        FaultCase{Fault::kCut, Point::kDuringData, "tcp", "host-inline"},
        FaultCase{Fault::kStall, Point::kDuringData, "tcp", "host-inline"},
        FaultCase{Fault::kCorrupt, Point::kDuringData, "tcp", "host-inline"},
        FaultCase{Fault::kCorrupt, Point::kCommitInFlight, "tcp",
                  "host-inline"}),
    fault_case_name);

// --- one exchange -----------------------------------------------------------

// One exchange (protocol 11) under the control connection's faults. A first
// move (request 3, inline) goes through the proxy and leaves its connection
// kept at the source; the next (requests 1 and 2, 6 pages) goes on it as
// HELLO, PAGES and COMMIT in one write, and the fault lands on HELLO
// (nothing of the exchange forwarded), on COMMIT (HELLO and PAGES forwarded:
// the destination took slots) or on DONE (it installed). Afterwards every
// request lives in exactly one place with its digest, what was in doubt
// settles once the network heals, and both agents take new moves.
enum class ExchangeFrame { kHello, kCommit, kDone };
using ExchangeCase = std::tuple<Fault, ExchangeFrame>;

// The first connection's frames before the exchange: HELLO, PAGES, COMMIT
// and DONE_ACK to the destination, OFFER and DONE back.
constexpr int kWarmUpToDestination = 4;
constexpr int kWarmUpToSource = 2;

Expect expected_of_exchange(Fault f, ExchangeFrame at) {
  switch (at) {
    case ExchangeFrame::kHello:
      // Cut or corrupt: the destination read nothing of it (a bad frame
      // closes the connection), and says "no record" when asked on a new
      // connection: the exchange goes there again and commits. Stalled: no
      // answer, no query answered, in doubt until the network heals; the
      // destination never saw it.
      return f == Fault::kStall ? Expect::kInDoubt : Expect::kCommitted;
    case ExchangeFrame::kCommit:
      // The destination took slots with HELLO and gives them back when
      // COMMIT never comes: the source's query finds it aborted (or fences
      // it so). Stalled: in doubt first.
      return f == Fault::kStall ? Expect::kInDoubt : Expect::kRolledBack;
    case ExchangeFrame::kDone:
      return f == Fault::kStall ? Expect::kInDoubt : Expect::kCommitted;
  }
  return Expect::kRolledBack;
}

struct ExchangeAgents {
  std::unique_ptr<AgentProcess> src, dst;
  std::unique_ptr<ControlProxy> proxy;
  std::map<uint64_t, std::string> original;  // of requests 1, 2 and 3
};

// Source (requests 1 to 3) and destination with 128 KiB inline, the proxy,
// and the warm-up move of request 3 through it.
void start_exchange_agents(ExchangeAgents& a,
                           std::vector<std::string> src_flags = {}) {
  src_flags.insert(src_flags.end(),
                   {"--capacity-pages", "64", "--populate", "3:40", "--seed",
                    "11", "--peer-timeout-ms", kPeerTimeoutMs, "--inline-kib",
                    "128", "--transports", "tcp"});
  a.src = AgentProcess::start(src_flags);
  a.dst = AgentProcess::start({"--capacity-pages", "64", "--peer-timeout-ms",
                               kPeerTimeoutMs, "--inline-kib", "128",
                               "--transports", "tcp"});
  ASSERT_TRUE(a.src && a.dst);
  a.proxy = ControlProxy::start(a.dst->address());
  ASSERT_TRUE(a.proxy);
  a.original = digests(status_of(a.src->address()));
  ASSERT_EQ(a.original.size(), 3u);
  int code = -1;
  json warm = migrate(a.src->address(), a.proxy->address(), {3}, &code);
  ASSERT_EQ(code, 0) << warm.dump();
  ASSERT_FALSE(warm.value("one_exchange", true)) << warm.dump();
}

// Each request in exactly one place with its original digest: 1 and 2 at
// the destination when the exchange committed, else at the source; both
// pools' free pages match; and the requests move on (the destination's
// digests would show a late write into the slots it gave back).
void expect_one_place(ExchangeAgents& a, bool committed) {
  const std::set<uint64_t> at_src =
      committed ? std::set<uint64_t>{} : std::set<uint64_t>{1, 2};
  const std::set<uint64_t> at_dst = committed ? kAll : std::set<uint64_t>{3};
  json s = status_of(a.src->address());
  EXPECT_EQ(digests(s), only(a.original, at_src)) << s.dump();
  EXPECT_EQ(s["free_pages"],
            64 - static_cast<int64_t>(at_src.size()) * kPagesPerSeq);
  EXPECT_TRUE(s["in_doubt"].empty()) << s.dump();
  const int64_t dst_free =
      64 - static_cast<int64_t>(at_dst.size()) * kPagesPerSeq;
  json d = wait_for_free_pages(a.dst->address(), dst_free, 10s);
  EXPECT_EQ(d["free_pages"], dst_free) << d.dump() << a.dst->child().err();
  EXPECT_EQ(digests(d), only(a.original, at_dst));
  // Onward, straight (not through the proxy): 1 and 2 to the destination
  // if they are not there, then 1 back to the source.
  int code = -1;
  if (!committed) {
    json r = migrate(a.src->address(), a.dst->address(), {1, 2}, &code);
    ASSERT_EQ(code, 0) << r.dump();
  }
  json r = migrate(a.dst->address(), a.src->address(), {1}, &code);
  ASSERT_EQ(code, 0) << r.dump();
  EXPECT_EQ(digests(status_of(a.src->address())), only(a.original, {1}));
  EXPECT_EQ(digests(status_of(a.dst->address())), only(a.original, {2, 3}));
}

class OneExchangeFaultMatrix : public ::testing::TestWithParam<ExchangeCase> {};

TEST_P(OneExchangeFaultMatrix, EveryRequestLivesInExactlyOnePlace) {
  const auto [fault, at] = GetParam();
  using Action = ControlProxy::Action;
  using Dir = ControlProxy::Dir;
  ExchangeAgents a;
  start_exchange_agents(a);
  LogsOnFailure logs({{"source", a.src.get()}, {"destination", a.dst.get()}});
  if (HasFatalFailure()) return;
  const Action action = fault == Fault::kCut     ? Action::kCut
                        : fault == Fault::kStall ? Action::kStall
                                                 : Action::kCorrupt;
  switch (at) {
    case ExchangeFrame::kHello:
      a.proxy->arm(Dir::kToDestination, kWarmUpToDestination + 1, action);
      break;
    case ExchangeFrame::kCommit:
      a.proxy->arm(Dir::kToDestination, kWarmUpToDestination + 3, action);
      break;
    case ExchangeFrame::kDone:
      a.proxy->arm(Dir::kToSource, kWarmUpToSource + 1, action);
      break;
  }
  int code = -1;
  json r = migrate(a.src->address(), a.proxy->address(), kMoved, &code);
  ASSERT_TRUE(a.proxy->wait_fired(0s)) << r.dump();
  // It went as one exchange (the warm-up did not).
  EXPECT_NE(a.src->child().err().find("6 pages over the control connection"),
            std::string::npos);
  const Expect expect = expected_of_exchange(fault, at);
  bool committed = expect == Expect::kCommitted;
  if (expect == Expect::kInDoubt) {
    ASSERT_EQ(code, 1) << r.dump();
    ASSERT_NE(r.value("error", "").find("in doubt"), std::string::npos)
        << r.dump();
    a.proxy->heal();
    committed = at == ExchangeFrame::kDone;
    json s = status_of(a.src->address());
    auto end = std::chrono::steady_clock::now() + 20s;
    while (!s["in_doubt"].empty() && std::chrono::steady_clock::now() < end) {
      std::this_thread::sleep_for(100ms);
      s = status_of(a.src->address());
    }
    ASSERT_TRUE(s["in_doubt"].empty()) << s.dump();
  } else {
    ASSERT_EQ(code, committed ? 0 : 1) << r.dump();
    if (committed) {
      EXPECT_TRUE(r.value("one_exchange", false)) << r.dump();
    }
  }
  expect_one_place(a, committed);
}

INSTANTIATE_TEST_SUITE_P(
    Connection, OneExchangeFaultMatrix,
    ::testing::Combine(
        ::testing::Values(Fault::kCut, Fault::kStall, Fault::kCorrupt),
        ::testing::Values(ExchangeFrame::kHello, ExchangeFrame::kCommit,
                          ExchangeFrame::kDone)),
    [](const ::testing::TestParamInfo<ExchangeCase>& info) {
      const ExchangeFrame at = std::get<1>(info.param);
      return fault_name(std::get<0>(info.param)) + "_" +
             (at == ExchangeFrame::kHello    ? "Hello"
              : at == ExchangeFrame::kCommit ? "Commit"
                                             : "Done");
    });

// A reset on the way, not the destination's close: the source sees its
// kept connection closed as the exchange goes out, asks, hears "no record",
// and sends the exchange again; the first exchange reaches the destination
// late, after that answer and before the resend. The answer fenced the id:
// the late exchange is refused (seen before), and the resend, which says
// it is one, commits. Every request is in one place.
TEST(OneExchangeFaultMatrix, ExchangeThatArrivesAfterTheQueryIsRefused) {
  char dir_tmpl[] = "/tmp/kvmig-late-XXXXXX";
  const std::string dir = mkdtemp(dir_tmpl);
  const std::string release = dir + "/release";
  ScopeExit cleanup([&] { std::filesystem::remove_all(dir); });
  ScopeExit let_go([&] { std::ofstream(release).put('\n'); });
  ExchangeAgents a;
  start_exchange_agents(a, {"--fault", "src.kept_retry=hold:" + release});
  LogsOnFailure logs({{"source", a.src.get()}, {"destination", a.dst.get()}});
  if (HasFatalFailure()) return;
  // HELLO, PAGES and COMMIT kept back; the source's side closed.
  a.proxy->arm_delay(kWarmUpToDestination + 1, 3, true);
  auto cli =
      Child::spawn({kvmig_bin(), "migrate", "--agent", a.src->address(), "--to",
                    a.proxy->address(), "--seqs", join(kMoved), "--json"});
  ASSERT_TRUE(cli);
  // Asked, "no record": about to connect again.
  ASSERT_TRUE(a.src->child().wait_for("reached src.kept_retry", 30s, true))
      << a.src->child().err();
  a.proxy->release_held();
  ASSERT_TRUE(a.dst->child().wait_for("seen before", 10s, true))
      << a.dst->child().err();
  std::ofstream(release).put('\n');
  ASSERT_TRUE(cli->wait_exit(30s));
  json r = json::parse(cli->out(), nullptr, false);
  ASSERT_TRUE(r.is_object()) << cli->out() << cli->err();
  EXPECT_EQ(cli->exit_code(), 0) << r.dump();
  EXPECT_TRUE(r.value("one_exchange", false)) << r.dump();
  expect_one_place(a, true);
}

// A stalled path: the exchange is held on the way and the source's side
// stays open. The source waits out its peer timeout for DONE, asks on a new
// connection, hears "no record" and rolls back: the requests run at the
// source again. Then the path heals and TCP delivers the exchange (here:
// once the source has closed its end, as a retransmission after a heal
// would). The destination refuses it, the query having fenced its id;
// before the fence it installed the requests, which then lived in two
// places.
TEST(OneExchangeFaultMatrix,
     ExchangeDeliveredAfterTheSourceRolledBackIsRefused) {
  ExchangeAgents a;
  start_exchange_agents(a);
  LogsOnFailure logs({{"source", a.src.get()}, {"destination", a.dst.get()}});
  if (HasFatalFailure()) return;
  a.proxy->arm_delay(kWarmUpToDestination + 1, 3, false);
  int code = -1;
  json r = migrate(a.src->address(), a.proxy->address(), kMoved, &code);
  ASSERT_EQ(code, 1) << r.dump();
  EXPECT_EQ(digests(status_of(a.src->address())), only(a.original, kMoved));
  a.proxy->release_held();
  // Its fate, either way: refused, or (without the fence) installed.
  auto end = std::chrono::steady_clock::now() + 10s;
  while (a.dst->child().err().find("seen before") == std::string::npos &&
         a.dst->child().err().find("installed 2 requests") ==
             std::string::npos &&
         std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_NE(a.dst->child().err().find("seen before"), std::string::npos)
      << a.dst->child().err();
  expect_one_place(a, false);
}

// --- in doubt while the engine runs -----------------------------------------

// The destination installs requests 1 and 2, then its DONE and every later
// connection stall: the move is in doubt while the source's engine keeps
// decoding. Requests 1 and 2 stop (they may already run at the
// destination), request 3 goes on. Once the network heals the source learns
// "committed" by itself and drops 1 and 2; the destination has them exactly
// as they were when they stopped.
TEST(InDoubt, HeldRequestsDoNotRunUntilSettled) {
  auto src = AgentProcess::start({"--capacity-pages", "256", "--populate",
                                  "3:40", "--seed", "11", "--decode-rate", "50",
                                  "--peer-timeout-ms", kPeerTimeoutMs});
  auto dst = AgentProcess::start(
      {"--capacity-pages", "256", "--peer-timeout-ms", kPeerTimeoutMs});
  LogsOnFailure logs({{"source", src.get()}, {"destination", dst.get()}});
  ASSERT_TRUE(src && dst);
  auto proxy = ControlProxy::start(dst->address());
  ASSERT_TRUE(proxy);
  // OFFER, then DONE: stalled.
  proxy->arm(ControlProxy::Dir::kToSource, 2, ControlProxy::Action::kStall);
  int code = -1;
  json r = migrate(src->address(), proxy->address(), kMoved, &code);
  ASSERT_EQ(code, 1) << r.dump();
  ASSERT_NE(r.value("error", "").find("in doubt"), std::string::npos)
      << r.dump();

  auto tokens = [](const json& status) {
    std::map<uint64_t, uint64_t> out;
    for (const auto& s : status["seqs"]) out[s["id"]] = s["tokens"];
    return out;
  };
  const json held = status_of(src->address());
  ASSERT_EQ(held["in_doubt"].size(), 1u) << held.dump();
  EXPECT_EQ(held["in_doubt"][0]["hold"], "seqs");
  // Proof that time passed with the engine decoding: request 3 grows by 5
  // tokens (polled), while the held ones do not grow at all.
  json later = status_of(src->address());
  const auto grown_until = std::chrono::steady_clock::now() + 20s;
  while (tokens(later)[3] < tokens(held)[3] + 5 &&
         std::chrono::steady_clock::now() < grown_until) {
    std::this_thread::sleep_for(20ms);
    later = status_of(src->address());
  }
  EXPECT_EQ(tokens(later)[1], tokens(held)[1]);
  EXPECT_EQ(tokens(later)[2], tokens(held)[2]);
  EXPECT_GT(tokens(later)[3], tokens(held)[3]);  // the engine runs

  proxy->heal();
  json s = later;
  auto end = std::chrono::steady_clock::now() + 20s;
  while (!s["in_doubt"].empty() && std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(100ms);
    s = status_of(src->address());
  }
  ASSERT_TRUE(s["in_doubt"].empty()) << s.dump();
  EXPECT_EQ(tokens(s).count(1) + tokens(s).count(2), 0u) << s.dump();
  EXPECT_EQ(tokens(s).count(3), 1u);
  EXPECT_EQ(digests(status_of(dst->address())), only(digests(held), kMoved));
}

// --- stale writes -----------------------------------------------------------

class StaleWrites : public ::testing::TestWithParam<std::string> {};

// The destination aborts a migration while the source is stalled mid-data,
// gives the slots back, and another migration fills them; then the stalled
// source wakes and writes the rest of its pages. None of those writes may
// land: the new requests' digests stay as they arrived.
TEST_P(StaleWrites, AnAbortedSourceCannotChangeReleasedSlots) {
  const std::string transport = GetParam();
  const std::string transports = "tcp," + transport;
  auto src = AgentProcess::start(
      {"--layout", "layer", "--capacity-pages", "64", "--populate", "3:40",
       "--seed", "11", "--transports", transports, "--peer-timeout-ms",
       kPeerTimeoutMs, "--fault", stall_at("src.data.mid", 3000)});
  auto dst =
      AgentProcess::start({"--capacity-pages", "64", "--transports", transports,
                           "--peer-timeout-ms", kPeerTimeoutMs});
  auto other =
      AgentProcess::start({"--capacity-pages", "64", "--populate", "3:40",
                           "--seed", "77", "--transports", transports});
  LogsOnFailure logs({{"source", src.get()},
                      {"destination", dst.get()},
                      {"other", other.get()}});
  ASSERT_TRUE(src && dst && other);
  auto proxy = ControlProxy::start(dst->address());
  ASSERT_TRUE(proxy);
  const json sb = status_of(src->address());
  const json db = status_of(dst->address());
  const json ob = status_of(other->address());
  const int64_t dst_free = db["free_pages"];

  auto cli = Child::spawn({kvmig_bin(), "migrate", "--agent", src->address(),
                           "--to", proxy->address(), "--all", "--transport",
                           transport, "--json"});
  ASSERT_TRUE(cli);
  ASSERT_TRUE(src->child().wait_for("reached src.data.mid", 30s, true));
  proxy->act(ControlProxy::Action::kCut);
  json d = wait_for_free_pages(dst->address(), dst_free, kSlow * 5s);
  ASSERT_EQ(d["free_pages"], dst_free) << dst->child().err();
  // Refill the released slots while the source still sleeps.
  CliResult refill =
      run_kvmig({"migrate", "--agent", other->address(), "--to", dst->address(),
                 "--all", "--transport", transport, "--json"});
  ASSERT_EQ(refill.code, 0) << refill.out << refill.err;
  ASSERT_FALSE(cli->wait_exit(0ms))
      << "the source finished before the slots were refilled";
  // The source wakes, writes the second half into revoked slots, fails.
  ASSERT_TRUE(cli->wait_exit(30s));
  EXPECT_EQ(cli->exit_code(), 1) << cli->out();
  json after = status_of(dst->address());
  EXPECT_EQ(digests(after), digests(ob)) << dst->child().err();
  EXPECT_EQ(after["free_pages"], dst_free - 9);
  // The source kept everything and can still move it elsewhere.
  json s = status_of(src->address());
  EXPECT_EQ(digests(s), digests(sb));
  EXPECT_EQ(s["free_pages"], sb["free_pages"]);
  json r = json::parse(
      run_kvmig({"migrate", "--agent", src->address(), "--to", other->address(),
                 "--all", "--transport", transport, "--json"})
          .out,
      nullptr, false);
  ASSERT_TRUE(r.is_object() && r["ok"].get<bool>()) << r.dump();
  json o = status_of(other->address());
  EXPECT_EQ(digests(o), digests(sb));
}

INSTANTIATE_TEST_SUITE_P(Transports, StaleWrites,
                         ::testing::ValuesIn(data_transports()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace kvmig::testing
