// EtcdClient against a real etcd (tests/cluster/etcd_server.h), one fresh
// server per test.
#include "etcd_client.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cluster/etcd_server.h"
#include "testutil.h"

namespace kvmig {
namespace {

using namespace std::chrono_literals;
using testing::EtcdServer;
using testing::eventually;
using testing::free_loopback_port;
using Clock = std::chrono::steady_clock;

// What a watch delivered, for the test thread to wait on.
class Recorder {
 public:
  EtcdClient::EventsFn events_fn() {
    return [this](const std::vector<EtcdWatchEvent>& batch) {
      std::lock_guard lock(mu_);
      for (const auto& e : batch) events_.push_back(e);
      ++batches_;
      cv_.notify_all();
    };
  }
  EtcdClient::ErrorFn error_fn() {
    return [this](const Status& s) {
      std::lock_guard lock(mu_);
      errors_.push_back(s);
      cv_.notify_all();
    };
  }
  // Waits until at least n events arrived; a copy of them all.
  std::vector<EtcdWatchEvent> wait_events(size_t n,
                                          std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, limit, [&] { return events_.size() >= n; });
    return events_;
  }
  std::vector<Status> wait_errors(size_t n, std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, limit, [&] { return errors_.size() >= n; });
    return errors_;
  }
  std::vector<EtcdWatchEvent> events() {
    std::lock_guard lock(mu_);
    return events_;
  }
  size_t callbacks() {
    std::lock_guard lock(mu_);
    return batches_ + errors_.size();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<EtcdWatchEvent> events_;
  std::vector<Status> errors_;
  size_t batches_ = 0;
};

class EtcdClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    KVMIG_REQUIRE_ETCD();
    etcd_ = EtcdServer::start();
    ASSERT_NE(etcd_, nullptr);
    auto c = EtcdClient::create(EtcdOptions{{etcd_->endpoint()}, 2s});
    ASSERT_OK(c);
    client_ = std::move(c).value();
  }

  // Compacts etcd's history up to rev with etcdctl (next to etcd).
  void compact(int64_t rev) {
    std::string etcdctl = testing::etcd_binary();
    etcdctl = etcdctl.substr(0, etcdctl.rfind('/') + 1) + "etcdctl";
    if (::access(etcdctl.c_str(), X_OK) != 0) {
      GTEST_SKIP() << "etcdctl is not installed next to etcd";
    }
    const std::string cmd = "ETCDCTL_API=3 " + etcdctl +
                            " --endpoints=" + etcd_->endpoint() + " compact " +
                            std::to_string(rev) + " >/dev/null";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  }

  std::unique_ptr<EtcdServer> etcd_;
  std::unique_ptr<EtcdClient> client_;
};

TEST_F(EtcdClientTest, PutGetDelete) {
  ASSERT_OK_AND_ASSIGN(int64_t r1, client_->put("k", "v1"));
  ASSERT_OK_AND_ASSIGN(int64_t r2, client_->put("k", "v2"));
  EXPECT_GT(r1, 0);
  EXPECT_EQ(r2, r1 + 1);

  ASSERT_OK_AND_ASSIGN(auto kv, client_->get("k"));
  ASSERT_TRUE(kv.has_value());
  EXPECT_EQ(kv->key, "k");
  EXPECT_EQ(kv->value, "v2");
  EXPECT_EQ(kv->create_revision, r1);
  EXPECT_EQ(kv->mod_revision, r2);
  EXPECT_EQ(kv->version, 2);
  EXPECT_EQ(kv->lease, 0);

  ASSERT_OK_AND_ASSIGN(auto missing, client_->get("nope"));
  EXPECT_FALSE(missing.has_value());

  ASSERT_OK_AND_ASSIGN(int64_t deleted, client_->del("k"));
  EXPECT_EQ(deleted, 1);
  ASSERT_OK_AND_ASSIGN(deleted, client_->del("k"));
  EXPECT_EQ(deleted, 0);
  ASSERT_OK_AND_ASSIGN(kv, client_->get("k"));
  EXPECT_FALSE(kv.has_value());

  // An empty value is a value, not a missing one.
  ASSERT_OK(client_->put("empty", ""));
  ASSERT_OK_AND_ASSIGN(kv, client_->get("empty"));
  ASSERT_TRUE(kv.has_value());
  EXPECT_EQ(kv->value, "");
}

