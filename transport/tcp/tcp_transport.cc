#include "tcp_transport.h"

#include <algorithm>
#include <array>
#include <boost/asio/buffer.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include "../transport_util.h"
#include "bytes.h"
#include "errors.h"
#include "log.h"

namespace kvmig {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

// Region value of a flush record.
constexpr uint32_t kFlushRegion = 0xFFFFFFFF;
// u32 region, u64 offset (or flush sequence), u64 length.
constexpr size_t kHeaderBytes = 20;
// Address blob limits, checked when parsing a peer's address.
constexpr size_t kMaxHostLen = 255;
constexpr uint32_t kMaxRegions = 1u << 20;
// How long a fresh connection may take to present the token.
constexpr auto kTokenTimeout = std::chrono::seconds(5);
// Bytes one read or write system call may move (Asio's default is 64 KiB).
constexpr size_t kMaxTransferPerCall = size_t{16} << 20;

using Header = std::array<uint8_t, kHeaderBytes>;
using Word = std::array<uint8_t, 8>;

// Lets one read or write call move up to kMaxTransferPerCall bytes.
size_t large_transfers(const error_code& ec, size_t /*transferred*/) {
  return ec ? 0 : kMaxTransferPerCall;
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

// The receiving end. Thread-safe: revoke() and health() may be called from
// any thread. Everything else runs on the target's own thread, which is the
// only one touching the sockets until revoke() has joined it.
class TcpTarget final : public TransportTarget {
 public:
  static Result<std::unique_ptr<TransportTarget>> open(
      const std::string& host, std::span<const std::span<std::byte>> regions) {
    std::unique_ptr<TcpTarget> t(new TcpTarget(regions));
    KVMIG_RETURN_IF_ERROR(t->listen(host));
    t->start_accept();
    t->thread_ = std::thread([raw = t.get()] { raw->io_.run(); });
    return std::unique_ptr<TransportTarget>(std::move(t));
  }

  ~TcpTarget() override { revoke(); }

  std::vector<uint8_t> address() const override { return address_; }

  void revoke() override {
    // Held for the whole teardown: a second caller returns only once the
    // first has cut the initiator off.
    std::lock_guard teardown(teardown_mu_);
    {
      std::lock_guard lock(mu_);
      if (revoked_) return;
      revoked_ = true;
    }
    // After the join no handler runs and no read is issued; the sockets are
    // then closed so the kernel drops whatever else arrives.
    io_.stop();
    if (thread_.joinable()) thread_.join();
    close_logged(acceptor_, "tcp target acceptor");
    close_logged(pending_, "tcp target pending connection");
    close_logged(socket_, "tcp target connection");
    log_->debug(
        "target revoked (initiator {}): {} writes, {} bytes, {} flushes",
        peer_.empty() ? "never connected" : peer_, writes_applied_,
        bytes_applied_, flushes_);
  }

  Status health() const override {
    std::lock_guard lock(mu_);
    return health_;
  }

  bool allow(std::span<const WriteWindow> ranges) override {
    std::lock_guard lock(mu_);
    if (windows_.empty()) windows_.resize(regions_.size());
    for (const WriteWindow& w : ranges) {
      if (w.region >= windows_.size() || w.length == 0) continue;
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
    return true;
  }

 private:
  // True when [offset, +length) of region is inside one allowed range (or
  // no window was set). Target thread.
  bool allowed(uint32_t region, uint64_t offset, uint64_t length) const {
    std::lock_guard lock(mu_);
    if (windows_.empty()) return true;
    const auto& spans = windows_[region];
    auto it = spans.upper_bound(offset);
    if (it == spans.begin()) return false;
    --it;
    return offset >= it->first && offset + length <= it->second;
  }

  explicit TcpTarget(std::span<const std::span<std::byte>> regions)
      : log_(logger("tcp")),
        regions_(regions.begin(), regions.end()),
        token_(random_token()),
        acceptor_(io_),
        pending_(io_),
        token_timer_(io_),
        socket_(io_) {}

  Status listen(const std::string& host) {
    error_code ec;
    const auto ip = asio::ip::make_address(host, ec);
    if (ec) {
      return Status::invalid_argument("tcp: bind host '" + host +
                                      "' is not an IP address");
    }
    const tcp::endpoint ep(ip, 0);
    acceptor_.open(ep.protocol(), ec);
    if (ec) return status_from_error(ec, "tcp: open acceptor");
    acceptor_.bind(ep, ec);
    if (ec) return status_from_error(ec, "tcp: bind " + host + ":0");
    acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return status_from_error(ec, "tcp: listen on " + host);
    const auto local = acceptor_.local_endpoint(ec);
    if (ec) return status_from_error(ec, "tcp: query listening port");

    ByteWriter w;
    w.put_string(host);
    w.put<uint16_t>(local.port());
    w.put<uint64_t>(token_);
    w.put<uint32_t>(static_cast<uint32_t>(regions_.size()));
    for (const auto& r : regions_) w.put<uint64_t>(r.size());
    address_ = w.take();
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
          if (wec) return fail(status_from_error(wec, "tcp: answer " + peer_));
          read_header();
        });
  }

  void read_header() {
    asio::async_read(socket_, asio::buffer(header_),
                     [this](const error_code& ec, size_t) { on_header(ec); });
  }

  void on_header(const error_code& ec) {
    if (ec == asio::error::eof) {
      return fail(Status::unavailable("tcp target: initiator " + peer_ +
                                      " closed the connection"));
    }
    if (ec) {
      return fail(status_from_error(ec, "tcp: read from initiator " + peer_));
    }
    const uint32_t region = load_le<uint32_t>(header_.data());
    const uint64_t offset = load_le<uint64_t>(header_.data() + 4);
    const uint64_t length = load_le<uint64_t>(header_.data() + 12);
    if (region == kFlushRegion) {
      if (length != 0) {
        return fail(Status::protocol("tcp target: flush record from " + peer_ +
                                     " has length " + std::to_string(length)));
      }
      // Records are applied in order, so every earlier write has landed.
      ++flushes_;
      store_le<uint64_t>(ack_.data(), offset);
      asio::async_write(
          socket_, asio::buffer(ack_), [this](const error_code& wec, size_t) {
            if (wec) {
              return fail(status_from_error(wec, "tcp: ack to " + peer_));
            }
            read_header();
          });
      return;
    }
    if (region >= regions_.size()) {
      return fail(Status::protocol("tcp target: write record from " + peer_ +
                                   " for region " + std::to_string(region) +
                                   " of " + std::to_string(regions_.size())));
    }
    const std::span<std::byte> dst = regions_[region];
    if (offset > dst.size() || length > dst.size() - offset) {
      return fail(Status::protocol(
          "tcp target: write record from " + peer_ + " for [" +
          std::to_string(offset) + ", +" + std::to_string(length) +
          ") outside region " + std::to_string(region) + " of " +
          std::to_string(dst.size()) + " bytes"));
    }
    if (length == 0) return read_header();
    if (!allowed(region, offset, length)) {
      return fail(Status::protocol(
          "tcp target: write record from " + peer_ + " for [" +
          std::to_string(offset) + ", +" + std::to_string(length) +
          ") of region " + std::to_string(region) +
          " lies outside the slots offered to this migration"));
    }
    asio::async_read(socket_, asio::buffer(dst.data() + offset, length),
                     large_transfers,
                     [this, length](const error_code& rec, size_t) {
                       if (rec) {
                         return fail(status_from_error(
                             rec, "tcp: read payload from " + peer_));
                       }
                       bytes_applied_ += length;
                       ++writes_applied_;
                       read_header();
                     });
  }

  // Records the first failure and drops the connection.
  void fail(Status s) {
    {
      std::lock_guard lock(mu_);
      if (health_.ok()) health_ = s;
    }
    if (s.code() == StatusCode::kUnavailable) {
      log_->info("target: {}", s.to_string());
    } else {
      log_->warn("target: {}", s.to_string());
    }
    close_logged(socket_, "tcp target connection");
  }

  const std::shared_ptr<spdlog::logger> log_;
  const std::vector<std::span<std::byte>> regions_;
  const uint64_t token_;
  std::vector<uint8_t> address_;  // set before the thread starts

  // Touched only by the target thread (or after it was joined).
  asio::io_context io_;
  tcp::acceptor acceptor_;
  tcp::socket pending_;  // a connection that has not shown the token yet
  asio::steady_timer token_timer_;
  tcp::socket socket_;  // the authenticated initiator
  Word token_buf_{};
  Header header_{};
  Word ack_{};
  std::string peer_;
  uint64_t bytes_applied_ = 0;
  uint64_t writes_applied_ = 0;
  uint64_t flushes_ = 0;

  std::mutex teardown_mu_;  // held by revoke() throughout (never by io_)
  mutable std::mutex mu_;
  Status health_;         // guarded by mu_
  bool revoked_ = false;  // guarded by mu_
  // Per region, allowed [begin, end) ranges by begin, disjoint and merged;
  // empty: no window (guarded by mu_).
  std::vector<std::map<uint64_t, uint64_t>> windows_;

  std::thread thread_;  // runs io_; joined by revoke()
};

// The sending end. Not thread-safe: one thread drives it. Every wait runs the
// initiator's own io_context until the deadline; past it the socket is
// closed and the initiator stays failed.
class TcpInitiator final : public TransportInitiator {
 public:
  TcpInitiator() : log_(logger("tcp")), socket_(io_) {}
  ~TcpInitiator() override {
    close_logged(socket_, "tcp initiator connection");
    log_->debug("initiator to {} closed: {} ops, {} bytes, {} flushes",
                peer_.empty() ? "nobody" : peer_, ops_posted_, bytes_written_,
                flush_seq_);
  }

