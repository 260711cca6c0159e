#include "tcp_transport.h"

#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/buffer.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../transport_util.h"
#include "bytes.h"
#include "errors.h"
#include "log.h"
#include "wide_transfer.h"

namespace kvmig {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

// Records on a data connection: a header of u32 region, u64 offset, u64
// length (kHeaderBytes), then `length` bytes of payload for that place,
// except for these region values:
// - flush: offset is its sequence number, no payload; the target answers
//   with the sequence once every earlier record has landed.
// - mark (protocol 7): the same without an answer; the target notes the
//   sequence (TransportTarget::wait_mark), every earlier record having
//   landed. Flushes and marks share one sequence per connection.
// - batch (protocol 6): offset is a count of entries (2 to
//   kMaxBatchEntries), length their payload bytes (at most kMaxBatchBytes);
//   the entries follow, a header each (region, offset, length), then their
//   payloads, in order. The target checks every entry before it applies
//   any, and reads the payloads straight into place.
constexpr uint32_t kFlushRegion = 0xFFFFFFFF;
constexpr uint32_t kBatchRegion = 0xFFFFFFFE;
constexpr uint32_t kMarkRegion = 0xFFFFFFFD;
constexpr size_t kHeaderBytes = 20;
// Address blob limits, checked when parsing a peer's address.
constexpr size_t kMaxHostLen = 255;
constexpr uint32_t kMaxRegions = 1u << 20;
// How long a fresh connection may take to present the token.
constexpr auto kTokenTimeout = std::chrono::seconds(5);
// Bytes one read or write system call may move (Asio's default is 64 KiB).
constexpr size_t kMaxTransferPerCall = size_t{16} << 20;

// Host bytes a target applies into device memory at a time, and the most a
// write record from device memory carries: device bytes go through a
// bounce buffer of this size at each end.
constexpr size_t kBounceBytes = size_t{256} << 10;
// A target's receive buffer: small records are applied from it, many per
// system call, their payloads copied out; a payload of kCopyBelow bytes or
// more is read straight into place with the next header only (copying it
// costs more than the system call saved: 32 KiB writes ran 19 % slower).
constexpr size_t kRxBytes = size_t{256} << 10;
constexpr uint64_t kCopyBelow = uint64_t{16} << 10;
// A batch's payloads and the next header in one read (Asio hands at most
// 64 buffers to a system call); its payloads fit one bounce buffer, where
// a device target reads them.
constexpr uint64_t kMaxBatchEntries = 63;
constexpr uint64_t kMaxBatchBytes = kBounceBytes;

using Header = std::array<uint8_t, kHeaderBytes>;
using Word = std::array<uint8_t, 8>;

// One of a target's regions, with how to reach it when it is device memory
// (null: host memory, read into directly).
struct TargetRegion {
  std::span<std::byte> mem;
  std::shared_ptr<const DeviceMemory> device;
};

// The transport's registered memory, shared with its initiators (which look
// up device sources). Thread-safe.
class Registry {
 public:
  Status add(std::span<std::byte> region,
             std::shared_ptr<const DeviceMemory> device) {
    std::lock_guard lock(mu_);
    KVMIG_RETURN_IF_ERROR(table_.check_new(region, "tcp"));
    if (device) has_device_ = true;
    table_.add(region, std::move(device));
    return Status();
  }
  Status remove(std::span<std::byte> region) {
    std::lock_guard lock(mu_);
    return table_.remove(region, "tcp").status();
  }
  // Whether [p, p + n) is registered, and its device (null for host).
  std::optional<std::shared_ptr<const DeviceMemory>> find(const void* p,
                                                          size_t n) const {
    std::lock_guard lock(mu_);
    const auto* e = table_.find(p, n);
    if (e == nullptr) return std::nullopt;
    return e->value;
  }
  // Ever held device memory: writes must then look their sources up.
  bool has_device() const { return has_device_.load(); }

 private:
  mutable std::mutex mu_;
  RegionTable<std::shared_ptr<const DeviceMemory>> table_;  // guarded by mu_
  std::atomic<bool> has_device_{false};
};

// Completion condition: at least `n` bytes, in calls of up to
// kMaxTransferPerCall.
auto at_least(uint64_t n) {
  return [n](const error_code& ec, size_t transferred) -> size_t {
    return ec || transferred >= n ? 0 : kMaxTransferPerCall;
  };
}

// Closes a socket or acceptor, logging a failure.
template <typename S>
void close_logged(S& s, std::string_view what) {
  if (!s.is_open()) return;
  error_code ec;
  s.close(ec);
  if (ec) logger("tcp")->warn("closing {}: {}", what, ec.message());
}

std::string endpoint_string(const tcp::socket& s) {
  error_code ec;
  auto ep = s.remote_endpoint(ec);
  if (ec) return "?";
  return ep.address().to_string() + ":" + std::to_string(ep.port());
}

// One target connection: an acceptor until the initiator showed the token,
// then that initiator's stream, applied into the regions of the migration
// it currently serves. A committed migration may park it (keep()) for the
// same initiator's next migration, which adopts it with its own regions.
// Thread-safe: adopt(), park(), allow(), revoke() and health() may be
// called from any thread. The sockets are touched only by the connection's
// own thread until revoke() has joined it.
class TargetConn {
 public:
  static Result<std::shared_ptr<TargetConn>> open(
      const std::string& host, std::vector<TargetRegion> regions) {
    std::shared_ptr<TargetConn> c(new TargetConn(host, std::move(regions)));
    KVMIG_RETURN_IF_ERROR(c->listen());
    c->start_accept();
    c->thread_ = std::thread([raw = c.get()] { raw->io_.run(); });
    return c;
  }

  ~TargetConn() { revoke(); }

  TargetConn(const TargetConn&) = delete;
  TargetConn& operator=(const TargetConn&) = delete;

  uint64_t token() const { return token_; }

  // What the initiator needs: host, port (0: the connection it already
  // holds), token and the current regions' lengths.
  std::vector<uint8_t> address(bool reused) const {
    std::lock_guard lock(mu_);
    ByteWriter w;
    w.put_string(host_);
    w.put<uint16_t>(reused ? 0 : port_);
    w.put<uint64_t>(token_);
    w.put<uint32_t>(static_cast<uint32_t>(regions_.size()));
    for (const auto& r : regions_) w.put<uint64_t>(r.mem.size());
    return w.take();
  }

  // Serves a new migration over this (parked) connection: its regions, no
  // window yet. Returns the new generation (see generation()).
  uint64_t adopt(std::vector<TargetRegion> regions) {
    std::lock_guard lock(mu_);
    regions_ = std::move(regions);
    windows_.clear();
    parked_ = false;
    return ++generation_;
  }

  // Which migration the connection serves: 0 for the one that opened it,
  // one more for each adopt().
  uint64_t generation() const {
    std::lock_guard lock(mu_);
    return generation_;
  }

