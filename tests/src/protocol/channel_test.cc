#include "channel.h"

#include <gtest/gtest.h>

#include <chrono>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "testutil.h"

// FrameChannel over a real loopback connection: frames of every size around
// the read-ahead buffer arrive whole and in order, read-ahead bytes count as
// unread, and every wait ends at its deadline with the bytes it had.
namespace kvmig {
namespace {

using std::chrono::milliseconds;

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 31);
  return v;
}

class ChannelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    asio::ip::tcp::acceptor acceptor(io_,
                                     {asio::ip::make_address("127.0.0.1"), 0});
    asio::ip::tcp::socket client(io_);
    client.connect(acceptor.local_endpoint());
    asio::ip::tcp::socket server = acceptor.accept();
    a_.emplace(std::move(client), kMaxPayload);
    b_.emplace(std::move(server), kMaxPayload);
  }

  // Runs the coroutines spawned so far to completion.
  void run() {
    io_.restart();
    io_.run();
  }

  template <typename T>
  T run_one(asio::awaitable<T> op) {
    std::optional<T> out;
    asio::co_spawn(
        io_,
        [&]() -> asio::awaitable<void> { out.emplace(co_await std::move(op)); },
        asio::detached);
    run();
    return std::move(*out);
  }

  // Spawns a's send of `frames` (kept alive by the caller until run()
  // returns); its status lands in `sent`.
  void spawn_send_all(std::span<const FrameChannel::OutFrame> frames,
                      Deadline deadline, std::optional<Status>& sent) {
    asio::co_spawn(
        io_,
        [this, frames, deadline, &sent]() -> asio::awaitable<void> {
          sent = co_await a_->send_all(frames, deadline);
        },
        asio::detached);
  }

  // Writes raw bytes on a's socket, bypassing the channel.
  void raw_write(std::span<const uint8_t> bytes) {
    asio::write(a_->socket(), asio::buffer(bytes.data(), bytes.size()));
  }

  static constexpr uint32_t kMaxPayload = 4 << 20;
  asio::io_context io_;
  std::optional<FrameChannel> a_, b_;
};

TEST_F(ChannelTest, FramesOfEverySizeArriveWholeAndInOrder) {
  constexpr size_t kAhead = FrameChannel::kReadAhead;
  const std::vector<size_t> sizes = {
      0,           1,           23,         24,     100,
      kAhead - 25, kAhead - 24, kAhead - 1, kAhead, kAhead + 1,
      3 * kAhead,  0,           2 << 20,    5,      kAhead - 24};
  std::vector<Status> sent;
  std::vector<Result<Frame>> got;
  asio::co_spawn(
      io_,
      [&]() -> asio::awaitable<void> {
        for (size_t i = 0; i < sizes.size(); ++i) {
          const std::vector<uint8_t> payload =
              pattern(sizes[i], static_cast<uint8_t>(i));
          sent.push_back(
              co_await a_->send(MsgType::kPages, payload,
                                Clock::now() + std::chrono::seconds(10)));
        }
      },
      asio::detached);
  asio::co_spawn(
      io_,
      [&]() -> asio::awaitable<void> {
        for (size_t i = 0; i < sizes.size(); ++i) {
          got.push_back(
              co_await b_->receive(Clock::now() + std::chrono::seconds(10)));
        }
      },
      asio::detached);
  run();
  ASSERT_EQ(sent.size(), sizes.size());
  ASSERT_EQ(got.size(), sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    SCOPED_TRACE("frame " + std::to_string(i) + " of " +
                 std::to_string(sizes[i]) + " bytes");
    ASSERT_OK(sent[i]);
    ASSERT_OK(got[i].status());
    EXPECT_EQ(got[i]->type, MsgType::kPages);
    EXPECT_EQ(got[i]->payload, pattern(sizes[i], static_cast<uint8_t>(i)));
  }
}

TEST_F(ChannelTest, FramesSentTogetherArriveWholeAndInOrder) {
  // A small frame, one larger than the socket buffers (the write goes on
  // after a partial one), an empty one: received one by one, in order.
  const std::vector<uint8_t> small = pattern(100, 1);
  const std::vector<uint8_t> big = pattern(2 << 20, 2);
  const std::vector<FrameChannel::OutFrame> frames = {
      {MsgType::kPages, small},
      {MsgType::kCommit, big},
      {MsgType::kDone, {}},
  };
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  std::optional<Status> sent;
  std::vector<Result<Frame>> got;
  spawn_send_all(frames, deadline, sent);
  asio::co_spawn(
      io_,
      [&]() -> asio::awaitable<void> {
        for (size_t i = 0; i < frames.size(); ++i) {
          got.push_back(co_await b_->receive(deadline));
        }
      },
      asio::detached);
  run();
  ASSERT_TRUE(sent.has_value());
  ASSERT_OK(*sent);
  ASSERT_EQ(got.size(), 3u);
  for (const auto& g : got) ASSERT_OK(g.status());
  EXPECT_EQ(got[0]->type, MsgType::kPages);
  EXPECT_EQ(got[0]->payload, small);
  EXPECT_EQ(got[1]->type, MsgType::kCommit);
  EXPECT_EQ(got[1]->payload, big);
  EXPECT_EQ(got[2]->type, MsgType::kDone);
  EXPECT_TRUE(got[2]->payload.empty());
}

