// The sending end of the ucx transport: connect (or reuse a kept
// connection), write as ucp_put_nbx batches bounded by max_in_flight, and
// flush.
#include <algorithm>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ucx_core.h"
#include "ucx_error.h"
#include "ucx_kept.h"

namespace kvmig::ucx {

// -------------------------------------------------------------- InitState

void InitState::fail(Status s) {
  std::lock_guard lock(mu);
  if (error.ok()) {
    ucx_log()->info("initiator to {}: {}", peer, s.to_string());
    error = std::move(s);
  }
  cv.notify_all();
}

bool InitState::failed() {
  std::lock_guard lock(mu);
  return !error.ok();
}

void InitState::start_connect(const sockaddr_storage& ss) {
  ucp_ep_params_t p{};
  p.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                 UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                 UCP_EP_PARAM_FIELD_ERR_HANDLER;
  p.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  p.sockaddr.addr = reinterpret_cast<const sockaddr*>(&ss);
  p.sockaddr.addrlen = sockaddr_len(ss);
  p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  p.err_handler.cb = on_ep_error;
  p.err_handler.arg = this;
  ucp_ep_h raw = nullptr;
  const ucs_status_t s = ucp_ep_create(core->worker(), &p, &raw);
  if (s != UCS_OK) return fail(status_from_ucs(s, "connect to " + peer));
  core->object_opened();
  ep.reset(raw);
  start_flush(on_connect_flushed);
}

void InitState::begin_reuse() {
  std::lock_guard lock(mu);
  batches_posted = 0;
  flushes_done = 0;
  connected = true;
}

void InitState::reuse(std::vector<RemoteRegion> regions) {
  if (!ep || closing) {
    return fail(Status::unavailable("ucx: the connection kept to " + peer +
                                    " is gone"));
  }
  rkeys.clear();
  remote = std::move(regions);
  batch.reset();
  next = 0;
  finish_connect();
}

bool InitState::usable() {
  std::lock_guard lock(mu);
  return connected && error.ok();
}

void InitState::finish_connect() {
  for (const RemoteRegion& r : remote) {
    if (r.rkey.empty()) {
      rkeys.emplace_back(nullptr);
      continue;
    }
    ucp_rkey_h rkey = nullptr;
    const ucs_status_t s = ucp_ep_rkey_unpack(ep.get(), r.rkey.data(), &rkey);
    if (s != UCS_OK) {
      return fail(status_from_ucs(s, "unpack a remote key of " + peer));
    }
    rkeys.emplace_back(rkey);
  }
  std::lock_guard lock(mu);
  connected = true;
  cv.notify_all();
}

void InitState::start_flush(ucp_send_nbx_callback_t cb) {
  if (!ep)
    return fail(Status::unavailable("ucx: endpoint to " + peer + " is closed"));
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.send = cb;
  p.user_data = this;
  ucs_status_ptr_t r = ucp_ep_flush_nbx(ep.get(), &p);
  if (UCS_PTR_IS_PTR(r)) return;  // cb runs on completion
  cb(nullptr, UCS_PTR_STATUS(r), this);
}

void InitState::on_connect_flushed(void* req, ucs_status_t s, void* user) {
  auto* st = static_cast<InitState*>(user);
  if (req) ucp_request_free(req);
  if (s != UCS_OK)
    return st->fail(status_from_ucs(s, "connect to " + st->peer));
  if (!st->failed()) st->finish_connect();
}

void InitState::on_flushed(void* req, ucs_status_t s, void* user) {
  auto* st = static_cast<InitState*>(user);
  if (req) ucp_request_free(req);
  if (s != UCS_OK) return st->fail(status_from_ucs(s, "flush to " + st->peer));
  // The caller flushes only after its writes were posted, and waits for
  // the flush before writing again: this one covered every put.
  st->unflushed = false;
  std::lock_guard lock(st->mu);
  ++st->flushes_done;
  st->cv.notify_all();
}

void InitState::on_put_done(void* req, ucs_status_t s, void* user) {
  auto* st = static_cast<InitState*>(user);
  ucp_request_free(req);
  --st->in_flight;
  if (s != UCS_OK) st->fail(status_from_ucs(s, "put to " + st->peer));
  st->pump();
}

void InitState::on_ep_error(void* arg, ucp_ep_h, ucs_status_t s) {
  auto* st = static_cast<InitState*>(arg);
  st->ep_failed = true;
  st->fail(status_from_ucs(s, "connection to target " + st->peer));
  st->close(nullptr);  // a failed endpoint is only good for closing
}

void InitState::pump() {
  if (!batch) return;
  if (closing || failed()) {
    batch.reset();
    return;
  }
  while (next < batch->size() && in_flight < max_in_flight) {
    const Put& put = (*batch)[next++];
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = on_put_done;
    p.user_data = this;
    if (put.memh) {
      p.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
      p.memh = put.memh;
    }
    ucs_status_ptr_t r = ucp_put_nbx(ep.get(), put.src, put.length, put.remote,
                                     rkeys[put.region].get(), &p);
    unflushed = true;
    if (UCS_PTR_IS_PTR(r)) {
      ++in_flight;
    } else if (UCS_PTR_STATUS(r) != UCS_OK) {
      batch.reset();
      return fail(status_from_ucs(UCS_PTR_STATUS(r), "put to " + peer));
    }
  }
  if (next == batch->size()) {
    batch.reset();
    std::lock_guard lock(mu);
    ++batches_posted;
    cv.notify_all();
  }
}

void InitState::close(std::function<void()> on_closed) {
  closing = true;
  batch.reset();
  if (drain.running()) return drain.wait(std::move(on_closed));
  if (ep && unflushed && !ep_failed) {
    unflushed = false;
    if (drain.start(core, ep.get(), shared_from_this(), "initiator to " + peer,
                    on_closed)) {
      return;
    }
  }
  ep_close.request(core, ep, shared_from_this(), std::move(on_closed),
                   [this] { rkeys.clear(); });
}

// ----------------------------------------------------------- UcxInitiator

namespace {

// The sending end. Not thread-safe: one thread drives it.
class UcxInitiator final : public TransportInitiator {
 public:
  // peer: the destination agent's control address, under which a connection
  // kept by an earlier initiator is found (empty: never reuse or keep).
  UcxInitiator(std::shared_ptr<UcxCore> core, std::shared_ptr<Parking> parking,
               uint32_t max_in_flight, std::string peer)
      : core_(std::move(core)),
        parking_(std::move(parking)),
        max_in_flight_(std::max<uint32_t>(1, max_in_flight)),
        peer_key_(std::move(peer)) {
    if (!peer_key_.empty()) state_ = parking_->take_init(peer_key_);
    adopted_ = state_ != nullptr;
    if (!state_)
      state_ = std::make_shared<InitState>(core_.get(), max_in_flight_);
  }