TEST_F(EtcdClientTest, GetPrefixInKeyOrderAndOnlyThePrefix) {
  ASSERT_OK(client_->put("p/b", "2"));
  ASSERT_OK(client_->put("p/a", "1"));
  ASSERT_OK(client_->put("p/c/d", "3"));
  ASSERT_OK(client_->put("p", "no: the prefix itself without slash"));
  ASSERT_OK(client_->put("q/a", "no"));
  ASSERT_OK(client_->put("p0", "no"));
  ASSERT_OK_AND_ASSIGN(int64_t last, client_->put("o/z", "no"));

  ASSERT_OK_AND_ASSIGN(EtcdRangeResult r, client_->get_prefix("p/"));
  ASSERT_EQ(r.kvs.size(), 3u);
  EXPECT_EQ(r.kvs[0].key, "p/a");
  EXPECT_EQ(r.kvs[1].key, "p/b");
  EXPECT_EQ(r.kvs[2].key, "p/c/d");
  EXPECT_EQ(r.kvs[2].value, "3");
  EXPECT_EQ(r.revision, last);

  ASSERT_OK_AND_ASSIGN(r, client_->get_prefix("none/"));
  EXPECT_TRUE(r.kvs.empty());
  EXPECT_EQ(r.revision, last);

  // "" is every key.
  ASSERT_OK_AND_ASSIGN(r, client_->get_prefix(""));
  EXPECT_EQ(r.kvs.size(), 7u);
}

TEST_F(EtcdClientTest, RevisionsAndLeaseIdsAreFullInt64) {
  // Lease ids are above 2^53: they only survive as strings, not doubles.
  ASSERT_OK_AND_ASSIGN(int64_t lease, client_->lease_grant(60));
  EXPECT_NE(lease, 0);
  ASSERT_OK_AND_ASSIGN(int64_t rev, client_->put("leased", "v", lease));
  ASSERT_OK_AND_ASSIGN(auto kv, client_->get("leased"));
  ASSERT_TRUE(kv.has_value());
  EXPECT_EQ(kv->lease, lease);
  EXPECT_EQ(kv->mod_revision, rev);
  int64_t prev = rev;
  for (int i = 0; i < 5; ++i) {
    ASSERT_OK_AND_ASSIGN(int64_t r, client_->put("leased", "v", lease));
    EXPECT_EQ(r, prev + 1);
    prev = r;
  }
}

TEST_F(EtcdClientTest, BinaryAndUnicodeRoundTrip) {
  std::string all_bytes;
  for (int i = 0; i < 256; ++i) all_bytes += static_cast<char>(i);
  const std::string binary_key = std::string("bin/\0\x01\xfe\xff", 8);
  const std::string unicode_key = "uni/ключ/🔑";
  const std::string unicode_value = "значение ✓ \"quoted\" \\ \n\t";
  ASSERT_OK(client_->put(binary_key, all_bytes));
  ASSERT_OK(client_->put(unicode_key, unicode_value));

  ASSERT_OK_AND_ASSIGN(auto kv, client_->get(binary_key));
  ASSERT_TRUE(kv.has_value());
  EXPECT_EQ(kv->key, binary_key);
  EXPECT_EQ(kv->value, all_bytes);
  ASSERT_OK_AND_ASSIGN(kv, client_->get(unicode_key));
  ASSERT_TRUE(kv.has_value());
  EXPECT_EQ(kv->value, unicode_value);

  // Every base64 padding length.
  for (size_t n = 0; n < 8; ++n) {
    const std::string k = "len/" + std::string(n, '\xff');
    ASSERT_OK(client_->put(k, std::string(n, '\x80')));
    ASSERT_OK_AND_ASSIGN(kv, client_->get(k));
    ASSERT_TRUE(kv.has_value());
    EXPECT_EQ(kv->value, std::string(n, '\x80'));
  }

  // A prefix ending in 0xff bytes.
  ASSERT_OK(client_->put(std::string("ff\xff\xff/a", 5), "1"));
  ASSERT_OK(client_->put(std::string("ff\xff\xff", 4), "2"));
  ASSERT_OK(client_->put("fg", "no"));
  ASSERT_OK_AND_ASSIGN(EtcdRangeResult r,
                       client_->get_prefix(std::string("ff\xff", 3)));
  ASSERT_EQ(r.kvs.size(), 2u);
  EXPECT_EQ(r.kvs[0].key, std::string("ff\xff\xff", 4));
  EXPECT_EQ(r.kvs[1].key, std::string("ff\xff\xff/a", 5));
}