  std::vector<uint8_t> address() const override { return {}; }

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
    error_code ec;
    const auto ip = asio::ip::make_address(parsed->host, ec);
    if (ec || parsed->port == 0) {
      return Status::invalid_argument("tcp: bad target address: host '" +
                                      parsed->host + "' port " +
                                      std::to_string(parsed->port));
    }
    peer_ = parsed->host + ":" + std::to_string(parsed->port);
    store_le<uint64_t>(word_.data(), parsed->token);

    bool done = false;
    error_code result;
    socket_.async_connect(
        tcp::endpoint(ip, parsed->port), [&](const error_code& cec) {
          if (cec) {
            result = cec;
            done = true;
            return;
          }
          error_code opt_ec;
          socket_.set_option(tcp::no_delay(true), opt_ec);
          send_then_read_reply(asio::buffer(word_), done, result);
        });
    KVMIG_RETURN_IF_ERROR(wait(deadline, done, result, "connect"));
    if (reply_ != word_) {
      return fail(
          Status::protocol("tcp: target " + peer_ +
                           " answered the handshake with a wrong token"));
    }
    region_lengths_ = std::move(parsed->region_lengths);
    connected_ = true;
    log_->debug("initiator connected to {}", peer_);
    return Status();
  }

  Status write(std::span<const WriteOp> ops, Deadline deadline) override {
    KVMIG_RETURN_IF_ERROR(usable());
    KVMIG_RETURN_IF_ERROR(check_write_ops(ops, region_lengths_, "tcp"));
    headers_.clear();
    headers_.reserve(ops.size());
    buffers_.clear();
    buffers_.reserve(2 * ops.size());
    uint64_t bytes = 0;
    for (const WriteOp& op : ops) {
      if (op.length == 0) continue;
      Header& h = headers_.emplace_back();
      store_le<uint32_t>(h.data(), op.dst_region);
      store_le<uint64_t>(h.data() + 4, op.dst_offset);
      store_le<uint64_t>(h.data() + 12, op.length);
      buffers_.push_back(asio::buffer(h));
      buffers_.push_back(asio::buffer(op.src, op.length));
      bytes += op.length;
    }
    if (!buffers_.empty()) {
      bool done = false;
      error_code result;
      asio::async_write(socket_, buffers_, large_transfers,
                        [&](const error_code& ec, size_t) {
                          result = ec;
                          done = true;
                        });
      KVMIG_RETURN_IF_ERROR(wait(deadline, done, result, "write"));
    }
    bytes_written_ += bytes;
    ops_posted_ += ops.size();
    return Status();
  }

