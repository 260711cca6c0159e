#include "channel.h"

#include <sys/socket.h>

#include <array>
#include <cerrno>
#include <memory>
#include <vector>

#include "errors.h"
#include "host_port.h"

namespace kvmig {
namespace {

using boost::system::error_code;

// Cancels an object's pending operations without throwing.
void cancel_quietly(asio::ip::tcp::socket& socket) {
  error_code ignored;
  socket.cancel(ignored);
}
void cancel_quietly(asio::ip::tcp::resolver& resolver) { resolver.cancel(); }

// Arms a timer that cancels `io_object`'s operations (a socket's, a
// resolver's) at `deadline`. The operation's coroutine calls disarm() when
// it resumes; a timer that fires after that leaves the object alone (it may
// be gone).
class Watchdog {
 public:
  template <typename IoObject>
  Watchdog(IoObject& io_object, Deadline deadline)
      : state_(std::make_shared<State>()), timer_(io_object.get_executor()) {
    timer_.expires_at(deadline);
    timer_.async_wait([state = state_, &io_object](const error_code& ec) {
      if (ec || state->disarmed) return;
      state->fired = true;
      cancel_quietly(io_object);
    });
  }
  ~Watchdog() { disarm(); }
  // True if the deadline passed before disarm().
  bool disarm() {
    state_->disarmed = true;
    timer_.cancel();
    return state_->fired;
  }

 private:
  struct State {
    bool disarmed = false;
    bool fired = false;
  };
  std::shared_ptr<State> state_;
  asio::steady_timer timer_;
};

}  // namespace

FrameChannel::FrameChannel(asio::ip::tcp::socket socket, uint32_t max_payload)
    : socket_(std::move(socket)), max_payload_(max_payload) {
  error_code ec;
  auto ep = socket_.remote_endpoint(ec);
  peer_ = ec ? "?" : ep.address().to_string() + ":" + std::to_string(ep.port());
  socket_.set_option(asio::ip::tcp::no_delay(true), ec);
}

asio::awaitable<Status> FrameChannel::send(MsgType type,
                                           std::span<const uint8_t> payload,
                                           Deadline deadline) {
  std::vector<uint8_t> frame = encode_frame(type, payload);
  error_code ec;
  Watchdog dog(socket_, deadline);
  co_await asio::async_write(socket_, asio::buffer(frame),
                             asio::redirect_error(asio::use_awaitable, ec));
  bool late = dog.disarm();
  if (late) {
    co_return Status::deadline_exceeded("sending " + msg_type_name(type) +
                                        " to " + peer_ + ": deadline passed");
  }
  if (ec)
    co_return status_from_error(
        ec, "sending " + msg_type_name(type) + " to " + peer_);
  co_return Status();
}

asio::awaitable<Result<Frame>> FrameChannel::receive(Deadline deadline) {
  std::array<uint8_t, kFrameHeaderBytes> header_bytes;
  error_code ec;
  Watchdog dog(socket_, deadline);
  co_await asio::async_read(socket_, asio::buffer(header_bytes),
                            asio::redirect_error(asio::use_awaitable, ec));
  if (ec) {
    bool late = dog.disarm();
    if (late) {
      co_return Status::deadline_exceeded("waiting for a frame from " + peer_ +
                                          ": deadline passed");
    }
    co_return status_from_error(ec, "reading a frame from " + peer_);
  }
  auto header = decode_frame_header(header_bytes, max_payload_);
  if (!header.ok()) {
    co_return header.status().with_context("frame from " + peer_);
  }
  Frame frame;
  frame.type = header->type;
  frame.payload.resize(header->length);
  co_await asio::async_read(socket_, asio::buffer(frame.payload),
                            asio::redirect_error(asio::use_awaitable, ec));
  bool late = dog.disarm();
  if (ec) {
    if (late) {
      co_return Status::deadline_exceeded("reading " +
                                          msg_type_name(frame.type) + " from " +
                                          peer_ + ": deadline passed");
    }
    co_return status_from_error(
        ec, "reading " + msg_type_name(frame.type) + " from " + peer_);
  }
  Status valid = check_frame_payload(*header, frame.payload);
  if (!valid.ok()) co_return valid.with_context("frame from " + peer_);
  co_return frame;
}

bool FrameChannel::peer_closed() {
  if (!socket_.is_open()) return true;
  char byte = 0;
  const ssize_t n =
      ::recv(socket_.native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n == 0) return true;
  if (n < 0) return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
  return false;
}

void FrameChannel::close() {
  error_code ignored;
  socket_.shutdown(asio::ip::tcp::socket::shutdown_both, ignored);
  socket_.close(ignored);
}

asio::awaitable<Result<asio::ip::tcp::socket>> connect_to(
    std::string_view host_port, Deadline deadline) {
  auto hp = parse_host_port(host_port);
  if (!hp.ok()) co_return hp.status();
  auto executor = co_await asio::this_coro::executor;
  error_code ec;
  std::vector<asio::ip::tcp::endpoint> endpoints;
  const asio::ip::address ip = asio::ip::make_address(hp->host, ec);
  if (!ec) {
    endpoints.emplace_back(ip, hp->port);  // no resolver thread for an IP
  } else {
    asio::ip::tcp::resolver resolver(executor);
    Watchdog dog(resolver, deadline);
    auto found = co_await resolver.async_resolve(
        hp->host, std::to_string(hp->port),
        asio::redirect_error(asio::use_awaitable, ec));
    if (dog.disarm()) {
      co_return Status::deadline_exceeded("resolving " + hp->host +
                                          ": deadline passed");
    }
    if (ec) co_return status_from_error(ec, "resolving " + hp->host);
    for (const auto& entry : found) endpoints.push_back(entry.endpoint());
  }
  asio::ip::tcp::socket socket(executor);
  Watchdog dog(socket, deadline);
  co_await asio::async_connect(socket, endpoints,
                               asio::redirect_error(asio::use_awaitable, ec));
  bool late = dog.disarm();
  if (ec) {
    if (late) {
      co_return Status::deadline_exceeded(
          "connecting to " + std::string(host_port) + ": deadline passed");
    }
    co_return status_from_error(ec, "connecting to " + std::string(host_port));
  }
  co_return std::move(socket);
}

}  // namespace kvmig