TEST_F(EtcdClientTest, LeaseKeepaliveAndExpiry) {
  ASSERT_OK_AND_ASSIGN(int64_t lease, client_->lease_grant(2));
  ASSERT_OK(client_->put("ttl/k", "v", lease));
  ASSERT_OK_AND_ASSIGN(int64_t ttl, client_->lease_keepalive(lease));
  EXPECT_GT(ttl, 0);
  EXPECT_LE(ttl, 2);
  // No more keepalives: the key goes with the lease.
  bool gone = eventually(
      [&] {
        auto kv = client_->get("ttl/k");
        return kv.ok() && !kv->has_value();
      },
      15s);
  EXPECT_TRUE(gone);
  auto after = client_->lease_keepalive(lease);
  EXPECT_EQ(after.status().code(), StatusCode::kNotFound)
      << after.status().to_string();
}

TEST_F(EtcdClientTest, LeaseRevokeDeletesAttachedKeys) {
  ASSERT_OK_AND_ASSIGN(int64_t lease, client_->lease_grant(60));
  ASSERT_OK(client_->put("r/a", "1", lease));
  ASSERT_OK(client_->put("r/b", "2", lease));
  ASSERT_OK(client_->put("r/c", "3"));
  ASSERT_OK(client_->lease_revoke(lease));
  ASSERT_OK_AND_ASSIGN(EtcdRangeResult r, client_->get_prefix("r/"));
  ASSERT_EQ(r.kvs.size(), 1u);
  EXPECT_EQ(r.kvs[0].key, "r/c");

  auto keepalive = client_->lease_keepalive(lease);
  EXPECT_EQ(keepalive.status().code(), StatusCode::kNotFound)
      << keepalive.status().to_string();
  Status again = client_->lease_revoke(lease);
  EXPECT_EQ(again.code(), StatusCode::kNotFound) << again.to_string();
  // A put on a gone lease is etcd's error, passed through.
  auto put = client_->put("r/d", "4", lease);
  EXPECT_EQ(put.status().code(), StatusCode::kNotFound)
      << put.status().to_string();
  EXPECT_NE(put.status().message().find("etcd " + etcd_->endpoint() + " put"),
            std::string::npos)
      << put.status().message();

  EXPECT_EQ(client_->lease_grant(0).status().code(),
            StatusCode::kInvalidArgument);
}

TEST_F(EtcdClientTest, TxnCreateIfAbsentSucceedsOnce) {
  const std::vector<EtcdCompare> absent = {
      {"lock", EtcdCompare::Target::kCreateRevision, 0, ""}};
  const std::vector<EtcdOp> take = {{EtcdOp::Kind::kPut, "lock", "me", 0},
                                    {EtcdOp::Kind::kGet, "lock", "", 0}};
  const std::vector<EtcdOp> look = {{EtcdOp::Kind::kGet, "lock", "", 0},
                                    {EtcdOp::Kind::kGet, "other", "", 0}};
  ASSERT_OK_AND_ASSIGN(EtcdTxnResult first, client_->txn(absent, take, look));
  EXPECT_TRUE(first.succeeded);
  ASSERT_EQ(first.gets.size(), 1u);
  ASSERT_EQ(first.gets[0].size(), 1u);
  EXPECT_EQ(first.gets[0][0].value, "me");
  EXPECT_EQ(first.gets[0][0].mod_revision, first.revision);

  const std::vector<EtcdOp> take_you = {{EtcdOp::Kind::kPut, "lock", "you", 0}};
  ASSERT_OK_AND_ASSIGN(EtcdTxnResult second,
                       client_->txn(absent, take_you, look));
  EXPECT_FALSE(second.succeeded);
  EXPECT_EQ(second.revision, first.revision);  // nothing written
  ASSERT_EQ(second.gets.size(), 2u);
  ASSERT_EQ(second.gets[0].size(), 1u);
  EXPECT_EQ(second.gets[0][0].value, "me");
  EXPECT_TRUE(second.gets[1].empty());

  // A value compare, and a delete in a branch.
  const std::vector<EtcdCompare> mine = {
      {"lock", EtcdCompare::Target::kValue, 0, "me"}};
  const std::vector<EtcdOp> release = {{EtcdOp::Kind::kDelete, "lock", "", 0}};
  ASSERT_OK_AND_ASSIGN(EtcdTxnResult released, client_->txn(mine, release));
  EXPECT_TRUE(released.succeeded);
  EXPECT_TRUE(released.gets.empty());
  ASSERT_OK_AND_ASSIGN(auto kv, client_->get("lock"));
  EXPECT_FALSE(kv.has_value());
}