  // Stops applying writes: from now on any record but a flush or a mark
  // cuts the connection. False (nothing changed) unless the initiator is
  // connected, healthy and not in the middle of a write's payload, which could
  // still land after this returns.
  bool park() {
    std::lock_guard lock(mu_);
    if (revoked_ || !authenticated_ || !health_.ok() || in_payload_) {
      return false;
    }
    parked_ = true;
    return true;
  }

  // Connected, not failed, not revoked: a parked connection worth adopting.
  bool healthy() const {
    std::lock_guard lock(mu_);
    return !revoked_ && authenticated_ && health_.ok();
  }

  bool revoked() const {
    std::lock_guard lock(mu_);
    return revoked_;
  }

  void revoke() {
    // Held for the whole teardown: a second caller returns only once the
    // first has cut the initiator off.
    std::lock_guard teardown(teardown_mu_);
    {
      std::lock_guard lock(mu_);
      if (revoked_) return;
      revoked_ = true;
    }
    wake_mark_waiters();
    // After the join no handler runs and no read is issued; the sockets are
    // then closed so the kernel drops whatever else arrives.
    io_.stop();
    if (thread_.joinable()) thread_.join();
    close_logged(acceptor_, "tcp target acceptor");
    close_logged(pending_, "tcp target pending connection");
    close_logged(socket_, "tcp target connection");
    log_->debug(
        "target revoked (initiator {}): {} writes, {} bytes, {} flushes, {} "
        "migrations",
        peer_.empty() ? "never connected" : peer_, writes_applied_,
        bytes_applied_, flushes_, generation() + 1);
  }

  Status health() const {
    std::lock_guard lock(mu_);
    return health_;
  }

  // See TransportTarget::notify_mark.
  void notify_mark(uint64_t mark, std::function<void()> wake) {
    {
      std::lock_guard lock(mu_);
      if (marked_ < mark && health_.ok() && !revoked_) {
        mark_waiters_.emplace_back(mark, std::move(wake));
        return;
      }
    }
    wake();
  }

  // See TransportTarget::wait_mark. The mark is checked first: once it
  // arrived, every write before it landed, whatever became of the
  // connection since.
  Status wait_mark(uint64_t mark, Deadline deadline) {
    std::unique_lock lock(mu_);
    if (Clock::now() < deadline) {
      marked_cv_.wait_until(lock, deadline, [&] {
        return marked_ >= mark || !health_.ok() || revoked_;
      });
    }
    if (marked_ >= mark) return Status();
    const std::string what = "tcp target: mark " + std::to_string(mark) +
                             " from " + (peer_.empty() ? "?" : peer_);
    if (!health_.ok()) {
      return Status::unavailable(what + " never came: " + health_.message());
    }
    if (revoked_) return Status::aborted(what + ": the target was revoked");
    return Status::deadline_exceeded(what + " has not arrived (the last was " +
                                     std::to_string(marked_) + ")");
  }

  void allow(std::span<const WriteWindow> ranges) {
    // Joined before the lock: a map insertion per slot and region took
    // milliseconds for a few thousand random slots, on the OFFER's path.
    const std::vector<WriteWindow> runs =
        coalesce_windows({ranges.begin(), ranges.end()});
    std::lock_guard lock(mu_);
    if (windows_.empty()) windows_.resize(regions_.size());
    for (const WriteWindow& w : runs) {
      if (w.region >= windows_.size()) continue;
      auto& spans = windows_[w.region];
      uint64_t begin = w.offset, end = w.offset + w.length;
      // Merge with the ranges it touches, so a write spanning adjacent
      // slots is one range.
      auto it = spans.upper_bound(begin);
      if (it != spans.begin() && std::prev(it)->second >= begin) --it;
      while (it != spans.end() && it->first <= end) {
        begin = std::min(begin, it->first);
        end = std::max(end, it->second);
        it = spans.erase(it);
      }
      spans.emplace(begin, end);
    }
  }

 private:
  TargetConn(std::string host, std::vector<TargetRegion> regions)
      : log_(logger("tcp")),
        host_(std::move(host)),
        token_(random_token()),
        acceptor_(io_),
        pending_(io_),
        token_timer_(io_),
        socket_(io_),
        regions_(std::move(regions)) {}

  Status listen() {
    error_code ec;
    const auto ip = asio::ip::make_address(host_, ec);
    if (ec) {
      return Status::invalid_argument("tcp: bind host '" + host_ +
                                      "' is not an IP address");
    }
    const tcp::endpoint ep(ip, 0);
    acceptor_.open(ep.protocol(), ec);
    if (ec) return status_from_error(ec, "tcp: open acceptor");
    acceptor_.bind(ep, ec);
    if (ec) return status_from_error(ec, "tcp: bind " + host_ + ":0");
    acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return status_from_error(ec, "tcp: listen on " + host_);
    const auto local = acceptor_.local_endpoint(ec);
    if (ec) return status_from_error(ec, "tcp: query listening port");
    port_ = local.port();
    return Status();
  }

  void start_accept() {
    acceptor_.async_accept(pending_, [this](const error_code& ec) {
      if (ec == asio::error::operation_aborted) return;
      if (ec) return fail(status_from_error(ec, "tcp: accept"));
      token_timer_.expires_after(kTokenTimeout);
      token_timer_.async_wait([this](const error_code& tec) {
        if (!tec) close_logged(pending_, "tcp connection without token");
      });
      asio::async_read(
          pending_, asio::buffer(token_buf_),
          [this](const error_code& rec, size_t) { on_token(rec); });
    });
  }

  void on_token(const error_code& ec) {
    token_timer_.cancel();
    const std::string from = endpoint_string(pending_);
    if (ec || load_le<uint64_t>(token_buf_.data()) != token_) {
      log_->warn("target: rejected a connection from {}: {}", from,
                 ec ? ec.message() : "wrong token");
      close_logged(pending_, "rejected tcp connection");
      return start_accept();
    }
    socket_ = std::move(pending_);
    peer_ = from;
    close_logged(acceptor_, "tcp target acceptor");  // one initiator only
    error_code opt_ec;
    socket_.set_option(tcp::no_delay(true), opt_ec);
    asio::async_write(
        socket_, asio::buffer(token_buf_),
        [this](const error_code& wec, size_t) {
          if (wec) {
            return fail(status_from_error(wec, "tcp: answer " + peer_));
          }
          {
            std::lock_guard lock(mu_);
            authenticated_ = true;
          }
          rx_.resize(kRxBytes);
          serve();
        });
  }

