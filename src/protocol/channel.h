// FrameChannel: framed control messages over one TCP connection, as C++20
// coroutines. Every receive and send takes a deadline; past it the socket's
// pending operation is cancelled and the call returns DeadlineExceeded.
// Not thread-safe: use it from the io_context thread that owns the socket.
//
// A send or receive that the socket can serve at once (a frame that fits the
// send buffer, one already received) completes without waiting: no timer is
// armed and the coroutine is not suspended; only a wait arms the deadline.
// Receives read ahead: one recv of up to kReadAhead bytes may hold the next
// frames too (PAGES then COMMIT, sent together), which later receives
// take from memory. A frame's bulk bytes (PAGES' pages) are sent from where
// they lie and may be read straight into place (receive's BulkPlacer).
#ifndef KVMIG_SRC_CHANNEL_H_
#define KVMIG_SRC_CHANNEL_H_

#include <boost/container/small_vector.hpp>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "asio.h"
#include "errors.h"
#include "frame.h"
#include "kvmig/status.h"
#include "kvmig/transport.h"

namespace kvmig {
namespace detail {
class Watchdog;  // channel.cc: cancels a socket's operations at a deadline
}  // namespace detail

struct Frame {
  MsgType type = MsgType::kError;
  std::vector<uint8_t> payload;
};

class FrameChannel {
 public:
  FrameChannel(asio::ip::tcp::socket socket, uint32_t max_payload);

  asio::awaitable<Status> send(MsgType type, std::span<const uint8_t> payload,
                               Deadline deadline) {
    return send_frames(OutFrames{{type, payload}}, deadline);
  }
  // Frames back to back, in one system call where the socket takes them
  // all: the peer wakes once for them (PAGES and COMMIT).
  struct OutFrame {
    MsgType type;
    std::span<const uint8_t> payload;
    // Bulk bytes after the payload, outside its checksum, in this order
    // (PAGES: each page's pieces, where they lie in page memory).
    std::span<const std::span<const uint8_t>> bulk = {};
  };
  asio::awaitable<Status> send_all(std::span<const OutFrame> frames,
                                   Deadline deadline) {
    return send_frames(OutFrames(frames.begin(), frames.end()), deadline);
  }
  // Where a frame's bulk bytes go. Called for every frame received with a
  // placer, once its payload (the bulk excepted) has been read and checked,
  // before any bulk byte is read: returns spans of exactly `bulk` bytes in
  // all (none for a frame without bulk), or an error, which receive()
  // returns with the bulk left unread (the connection is of no further
  // use). It may refuse a frame that should have had bulk.
  using BulkPlacer = std::function<Result<std::vector<std::span<uint8_t>>>(
      const Frame& frame, uint32_t bulk)>;

  // The next frame, validated (header, length limit, checksum). Without a
  // placer, its bulk (if any) ends its payload; with one, the bulk went
  // where the placer said and the payload is the rest.
  asio::awaitable<Result<Frame>> receive(Deadline deadline,
                                         BulkPlacer place = {});

  // True when the peer has closed its end (end of stream or a reset is
  // waiting to be read): nothing sent now can reach it. Does not block and
  // consumes nothing; false while unread frames are pending (read ahead or
  // in the socket).
  bool peer_closed();

  // Bytes one receive reads ahead at most. Payloads larger than this are
  // read straight into the frame.
  static constexpr size_t kReadAhead = 16 << 10;

  // "HOST:PORT" of the peer, or "?" when unknown.
  const std::string& peer() const { return peer_; }
  void close();
  asio::ip::tcp::socket& socket() { return socket_; }

 private:
  // One frame or two (PAGES and COMMIT) on the hot path: kept inline, no
  // allocation per control frame.
  using OutFrames = boost::container::small_vector<OutFrame, 2>;
  asio::awaitable<Status> send_frames(OutFrames frames, Deadline deadline);
  // Fills out: from the bytes read ahead, then from the socket, arming
  // `dog` (for the deadline) the first time it must wait.
  asio::awaitable<boost::system::error_code> read_exact(
      std::span<uint8_t> out, Deadline deadline,
      std::optional<detail::Watchdog>& dog);
  // Fills the spans in turn, from the bytes read ahead, then from the
  // socket straight into them (scatter reads, nothing read ahead).
  asio::awaitable<boost::system::error_code> read_scattered(
      std::vector<asio::mutable_buffer> out, Deadline deadline,
      std::optional<detail::Watchdog>& dog);
  // One read into `buffers` (a mutable buffer sequence): at once when the
  // socket has bytes, else a wait, under `dog` (armed for the deadline the
  // first time one must wait). Sets ec on failure.
  template <typename Buffers>
  asio::awaitable<size_t> read_some(const Buffers& buffers, Deadline deadline,
                                    std::optional<detail::Watchdog>& dog,
                                    boost::system::error_code& ec);
  // Moves read-ahead bytes into out; returns how many.
  size_t take_ahead(std::span<uint8_t> out);

  asio::ip::tcp::socket socket_;
  uint32_t max_payload_;
  std::string peer_;
  // Read ahead: bytes [ahead_pos_, ahead_end_) of ahead_ are unread.
  std::vector<uint8_t> ahead_;
  size_t ahead_pos_ = 0;
  size_t ahead_end_ = 0;
};

// Connects to "HOST:PORT" within the deadline.
asio::awaitable<Result<asio::ip::tcp::socket>> connect_to(
    std::string_view host_port, Deadline deadline);

}  // namespace kvmig

#endif  // KVMIG_SRC_CHANNEL_H_
