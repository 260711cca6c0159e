#include "channel.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <memory>
#include <string>
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

}  // namespace

namespace detail {

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
  // True once the deadline has passed (the object's operations then
  // pending were cancelled; later ones are the caller's to refuse).
  bool fired() const { return state_->fired; }
  // True if the deadline passed before disarm().
  bool disarm() {
    if (!state_->disarmed) {
      state_->disarmed = true;
      timer_.cancel();
    }
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

}  // namespace detail

using detail::Watchdog;

FrameChannel::FrameChannel(asio::ip::tcp::socket socket, uint32_t max_payload)
    : socket_(std::move(socket)), max_payload_(max_payload) {
  error_code ec;
  auto ep = socket_.remote_endpoint(ec);
  peer_ = ec ? "?" : ep.address().to_string() + ":" + std::to_string(ep.port());
  socket_.set_option(asio::ip::tcp::no_delay(true), ec);
  // Sends and receives try the socket at once and wait only when it would
  // block (asio's own operations work the same either way).
  socket_.non_blocking(true, ec);
}

asio::awaitable<Status> FrameChannel::send_frames(OutFrames frames,
                                                  Deadline deadline) {
  boost::container::small_vector<std::array<uint8_t, kFrameHeaderBytes>, 2>
      headers;
  boost::container::small_vector<asio::const_buffer, 4> buffers;
  headers.reserve(frames.size());  // no reallocation: buffers point in
  size_t n_buffers = 0;
  for (const OutFrame& f : frames) n_buffers += 2 + f.bulk.size();
  buffers.reserve(n_buffers);
  size_t total = 0;
  for (const OutFrame& f : frames) {
    size_t bulk = 0;
    for (std::span<const uint8_t> piece : f.bulk) bulk += piece.size();
    headers.push_back(
        encode_frame_header(f.type, f.payload, static_cast<uint32_t>(bulk)));
    buffers.push_back(asio::buffer(headers.back()));
    buffers.push_back(asio::buffer(f.payload.data(), f.payload.size()));
    for (std::span<const uint8_t> piece : f.bulk) {
      buffers.push_back(asio::buffer(piece.data(), piece.size()));
    }
    total += headers.back().size() + f.payload.size() + bulk;
  }
  auto what = [&] {
    std::string names;
    for (const OutFrame& f : frames) {
      names += (names.empty() ? "" : " and ") + msg_type_name(f.type);
    }
    return "sending " + names + " to " + peer_;
  };
  error_code ec;
  // Most frames fit the socket's send buffer: one sendmsg, no timer.
  size_t sent = socket_.write_some(buffers, ec);
  if (ec == asio::error::would_block || ec == asio::error::try_again) {
    sent = 0;
    ec = {};
  }
  if (!ec && sent < total) {
    for (auto& b : buffers) {
      const size_t skip = std::min(sent, b.size());
      b += skip;
      sent -= skip;
    }
    Watchdog dog(socket_, deadline);
    co_await asio::async_write(socket_, buffers,
                               asio::redirect_error(asio::use_awaitable, ec));
    if (dog.disarm()) {
      co_return Status::deadline_exceeded(what() + ": deadline passed");
    }
  }
  if (ec) co_return status_from_error(ec, what());
  co_return Status();
}

template <typename Buffers>
asio::awaitable<size_t> FrameChannel::read_some(const Buffers& buffers,
                                                Deadline deadline,
                                                std::optional<Watchdog>& dog,
                                                error_code& ec) {
  ec = {};
  const size_t n = socket_.read_some(buffers, ec);
  if (ec != asio::error::would_block && ec != asio::error::try_again) {
    co_return n;
  }
  if (!dog) {
    dog.emplace(socket_, deadline);
  } else if (dog->fired()) {
    ec = asio::error::operation_aborted;  // nothing to cancel now
    co_return 0;
  }
  // A read, not a wait for readability: asio queues it on the socket's
  // standing registration, where async_wait would re-register the socket
  // with epoll (a system call, and a spurious EPOLLOUT wake-up) every time.
  ec = {};
  co_return co_await socket_.async_read_some(
      buffers, asio::redirect_error(asio::use_awaitable, ec));
}

size_t FrameChannel::take_ahead(std::span<uint8_t> out) {
  const size_t n = std::min(out.size(), ahead_end_ - ahead_pos_);
  std::copy_n(ahead_.begin() + static_cast<ptrdiff_t>(ahead_pos_), n,
              out.begin());
  ahead_pos_ += n;
  return n;
}

asio::awaitable<error_code> FrameChannel::read_exact(
    std::span<uint8_t> out, Deadline deadline, std::optional<Watchdog>& dog) {
  size_t got = take_ahead(out);
  while (got < out.size()) {
    // A short remainder reads ahead (the next frame may have come with
    // it); a long one goes straight into place.
    const bool ahead = out.size() - got < kReadAhead;
    if (ahead) {
      ahead_.resize(kReadAhead);
      ahead_pos_ = ahead_end_ = 0;
    }
    error_code ec;
    const asio::mutable_buffer into =
        ahead ? asio::buffer(ahead_)
              : asio::buffer(out.data() + got, out.size() - got);
    const size_t n = co_await read_some(into, deadline, dog, ec);
    if (ec) co_return ec;
    if (ahead) {
      ahead_end_ = n;
      got += take_ahead(out.subspan(got));
    } else {
      got += n;
    }
  }
  co_return error_code();
}

asio::awaitable<error_code> FrameChannel::read_scattered(
    std::vector<asio::mutable_buffer> out, Deadline deadline,
    std::optional<Watchdog>& dog) {
  size_t i = 0;  // out[i] is the first span not yet full
  for (; i < out.size(); ++i) {
    out[i] += take_ahead(
        std::span(static_cast<uint8_t*>(out[i].data()), out[i].size()));
    if (out[i].size() > 0) break;  // nothing more read ahead
  }
  while (i < out.size()) {
    const std::span<const asio::mutable_buffer> rest =
        std::span(out).subspan(i);
    error_code ec;
    size_t n = co_await read_some(rest, deadline, dog, ec);
    if (ec) co_return ec;
    for (; i < out.size() && n >= out[i].size(); ++i) n -= out[i].size();
    if (i < out.size()) out[i] += n;
  }
  co_return error_code();
}

asio::awaitable<Result<Frame>> FrameChannel::receive(Deadline deadline,
                                                     BulkPlacer place) {
  std::array<uint8_t, kFrameHeaderBytes> header_bytes;
  std::optional<Watchdog> dog;  // armed only if a read must wait
  error_code ec = co_await read_exact(header_bytes, deadline, dog);
  if (ec) {
    if (dog && dog->disarm()) {
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
  auto read_failed = [&] {
    if (dog && dog->disarm()) {
      return Status::deadline_exceeded("reading " + msg_type_name(frame.type) +
                                       " from " + peer_ + ": deadline passed");
    }
    return status_from_error(
        ec, "reading " + msg_type_name(frame.type) + " from " + peer_);
  };
  const size_t covered = header->length - header->bulk;
  frame.payload.resize(covered);
  ec = co_await read_exact(frame.payload, deadline, dog);
  if (ec) co_return read_failed();
  Status valid = check_frame_payload(*header, frame.payload);
  if (!valid.ok()) co_return valid.with_context("frame from " + peer_);
  if (!place) {
    if (header->bulk == 0) co_return frame;
    frame.payload.resize(header->length);
    ec = co_await read_exact(std::span(frame.payload).subspan(covered),
                             deadline, dog);
    if (ec) co_return read_failed();
    co_return frame;
  }
  auto into = place(frame, header->bulk);
  if (!into.ok()) co_return into.status();
  std::vector<asio::mutable_buffer> buffers;
  buffers.reserve(into->size());
  size_t placed = 0;
  for (std::span<uint8_t> s : *into) {
    buffers.push_back(asio::buffer(s.data(), s.size()));
    placed += s.size();
  }
  if (placed != header->bulk) {
    co_return Status::internal("placed " + std::to_string(placed) + " of " +
                               msg_type_name(frame.type) + "'s " +
                               std::to_string(header->bulk) + " bulk bytes");
  }
  if (!buffers.empty()) {
    ec = co_await read_scattered(std::move(buffers), deadline, dog);
    if (ec) co_return read_failed();
  }
  co_return frame;
}

bool FrameChannel::peer_closed() {
  if (!socket_.is_open()) return true;
  if (ahead_pos_ < ahead_end_) return false;  // a frame read ahead
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
  // The connect left the socket registered with epoll for writability, and
  // asio never drops that: every ACK that frees send space would then wake
  // the io thread for nothing. A fresh registration watches what reads
  // need (a send that fills the socket registers writability again).
  const auto protocol = socket.local_endpoint(ec).protocol();
  asio::ip::tcp::socket::native_handle_type fd = -1;
  if (!ec) fd = socket.release(ec);
  if (!ec) {
    socket.assign(protocol, fd, ec);
    if (ec) ::close(fd);  // released: ours to close
  }
  if (ec) {
    co_return status_from_error(ec, "connecting to " + std::string(host_port));
  }
  co_return std::move(socket);
}

}  // namespace kvmig