// PAGES' bulk (protocol 13): sent from several pieces, read straight into
// where the placer says, split otherwise than the sender's pieces, whether
// it came with the read-ahead or not; the next frames arrive intact. A
// receive without a placer gets the bulk at its payload's end, and a placer
// that refuses ends the receive with its error.
TEST_F(ChannelTest, BulkBytesAreReadWhereThePlacerSays) {
  const std::vector<uint8_t> head = pattern(12, 3);
  const std::vector<uint8_t> big = pattern(3 << 20, 4);  // > socket buffers
  const std::vector<uint8_t> small = pattern(50, 5);
  const std::vector<std::span<const uint8_t>> big_pieces = {
      std::span(big).first(1), std::span(big).subspan(1, 100),
      std::span(big).subspan(101, 16 << 10),
      std::span(big).subspan(101 + (16 << 10))};
  const std::vector<std::span<const uint8_t>> small_pieces = {small};
  const std::vector<uint8_t> commit = pattern(30, 6);
  const std::vector<FrameChannel::OutFrame> frames = {
      {MsgType::kPages, head, big_pieces},   {MsgType::kCommit, commit},
      {MsgType::kPages, head, small_pieces},  // bulk within the read-ahead
      {MsgType::kPages, head, small_pieces},  // the same, no placer
      {MsgType::kPages, head, small_pieces},  // the placer refuses
  };
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  std::vector<uint8_t> big_in(big.size()), small_in(small.size());
  // The receiver's spans: not the sender's pieces.
  auto split = [](std::vector<uint8_t>& into) {
    std::vector<std::span<uint8_t>> spans;
    for (size_t at = 0, n = 7; at < into.size(); at += n, n *= 5) {
      spans.push_back(
          std::span(into).subspan(at, std::min(n, into.size() - at)));
    }
    return spans;
  };
  std::vector<uint32_t> bulk_seen;
  auto placer = [&](const Frame& f,
                    uint32_t bulk) -> Result<std::vector<std::span<uint8_t>>> {
    bulk_seen.push_back(bulk);
    if (f.type != MsgType::kPages) return std::vector<std::span<uint8_t>>{};
    EXPECT_EQ(f.payload, head);  // checked, the bulk excepted
    if (bulk_seen.size() == 1) return split(big_in);
    return split(small_in);
  };
  std::optional<Status> sent;
  std::vector<Result<Frame>> got;
  spawn_send_all(frames, deadline, sent);
  asio::co_spawn(
      io_,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 3; ++i) {
          got.push_back(co_await b_->receive(deadline, placer));
        }
        got.push_back(co_await b_->receive(deadline));
        got.push_back(co_await b_->receive(
            deadline,
            [](const Frame&,
               uint32_t) -> Result<std::vector<std::span<uint8_t>>> {
              return Status::protocol("not here");
            }));
      },
      asio::detached);
  run();
  ASSERT_TRUE(sent.has_value());
  ASSERT_OK(*sent);
  ASSERT_EQ(got.size(), 5u);
  EXPECT_EQ(bulk_seen, (std::vector<uint32_t>{uint32_t(big.size()), 0,
                                              uint32_t(small.size())}));
  for (int i = 0; i < 4; ++i) {
    SCOPED_TRACE("frame " + std::to_string(i));
    ASSERT_OK(got[i].status());
  }
  EXPECT_EQ(got[0]->type, MsgType::kPages);
  EXPECT_EQ(got[0]->payload, head);
  EXPECT_TRUE(big_in == big);
  EXPECT_EQ(got[1]->type, MsgType::kCommit);
  EXPECT_EQ(got[1]->payload, commit);
  EXPECT_EQ(got[2]->payload, head);
  EXPECT_EQ(small_in, small);
  std::vector<uint8_t> whole = head;
  whole.insert(whole.end(), small.begin(), small.end());
  EXPECT_EQ(got[3]->payload, whole);
  EXPECT_EQ(got[4].status().code(), StatusCode::kProtocol);
  EXPECT_EQ(got[4].status().message(), "not here");
}