  // Applies the records buffered in rx_, in order, then reads more: many
  // small records per system call, each payload copied out of rx_; a
  // payload that is not buffered whole is read straight into place
  // (read_rest). Target thread.
  void serve() {
    for (;;) {
      if (rx_end_ - rx_begin_ < kHeaderBytes) return read_more();
      const uint8_t* h = rx_.data() + rx_begin_;
      const uint32_t region = load_le<uint32_t>(h);
      const uint64_t offset = load_le<uint64_t>(h + 4);
      const uint64_t length = load_le<uint64_t>(h + 12);
      rx_begin_ += kHeaderBytes;
      if (region == kFlushRegion) {
        if (length != 0) {
          return fail(Status::protocol("tcp target: flush record from " +
                                       peer_ + " has length " +
                                       std::to_string(length)));
        }
        // Records are applied in order, so every earlier write has landed.
        ++flushes_;
        store_le<uint64_t>(ack_.data(), offset);
        asio::async_write(
            socket_, asio::buffer(ack_), [this](const error_code& wec, size_t) {
              if (wec) {
                return fail(status_from_error(wec, "tcp: ack to " + peer_));
              }
              serve();
            });
        return;
      }
      if (region == kMarkRegion) {
        if (length != 0) {
          return fail(Status::protocol("tcp target: mark record from " + peer_ +
                                       " has length " +
                                       std::to_string(length)));
        }
        {
          std::lock_guard lock(mu_);
          marked_ = std::max(marked_, offset);
        }
        wake_mark_waiters();
        continue;
      }
      if (region == kBatchRegion) return start_batch(offset, length);
      auto dst = claim(region, offset, length);
      if (!dst.ok()) return fail(dst.status());
      if (length == 0) continue;
      large_ = length >= kCopyBelow;
      const size_t have =
          static_cast<size_t>(std::min<uint64_t>(length, rx_end_ - rx_begin_));
      const std::span<const std::byte> buffered(
          reinterpret_cast<const std::byte*>(rx_.data()) + rx_begin_, have);
      rx_begin_ += have;
      if (dst->device) {
        if (have > 0) {
          Status copied = device_->write(dst->mem.data(), buffered);
          if (!copied.ok()) return fail_device(copied);
        }
        if (have < length) {
          return read_into_device(dst->mem.data(), length, have);
        }
      } else {
        std::memcpy(dst->mem.data(), buffered.data(), have);
        if (have < length) return read_rest(dst->mem.data(), length, have);
      }
      end_payload();
      bytes_applied_ += length;
      ++writes_applied_;
    }
  }

  // A batch record's header has been taken from rx_: its entries, from
  // rx_ and then the socket. Target thread.
  void start_batch(uint64_t entries, uint64_t bytes) {
    if (entries < 2 || entries > kMaxBatchEntries || bytes > kMaxBatchBytes) {
      return fail(Status::protocol(
          "tcp target: batch record from " + peer_ + " of " +
          std::to_string(entries) + " entries and " + std::to_string(bytes) +
          " bytes (2 to " + std::to_string(kMaxBatchEntries) +
          " entries of at most " + std::to_string(kMaxBatchBytes) + " bytes)"));
    }
    batch_meta_.resize(entries * kHeaderBytes);
    batch_bytes_ = bytes;
    const size_t have = std::min(batch_meta_.size(), rx_end_ - rx_begin_);
    std::memcpy(batch_meta_.data(), rx_.data() + rx_begin_, have);
    rx_begin_ += have;
    if (have == batch_meta_.size()) return apply_batch();
    rx_begin_ = rx_end_ = 0;
    asio::async_read(
        socket_,
        asio::buffer(batch_meta_.data() + have, batch_meta_.size() - have),
        [this](const error_code& ec, size_t) {
          if (ec) {
            return fail(
                status_from_error(ec, "tcp: read a batch from " + peer_));
          }
          apply_batch();
        });
  }

  // Checks every entry of the batch in batch_meta_ (nothing lands if one
  // is refused), then applies the payloads rx_ holds and reads the rest
  // straight into place, with the next header. Target thread.
  void apply_batch() {
    batch_dst_.clear();
    bool device = false;
    Status refused;
    {
      std::lock_guard lock(mu_);
      uint64_t sum = 0;
      for (size_t k = 0; k < batch_meta_.size(); k += kHeaderBytes) {
        const uint8_t* h = batch_meta_.data() + k;
        const uint64_t length = load_le<uint64_t>(h + 12);
        auto dst = claim_locked(load_le<uint32_t>(h), load_le<uint64_t>(h + 4),
                                length);
        if (!dst.ok()) {
          refused = dst.status();
          break;
        }
        sum += length;
        device = device || dst->device != nullptr;
        batch_dst_.push_back({dst->mem.first(length), dst->device});
      }
      if (refused.ok() && sum != batch_bytes_) {
        refused = Status::protocol(
            "tcp target: batch record from " + peer_ +
            ": its entries add up to " + std::to_string(sum) +
            " bytes, its header says " + std::to_string(batch_bytes_));
      }
      if (refused.ok()) in_payload_ = true;
    }
    if (!refused.ok()) {
      batch_dst_.clear();
      return fail(refused);
    }
    large_ = true;  // after a batch, only the next header into rx_
    // Payload bytes already buffered: applied from rx_ (device targets read
    // the whole batch into the bounce buffer first).
    const size_t have = static_cast<size_t>(
        std::min<uint64_t>(batch_bytes_, rx_end_ - rx_begin_));
    const auto* from =
        reinterpret_cast<const std::byte*>(rx_.data()) + rx_begin_;
    rx_begin_ += have;
    if (device) {
      if (bounce_.size() < kBounceBytes) bounce_.resize(kBounceBytes);
      std::memcpy(bounce_.data(), from, have);
      if (have == batch_bytes_) return land_batch_from_bounce(0);
      rx_begin_ = rx_end_ = 0;
      const uint64_t rest = batch_bytes_ - have;
      reads_ = {asio::buffer(bounce_.data() + have, rest),
                asio::buffer(rx_.data(), kHeaderBytes)};
      asio::async_read(socket_, reads_, at_least(rest),
                       [this, rest](const error_code& ec, size_t n) {
                         if (ec) {
                           end_payload();
                           return fail(status_from_error(
                               ec, "tcp: read a batch from " + peer_));
                         }
                         land_batch_from_bounce(n - rest);
                       });
      return;
    }
    // Host: the buffered part copied, the rest read in place.
    size_t k = 0;
    uint64_t done = 0;  // of batch_dst_[k]
    for (size_t left = have; left > 0;) {
      const size_t n =
          std::min<uint64_t>(left, batch_dst_[k].mem.size() - done);
      std::memcpy(batch_dst_[k].mem.data() + done, from, n);
      from += n;
      left -= n;
      done += n;
      if (done == batch_dst_[k].mem.size()) {
        ++k;
        done = 0;
      }
    }
    if (have == batch_bytes_) {
      end_payload();
      return end_batch();
    }
    rx_begin_ = rx_end_ = 0;
    batch_reads_.clear();
    for (; k < batch_dst_.size(); ++k, done = 0) {
      const std::span<std::byte> rest = batch_dst_[k].mem.subspan(done);
      batch_reads_.push_back(asio::buffer(rest.data(), rest.size()));
    }
    batch_reads_.push_back(asio::buffer(rx_.data(), kHeaderBytes));
    const uint64_t rest = batch_bytes_ - have;
    transfer_wide(socket_, batch_reads_, rest,
                  [this, rest](const error_code& ec, size_t n) {
                    end_payload();
                    if (ec) {
                      return fail(status_from_error(
                          ec, "tcp: read a batch from " + peer_));
                    }
                    rx_end_ = n - rest;
                    end_batch();
                  });
  }