TEST_F(EtcdClientTest, TxnModRevisionCompareAndSwap) {
  ASSERT_OK_AND_ASSIGN(int64_t rev, client_->put("cas", "1"));
  const std::vector<EtcdOp> set2 = {{EtcdOp::Kind::kPut, "cas", "2", 0}};
  ASSERT_OK_AND_ASSIGN(
      EtcdTxnResult ok,
      client_->txn({{"cas", EtcdCompare::Target::kModRevision, rev, ""}},
                   set2));
  EXPECT_TRUE(ok.succeeded);
  EXPECT_EQ(ok.revision, rev + 1);
  // The same stale revision again loses.
  const std::vector<EtcdOp> set3 = {{EtcdOp::Kind::kPut, "cas", "3", 0}};
  const std::vector<EtcdOp> read = {{EtcdOp::Kind::kGet, "cas", "", 0}};
  ASSERT_OK_AND_ASSIGN(
      EtcdTxnResult stale,
      client_->txn({{"cas", EtcdCompare::Target::kModRevision, rev, ""}}, set3,
                   read));
  EXPECT_FALSE(stale.succeeded);
  ASSERT_EQ(stale.gets.size(), 1u);
  ASSERT_EQ(stale.gets[0].size(), 1u);
  EXPECT_EQ(stale.gets[0][0].value, "2");
  EXPECT_EQ(stale.gets[0][0].mod_revision, rev + 1);

  // A put with a lease inside a txn.
  ASSERT_OK_AND_ASSIGN(int64_t lease, client_->lease_grant(60));
  const std::vector<EtcdOp> leased = {{EtcdOp::Kind::kPut, "cas", "4", lease}};
  ASSERT_OK_AND_ASSIGN(
      EtcdTxnResult with_lease,
      client_->txn({{"cas", EtcdCompare::Target::kModRevision, rev + 1, ""}},
                   leased));
  EXPECT_TRUE(with_lease.succeeded);
  ASSERT_OK_AND_ASSIGN(auto kv, client_->get("cas"));
  ASSERT_TRUE(kv.has_value());
  EXPECT_EQ(kv->lease, lease);

  // etcd's own rejection (a key twice in one txn) is InvalidArgument.
  const std::vector<EtcdOp> twice = {{EtcdOp::Kind::kPut, "dup", "1", 0},
                                     {EtcdOp::Kind::kPut, "dup", "2", 0}};
  auto dup = client_->txn({}, twice);
  EXPECT_EQ(dup.status().code(), StatusCode::kInvalidArgument)
      << dup.status().to_string();
}