  ~UcxInitiator() override {
    // A kept connection never used (the migration ended before OFFER) is
    // still good: back to the parking.
    if (adopted_ && !connect_called_) keep_unused();
    // A fresh state never connected (the migration needed no data path: its
    // pages went inline, or it ended before OFFER) has nothing on the
    // progress thread to close: no hand-off there, which would put two
    // thread wake-ups on the migration's end and set the thread polling.
    if (!kept_ && (adopted_ || connect_called_)) close_and_wait();
    ucx_log()->debug("initiator to {} closed: {} ops, {} bytes, {} flushes",
                     state_->peer.empty() ? "nobody" : state_->peer,
                     ops_posted_, bytes_written_, flushes_requested_);
  }

  // Empty, or the token of the kept connection this initiator holds.
  std::vector<uint8_t> address() const override {
    if (!adopted_) return {};
    return encode_initiator_address(state_->token);
  }

  Status connect(std::span<const uint8_t> target_address,
                 Deadline deadline) override {
    if (connect_called_) {
      return Status::failed_precondition("ucx: connect called twice");
    }
    auto parsed = decode_target_address(target_address);
    if (!parsed.ok()) {
      return Status::invalid_argument("ucx: bad target address: " +
                                      parsed.status().message());
    }
    TargetAddress& a = *parsed;
    auto ss = make_sockaddr(a.host, a.port);
    if (!ss.ok()) {
      return Status::invalid_argument("ucx: bad target address: host '" +
                                      a.host + "' port " +
                                      std::to_string(a.port));
    }
    if (a.port == 0 && (!adopted_ || a.token != state_->token)) {
      return Status::invalid_argument(
          "ucx: bad target address: it reuses a connection this initiator "
          "does not hold");
    }
    connect_called_ = true;
    for (const auto& region : a.regions) {
      region_bases_.push_back(region.base);
      region_lengths_.push_back(region.length);
    }
    if (a.port == 0) {
      // Nothing to wait for: the target holds the connection (it answered
      // with our token), and the keys are unpacked on the progress thread
      // before any put, which is posted behind them.
      start_reuse(std::move(a.regions));
      return Status();
    }
    start_connect(std::move(a), *ss);
    return wait_connected(deadline);
  }

  Status write(std::span<const WriteOp> ops, Deadline deadline) override {
    KVMIG_RETURN_IF_ERROR(usable());
    KVMIG_RETURN_IF_ERROR(check_write_ops(ops, region_lengths_, "ucx"));
    auto puts = std::make_shared<std::vector<Put>>();
    puts->reserve(ops.size());
    uint64_t bytes = 0;
    core_->with_regions([&](const RegionTable<Registration>& table) {
      for (const WriteOp& op : ops) {
        if (op.length == 0) continue;
        const auto* e = table.find(op.src, op.length);
        puts->push_back(
            Put{op.src, region_bases_[op.dst_region] + op.dst_offset, op.length,
                op.dst_region, e ? e->value.memh.get() : nullptr});
        bytes += op.length;
      }
    });
    if (!puts->empty()) {
      const uint64_t want = ++batches_submitted_;
      core_->post(
          [st = state_, batch = std::shared_ptr<const std::vector<Put>>(puts)] {
            if (st->closing) return;
            st->batch = batch;
            st->next = 0;
            st->pump();
          });
      KVMIG_RETURN_IF_ERROR(wait_for(
          deadline, "write", [&] { return state_->batches_posted >= want; }));
    }
    bytes_written_ += bytes;
    ops_posted_ += ops.size();
    return Status();
  }