  Status flush(Deadline deadline) override {
    KVMIG_RETURN_IF_ERROR(usable());
    const uint64_t seq = ++flush_seq_;
    Header h{};
    store_le<uint32_t>(h.data(), kFlushRegion);
    store_le<uint64_t>(h.data() + 4, seq);
    bool done = false;
    error_code result;
    send_then_read_reply(asio::buffer(h), done, result);
    KVMIG_RETURN_IF_ERROR(wait(deadline, done, result, "flush"));
    if (load_le<uint64_t>(reply_.data()) != seq) {
      return fail(
          Status::protocol("tcp: target " + peer_ + " acknowledged flush " +
                           std::to_string(load_le<uint64_t>(reply_.data())) +
                           ", expected " + std::to_string(seq)));
    }
    return Status();
  }

  uint64_t bytes_written() const override { return bytes_written_; }
  uint64_t ops_posted() const override { return ops_posted_; }

 private:
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
    close_logged(socket_, "tcp initiator connection");
    log_->info("initiator to {}: {}", peer_, s.to_string());
    return s;
  }

  // Runs the io_context until the started operation chain set `done` or the
  // deadline passed. On expiry closes the socket and runs the cancelled
  // handlers (they reference the caller's locals) before returning.
  Status wait(Deadline deadline, const bool& done, const error_code& result,
              std::string_view what) {
    io_.restart();
    io_.run_until(deadline);
    if (!done) {
      close_logged(socket_, "tcp initiator connection");
      io_.restart();
      io_.run();
      return fail(Status::deadline_exceeded(
          "tcp: " + std::string(what) + " to " + peer_ +
          " did not finish before the deadline"));
    }
    if (result) {
      return fail(status_from_error(
          result, "tcp: " + std::string(what) + " to " + peer_));
    }
    return Status();
  }

  const std::shared_ptr<spdlog::logger> log_;
  asio::io_context io_;
  tcp::socket socket_;
  bool connected_ = false;
  Status failed_;  // once set, every call returns it
  std::string peer_;
  std::vector<uint64_t> region_lengths_;
  uint64_t flush_seq_ = 0;
  uint64_t bytes_written_ = 0;
  uint64_t ops_posted_ = 0;
  // Sends `out`, then reads the target's 8-byte answer into reply_; sets
  // `result` and `done` when either step fails or both finish. Runs on
  // io_, inside wait().
  void send_then_read_reply(asio::const_buffer out, bool& done,
                            error_code& result) {
    asio::async_write(
        socket_, out, [this, &done, &result](const error_code& wec, size_t) {
          if (wec) {
            result = wec;
            done = true;
            return;
          }
          asio::async_read(socket_, asio::buffer(reply_),
                           [&done, &result](const error_code& rec, size_t) {
                             result = rec;
                             done = true;
                           });
        });
  }

  Word word_{};
  Word reply_{};
  // Reused by write(); kept so large batches do not reallocate each call.
  std::vector<Header> headers_;
  std::vector<asio::const_buffer> buffers_;
};