TEST_F(EtcdClientTest, WatchPrefixDeliversPutsAndDeletesInOrder) {
  ASSERT_OK_AND_ASSIGN(int64_t before, client_->put("w/old", "0"));
  Recorder rec;
  ASSERT_OK_AND_ASSIGN(
      auto watch,
      client_->watch_prefix("w/", 0, rec.events_fn(), rec.error_fn()));
  ASSERT_OK_AND_ASSIGN(int64_t r1, client_->put("w/a", "1"));
  ASSERT_OK(client_->put("x/a", "not watched"));
  ASSERT_OK(client_->put("w", "not under w/"));
  ASSERT_OK_AND_ASSIGN(int64_t r2, client_->put("w/b", "2"));
  ASSERT_OK(client_->del("w/a"));
  ASSERT_OK_AND_ASSIGN(int64_t r4, client_->put("w/a", "3"));
  auto events = rec.wait_events(4, 10s);
  ASSERT_EQ(events.size(), 4u);
  EXPECT_GT(r1, before);
  EXPECT_EQ(events[0].type, EtcdWatchEvent::Type::kPut);
  EXPECT_EQ(events[0].kv.key, "w/a");
  EXPECT_EQ(events[0].kv.value, "1");
  EXPECT_EQ(events[0].kv.mod_revision, r1);
  EXPECT_EQ(events[1].kv.key, "w/b");
  EXPECT_EQ(events[1].kv.mod_revision, r2);
  EXPECT_EQ(events[2].type, EtcdWatchEvent::Type::kDelete);
  EXPECT_EQ(events[2].kv.key, "w/a");
  EXPECT_EQ(events[2].kv.mod_revision, r2 + 1);
  EXPECT_EQ(events[3].type, EtcdWatchEvent::Type::kPut);
  EXPECT_EQ(events[3].kv.value, "3");
  EXPECT_EQ(events[3].kv.mod_revision, r4);
  EXPECT_EQ(events[3].kv.create_revision, r4);
  EXPECT_TRUE(rec.wait_errors(0, 0ms).empty());
}

TEST_F(EtcdClientTest, WatchFromStartRevisionReplaysHistory) {
  ASSERT_OK(client_->put("h/a", "1"));
  ASSERT_OK_AND_ASSIGN(int64_t from, client_->put("h/b", "2"));
  ASSERT_OK(client_->put("h/c", "3"));
  ASSERT_OK(client_->del("h/b"));
  Recorder rec;
  ASSERT_OK_AND_ASSIGN(
      auto watch,
      client_->watch_prefix("h/", from, rec.events_fn(), rec.error_fn()));
  ASSERT_OK(client_->put("h/d", "4"));
  auto events = rec.wait_events(4, 10s);
  ASSERT_EQ(events.size(), 4u);
  EXPECT_EQ(events[0].kv.key, "h/b");
  EXPECT_EQ(events[0].kv.mod_revision, from);
  EXPECT_EQ(events[1].kv.key, "h/c");
  EXPECT_EQ(events[2].type, EtcdWatchEvent::Type::kDelete);
  EXPECT_EQ(events[3].kv.key, "h/d");
  for (size_t i = 1; i < events.size(); ++i) {
    EXPECT_LT(events[i - 1].kv.mod_revision, events[i].kv.mod_revision);
  }
}

// The read-then-watch pattern: the watch starts at a revision not written
// yet (which a range at that revision calls "future").
TEST_F(EtcdClientTest, WatchFromTheRevisionAfterARead) {
  ASSERT_OK(client_->put("n/a", "1"));
  ASSERT_OK_AND_ASSIGN(EtcdRangeResult r, client_->get_prefix("n/"));
  Recorder rec;
  ASSERT_OK_AND_ASSIGN(
      auto watch, client_->watch_prefix("n/", r.revision + 1, rec.events_fn(),
                                        rec.error_fn()));
  ASSERT_OK_AND_ASSIGN(int64_t rev, client_->put("n/b", "2"));
  auto events = rec.wait_events(1, 10s);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kv.key, "n/b");
  EXPECT_EQ(events[0].kv.mod_revision, rev);
  EXPECT_EQ(rev, r.revision + 1);
  // Far in the future is fine too.
  ASSERT_OK(client_->watch_prefix("n/", r.revision + 1000, rec.events_fn(),
                                  rec.error_fn()));
}