  // A device target's batch is whole in bounce_ (and `tail` bytes of the
  // next header in rx_): applied entry by entry. Target thread.
  void land_batch_from_bounce(size_t tail) {
    const std::byte* from = bounce_.data();
    for (const TargetRegion& d : batch_dst_) {
      if (d.device) {
        Status copied =
            d.device->write(d.mem.data(), std::span(from, d.mem.size()));
        if (!copied.ok()) return fail_device(copied);
      } else {
        std::memcpy(d.mem.data(), from, d.mem.size());
      }
      from += d.mem.size();
    }
    end_payload();
    if (tail > 0) rx_end_ = tail;  // read after the payloads (rx_ was empty)
    end_batch();
  }

  void end_batch() {
    bytes_applied_ += batch_bytes_;
    writes_applied_ += batch_dst_.size();
    batch_dst_.clear();
    serve();
  }

  // Reads whatever has arrived into rx_ after what is left of it; after a
  // large payload or a batch only the rest of a header (what follows is
  // likely the same, and its payloads go straight into place).
  void read_more() {
    if (rx_begin_ > 0) {
      std::memmove(rx_.data(), rx_.data() + rx_begin_, rx_end_ - rx_begin_);
      rx_end_ -= rx_begin_;
      rx_begin_ = 0;
    }
    const size_t room = large_ ? kHeaderBytes - rx_end_ : rx_.size() - rx_end_;
    socket_.async_read_some(
        asio::buffer(rx_.data() + rx_end_, room),
        [this](const error_code& ec, size_t n) {
          if (ec == asio::error::eof) {
            return fail(Status::unavailable("tcp target: initiator " + peer_ +
                                            " closed the connection"));
          }
          if (ec) {
            return fail(
                status_from_error(ec, "tcp: read from initiator " + peer_));
          }
          rx_end_ += n;
          serve();
        });
  }

  // The rest of a write's payload (rx_ is empty: it held `done` bytes of
  // it) straight into place, and what follows it into rx_, in the same
  // system calls. A stream that ends after a payload fails here, the
  // payload applied.
  void read_rest(std::byte* dst, uint64_t length, uint64_t done) {
    rx_begin_ = rx_end_ = 0;
    const uint64_t rest = length - done;
    // After a large payload, only the next header: a large one that
    // follows is then read into place too, not copied out of rx_.
    const size_t tail = large_ ? kHeaderBytes : rx_.size();
    reads_ = {asio::buffer(dst + done, rest), asio::buffer(rx_.data(), tail)};
    asio::async_read(socket_, reads_, at_least(rest),
                     [this, length, rest](const error_code& ec, size_t n) {
                       end_payload();
                       if (ec) {
                         return fail(status_from_error(
                             ec, "tcp: read payload from " + peer_));
                       }
                       rx_end_ = n - rest;
                       bytes_applied_ += length;
                       ++writes_applied_;
                       serve();
                     });
  }

  // A write into device memory: its payload a bounce buffer at a time,
  // each copied in through the device before the next is read; the last
  // piece is read together with the next header into rx_ (empty now), as
  // on the host path for a large payload. `done` bytes of `length` have landed
  // at dst.
  void read_into_device(std::byte* dst, uint64_t length, uint64_t done) {
    if (bounce_.empty()) bounce_.resize(kBounceBytes);
    rx_begin_ = rx_end_ = 0;
    const size_t n = std::min<uint64_t>(length - done, bounce_.size());
    const bool last = done + n == length;
    reads_ = {asio::buffer(bounce_.data(), n),
              asio::buffer(rx_.data(), last ? kHeaderBytes : 0)};
    asio::async_read(
        socket_, reads_, at_least(n),
        [this, dst, length, done, n, last](const error_code& ec, size_t got) {
          if (ec) {
            end_payload();
            return fail(
                status_from_error(ec, "tcp: read payload from " + peer_));
          }
          Status copied =
              device_->write(dst + done, std::span(bounce_).first(n));
          if (!copied.ok()) return fail_device(copied);
          if (!last) return read_into_device(dst, length, done + n);
          end_payload();
          rx_end_ = got - n;
          bytes_applied_ += length;
          ++writes_applied_;
          serve();
        });
  }

  void fail_device(const Status& copied) {
    end_payload();
    fail(copied.with_context("tcp target: applying a write from " + peer_ +
                             " into device memory"));
  }

  void end_payload() {
    std::lock_guard lock(mu_);
    in_payload_ = false;
  }

  // Checks a write record against the current migration's regions and
  // window and, when it is to be applied, marks its payload in flight
  // (park() refuses until it has landed): where it goes, and the device
  // it goes through (device_, for read_into_device). Target thread.
  Result<TargetRegion> claim(uint32_t region, uint64_t offset,
                             uint64_t length) {
    std::lock_guard lock(mu_);
    auto dst = claim_locked(region, offset, length);
    if (dst.ok() && length > 0) {
      in_payload_ = true;
      device_ = dst->device;
    }
    return dst;
  }

  // claim() without its side effects, mu_ held: whether the record may be
  // applied, and where.
  Result<TargetRegion> claim_locked(uint32_t region, uint64_t offset,
                                    uint64_t length) {
    // Messages are built only on the way out: this runs once a write.
    auto refuse = [&](const std::string& why) {
      return Status::protocol("tcp target: write record from " + peer_ + why);
    };
    if (parked_) {
      return refuse(" after its migration committed (the connection was kept)");
    }
    if (region >= regions_.size()) {
      return refuse(" for region " + std::to_string(region) + " of " +
                    std::to_string(regions_.size()));
    }
    const std::span<std::byte> dst = regions_[region].mem;
    if (offset > dst.size() || length > dst.size() - offset) {
      return refuse(" for [" + std::to_string(offset) + ", +" +
                    std::to_string(length) + ") outside region " +
                    std::to_string(region) + " of " +
                    std::to_string(dst.size()) + " bytes");
    }
    if (length == 0) return TargetRegion{dst, nullptr};
    if (!windows_.empty()) {
      const auto& spans = windows_[region];
      auto it = spans.upper_bound(offset);
      if (it == spans.begin() || offset < std::prev(it)->first ||
          offset + length > std::prev(it)->second) {
        return refuse(" for [" + std::to_string(offset) + ", +" +
                      std::to_string(length) + ") of region " +
                      std::to_string(region) +
                      " lies outside the slots offered to this migration");
      }
    }
    return TargetRegion{dst.subspan(offset), regions_[region].device};
  }

  // Wakes wait_mark() and the notify_mark() callers whose wait is over
  // (every one once the connection failed or was revoked), outside mu_.
  void wake_mark_waiters() {
    std::vector<std::function<void()>> due;
    {
      std::lock_guard lock(mu_);
      const bool over = !health_.ok() || revoked_;
      auto it = mark_waiters_.begin();
      while (it != mark_waiters_.end()) {
        if (over || it->first <= marked_) {
          due.push_back(std::move(it->second));
          it = mark_waiters_.erase(it);
        } else {
          ++it;
        }
      }
    }
    marked_cv_.notify_all();
    for (auto& wake : due) wake();
  }