// Thread-safe: the region table is guarded by mu_.
class TcpTransport final : public Transport {
 public:
  explicit TcpTransport(TransportOptions opts) : opts_(std::move(opts)) {}

  std::string_view name() const override { return "tcp"; }

  Status register_memory(std::span<std::byte> region) override {
    std::lock_guard lock(mu_);
    KVMIG_RETURN_IF_ERROR(regions_.check_new(region, "tcp"));
    regions_.add(region, std::monostate{});
    return Status();
  }

  Status deregister_memory(std::span<std::byte> region) override {
    std::lock_guard lock(mu_);
    return regions_.remove(region, "tcp").status();
  }

  Result<std::unique_ptr<TransportInitiator>> create_initiator() override {
    return std::unique_ptr<TransportInitiator>(new TcpInitiator());
  }

  Result<std::unique_ptr<TransportTarget>> open_target(
      std::span<const std::span<std::byte>> regions,
      std::span<const uint8_t> /*initiator_address*/,
      Deadline /*deadline: nothing here waits on the peer*/) override {
    {
      std::lock_guard lock(mu_);
      for (size_t i = 0; i < regions.size(); ++i) {
        if (!regions[i].empty() &&
            regions_.find(regions[i].data(), regions[i].size()) == nullptr) {
          return Status::invalid_argument(
              "tcp: target region " + std::to_string(i) + " (" +
              std::to_string(regions[i].size()) +
              " bytes) is not inside registered memory");
        }
      }
    }
    return TcpTarget::open(opts_.bind_host, regions);
  }

 private:
  const TransportOptions opts_;
  std::mutex mu_;
  RegionTable<std::monostate> regions_;  // guarded by mu_
};

}  // namespace

Result<std::unique_ptr<Transport>> make_tcp_transport(
    const TransportOptions& opts) {
  return std::unique_ptr<Transport>(new TcpTransport(opts));
}

}  // namespace kvmig