TEST_F(EtcdClientTest, WatchSurvivesEtcdKillAndRestart) {
  Recorder rec;
  ASSERT_OK_AND_ASSIGN(
      auto watch,
      client_->watch_prefix("s/", 0, rec.events_fn(), rec.error_fn()));
  ASSERT_OK(client_->put("s/1", "before"));
  ASSERT_EQ(rec.wait_events(1, 10s).size(), 1u);

  etcd_->kill();
  auto errors = rec.wait_errors(1, 10s);
  ASSERT_GE(errors.size(), 1u);
  EXPECT_EQ(errors[0].code(), StatusCode::kUnavailable)
      << errors[0].to_string();
  EXPECT_EQ(
      errors[0].message().rfind("etcd " + etcd_->endpoint() + " watch: ", 0),
      0u)
      << errors[0].message();

  ASSERT_TRUE(etcd_->restart());
  // The client's kept-alive connection is stale: it reconnects by itself.
  ASSERT_OK(client_->put("s/2", "after"));
  ASSERT_OK(client_->put("t/2", "not watched"));
  ASSERT_OK(client_->put("s/3", "after"));
  auto events = rec.wait_events(3, 15s);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[0].kv.key, "s/1");
  EXPECT_EQ(events[1].kv.key, "s/2");
  EXPECT_EQ(events[2].kv.key, "s/3");
}

TEST_F(EtcdClientTest, WatchResumesWithoutLosingEventsMissedWhileDown) {
  Recorder rec;
  ASSERT_OK_AND_ASSIGN(
      auto watch,
      client_->watch_prefix("m/", 0, rec.events_fn(), rec.error_fn()));
  ASSERT_OK(client_->put("m/1", "a"));
  ASSERT_EQ(rec.wait_events(1, 10s).size(), 1u);
  // Written by a second client while the watch's connection is being cut:
  // stop etcd, restart it, write at once; the watch resumes from m/1 + 1.
  etcd_->kill();
  ASSERT_TRUE(etcd_->restart());
  ASSERT_OK(client_->put("m/2", "b"));
  ASSERT_OK(client_->put("m/3", "c"));
  auto events = rec.wait_events(3, 15s);
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[1].kv.key, "m/2");
  EXPECT_EQ(events[2].kv.key, "m/3");
}

TEST_F(EtcdClientTest, WatchOfCompactedRevisionIsOutOfRange) {
  ASSERT_OK_AND_ASSIGN(int64_t first, client_->put("c/a", "1"));
  ASSERT_OK(client_->put("c/a", "2"));
  ASSERT_OK_AND_ASSIGN(int64_t last, client_->put("c/a", "3"));
  compact(last);
  if (HasFatalFailure() || IsSkipped()) return;
  Recorder rec;
  auto watch =
      client_->watch_prefix("c/", first, rec.events_fn(), rec.error_fn());
  EXPECT_EQ(watch.status().code(), StatusCode::kOutOfRange)
      << watch.status().to_string();
}

TEST_F(EtcdClientTest, WatchStopsWithOutOfRangeWhenCompactedWhileAway) {
  Recorder rec;
  ASSERT_OK_AND_ASSIGN(
      auto watch,
      client_->watch_prefix("c/", 0, rec.events_fn(), rec.error_fn()));
  ASSERT_OK(client_->put("c/a", "1"));
  ASSERT_EQ(rec.wait_events(1, 10s).size(), 1u);
  // Revisions the watch never saw (other keys), then compacted: resuming
  // after c/a must fail.
  ASSERT_OK(client_->put("other", "1"));
  ASSERT_OK_AND_ASSIGN(int64_t last, client_->put("other", "2"));
  compact(last);
  if (HasFatalFailure() || IsSkipped()) return;
  etcd_->kill();
  ASSERT_TRUE(etcd_->restart());
  bool out_of_range = eventually(
      [&] {
        for (const Status& s : rec.wait_errors(0, 0ms)) {
          if (s.code() == StatusCode::kOutOfRange) return true;
        }
        return false;
      },
      15s);
  ASSERT_TRUE(out_of_range);
  // Stopped: later changes are not delivered, nothing else is reported.
  const size_t callbacks = rec.callbacks();
  ASSERT_OK(client_->put("c/b", "2"));
  std::this_thread::sleep_for(300ms);  // a negative check: nothing may come
  EXPECT_EQ(rec.callbacks(), callbacks);
  EXPECT_EQ(rec.events().size(), 1u);
}

