#include "kept_channels.h"

#include <gtest/gtest.h>
#include <sys/socket.h>

#include <array>
#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

// KeptChannels over real loopback connections: what is taken is what was
// put, newest first, per peer; a connection its peer closed, one past its
// idle time, one beyond the per-peer bound and anything put while keeping
// is off are closed, never handed out; the timer closes each at the end of
// its idle time, and a sweep what its peer closed.
namespace kvmig {
namespace {

using namespace std::chrono_literals;

class KeptChannelsTest : public ::testing::Test {
 protected:
  // A connected pair: the kept end (a channel) and the peer's socket.
  std::pair<FrameChannel, asio::ip::tcp::socket> pair() {
    asio::ip::tcp::socket client(io_);
    client.connect(acceptor_.local_endpoint());
    asio::ip::tcp::socket server = acceptor_.accept();
    return {FrameChannel(std::move(client), 1 << 20), std::move(server)};
  }

  // Puts three new connections, the i-th under peers[i], and returns
  // their peers' ends in that order.
  std::vector<asio::ip::tcp::socket> put_three(
      KeptChannels& kept, const std::array<std::string, 3>& peers) {
    std::vector<asio::ip::tcp::socket> ends;
    for (const std::string& peer : peers) {
      auto [c, s] = pair();
      kept.put(peer, std::move(c));
      ends.push_back(std::move(s));
    }
    return ends;
  }

  // Polls (up to 5 s) until the socket reads end of stream: its peer
  // closed. False if it never did.
  static bool sees_close(asio::ip::tcp::socket& s) {
    const auto until = Clock::now() + 5s;
    while (Clock::now() < until) {
      char byte = 0;
      const ssize_t n =
          ::recv(s.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
      if (n == 0) return true;
      std::this_thread::sleep_for(1ms);
    }
    return false;
  }

  asio::io_context io_;
  asio::ip::tcp::acceptor acceptor_{io_,
                                    {asio::ip::make_address("127.0.0.1"), 0}};
};

TEST_F(KeptChannelsTest, TakesWhatWasPutNewestFirstPerPeer) {
  KeptChannels kept(io_, 4, 60s);
  auto ends = put_three(kept, {"a:1", "a:1", "b:2"});
  EXPECT_EQ(kept.size(), 3u);
  EXPECT_FALSE(kept.take("c:3"));
  auto t = kept.take("a:1");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->channel.socket().local_endpoint(), ends[1].remote_endpoint());
  t = kept.take("a:1");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->channel.socket().local_endpoint(), ends[0].remote_endpoint());
  EXPECT_FALSE(kept.take("a:1"));
  EXPECT_TRUE(kept.take("b:2"));
  EXPECT_EQ(kept.size(), 0u);
}

TEST_F(KeptChannelsTest, AConnectionItsPeerClosedIsNotTaken) {
  KeptChannels kept(io_, 4, 60s);
  auto [c, s] = pair();
  s.close();
  // Wait for the close to reach this end (a peek, consuming nothing).
  const auto until = Clock::now() + 5s;
  while (!c.peer_closed() && Clock::now() < until) {
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_TRUE(c.peer_closed());
  kept.put("a:1", std::move(c));
  EXPECT_FALSE(kept.take("a:1"));
  EXPECT_EQ(kept.size(), 0u);
}

TEST_F(KeptChannelsTest, BeyondThePerPeerBoundTheOldestIsClosed) {
  KeptChannels kept(io_, 2, 60s);
  auto ends = put_three(kept, {"a:1", "a:1", "a:1"});
  EXPECT_EQ(kept.size(), 2u);
  EXPECT_TRUE(sees_close(ends[0]));  // its peer (the kept end) closed it
  EXPECT_TRUE(kept.take("a:1"));
  EXPECT_TRUE(kept.take("a:1"));
  EXPECT_FALSE(kept.take("a:1"));
}

TEST_F(KeptChannelsTest, PastItsIdleTimeAConnectionIsClosed) {
  KeptChannels kept(io_, 4, 20ms);
  auto [c, s] = pair();
  kept.put("a:1", std::move(c));
  std::this_thread::sleep_for(40ms);  // the idle time passing is the input
  EXPECT_FALSE(kept.take("a:1"));
  EXPECT_TRUE(sees_close(s));
}

TEST_F(KeptChannelsTest, TheTimerClosesEachAtTheEndOfItsIdleTime) {
  KeptChannels kept(io_, 4, 50ms);
  auto first = put_three(kept, {"a:1", "b:2", "a:1"});
  std::this_thread::sleep_for(20ms);
  auto [c, s] = pair();
  kept.put("c:3", std::move(c));  // a later idle end: the timer arms again
  EXPECT_EQ(kept.size(), 4u);
  // Runs until no timer is left: every connection was closed by it.
  io_.run_for(10s);
  EXPECT_TRUE(io_.stopped());
  EXPECT_EQ(kept.size(), 0u);
  for (auto& end : first) EXPECT_TRUE(sees_close(end));
  EXPECT_TRUE(sees_close(s));
}

TEST_F(KeptChannelsTest, ClearStopsTheTimer) {
  KeptChannels kept(io_, 4, 60s);
  auto ends = put_three(kept, {"a:1", "b:2", "c:3"});
  kept.clear();
  io_.run_for(10s);  // returns at once: the cancelled wait is all there is
  EXPECT_TRUE(io_.stopped());
  for (auto& end : ends) EXPECT_TRUE(sees_close(end));
}

TEST_F(KeptChannelsTest, SweepClosesWhatItsPeerClosed) {
  KeptChannels kept(io_, 4, 60s);
  auto ends = put_three(kept, {"a:1", "a:1", "b:2"});
  EXPECT_EQ(kept.sweep(), 3u);
  ends[1].close();
  const auto until = Clock::now() + 5s;
  while (kept.sweep() != 2 && Clock::now() < until) {
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_EQ(kept.size(), 2u);
  auto t = kept.take("a:1");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->channel.socket().local_endpoint(), ends[0].remote_endpoint());
}

TEST_F(KeptChannelsTest, EachConnectionKeepsItsOffersTerms) {
  KeptChannels kept(io_, 4, 60s);
  auto [c1, s1] = pair();
  auto [c2, s2] = pair();
  kept.put("a:1", std::move(c1), {64 << 10, 7});
  kept.put("a:1", std::move(c2));
  auto t = kept.take("a:1");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->channel.socket().local_endpoint(), s2.remote_endpoint());
  EXPECT_EQ(t->terms.inline_limit, 0u);
  EXPECT_EQ(t->terms.incarnation, 0u);
  t = kept.take("a:1");
  ASSERT_TRUE(t);
  EXPECT_EQ(t->channel.socket().local_endpoint(), s1.remote_endpoint());
  EXPECT_EQ(t->terms.inline_limit, 64u << 10);
  EXPECT_EQ(t->terms.incarnation, 7u);
}

TEST_F(KeptChannelsTest, KeepingOffClosesWhatIsPut) {
  KeptChannels kept(io_, 4, 0ms);
  EXPECT_FALSE(kept.enabled());
  auto [c, s] = pair();
  kept.put("a:1", std::move(c));
  EXPECT_EQ(kept.size(), 0u);
  EXPECT_TRUE(sees_close(s));
}

}  // namespace
}  // namespace kvmig
