// The receiving end of the ucx transport: a listener the initiator connects
// to, the exported regions' packed remote keys, revoke() and keep().
#include <netinet/in.h>

#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "random.h"
#include "ucx_core.h"
#include "ucx_error.h"
#include "ucx_kept.h"

namespace kvmig::ucx {

// ------------------------------------------------------------ TargetState

void TargetState::set_health(Status s) {
  std::lock_guard lock(mu);
  if (health.ok()) health = std::move(s);
}

void TargetState::on_conn_request(ucp_conn_request_h req, void* arg) {
  auto* st = static_cast<TargetState*>(arg);
  ucp_conn_request_attr_t attr{};
  attr.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
  std::string from = "?";
  if (ucp_conn_request_query(req, &attr) == UCS_OK) {
    from = sockaddr_string(attr.client_address);
  }
  if (st->revoked || st->ep) {
    ucx_log()->warn("target: rejected a second connection from {}", from);
    const ucs_status_t s = ucp_listener_reject(st->listener.get(), req);
    if (s != UCS_OK) {
      ucx_log()->warn("ucp_listener_reject: {}", ucs_status_string(s));
    }
    return;
  }
  ucp_ep_params_t p{};
  p.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST |
                 UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                 UCP_EP_PARAM_FIELD_ERR_HANDLER;
  p.conn_request = req;
  p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  p.err_handler.cb = on_ep_error;
  p.err_handler.arg = st;
  ucp_ep_h ep = nullptr;
  const ucs_status_t s = ucp_ep_create(st->core->worker(), &p, &ep);
  if (s != UCS_OK) {
    st->set_health(status_from_ucs(s, "accept initiator " + from));
    return;
  }
  st->core->object_opened();
  st->ep.reset(ep);
  {
    std::lock_guard lock(st->mu);
    st->peer = from;
  }
  st->connected = true;
}

void TargetState::on_ep_error(void* arg, ucp_ep_h, ucs_status_t s) {
  auto* st = static_cast<TargetState*>(arg);
  std::string peer;
  {
    std::lock_guard lock(st->mu);
    peer = st->peer;
  }
  Status status = status_from_ucs(s, "connection from initiator " + peer);
  ucx_log()->info("target: {}", status.to_string());
  st->set_health(std::move(status));
  st->ep_failed = true;  // close() below clears `connected`
  // A failed endpoint is only good for closing; close it at once.
  // Known UCX 1.13 limit (seen under TSan with UCX_TLS=tcp, about one run
  // in five): when the initiator vanishes mid-transfer, software-RMA puts
  // already received are acknowledged on the failed endpoint and UCX
  // aborts the process (ucp_request.inl "unexpected error: Endpoint
  // timeout" from ucp_put_handler). Closing here narrows the window; it
  // does not close it.
  st->close(nullptr);
}

void TargetState::close(std::function<void()> done) {
  connected = false;
  if (drain.running()) return drain.wait(std::move(done));
  if (ep && !drained && !ep_failed) {
    drained = true;
    std::string who;
    {
      std::lock_guard lock(mu);
      who = "target of " + peer;
    }
    if (drain.start(core, ep.get(), shared_from_this(), std::move(who), done)) {
      return;
    }
  }
  ep_close.request(core, ep, shared_from_this(), std::move(done));
}

void TargetState::shut(std::function<void()> done) {
  revoked = true;
  listener.reset();
  close(std::move(done));
}

bool TargetState::healthy() {
  std::lock_guard lock(mu);
  return health.ok();
}

// -------------------------------------------------------------- UcxTarget

namespace {

// The receiving end. Thread-safe.
class UcxTarget final : public TransportTarget {
 public:
  static Result<std::unique_ptr<TransportTarget>> open(
      std::shared_ptr<UcxCore> core, std::shared_ptr<Parking> parking,
      const std::string& host, std::vector<ExportedRegion> regions,
      uint64_t token) {
    if (token != 0) {
      if (auto st = parking->take_target(token)) {
        if (st->connected && st->healthy()) {
          return adopt(std::move(core), std::move(parking), host, regions,
                       std::move(st));
        }
        std::unique_ptr<UcxTarget> t(new UcxTarget(core, parking, st));
        t->adopted_ = true;
        ucx_log()->debug(
            "target: the kept connection is gone; listening afresh");
        // t's destructor revokes what is left of it.
      }
    }
    KVMIG_ASSIGN_OR_RETURN(sockaddr_storage ss, make_sockaddr(host, 0));
    auto st = std::make_shared<TargetState>(core.get());
    st->token = random_token() | 1;  // never 0
    std::unique_ptr<UcxTarget> t(new UcxTarget(core, parking, st));
    KVMIG_ASSIGN_OR_RETURN(
        t->address_, t->core_->call([&]() -> Result<std::vector<uint8_t>> {
          return setup(st.get(), host, ss, regions);
        }));
    return std::unique_ptr<TransportTarget>(std::move(t));
  }

  // A target over the kept connection st (connected, healthy). No trip to
  // the progress thread: the keys were packed when the memory was
  // registered, and an endpoint that fails after this check fails the
  // migration's writes instead.
  static std::unique_ptr<TransportTarget> adopt(
      std::shared_ptr<UcxCore> core, std::shared_ptr<Parking> parking,
      const std::string& host, const std::vector<ExportedRegion>& regions,
      std::shared_ptr<TargetState> st) {
    std::unique_ptr<UcxTarget> t(
        new UcxTarget(std::move(core), std::move(parking), st));
    t->adopted_ = true;
    // No listener (port 0): reuse the kept endpoint.
    t->address_ = encode_target_address(
        TargetAddress{host, 0, st->token, pack_regions(regions)});
    std::lock_guard lock(st->mu);
    ucx_log()->debug("target reuses the connection kept for {}", st->peer);
    return t;
  }