TEST_F(EtcdClientTest, WatchDestructorIsPromptWhileEtcdIsDown) {
  std::atomic<bool> destroyed{false};
  std::atomic<int> late_callbacks{0};
  auto on_error = [&](const Status&) {
    if (destroyed) ++late_callbacks;
  };
  auto on_events = [&](const std::vector<EtcdWatchEvent>&) {
    if (destroyed) ++late_callbacks;
  };
  ASSERT_OK_AND_ASSIGN(auto watch,
                       client_->watch_prefix("d/", 0, on_events, on_error));
  etcd_->kill();
  std::this_thread::sleep_for(200ms);  // let it reach its backoff loop
  const auto t0 = Clock::now();
  watch.reset();
  destroyed = true;
  EXPECT_LT(Clock::now() - t0, 500ms);
  EXPECT_EQ(late_callbacks.load(), 0);
}

TEST_F(EtcdClientTest, WatchDestructorIsPromptWhileStreaming) {
  Recorder rec;
  ASSERT_OK_AND_ASSIGN(
      auto watch,
      client_->watch_prefix("d/", 0, rec.events_fn(), rec.error_fn()));
  const auto t0 = Clock::now();
  watch.reset();
  EXPECT_LT(Clock::now() - t0, 500ms);
  EXPECT_EQ(rec.callbacks(), 0u);
}

TEST_F(EtcdClientTest, KeptAliveConnectionIsReused) {
  const uint64_t before = client_->requests_sent();
  for (int i = 0; i < 20; ++i) ASSERT_OK(client_->put("ka", "v"));
  EXPECT_EQ(client_->requests_sent(), before + 20);
}

TEST_F(EtcdClientTest, ConcurrentCallsAreSerialized) {
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 25; ++i) {
        const std::string key =
            "conc/" + std::to_string(t) + "/" + std::to_string(i);
        if (!client_->put(key, key).ok()) ++failures;
        auto kv = client_->get(key);
        if (!kv.ok() || !kv->has_value() || (*kv)->value != key) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  ASSERT_OK_AND_ASSIGN(EtcdRangeResult r, client_->get_prefix("conc/"));
  EXPECT_EQ(r.kvs.size(), 100u);
}

TEST_F(EtcdClientTest, FailsOverFromADeadEndpoint) {
  const std::string dead = "127.0.0.1:" + std::to_string(free_loopback_port());
  ASSERT_OK_AND_ASSIGN(
      auto client, EtcdClient::create(
                       EtcdOptions{{dead, "http://" + etcd_->endpoint()}, 2s}));
  ASSERT_OK(client->put("f", "1"));
  EXPECT_EQ(client->requests_sent(), 1u);  // a refused connect sends nothing
  // Later calls start at the endpoint that answered.
  ASSERT_OK_AND_ASSIGN(auto kv, client->get("f"));
  ASSERT_TRUE(kv.has_value());
  EXPECT_EQ(client->requests_sent(), 2u);
  // A watch fails over too.
  Recorder rec;
  ASSERT_OK_AND_ASSIGN(auto watch, client->watch_prefix("f", 0, rec.events_fn(),
                                                        rec.error_fn()));
  ASSERT_OK(client->put("f", "2"));
  EXPECT_EQ(rec.wait_events(1, 10s).size(), 1u);
}

TEST(EtcdClientNoServerTest, AllEndpointsDeadIsUnavailableQuickly) {
  const std::string a = "127.0.0.1:" + std::to_string(free_loopback_port());
  const std::string b = "127.0.0.1:" + std::to_string(free_loopback_port());
  ASSERT_OK_AND_ASSIGN(auto client,
                       EtcdClient::create(EtcdOptions{{a, b}, 2s}));
  const auto t0 = Clock::now();
  auto put = client->put("k", "v");
  EXPECT_LT(Clock::now() - t0, 1s);
  EXPECT_EQ(put.status().code(), StatusCode::kUnavailable)
      << put.status().to_string();
  EXPECT_NE(put.status().message().find("etcd " + a + " put"),
            std::string::npos)
      << put.status().message();
  EXPECT_NE(put.status().message().find("etcd " + b + " put"),
            std::string::npos)
      << put.status().message();

  Recorder rec;
  auto watch = client->watch_prefix("", 0, rec.events_fn(), rec.error_fn());
  EXPECT_EQ(watch.status().code(), StatusCode::kUnavailable)
      << watch.status().to_string();
  EXPECT_EQ(rec.callbacks(), 0u);

  ASSERT_OK_AND_ASSIGN(auto one, EtcdClient::create(EtcdOptions{{a}, 2s}));
  auto get = one->get("k");
  EXPECT_EQ(get.status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(get.status().message().rfind("etcd " + a + " get: connect: ", 0),
            0u)
      << get.status().message();
}

// A listening socket that never accepts: connects succeed (the kernel
// completes them), requests are never answered.
class SilentServer {
 public:
  SilentServer() {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof sa;
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0 &&
        ::listen(fd_, 16) == 0 &&
        ::getsockname(fd_, reinterpret_cast<sockaddr*>(&sa), &len) == 0) {
      endpoint_ = "127.0.0.1:" + std::to_string(ntohs(sa.sin_port));
    }
  }
  ~SilentServer() { ::close(fd_); }
  const std::string& endpoint() const { return endpoint_; }

 private:
  int fd_ = -1;
  std::string endpoint_;
};

