// transfer_wide (transport/tcp/wide_transfer.h) over a real loopback TCP
// connection: every byte of many buffers of uneven sizes arrives in order
// through partial reads and writes; a read stops once it has what it needs;
// end of stream is reported with what came before it; and one system call
// takes up to 64 buffers (Asio's composed operations take 16).
#include "tcp/wide_transfer.h"

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace kvmig {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

struct Connected {
  asio::io_context io;
  tcp::socket writer{io};
  tcp::socket reader{io};
};

// A connected pair on loopback. `buffer_bytes` > 0: both socket buffers
// set to that (the kernel doubles it).
void connect_pair(Connected& c, int buffer_bytes) {
  tcp::acceptor acceptor(c.io,
                         tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  c.writer.connect(acceptor.local_endpoint());
  acceptor.accept(c.reader);
  if (buffer_bytes > 0) {
    c.writer.set_option(asio::socket_base::send_buffer_size(buffer_bytes));
    c.reader.set_option(asio::socket_base::receive_buffer_size(buffer_bytes));
  }
}

// Cuts `bytes` into pieces of 0 to `max_piece` bytes (some empty).
std::vector<size_t> random_cuts(size_t bytes, size_t max_piece, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<size_t> cuts;
  for (size_t left = bytes; left > 0;) {
    size_t n = std::uniform_int_distribution<size_t>(0, max_piece)(rng);
    if (n > left) n = left;
    cuts.push_back(n);
    left -= n;
  }
  return cuts;
}

// Counts the read_some and write_some calls made through it.
struct CountingSocket {
  tcp::socket& socket;
  int calls = 0;
  template <typename Buffers, typename Handler>
  void async_write_some(const Buffers& b, Handler&& h) {
    ++calls;
    socket.async_write_some(b, std::forward<Handler>(h));
  }
  template <typename Buffers, typename Handler>
  void async_read_some(const Buffers& b, Handler&& h) {
    ++calls;
    socket.async_read_some(b, std::forward<Handler>(h));
  }
};

TEST(WideTransfer, ManyUnevenBuffersArriveInOrderThroughPartialTransfers) {
  Connected c;
  // Socket buffers smaller than a window of buffers: calls move only part
  // of what they are given. (Much smaller ones make loopback TCP crawl.)
  connect_pair(c, 32768);
  constexpr size_t kBytes = 2 << 20;
  std::vector<uint8_t> src(kBytes), dst(kBytes, 0);
  std::mt19937_64 rng(7);
  for (auto& b : src) b = static_cast<uint8_t>(rng());

  // The writer and the reader cut the same bytes differently.
  std::vector<asio::const_buffer> out;
  size_t at = 0;
  for (size_t n : random_cuts(kBytes, 9000, 1)) {
    out.push_back(asio::buffer(src.data() + at, n));
    at += n;
  }
  std::vector<asio::mutable_buffer> in;
  at = 0;
  for (size_t n : random_cuts(kBytes, 5000, 2)) {
    in.push_back(asio::buffer(dst.data() + at, n));
    at += n;
  }
  ASSERT_GT(out.size(), 400u);
  ASSERT_GT(in.size(), 700u);

  error_code wec, rec;
  size_t wrote = 0, read = 0;
  bool wdone = false, rdone = false;
  CountingSocket w{c.writer}, r{c.reader};
  transfer_wide(w, out, kBytes, [&](const error_code& ec, size_t n) {
    wec = ec;
    wrote = n;
    wdone = true;
  });
  transfer_wide(r, in, kBytes, [&](const error_code& ec, size_t n) {
    rec = ec;
    read = n;
    rdone = true;
  });
  // A transfer that loses its place can wait forever for bytes that never
  // come: bounded, so that it fails here.
  c.io.run_for(std::chrono::seconds(30));
  ASSERT_TRUE(wdone && rdone) << "wrote " << wrote << ", read " << read;
  EXPECT_FALSE(wec) << wec.message();
  EXPECT_FALSE(rec) << rec.message();
  EXPECT_EQ(wrote, kBytes);
  EXPECT_EQ(read, kBytes);
  EXPECT_TRUE(src == dst) << "the bytes differ";
  // Partial transfers happened: more calls than 64-buffer windows.
  EXPECT_GT(r.calls, static_cast<int>(in.size() / kWideBuffers) + 1);
}

TEST(WideTransfer, ReadStopsOnceItHasWhatItNeeds) {
  Connected c;
  connect_pair(c, 0);
  std::vector<uint8_t> sent(100);
  for (size_t i = 0; i < sent.size(); ++i) sent[i] = static_cast<uint8_t>(i);
  asio::write(c.writer, asio::buffer(sent));
  // 60 bytes needed, room for 160: the read ends with the 60 and whatever
  // else had come (here all 100), not waiting to fill the rest.
  std::vector<uint8_t> head(60), tail(100, 0xff);
  std::vector<asio::mutable_buffer> in = {asio::buffer(head),
                                          asio::buffer(tail)};
  error_code rec;
  size_t read = 0;
  bool done = false;
  transfer_wide(c.reader, in, 60, [&](const error_code& ec, size_t n) {
    rec = ec;
    read = n;
    done = true;
  });
  c.io.run();
  ASSERT_TRUE(done);
  EXPECT_FALSE(rec) << rec.message();
  ASSERT_GE(read, 60u);
  ASSERT_LE(read, 100u);
  for (size_t i = 0; i < read; ++i) {
    const uint8_t got = i < 60 ? head[i] : tail[i - 60];
    ASSERT_EQ(got, sent[i]) << "byte " << i;
  }
}

TEST(WideTransfer, EndOfStreamReportsWhatCameBeforeIt) {
  Connected c;
  connect_pair(c, 0);
  std::vector<uint8_t> sent(10, 0x5a);
  asio::write(c.writer, asio::buffer(sent));
  c.writer.close();
  std::vector<uint8_t> a(4), b(46);
  std::vector<asio::mutable_buffer> in = {asio::buffer(a), asio::buffer(b)};
  error_code rec;
  size_t read = 0;
  transfer_wide(c.reader, in, 50, [&](const error_code& ec, size_t n) {
    rec = ec;
    read = n;
  });
  c.io.run();
  EXPECT_EQ(rec, asio::error::eof) << rec.message();
  EXPECT_EQ(read, 10u);
  EXPECT_EQ(a, std::vector<uint8_t>(4, 0x5a));
}

TEST(WideTransfer, OneCallTakesUpToSixtyFourBuffers) {
  Connected c;
  // Room for all of it at once: each call moves its whole window.
  connect_pair(c, 1 << 20);
  const std::pair<size_t, int> cases[] = {{64, 1}, {128, 2}, {130, 3}};
  for (const auto& [buffers, calls] : cases) {
    std::vector<uint8_t> src(buffers * 1024, 0x11);
    std::vector<asio::const_buffer> out;
    for (size_t i = 0; i < buffers; ++i) {
      out.push_back(asio::buffer(src.data() + i * 1024, 1024));
    }
    std::vector<uint8_t> dst(src.size());
    CountingSocket w{c.writer};
    size_t wrote = 0;
    transfer_wide(w, out, src.size(),
                  [&](const error_code&, size_t n) { wrote = n; });
    c.io.run();
    c.io.restart();
    ASSERT_EQ(wrote, src.size());
    // Asio's async_write would take 4, 8 and 9 calls.
    EXPECT_EQ(w.calls, calls) << buffers << " buffers";
    asio::read(c.reader, asio::buffer(dst));
    EXPECT_EQ(dst, src);
  }
}

}  // namespace
}  // namespace kvmig