  ~UcxTarget() override {
    {
      std::lock_guard lock(revoke_mu_);
      if (kept_) return;  // the connection is the parking's now
    }
    revoke();
  }

  std::vector<uint8_t> address() const override { return address_; }

  // One-sided puts into memory registered once: allow() cannot restrict
  // them (revoke() is the cut-off).
  bool restricts_writes() const override { return false; }

  void revoke() override {
    // Held for the whole teardown: a second caller returns only once the
    // first has closed the endpoint.
    std::lock_guard teardown(teardown_mu_);
    {
      std::lock_guard lock(revoke_mu_);
      if (revoked_) return;
      revoked_ = true;
      // Kept, then revoked (the install failed): close it unless another
      // migration has adopted it since.
      if (kept_ && !parking_->unpark_target(state_.get())) return;
    }
    core_->post_close_and_wait(
        [st = state_](auto done) { st->shut(std::move(done)); },
        "the target's endpoint to its initiator");
  }

  bool keep() override {
    {
      std::lock_guard lock(revoke_mu_);
      if (revoked_ || kept_) return kept_;
    }
    // An adopted connection has no listener (it went when the connection
    // was first kept): nothing for the progress thread to do.
    const bool open =
        adopted_ ? state_->connected.load() : core_->call([st = state_.get()] {
          st->listener.reset();  // one initiator per connection
          return st->ep != nullptr && !st->revoked;
        });
    if (!open || !state_->healthy()) {
      revoke();
      return false;
    }
    {
      std::lock_guard lock(revoke_mu_);
      kept_ = true;
    }
    parking_->park_target(state_);
    return true;
  }

  Status health() const override {
    std::lock_guard lock(state_->mu);
    return state_->health;
  }

 private:
  UcxTarget(std::shared_ptr<UcxCore> core, std::shared_ptr<Parking> parking,
            std::shared_ptr<TargetState> state)
      : core_(std::move(core)),
        parking_(std::move(parking)),
        state_(std::move(state)) {}

  // Each region's base, length and packed remote key. Any thread.
  static std::vector<RemoteRegion> pack_regions(
      const std::vector<ExportedRegion>& regions) {
    std::vector<RemoteRegion> out;
    out.reserve(regions.size());
    for (const ExportedRegion& r : regions) {
      out.push_back(RemoteRegion{r.base, r.length, r.rkey});
    }
    return out;
  }

  // Progress thread: starts the listener and builds the address (host,
  // port, token, regions).
  static Result<std::vector<uint8_t>> setup(
      TargetState* st, const std::string& host, const sockaddr_storage& ss,
      const std::vector<ExportedRegion>& regions) {
    // The port is the listener's.
    TargetAddress a{host, 0, st->token, pack_regions(regions)};

    ucp_listener_params_t lp{};
    lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR |
                    UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&ss);
    lp.sockaddr.addrlen = sockaddr_len(ss);
    lp.conn_handler.cb = TargetState::on_conn_request;
    lp.conn_handler.arg = st;
    ucp_listener_h listener = nullptr;
    ucs_status_t s = ucp_listener_create(st->core->worker(), &lp, &listener);
    if (s != UCS_OK) return status_from_ucs(s, "listen on " + host);
    st->core->object_opened();
    st->listener.reset(listener);
    ucp_listener_attr_t attr{};
    attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    s = ucp_listener_query(listener, &attr);
    if (s != UCS_OK) return status_from_ucs(s, "ucp_listener_query");
    a.port = attr.sockaddr.ss_family == AF_INET6
                 ? ntohs(reinterpret_cast<const sockaddr_in6*>(&attr.sockaddr)
                             ->sin6_port)
                 : ntohs(reinterpret_cast<const sockaddr_in*>(&attr.sockaddr)
                             ->sin_port);
    ucx_log()->debug("target listening on {}:{} for {} regions", host, a.port,
                     regions.size());
    return encode_target_address(a);
  }

  const std::shared_ptr<UcxCore> core_;
  const std::shared_ptr<Parking> parking_;
  const std::shared_ptr<TargetState> state_;
  std::vector<uint8_t> address_;
  std::mutex teardown_mu_;  // held by revoke() throughout
  std::mutex revoke_mu_;
  bool revoked_ = false;  // guarded by revoke_mu_
  bool kept_ = false;     // guarded by revoke_mu_
  bool adopted_ = false;  // state_ is a kept connection: it has no listener
};

}  // namespace

Result<std::unique_ptr<TransportTarget>> open_ucx_target(
    std::shared_ptr<UcxCore> core, std::shared_ptr<Parking> parking,
    const std::string& host, std::vector<ExportedRegion> regions,
    uint64_t token) {
  return UcxTarget::open(std::move(core), std::move(parking), host,
                         std::move(regions), token);
}

std::unique_ptr<TransportTarget> adopt_ucx_target(
    std::shared_ptr<UcxCore> core, std::shared_ptr<Parking> parking,
    const std::string& host, const std::vector<ExportedRegion>& regions,
    uint64_t token) {
  if (token == 0) return nullptr;
  auto st = parking->take_ready_target(token);
  if (!st) return nullptr;
  return UcxTarget::adopt(std::move(core), std::move(parking), host, regions,
                          std::move(st));
}

}  // namespace kvmig::ucx
