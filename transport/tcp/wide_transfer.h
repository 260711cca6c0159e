// Scatter-gather reads and writes on an Asio stream socket with up to 64
// buffers a system call (transfer_wide). Private to transport/tcp.
#ifndef KVMIG_TRANSPORT_TCP_WIDE_TRANSFER_H_
#define KVMIG_TRANSPORT_TCP_WIDE_TRANSFER_H_

#include <algorithm>
#include <array>
#include <boost/asio/buffer.hpp>
#include <boost/system/error_code.hpp>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvmig {

// Asio's composed reads and writes (async_read, async_write over a buffer
// sequence) hand at most 16 buffers to each system call. A batch record is
// its header and up to 63 payloads, so a batch of 4 KiB writes took four
// sendmsg calls at the initiator and four recvmsg calls at the target,
// each with its wake-ups. This one hands up to kWideBuffers, as many as
// Asio gives one read_some or write_some call: a batch in one call.
constexpr size_t kWideBuffers = 64;

// Moves `buffers` (a vector of const_buffer: write; of mutable_buffer:
// read) until at least `need` bytes have gone (a read may fill part of the
// buffers after them, as asio::async_read with at_least does), then calls
// handler(ec, bytes moved). The socket and the vector must outlive it; one
// at a time per socket and direction.
template <typename Socket, typename Buffer, typename Handler>
class WideTransfer : public std::enable_shared_from_this<
                         WideTransfer<Socket, Buffer, Handler>> {
 public:
  WideTransfer(Socket& socket, const std::vector<Buffer>& buffers,
               uint64_t need, Handler handler)
      : socket_(socket),
        buffers_(buffers),
        need_(need),
        handler_(std::move(handler)) {}

  void step() {
    skip_empty();
    size_t n = 0;
    for (size_t i = index_; i < buffers_.size() && n < kWideBuffers; ++i) {
      window_[n++] = i == index_ ? buffers_[i] + offset_ : buffers_[i];
    }
    const std::span<const Buffer> view(window_.data(), n);
    auto done = [self = this->shared_from_this()](
                    const boost::system::error_code& ec, size_t got) {
      self->advance(got);
      if (ec || self->total_ >= self->need_ ||
          self->index_ == self->buffers_.size()) {
        return self->handler_(ec, self->total_);
      }
      self->step();
    };
    if constexpr (std::is_same_v<Buffer, boost::asio::const_buffer>) {
      socket_.async_write_some(view, std::move(done));
    } else {
      socket_.async_read_some(view, std::move(done));
    }
  }

 private:
  void skip_empty() {
    while (index_ < buffers_.size() && buffers_[index_].size() == offset_) {
      ++index_;
      offset_ = 0;
    }
  }
  void advance(size_t got) {
    if (got == 0) return;  // (a failed call: the buffers are not touched)
    total_ += got;
    // (got never exceeds the window, which ends at or before the last
    // buffer.)
    while (got > 0 && index_ < buffers_.size()) {
      const size_t left = buffers_[index_].size() - offset_;
      const size_t n = std::min(got, left);
      offset_ += n;
      got -= n;
      skip_empty();
    }
  }

  Socket& socket_;
  const std::vector<Buffer>& buffers_;
  const uint64_t need_;
  Handler handler_;
  size_t index_ = 0;   // first buffer not yet done
  size_t offset_ = 0;  // bytes of buffers_[index_] done
  uint64_t total_ = 0;
  std::array<Buffer, kWideBuffers> window_{};
};

template <typename Socket, typename Buffer, typename Handler>
void transfer_wide(Socket& socket, const std::vector<Buffer>& buffers,
                   uint64_t need, Handler handler) {
  std::make_shared<WideTransfer<Socket, Buffer, Handler>>(socket, buffers, need,
                                                          std::move(handler))
      ->step();
}

}  // namespace kvmig

#endif  // KVMIG_TRANSPORT_TCP_WIDE_TRANSFER_H_