  // Records the first failure and drops the connection.
  void fail(Status s) {
    {
      std::lock_guard lock(mu_);
      if (health_.ok()) health_ = s;
    }
    wake_mark_waiters();
    if (s.code() == StatusCode::kUnavailable) {
      log_->info("target: {}", s.to_string());
    } else {
      log_->warn("target: {}", s.to_string());
    }
    close_logged(socket_, "tcp target connection");
  }

  const std::shared_ptr<spdlog::logger> log_;
  const std::string host_;
  const uint64_t token_;
  uint16_t port_ = 0;  // set before the thread starts

  // Touched only by the connection's thread (or after it was joined).
  asio::io_context io_;
  tcp::acceptor acceptor_;
  tcp::socket pending_;  // a connection that has not shown the token yet
  asio::steady_timer token_timer_;
  tcp::socket socket_;  // the authenticated initiator
  Word token_buf_{};
  // Received and not yet applied: rx_[rx_begin_, rx_end_).
  std::vector<uint8_t> rx_;
  size_t rx_begin_ = 0, rx_end_ = 0;
  // The last record was a batch, or a write of kCopyBelow bytes or more.
  bool large_ = false;
  std::array<asio::mutable_buffer, 2> reads_;
  // The batch being applied: its entries, where each goes, its payload
  // bytes, and the reads that bring them in.
  std::vector<uint8_t> batch_meta_;
  std::vector<TargetRegion> batch_dst_;
  uint64_t batch_bytes_ = 0;
  std::vector<asio::mutable_buffer> batch_reads_;
  std::vector<std::byte> bounce_;  // device writes only; kBounceBytes
  std::shared_ptr<const DeviceMemory> device_;  // of the write being read
  Word ack_{};
  std::string peer_;
  uint64_t bytes_applied_ = 0;
  uint64_t writes_applied_ = 0;
  uint64_t flushes_ = 0;

  std::mutex teardown_mu_;  // held by revoke() throughout (never by io_)
  mutable std::mutex mu_;
  // Guarded by mu_:
  std::vector<TargetRegion> regions_;  // the current migration's
  // Per region, allowed [begin, end) ranges by begin, disjoint and merged;
  // empty: no window.
  std::vector<std::map<uint64_t, uint64_t>> windows_;
  Status health_;
  bool revoked_ = false;
  bool authenticated_ = false;  // the initiator showed the token
  bool parked_ = false;         // kept: no write is applied
  bool in_payload_ = false;     // a write's bytes are being read
  uint64_t generation_ = 0;
  uint64_t marked_ = 0;                // the highest mark that arrived
  std::condition_variable marked_cv_;  // marked_, health_ or revoked_ moved
  // notify_mark()'s callers still waiting: mark, wake.
  std::vector<std::pair<uint64_t, std::function<void()>>> mark_waiters_;

  std::thread thread_;  // runs io_; joined by revoke()
};

// The initiator's end of a connection, kept between migrations to the same
// peer. One thread at a time drives it.
struct InitConn {
  asio::io_context io;
  tcp::socket socket{io};
  uint64_t token = 0;  // the target's, shown when connecting
  // Flushes and marks: continues across the migrations it serves.
  uint64_t flush_seq = 0;
  std::string peer;  // host:port, for logs