  Status flush(Deadline deadline) override {
    KVMIG_RETURN_IF_ERROR(usable());
    const uint64_t want = ++flushes_requested_;
    core_->post([st = state_] {
      if (st->closing) return;
      st->start_flush(InitState::on_flushed);
    });
    return wait_for(deadline, "flush",
                    [&] { return state_->flushes_done >= want; });
  }

  uint64_t bytes_written() const override { return bytes_written_; }
  uint64_t ops_posted() const override { return ops_posted_; }

  void keep() override {
    if (connect_called_) keep_unused();
  }

 private:
  // connect() over the kept connection this initiator holds.
  void start_reuse(std::vector<RemoteRegion> regions) {
    state_->begin_reuse();
    core_->post([st = state_, regions = std::move(regions)]() mutable {
      st->reuse(std::move(regions));
    });
  }

  // connect() to the target's listener, on a fresh connection.
  void start_connect(TargetAddress a, const sockaddr_storage& ss) {
    if (adopted_) {
      // The target did not know our token (it restarted, or let its side
      // go): the kept connection is useless.
      close_and_wait();
      state_ = std::make_shared<InitState>(core_.get(), max_in_flight_);
      adopted_ = false;
    }
    state_->peer = a.host + ":" + std::to_string(a.port);
    state_->token = a.token;
    state_->remote = std::move(a.regions);
    core_->post([st = state_, addr = ss] { st->start_connect(addr); });
  }

  // Waits until the connection is up or has failed.
  Status wait_connected(Deadline deadline) {
    std::unique_lock lock(state_->mu);
    if (!state_->cv.wait_until(lock, deadline, [&] {
          return state_->connected || !state_->error.ok();
        })) {
      lock.unlock();
      return expire("connect");
    }
    if (!state_->error.ok()) {
      Status s = state_->error;
      lock.unlock();
      close_and_wait();
      return s;
    }
    ucx_log()->debug("initiator connected to {}", state_->peer);
    return Status();
  }

  void keep_unused() {
    if (kept_ || peer_key_.empty() || !state_->usable()) return;
    kept_ = true;
    parking_->park_init(peer_key_, state_);
  }

  Status usable() {
    std::lock_guard lock(state_->mu);
    if (!state_->error.ok()) return state_->error;
    if (!state_->connected) {
      return Status::failed_precondition("ucx: initiator is not connected");
    }
    return Status();
  }

  // Waits until done() or a failure; past the deadline closes the endpoint.
  template <typename Pred>
  Status wait_for(Deadline deadline, std::string_view what, Pred done) {
    std::unique_lock lock(state_->mu);
    if (!state_->cv.wait_until(lock, deadline,
                               [&] { return done() || !state_->error.ok(); })) {
      lock.unlock();
      return expire(what);
    }
    return state_->error;
  }

  Status expire(std::string_view what) {
    state_->fail(Status::deadline_exceeded(
        "ucx: " + std::string(what) + " to " + state_->peer +
        " did not finish before the deadline"));
    close_and_wait();
    std::lock_guard lock(state_->mu);
    return state_->error;
  }

  // Closes the endpoint and waits (bounded) until UCX let go of it, so no
  // put still reads the caller's memory.
  void close_and_wait() {
    core_->post_close_and_wait(
        [st = state_](auto done) { st->close(std::move(done)); },
        "the initiator's endpoint to " + state_->peer);
  }

  const std::shared_ptr<UcxCore> core_;
  const std::shared_ptr<Parking> parking_;
  const uint32_t max_in_flight_;
  const std::string peer_key_;
  std::shared_ptr<InitState> state_;
  bool adopted_ = false;  // state_ is a connection kept by an earlier one
  bool kept_ = false;     // state_ went back to the parking
  bool connect_called_ = false;
  std::vector<uint64_t> region_bases_;
  std::vector<uint64_t> region_lengths_;
  uint64_t batches_submitted_ = 0;
  uint64_t flushes_requested_ = 0;
  uint64_t bytes_written_ = 0;
  uint64_t ops_posted_ = 0;
};

}  // namespace

std::unique_ptr<TransportInitiator> make_ucx_initiator(
    std::shared_ptr<UcxCore> core, std::shared_ptr<Parking> parking,
    uint32_t max_in_flight, std::string peer) {
  return std::make_unique<UcxInitiator>(std::move(core), std::move(parking),
                                        max_in_flight, std::move(peer));
}

}  // namespace kvmig::ucx