TEST_F(ChannelTest, FramesReadAheadAreUnreadUntilReceived) {
  // Two frames in one write, then the peer closes: the first receive reads
  // both; the second frame still counts as unread.
  std::vector<uint8_t> both = encode_frame(MsgType::kCommit, pattern(40, 1));
  const std::vector<uint8_t> second = encode_frame(MsgType::kDone, {});
  both.insert(both.end(), second.begin(), second.end());
  raw_write(both);
  a_->close();
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  Result<Frame> first = run_one(b_->receive(deadline));
  ASSERT_OK(first.status());
  EXPECT_EQ(first->type, MsgType::kCommit);
  EXPECT_FALSE(b_->peer_closed());
  Result<Frame> next = run_one(b_->receive(deadline));
  ASSERT_OK(next.status());
  EXPECT_EQ(next->type, MsgType::kDone);
  EXPECT_TRUE(b_->peer_closed());
  Result<Frame> none = run_one(b_->receive(deadline));
  EXPECT_EQ(none.status().code(), StatusCode::kUnavailable)
      << none.status().to_string();
}

TEST_F(ChannelTest, AWaitEndsAtItsDeadline) {
  // Nothing at all.
  Result<Frame> idle = run_one(b_->receive(Clock::now() + milliseconds(50)));
  EXPECT_EQ(idle.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(idle.status().message().find("waiting for a frame"),
            std::string::npos)
      << idle.status().to_string();
  // A header and part of its payload: the frame is named.
  const std::vector<uint8_t> frame =
      encode_frame(MsgType::kHello, pattern(100, 2));
  raw_write(std::span(frame).first(kFrameHeaderBytes + 10));
  Result<Frame> cut = run_one(b_->receive(Clock::now() + milliseconds(50)));
  EXPECT_EQ(cut.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(cut.status().message().find("reading HELLO"), std::string::npos)
      << cut.status().to_string();
}

TEST_F(ChannelTest, DataAlreadyHereIsReturnedPastTheDeadline) {
  const std::vector<uint8_t> frame = encode_frame(MsgType::kDone, {});
  raw_write(frame);
  // Arrived before the receive (polled for: the socket holds it all): no
  // wait, so no deadline to miss.
  for (int i = 0; i < 2000 && b_->socket().available() < frame.size(); ++i) {
    std::this_thread::sleep_for(milliseconds(1));
  }
  ASSERT_EQ(b_->socket().available(), frame.size());
  Result<Frame> got = run_one(b_->receive(Clock::now() - milliseconds(1)));
  ASSERT_OK(got.status());
  EXPECT_EQ(got->type, MsgType::kDone);
}

TEST_F(ChannelTest, APeerThatClosesMidFrameIsUnavailable) {
  const std::vector<uint8_t> frame =
      encode_frame(MsgType::kOffer, pattern(3 * FrameChannel::kReadAhead, 3));
  raw_write(std::span(frame).first(frame.size() / 2));
  a_->close();
  Result<Frame> cut =
      run_one(b_->receive(Clock::now() + std::chrono::seconds(10)));
  EXPECT_EQ(cut.status().code(), StatusCode::kUnavailable)
      << cut.status().to_string();
  EXPECT_NE(cut.status().message().find("reading OFFER"), std::string::npos)
      << cut.status().to_string();
}

TEST_F(ChannelTest, ACorruptPayloadIsDataLoss) {
  std::vector<uint8_t> frame = encode_frame(MsgType::kCommit, pattern(64, 4));
  frame.back() ^= 1;
  raw_write(frame);
  Result<Frame> bad =
      run_one(b_->receive(Clock::now() + std::chrono::seconds(10)));
  EXPECT_EQ(bad.status().code(), StatusCode::kDataLoss)
      << bad.status().to_string();
}

TEST_F(ChannelTest, ASendThePeerNeverReadsEndsAtItsDeadline) {
  // More than the socket buffers hold: the send must wait, and nobody reads.
  const std::vector<uint8_t> big = pattern(kMaxPayload, 5);
  Status s =
      run_one(a_->send(MsgType::kPages, big, Clock::now() + milliseconds(100)));
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.to_string();
  EXPECT_NE(s.message().find("sending PAGES"), std::string::npos)
      << s.to_string();
}

TEST_F(ChannelTest, FramesSentTogetherNameThemAllAtTheDeadline) {
  const std::vector<uint8_t> big = pattern(kMaxPayload, 5);
  const std::vector<FrameChannel::OutFrame> frames = {{MsgType::kPages, big},
                                                      {MsgType::kCommit, {}}};
  Status s = run_one(a_->send_all(frames, Clock::now() + milliseconds(100)));
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.to_string();
  EXPECT_NE(s.message().find("sending PAGES and COMMIT to "), std::string::npos)
      << s.to_string();
}

}  // namespace
}  // namespace kvmig