  // While parked nobody reads the socket: false once the target closed it
  // (or sent something it should not have).
  bool alive() {
    if (!socket.is_open()) return false;
    uint8_t b = 0;
    const ssize_t n =
        ::recv(socket.native_handle(), &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
};

// Connections kept after committed migrations (TransportTarget::keep(),
// TransportInitiator::keep()): targets by token, initiators by peer. At
// most kMaxKept of each; the oldest goes to make room. Thread-safe.
class Parking {
 public:
  static constexpr size_t kMaxKept = 16;

  void park_target(std::shared_ptr<TargetConn> c) {
    std::shared_ptr<TargetConn> evicted;
    {
      std::lock_guard lock(mu_);
      targets_.push_back(std::move(c));
      if (targets_.size() > kMaxKept) {
        evicted = std::move(targets_.front());
        targets_.pop_front();
      }
    }
    if (evicted) evicted->revoke();
  }

  // Adopts the parked connection with this token for a migration into
  // `regions`, if it is still healthy; null otherwise.
  std::shared_ptr<TargetConn> take_target(uint64_t token,
                                          std::vector<TargetRegion> regions) {
    std::shared_ptr<TargetConn> c;
    {
      std::lock_guard lock(mu_);
      auto it =
          std::find_if(targets_.begin(), targets_.end(),
                       [&](const auto& t) { return t->token() == token; });
      if (it == targets_.end()) return nullptr;
      c = std::move(*it);
      targets_.erase(it);
      if (c->healthy()) {
        c->adopt(std::move(regions));
        return c;
      }
    }
    c->revoke();
    return nullptr;
  }

  // Before revoking a connection a migration kept: true when it is still
  // that migration's (parked, and now taken out; or evicted), false when
  // the next migration adopted it.
  bool reclaim(const TargetConn* c, uint64_t generation) {
    std::lock_guard lock(mu_);
    auto it = std::find_if(targets_.begin(), targets_.end(),
                           [&](const auto& t) { return t.get() == c; });
    if (it == targets_.end()) return c->generation() == generation;
    targets_.erase(it);
    return true;
  }

  void park_init(const std::string& peer, std::unique_ptr<InitConn> c) {
    std::vector<std::unique_ptr<InitConn>> displaced;
    std::lock_guard lock(mu_);
    displaced = inits_.put(peer, std::move(c));
  }

  // The connection kept to peer, if the target has not closed it.
  std::unique_ptr<InitConn> take_init(const std::string& peer) {
    std::lock_guard lock(mu_);
    auto c = inits_.take(peer);
    if (c && !c->alive()) return nullptr;
    return c;
  }

  void clear() {
    std::deque<std::shared_ptr<TargetConn>> targets;
    {
      std::lock_guard lock(mu_);
      targets.swap(targets_);
      (void)inits_.take_all();
    }
    for (const auto& t : targets) t->revoke();
  }

 private:
  std::mutex mu_;
  std::deque<std::shared_ptr<TargetConn>> targets_;        // guarded by mu_
  KeptByPeer<std::unique_ptr<InitConn>> inits_{kMaxKept};  // guarded by mu_
};

// The receiving end of one migration: a connection it opened or adopted
// from the parking. Thread-safe.
class TcpTarget final : public TransportTarget {
 public:
  TcpTarget(std::shared_ptr<TargetConn> conn, std::shared_ptr<Parking> parking,
            bool reused)
      : conn_(std::move(conn)),
        parking_(std::move(parking)),
        generation_(conn_->generation()),
        address_(conn_->address(reused)) {}

  // Revokes, unless the connection was kept: it is the parking's then.
  ~TcpTarget() override {
    {
      std::lock_guard lock(mu_);
      if (kept_) return;
    }
    revoke();
  }

  std::vector<uint8_t> address() const override { return address_; }

  Result<bool> allow(std::span<const WriteWindow> ranges) override {
    conn_->allow(ranges);
    return true;
  }

  Status health() const override { return conn_->health(); }

  Status wait_mark(uint64_t mark, Deadline deadline) override {
    return conn_->wait_mark(mark, deadline);
  }

  void notify_mark(uint64_t mark, std::function<void()> wake) override {
    conn_->notify_mark(mark, std::move(wake));
  }

  void revoke() override {
    std::lock_guard lock(mu_);
    if (kept_) {
      // Parked: take it back, unless the next migration adopted it (then
      // it is that migration's to revoke).
      if (!parking_->reclaim(conn_.get(), generation_)) return;
      kept_ = false;
    }
    conn_->revoke();
  }

  bool keep() override {
    std::lock_guard lock(mu_);
    if (kept_) return true;
    if (!conn_->park()) {
      conn_->revoke();
      return false;
    }
    kept_ = true;
    parking_->park_target(conn_);
    return true;
  }

 private:
  const std::shared_ptr<TargetConn> conn_;
  const std::shared_ptr<Parking> parking_;
  const uint64_t generation_;  // conn_'s while it serves this migration
  const std::vector<uint8_t> address_;
  std::mutex mu_;
  bool kept_ = false;  // guarded by mu_
};

// The sending end. Not thread-safe: one thread drives it. Every wait runs the
// connection's io_context until the deadline; past it the socket is closed
// and the initiator stays failed.
class TcpInitiator final : public TransportInitiator {
 public:
  // `adopted`: a connection an earlier initiator to peer_key kept.
  TcpInitiator(std::shared_ptr<const Registry> registry,
               std::shared_ptr<Parking> parking, std::string peer_key,
               std::unique_ptr<InitConn> adopted)
      : log_(logger("tcp")),
        registry_(std::move(registry)),
        parking_(std::move(parking)),
        peer_key_(std::move(peer_key)),
        adopted_(adopted != nullptr),
        conn_(std::move(adopted)) {}

  ~TcpInitiator() override {
    if (!conn_) return;  // kept, or never connected
    close_logged(conn_->socket, "tcp initiator connection");
    log_->debug(
        "initiator to {} closed: {} ops, {} bytes, {} flushes and marks",
        conn_->peer.empty() ? "nobody" : conn_->peer, ops_posted_,
        bytes_written_, conn_->flush_seq);
  }

  // Empty, or the token of the kept connection this initiator holds.
  std::vector<uint8_t> address() const override {
    if (!adopted_) return {};
    std::vector<uint8_t> a(8);
    store_le<uint64_t>(a.data(), conn_->token);
    return a;
  }

  Status connect(std::span<const uint8_t> target_address,
                 Deadline deadline) override {
    if (connected_ || !failed_.ok()) {
      return Status::failed_precondition("tcp: connect called twice");
    }
    ByteReader r(target_address);
    auto parsed = parse_address(r);
    if (!parsed.ok()) {
      return Status::invalid_argument("tcp: bad target address: " +
                                      parsed.status().message());
    }
    if (parsed->port == 0) {
      // The target adopted the connection this initiator holds.
      if (!adopted_ || parsed->token != conn_->token) {
        return fail(Status::protocol(
            "tcp: bad target address: it reuses a connection this initiator "
            "does not hold"));
      }
      region_lengths_ = std::move(parsed->region_lengths);
      connected_ = true;
      log_->debug("initiator reuses its connection to {}", conn_->peer);
      return Status();
    }
    if (adopted_) {
      // The target did not know our token (it restarted, or let its side
      // go): the kept connection is useless.
      close_logged(conn_->socket, "kept tcp initiator connection");
      conn_.reset();
      adopted_ = false;
    }
    // Made here, not with the initiator: a migration whose pages go another
    // way (inline) never pays for its io_context (~13 us).
    conn_ = std::make_unique<InitConn>();
    error_code ec;
    const auto ip = asio::ip::make_address(parsed->host, ec);
    if (ec) {
      return Status::invalid_argument("tcp: bad target address: host '" +
                                      parsed->host + "'");
    }
    conn_->peer = parsed->host + ":" + std::to_string(parsed->port);
    conn_->token = parsed->token;
    store_le<uint64_t>(word_.data(), parsed->token);

    bool done = false;
    error_code result;
    conn_->socket.async_connect(
        tcp::endpoint(ip, parsed->port), [&](const error_code& cec) {
          if (cec) {
            result = cec;
            done = true;
            return;
          }
          error_code opt_ec;
          conn_->socket.set_option(tcp::no_delay(true), opt_ec);
          send_then_read_reply(asio::buffer(word_), done, result);
        });
    KVMIG_RETURN_IF_ERROR(wait(deadline, done, result, "connect"));
    if (reply_ != word_) {
      return fail(
          Status::protocol("tcp: target " + conn_->peer +
                           " answered the handshake with a wrong token"));
    }
    region_lengths_ = std::move(parsed->region_lengths);
    connected_ = true;
    log_->debug("initiator connected to {}", conn_->peer);
    return Status();
  }

  Status write(std::span<const WriteOp> ops, Deadline deadline) override {
    KVMIG_RETURN_IF_ERROR(usable());
    KVMIG_RETURN_IF_ERROR(check_write_ops(ops, region_lengths_, "tcp"));
    if (registry_->has_device()) return write_via_bounce(ops, deadline);
    return write_records(ops, deadline, false);
  }

  Status flush(Deadline deadline) override {
    KVMIG_RETURN_IF_ERROR(usable());
    const uint64_t seq = ++conn_->flush_seq;
    Header h{};
    store_le<uint32_t>(h.data(), kFlushRegion);
    store_le<uint64_t>(h.data() + 4, seq);
    bool done = false;
    error_code result;
    send_then_read_reply(asio::buffer(h), done, result);
    KVMIG_RETURN_IF_ERROR(wait(deadline, done, result, "flush"));
    if (load_le<uint64_t>(reply_.data()) != seq) {
      return fail(Status::protocol(
          "tcp: target " + conn_->peer + " acknowledged flush " +
          std::to_string(load_le<uint64_t>(reply_.data())) + ", expected " +
          std::to_string(seq)));
    }
    return Status();
  }

  Result<uint64_t> write_marked(std::span<const WriteOp> ops,
                                Deadline deadline) override {
    KVMIG_RETURN_IF_ERROR(usable());
    KVMIG_RETURN_IF_ERROR(check_write_ops(ops, region_lengths_, "tcp"));
    const uint64_t seq = conn_->flush_seq + 1;
    store_le<uint32_t>(mark_.data(), kMarkRegion);
    store_le<uint64_t>(mark_.data() + 4, seq);
    store_le<uint64_t>(mark_.data() + 12, 0);
    if (registry_->has_device()) {
      KVMIG_RETURN_IF_ERROR(write_via_bounce(ops, deadline));
      buffers_.clear();
      buffers_.push_back(asio::buffer(mark_));
      KVMIG_RETURN_IF_ERROR(send_buffers(deadline));
    } else {
      KVMIG_RETURN_IF_ERROR(write_records(ops, deadline, true));
    }
    conn_->flush_seq = seq;
    return seq;
  }

  uint64_t bytes_written() const override { return bytes_written_; }
  uint64_t ops_posted() const override { return ops_posted_; }

  // write() when some registered memory is a device's: a source in device
  // memory is copied out into a bounded bounce buffer (records of at most
  // kBounceBytes packed into 4 * kBounceBytes) and sent from there, a
  // buffer's worth at a time.
  Status write_via_bounce(std::span<const WriteOp> ops, Deadline deadline) {
    if (bounce_.empty()) bounce_.resize(4 * kBounceBytes);
    std::deque<Header> headers;  // stable: buffers_ points into it
    buffers_.clear();
    size_t used = 0;  // of bounce_
    uint64_t bytes = 0;
    auto send = [&]() -> Status {
      KVMIG_RETURN_IF_ERROR(send_buffers(deadline));
      headers.clear();
      buffers_.clear();
      used = 0;
      return Status();
    };
    auto record = [&](uint32_t region, uint64_t offset, const std::byte* src,
                      uint64_t length) {
      Header& h = headers.emplace_back();
      store_le<uint32_t>(h.data(), region);
      store_le<uint64_t>(h.data() + 4, offset);
      store_le<uint64_t>(h.data() + 12, length);
      buffers_.push_back(asio::buffer(h));
      buffers_.push_back(asio::buffer(src, length));
    };
    for (const WriteOp& op : ops) {
      if (op.length == 0) continue;
      auto device = registry_->find(op.src, op.length);
      if (!device) {
        return Status::invalid_argument(
            "tcp: write source of " + std::to_string(op.length) +
            " bytes is not inside registered memory");
      }
      if (!*device) {
        record(op.dst_region, op.dst_offset, op.src, op.length);
      } else {
        for (uint64_t done = 0; done < op.length;) {
          const uint64_t n = std::min<uint64_t>(op.length - done, kBounceBytes);
          if (bounce_.size() - used < n) KVMIG_RETURN_IF_ERROR(send());
          std::byte* piece = bounce_.data() + used;
          KVMIG_RETURN_IF_ERROR(
              (*device)
                  ->read(op.src + done, std::span(piece, n))
                  .with_context("tcp: reading a write's source from device "
                                "memory"));
          record(op.dst_region, op.dst_offset + done, piece, n);
          used += n;
          done += n;
        }
      }
      bytes += op.length;
    }
    KVMIG_RETURN_IF_ERROR(send());
    bytes_written_ += bytes;
    ops_posted_ += ops.size();
    return Status();
  }

  void keep() override {
    if (!parking_ || peer_key_.empty()) return;
    // A kept connection this migration never used (its pages went another
    // way) goes back as it came; the target still holds its end.
    const bool unused = adopted_ && !connected_ && failed_.ok();
    if (!unused && !usable().ok()) return;
    log_->debug("initiator keeps its connection to {}", conn_->peer);
    parking_->park_init(peer_key_, std::move(conn_));
    failed_ = Status::failed_precondition(
        "tcp: the initiator kept its connection for the next migration");
  }

 private:
  // Writes ops (checked) from host memory as records, then mark_'s record
  // with `mark`, in one system call where the socket takes them.
  Status write_records(std::span<const WriteOp> ops, Deadline deadline,
                       bool mark) {
    // At most a header and an entry per write: no reallocation moves the
    // bytes buffers_ points at.
    meta_.clear();
    meta_.reserve(2 * kHeaderBytes * ops.size());
    buffers_.clear();
    buffers_.reserve(2 * ops.size() + 1);
    auto put = [this](uint32_t region, uint64_t offset, uint64_t length) {
      meta_.resize(meta_.size() + kHeaderBytes);
      uint8_t* h = meta_.data() + meta_.size() - kHeaderBytes;
      store_le<uint32_t>(h, region);
      store_le<uint64_t>(h + 4, offset);
      store_le<uint64_t>(h + 12, length);
    };
    uint64_t bytes = 0;
    for (size_t i = 0; i < ops.size();) {
      // A run of small writes goes as one batch record, so the target can
      // read their payloads straight into place; a large one on its own.
      size_t end = i, entries = 0;
      uint64_t run = 0;
      for (; end < ops.size(); ++end) {
        const uint64_t n = ops[end].length;
        if (n == 0) continue;
        if (n >= kCopyBelow || entries == kMaxBatchEntries ||
            run + n > kMaxBatchBytes) {
          break;
        }
        ++entries;
        run += n;
      }
      if (entries < 2) end = i + 1;  // not worth a batch: one record
      const size_t at = meta_.size();
      if (entries >= 2) put(kBatchRegion, entries, run);
      for (size_t k = i; k < end; ++k) {
        if (ops[k].length == 0) continue;
        put(ops[k].dst_region, ops[k].dst_offset, ops[k].length);
        bytes += ops[k].length;
      }
      if (meta_.size() > at) {
        buffers_.push_back(asio::buffer(meta_.data() + at, meta_.size() - at));
        for (size_t k = i; k < end; ++k) {
          if (ops[k].length == 0) continue;
          buffers_.push_back(asio::buffer(ops[k].src, ops[k].length));
        }
      }
      i = end;
    }
    if (mark) buffers_.push_back(asio::buffer(mark_));
    KVMIG_RETURN_IF_ERROR(send_buffers(deadline));
    bytes_written_ += bytes;
    ops_posted_ += ops.size();
    return Status();
  }

  struct ParsedAddress {
    std::string host;
    uint16_t port = 0;
    uint64_t token = 0;
    std::vector<uint64_t> region_lengths;
  };

  static Result<ParsedAddress> parse_address(ByteReader& r) {
    ParsedAddress a;
    KVMIG_ASSIGN_OR_RETURN(a.host, r.get_string(kMaxHostLen, "host"));
    KVMIG_ASSIGN_OR_RETURN(a.port, r.get<uint16_t>("port"));
    KVMIG_ASSIGN_OR_RETURN(a.token, r.get<uint64_t>("token"));
    KVMIG_ASSIGN_OR_RETURN(uint32_t n, r.get<uint32_t>("region count"));
    if (n > kMaxRegions || n > r.remaining() / 8) {
      return Status::data_loss("region count " + std::to_string(n) +
                               " does not fit the address");
    }
    a.region_lengths.resize(n);
    for (auto& len : a.region_lengths) {
      KVMIG_ASSIGN_OR_RETURN(len, r.get<uint64_t>("region length"));
    }
    KVMIG_RETURN_IF_ERROR(r.expect_end("target address"));
    return a;
  }

  Status usable() const {
    if (!failed_.ok()) return failed_;
    if (!connected_) {
      return Status::failed_precondition("tcp: initiator is not connected");
    }
    return Status();
  }

  // Records a failure that leaves the stream unusable.
  Status fail(Status s) {
    failed_ = s;
    if (!conn_) return s;
    close_logged(conn_->socket, "tcp initiator connection");
    log_->info("initiator to {}: {}", conn_->peer, s.to_string());
    return s;
  }

  // Runs the io_context until the started operation chain set `done` or the
  // deadline passed. On expiry closes the socket and runs the cancelled
  // handlers (they reference the caller's locals) before returning.
  Status wait(Deadline deadline, const bool& done, const error_code& result,
              std::string_view what) {
    conn_->io.restart();
    conn_->io.run_until(deadline);
    if (!done) {
      close_logged(conn_->socket, "tcp initiator connection");
      conn_->io.restart();
      conn_->io.run();
      return fail(Status::deadline_exceeded(
          "tcp: " + std::string(what) + " to " + conn_->peer +
          " did not finish before the deadline"));
    }
    if (result) {
      return fail(status_from_error(
          result, "tcp: " + std::string(what) + " to " + conn_->peer));
    }
    return Status();
  }

  // Writes every buffer of buffers_ (none: nothing to do) before deadline.
  Status send_buffers(Deadline deadline) {
    if (buffers_.empty()) return Status();
    // A target that gave the migration up (revoke) has closed its end, and
    // its FIN or RST waits here: nothing is sent then. The kernel would
    // take a call's worth of bytes all the same (only the next call
    // fails), and a source that resumes after a stall would go on to
    // COMMIT as if its last pages had landed, instead of learning now that
    // they cannot (FaultMatrix Stall_DuringData_tcp).
    if (!conn_->alive()) {
      return fail(Status::unavailable(
          "tcp: target " + conn_->peer +
          " closed the data connection (it gave the migration up)"));
    }
    bool done = false;
    error_code result;
    uint64_t total = 0;
    for (const asio::const_buffer& b : buffers_) total += b.size();
    transfer_wide(conn_->socket, buffers_, total,
                  [&](const error_code& ec, size_t) {
                    result = ec;
                    done = true;
                  });
    return wait(deadline, done, result, "write");
  }

  // Sends `out`, then reads the target's 8-byte answer into reply_; sets
  // `result` and `done` when either step fails or both finish. Runs on
  // the connection's io_context, inside wait().
  void send_then_read_reply(asio::const_buffer out, bool& done,
                            error_code& result) {
    asio::async_write(conn_->socket, out,
                      [this, &done, &result](const error_code& wec, size_t) {
                        if (wec) {
                          result = wec;
                          done = true;
                          return;
                        }
                        asio::async_read(
                            conn_->socket, asio::buffer(reply_),
                            [&done, &result](const error_code& rec, size_t) {
                              result = rec;
                              done = true;
                            });
                      });
  }

  const std::shared_ptr<spdlog::logger> log_;
  const std::shared_ptr<const Registry> registry_;
  const std::shared_ptr<Parking> parking_;  // null: never keeps
  const std::string peer_key_;              // empty: never keeps
  bool adopted_;                            // conn_ was kept by an earlier one
  // Null until connect() (unless adopted), and once kept.
  std::unique_ptr<InitConn> conn_;
  bool connected_ = false;
  Status failed_;  // once set, every call returns it
  std::vector<uint64_t> region_lengths_;
  uint64_t bytes_written_ = 0;
  uint64_t ops_posted_ = 0;
  Word word_{};
  Word reply_{};
  Header mark_{};  // post_mark()'s record
  // Reused by write(); kept so large batches do not reallocate each call:
  // the records' headers and batch entries, which buffers_ points into.
  std::vector<uint8_t> meta_;
  std::vector<asio::const_buffer> buffers_;
  std::vector<std::byte> bounce_;  // write_via_bounce only
};

// Thread-safe: the region table is guarded by mu_.
class TcpTransport final : public Transport {
 public:
  explicit TcpTransport(TransportOptions opts)
      : opts_(std::move(opts)),
        registry_(std::make_shared<Registry>()),
        parking_(std::make_shared<Parking>()) {}

  ~TcpTransport() override { parking_->clear(); }

  std::string_view name() const override { return "tcp"; }
  // A target opens a listener (and its thread) or adopts a parked
  // connection; allow() and keep() take a lock, and keep() after the flush
  // finds the connection idle.
  bool targets_open_at_once() const override { return true; }

  Status register_memory(std::span<std::byte> region) override {
    return registry_->add(region, nullptr);
  }

  // Device memory is reached through its copies and bounce buffers.
  Status register_device_memory(
      std::span<std::byte> region,
      std::shared_ptr<const DeviceMemory> device) override {
    if (!device || !device->read || !device->write) {
      return Status::invalid_argument("tcp: device memory without copies");
    }
    return registry_->add(region, std::move(device));
  }

  Status deregister_memory(std::span<std::byte> region) override {
    return registry_->remove(region);
  }

  Result<std::unique_ptr<TransportInitiator>> create_initiator() override {
    return create_initiator_for("");
  }

  Result<std::unique_ptr<TransportInitiator>> create_initiator_for(
      std::string_view peer) override {
    std::unique_ptr<InitConn> kept;
    if (!peer.empty()) kept = parking_->take_init(std::string(peer));
    return std::unique_ptr<TransportInitiator>(new TcpInitiator(
        registry_, parking_, std::string(peer), std::move(kept)));
  }

  Result<std::unique_ptr<TransportTarget>> open_target(
      std::span<const std::span<std::byte>> regions,
      std::span<const uint8_t> initiator_address,
      Deadline /*deadline: nothing here waits on the peer*/) override {
    // Empty, or the 8-byte token of a connection the initiator kept.
    if (!initiator_address.empty() && initiator_address.size() != 8) {
      return Status::invalid_argument(
          "tcp: initiator address of " +
          std::to_string(initiator_address.size()) +
          " bytes (expected none, or an 8-byte token)");
    }
    std::vector<TargetRegion> targets;
    targets.reserve(regions.size());
    for (size_t i = 0; i < regions.size(); ++i) {
      auto& t = targets.emplace_back(TargetRegion{regions[i], nullptr});
      if (regions[i].empty()) continue;
      auto device = registry_->find(regions[i].data(), regions[i].size());
      if (!device) {
        return Status::invalid_argument(
            "tcp: target region " + std::to_string(i) + " (" +
            std::to_string(regions[i].size()) +
            " bytes) is not inside registered memory");
      }
      t.device = std::move(*device);
    }
    if (!initiator_address.empty()) {
      const uint64_t token = load_le<uint64_t>(initiator_address.data());
      if (auto conn = parking_->take_target(token, targets)) {
        return std::unique_ptr<TransportTarget>(
            new TcpTarget(std::move(conn), parking_, /*reused=*/true));
      }
    }
    KVMIG_ASSIGN_OR_RETURN(
        auto conn, TargetConn::open(opts_.bind_host, std::move(targets)));
    return std::unique_ptr<TransportTarget>(
        new TcpTarget(std::move(conn), parking_, /*reused=*/false));
  }

 private:
  const TransportOptions opts_;
  const std::shared_ptr<Registry> registry_;
  const std::shared_ptr<Parking> parking_;
};

}  // namespace

Result<std::unique_ptr<Transport>> make_tcp_transport(
    const TransportOptions& opts) {
  return std::unique_ptr<Transport>(new TcpTransport(opts));
}

}  // namespace kvmig
