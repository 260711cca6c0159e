// FrameChannel: framed control messages over one TCP connection, as C++20
// coroutines. Every receive and send takes a deadline; past it the socket's
// pending operation is cancelled and the call returns DeadlineExceeded.
// Not thread-safe: use it from the io_context thread that owns the socket.
#ifndef KVMIG_SRC_CHANNEL_H_
#define KVMIG_SRC_CHANNEL_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "asio.h"
#include "errors.h"
#include "frame.h"
#include "kvmig/status.h"
#include "kvmig/transport.h"

namespace kvmig {

struct Frame {
  MsgType type = MsgType::kError;
  std::vector<uint8_t> payload;
};

class FrameChannel {
 public:
  FrameChannel(asio::ip::tcp::socket socket, uint32_t max_payload);

  asio::awaitable<Status> send(MsgType type, std::span<const uint8_t> payload,
                               Deadline deadline);
  // The next frame, validated (header, length limit, checksum).
  asio::awaitable<Result<Frame>> receive(Deadline deadline);

  // True when the peer has closed its end (end of stream or a reset is
  // waiting to be read): nothing sent now can reach it. Does not block and
  // consumes nothing; false while unread frames are pending.
  bool peer_closed();

  // "HOST:PORT" of the peer, or "?" when unknown.
  const std::string& peer() const { return peer_; }
  void close();
  asio::ip::tcp::socket& socket() { return socket_; }

 private:
  asio::ip::tcp::socket socket_;
  uint32_t max_payload_;
  std::string peer_;
};

// Connects to "HOST:PORT" within the deadline.
asio::awaitable<Result<asio::ip::tcp::socket>> connect_to(
    std::string_view host_port, Deadline deadline);

}  // namespace kvmig

#endif  // KVMIG_SRC_CHANNEL_H_