TEST(EtcdClientNoServerTest, SilentEndpointIsDeadlineExceeded) {
  SilentServer silent;
  ASSERT_FALSE(silent.endpoint().empty());
  ASSERT_OK_AND_ASSIGN(
      auto client, EtcdClient::create(EtcdOptions{{silent.endpoint()}, 300ms}));
  for (int i = 0; i < 2; ++i) {  // and again on the half-used connection
    const auto t0 = Clock::now();
    auto put = client->put("k", "v");
    const auto took = Clock::now() - t0;
    EXPECT_EQ(put.status().code(), StatusCode::kDeadlineExceeded)
        << put.status().to_string();
    EXPECT_GE(took, 290ms);
    EXPECT_LT(took, 300ms + 700ms);
    EXPECT_NE(put.status().message().find("etcd " + silent.endpoint() + " put"),
              std::string::npos)
        << put.status().message();
  }
  // A watch's creation has the same deadline.
  Recorder rec;
  const auto t0 = Clock::now();
  auto watch = client->watch_prefix("w", 0, rec.events_fn(), rec.error_fn());
  EXPECT_EQ(watch.status().code(), StatusCode::kDeadlineExceeded)
      << watch.status().to_string();
  EXPECT_LT(Clock::now() - t0, 300ms + 700ms);
}

TEST(EtcdClientNoServerTest, SilentThenDeadIsBoundedByTheTimeout) {
  SilentServer silent;
  const std::string dead = "127.0.0.1:" + std::to_string(free_loopback_port());
  ASSERT_OK_AND_ASSIGN(auto client, EtcdClient::create(EtcdOptions{
                                        {silent.endpoint(), dead}, 300ms}));
  const auto t0 = Clock::now();
  auto get = client->get("k");
  EXPECT_LT(Clock::now() - t0, 300ms + 700ms);
  EXPECT_EQ(get.status().code(), StatusCode::kDeadlineExceeded)
      << get.status().to_string();
}

TEST(EtcdClientNoServerTest, MalformedEndpointsAreInvalidArgument) {
  const std::vector<std::string> bad = {
      "",          "localhost",     "http://:2379", "127.0.0.1:",
      "1.2.3.4:0", "1.2.3.4:65536", "1.2.3.4:12ab", "https://127.0.0.1:2379",
      "unix://x",  "a b:1",         "h:1/v3/kv",    "[::1:2379",
      "[zz]:1",    "::1:2379",
  };
  for (const std::string& ep : bad) {
    auto c = EtcdClient::create(EtcdOptions{{"127.0.0.1:2379", ep}, 1s});
    EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << ep;
  }
  EXPECT_EQ(EtcdClient::create(EtcdOptions{{}, 1s}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(
      EtcdClient::create(EtcdOptions{{"127.0.0.1:2379"}, 0ms}).status().code(),
      StatusCode::kInvalidArgument);
  for (const std::string ep :
       {"127.0.0.1:2379", "http://127.0.0.1:2379", "http://127.0.0.1:2379/",
        "localhost:2379", "[::1]:2379", "etcd-0.etcd.svc:2379"}) {
    auto c = EtcdClient::create(EtcdOptions{{ep}, 1s});
    EXPECT_TRUE(c.ok()) << ep << ": " << c.status().to_string();
  }
}

}  // namespace
}  // namespace kvmig
