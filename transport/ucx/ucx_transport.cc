#include "ucx_transport.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <ucp/api/ucp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "../transport_util.h"
#include "bytes.h"
#include "log.h"

// Threading. Each UcxTransport owns one ucp_context and one ucp_worker, and
// one progress thread that creates them, makes every ucp_* call on them
// (endpoints, listeners, puts, flushes, rkeys, mem_map) and destroys them.
// Other threads hand it work through a mutex-protected queue. The worker is
// therefore UCS_THREAD_MODE_SINGLE and every UCX callback (put and flush
// completions, endpoint errors, connection requests) runs on that thread.
// This is simpler to get right than UCS_THREAD_MODE_MULTI, whose locking
// covers the worker but not our own state touched from callbacks; the cost
// is one hand-off per write()/flush() call, not per put.
//
// The thread polls while there is activity and for kSpinAfterActivity after
// it, then sleeps up to kMaxIdleSleep at a time (new work wakes it at once).
// It does not use UCP_FEATURE_WAKEUP: event fds would narrow the transports
// UCX may select, and a target over tcp or software-emulated RMA must keep
// progressing for incoming puts to land.
//
// What revoke() can guarantee. The target destroys its listener and
// force-closes its endpoint; the registration (ucp_mem_map) stays for the
// agent's life, so the packed rkeys stay valid. Over connection-oriented
// lanes closing the endpoint stops further writes: tcp (the connection is
// closed), rc verbs (the QP is destroyed), and UCX's software-emulated RMA
// over active messages (carried by those connections). Over connectionless
// one-sided lanes it does not: cma (process_vm_writev), knem, xpmem and the
// posix/sysv shared-memory RMA into UCX-allocated memory on one host, and dc on
// InfiniBand can still write through the rkey until the mapping behind it is
// unmapped, and the initiator only stops once it has seen the disconnect. So
// this transport removes cma from UCX's default transports (knem and xpmem are
// not built into Debian's UCX; naming them would only make UCX warn) unless
// UCX_TLS is set explicitly, which is then trusted; a deployment on dc must map
// per migration.
//
// Shared memory. A listener-made endpoint asks for peer error handling, and
// UCX 1.13's shared-memory transports (sysv, posix) offer it only with
// UCX_MM_ERROR_HANDLING=y; without it such an endpoint gets tcp alone even
// between two processes on one host (openucx/ucx#8477). So this transport
// sets it unless the environment does. Puts into the agent's own memory
// (not UCX-allocated) then run as emulated RMA over the sysv active-message
// lane, which carries the endpoint id, so a closed endpoint stops them as
// it does on tcp. With no RDMA device an endpoint to another host gets tcp.

namespace kvmig {
namespace {

constexpr size_t kMaxHostLen = 255;
constexpr uint32_t kMaxRegions = 1u << 20;
constexpr uint32_t kMaxRkeyLen = 64 * 1024;
constexpr auto kSpinAfterActivity = std::chrono::milliseconds(2);
constexpr auto kMaxIdleSleep = std::chrono::milliseconds(1);
// How long teardown waits for UCX to finish closing an endpoint.
constexpr auto kCloseGrace = std::chrono::seconds(2);
// An initiator address that presents a kept connection: this byte, then the
// connection's token (u64).
constexpr uint8_t kKeptConnection = 1;
// Transports whose RMA a closed endpoint cannot stop (see above).
constexpr const char* kDefaultTls = "^cma";

std::shared_ptr<spdlog::logger> ucx_log() {
  static const auto log = logger("ucx");
  return log;
}

// The one mapper from ucs_status_t to Status.
Status status_from_ucs(ucs_status_t s, std::string_view what) {
  if (s == UCS_OK) return Status();
  std::string msg = "ucx: " + std::string(what) + ": " + ucs_status_string(s);
  switch (s) {
    case UCS_ERR_TIMED_OUT:
      return Status::deadline_exceeded(std::move(msg));
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_CANCELED:
    case UCS_ERR_IO_ERROR:
    case UCS_ERR_SOME_CONNECTS_FAILED:
    case UCS_ERR_NO_DEVICE:
    case UCS_ERR_BUSY:
      return Status::unavailable(std::move(msg));
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return Status::invalid_argument(std::move(msg));
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
    case UCS_ERR_EXCEEDS_LIMIT:
      return Status::resource_exhausted(std::move(msg));
    case UCS_ERR_UNSUPPORTED:
    case UCS_ERR_NOT_IMPLEMENTED:
      return Status::unimplemented(std::move(msg));
    case UCS_ERR_NO_ELEM:
      return Status::not_found(std::move(msg));
    case UCS_ERR_ALREADY_EXISTS:
      return Status::already_exists(std::move(msg));
    default:
      return Status::internal(std::move(msg));
  }
}

template <typename T>
using Handle = std::remove_pointer_t<T>;

struct ContextDeleter {
  void operator()(ucp_context_h c) const { ucp_cleanup(c); }
};
struct WorkerDeleter {
  void operator()(ucp_worker_h w) const { ucp_worker_destroy(w); }
};
struct ListenerDeleter {
  void operator()(ucp_listener_h l) const { ucp_listener_destroy(l); }
};
struct RkeyDeleter {
  void operator()(ucp_rkey_h k) const { ucp_rkey_destroy(k); }
};
struct RkeyBufferDeleter {
  void operator()(void* b) const { ucp_rkey_buffer_release(b); }
};
struct MemhDeleter {
  ucp_context_h context = nullptr;
  void operator()(ucp_mem_h m) const {
    const ucs_status_t s = ucp_mem_unmap(context, m);
    if (s != UCS_OK) {
      ucx_log()->error("ucp_mem_unmap: {}", ucs_status_string(s));
    }
  }
};
using ContextPtr = std::unique_ptr<Handle<ucp_context_h>, ContextDeleter>;
using WorkerPtr = std::unique_ptr<Handle<ucp_worker_h>, WorkerDeleter>;
using ListenerPtr = std::unique_ptr<Handle<ucp_listener_h>, ListenerDeleter>;
using RkeyPtr = std::unique_ptr<Handle<ucp_rkey_h>, RkeyDeleter>;
using RkeyBufferPtr = std::unique_ptr<void, RkeyBufferDeleter>;
using MemhPtr = std::unique_ptr<Handle<ucp_mem_h>, MemhDeleter>;

// host:port as a socket address; InvalidArgument unless host is an IP.
Result<sockaddr_storage> make_sockaddr(const std::string& host, uint16_t port) {
  sockaddr_storage ss{};
  auto* v4 = reinterpret_cast<sockaddr_in*>(&ss);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&ss);
  if (inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(port);
  } else if (inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(port);
  } else {
    return Status::invalid_argument("ucx: '" + host + "' is not an IP address");
  }
  return ss;
}

socklen_t sockaddr_len(const sockaddr_storage& ss) {
  return ss.ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
}

std::string sockaddr_string(const sockaddr_storage& ss) {
  char buf[INET6_ADDRSTRLEN] = {};
  uint16_t port = 0;
  if (ss.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, buf, sizeof(buf));
    port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof(buf));
    port = ntohs(a->sin6_port);
  } else {
    return "?";
  }
  return std::string(buf) + ":" + std::to_string(port);
}

// The context, the worker and the thread that progresses them (see the top
// of this file). Thread-safe: post(), call() and the region table may be
// used from any thread; context(), worker(), add_poller() and close_ep()
// only on the progress thread (from tasks and UCX callbacks). Must not be
// destroyed on the progress thread.
class UcxCore {
 public:
  static Result<std::shared_ptr<UcxCore>> start() {
    std::shared_ptr<UcxCore> core(new UcxCore());
    std::promise<Status> started;
    auto result = started.get_future();
    core->thread_ =
        std::thread([raw = core.get(), &started] { raw->run(started); });
    Status s = result.get();
    if (!s.ok()) {
      core->thread_.join();
      return s;
    }
    return core;
  }

  ~UcxCore() {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
      stop_by_ = Clock::now() + kCloseGrace;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  // Queues fn to run on the progress thread.
  void post(std::function<void()> fn) {
    {
      std::lock_guard lock(mu_);
      tasks_.push_back(std::move(fn));
    }
    cv_.notify_one();
  }

  // Runs fn on the progress thread and returns its result. fn must not wait
  // on a peer (it blocks the thread for everyone).
  template <typename Fn>
  std::invoke_result_t<Fn&> call(Fn fn) {
    using R = std::invoke_result_t<Fn&>;
    if (std::this_thread::get_id() == thread_id_) return fn();
    auto p = std::make_shared<std::promise<R>>();
    auto f = p->get_future();
    post([p, &fn] {
      if constexpr (std::is_void_v<R>) {
        fn();
        p->set_value();
      } else {
        p->set_value(fn());
      }
    });
    return f.get();
  }

  ucp_context_h context() const { return context_.get(); }
  ucp_worker_h worker() const { return worker_.get(); }

  // Calls p after every progress round until it returns true.
  void add_poller(std::function<bool()> p) { pollers_.push_back(std::move(p)); }

  // Force-closes ep (outstanding requests complete with an error) and calls
  // on_closed, if set, once UCX has finished.
  void close_ep(ucp_ep_h ep, std::function<void(ucs_status_t)> on_closed) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &p);
    auto finish = [on_closed = std::move(on_closed)](ucs_status_t s) {
      if (s != UCS_OK) {
        ucx_log()->debug("endpoint closed: {}", ucs_status_string(s));
      }
      if (on_closed) on_closed(s);
    };
    if (!UCS_PTR_IS_PTR(r)) return finish(UCS_PTR_STATUS(r));
    add_poller([r, finish] {
      const ucs_status_t s = ucp_request_check_status(r);
      if (s == UCS_INPROGRESS) return false;
      ucp_request_free(r);
      finish(s);
      return true;
    });
  }

  // Registrations (thread-safe). Mapping and unmapping run on the thread.
  Status register_region(std::span<std::byte> region) {
    return call([&]() -> Status {
      std::lock_guard lock(regions_mu_);
      KVMIG_RETURN_IF_ERROR(regions_.check_new(region, "ucx"));
      ucp_mem_map_params_t mp{};
      mp.field_mask =
          UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
      mp.address = region.data();
      mp.length = region.size();
      ucp_mem_h memh = nullptr;
      const ucs_status_t s = ucp_mem_map(context(), &mp, &memh);
      if (s != UCS_OK) {
        return status_from_ucs(
            s, "ucp_mem_map of " + std::to_string(region.size()) + " bytes");
      }
      regions_.add(region, MemhPtr(memh, MemhDeleter{context()}));
      return Status();
    });
  }
  Status deregister_region(std::span<std::byte> region) {
    return call([&]() -> Status {
      std::lock_guard lock(regions_mu_);
      return regions_.remove(region, "ucx").status();  // unmaps here
    });
  }
  void clear_regions() {
    call([&] {
      std::lock_guard lock(regions_mu_);
      regions_.clear([](auto& e) { e.value.reset(); });
    });
  }
  // The memory handle of the registration containing [p, +len), or null.
  ucp_mem_h find_memh(const void* p, size_t len) const {
    std::lock_guard lock(regions_mu_);
    const auto* e = regions_.find(p, len);
    return e ? e->value.get() : nullptr;
  }
  // find_memh for many ranges under one lock.
  template <typename Fn>
  void with_regions(Fn&& fn) const {
    std::lock_guard lock(regions_mu_);
    fn(regions_);
  }

 private:
  UcxCore() = default;

  Status init() {
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return status_from_ucs(s, "ucp_config_read");
    if (std::getenv("UCX_TLS") == nullptr) {
      s = ucp_config_modify(config, "TLS", kDefaultTls);
      if (s != UCS_OK) {
        ucp_config_release(config);
        return status_from_ucs(s, "set UCX_TLS");
      }
    }
    if (std::getenv("UCX_MM_ERROR_HANDLING") == nullptr) {
      s = ucp_config_modify(config, "MM_ERROR_HANDLING", "y");
      if (s != UCS_OK) {
        ucp_config_release(config);
        return status_from_ucs(s, "set UCX_MM_ERROR_HANDLING");
      }
    }
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME;
    params.features = UCP_FEATURE_RMA;
    params.name = "kvmig";
    ucp_context_h context = nullptr;
    s = ucp_init(&params, config, &context);
    ucp_config_release(config);
    if (s != UCS_OK) return status_from_ucs(s, "ucp_init");
    context_.reset(context);

    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    ucp_worker_h worker = nullptr;
    s = ucp_worker_create(context_.get(), &wp, &worker);
    if (s != UCS_OK) return status_from_ucs(s, "ucp_worker_create");
    worker_.reset(worker);
    return Status();
  }

  void run(std::promise<Status>& started) {
    thread_id_ = std::this_thread::get_id();
    Status s = init();
    const bool ok = s.ok();
    started.set_value(std::move(s));  // `started` is gone after this
    if (!ok) {
      worker_.reset();
      context_.reset();
      return;
    }
    auto last_activity = Clock::now();
    std::deque<std::function<void()>> batch;
    for (;;) {
      {
        std::unique_lock lock(mu_);
        if (tasks_.empty() && !stopping_ && pollers_.empty() &&
            Clock::now() - last_activity > kSpinAfterActivity) {
          cv_.wait_for(lock, kMaxIdleSleep);
        }
        batch.swap(tasks_);
        if (stopping_ && batch.empty() &&
            (pollers_.empty() || Clock::now() > stop_by_)) {
          break;
        }
      }
      bool active = !batch.empty();
      for (auto& task : batch) task();
      batch.clear();
      while (ucp_worker_progress(worker_.get()) != 0) active = true;
      if (!pollers_.empty()) {
        active = true;
        auto current = std::move(pollers_);
        pollers_.clear();
        std::vector<std::function<bool()>> keep;
        for (auto& p : current) {
          if (!p()) keep.push_back(std::move(p));
        }
        for (auto& p : pollers_)
          keep.push_back(std::move(p));  // added meanwhile
        pollers_ = std::move(keep);
      }
      if (active) last_activity = Clock::now();
    }
    if (!pollers_.empty()) {
      ucx_log()->warn("{} endpoint closes did not finish before shutdown",
                      pollers_.size());
    }
    pollers_.clear();
    {
      std::lock_guard lock(regions_mu_);
      regions_.clear([](auto& e) { e.value.reset(); });
    }
    // Destroyed on the thread that created them, worker before context.
    worker_.reset();
    context_.reset();
  }

  // Progress thread only (created, used and destroyed there).
  ContextPtr context_;
  WorkerPtr worker_;
  std::vector<std::function<bool()>> pollers_;
  std::thread::id thread_id_;

  mutable std::mutex regions_mu_;
  RegionTable<MemhPtr> regions_;  // guarded by regions_mu_; memh on thread

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;  // guarded by mu_
  bool stopping_ = false;                    // guarded by mu_
  Clock::time_point stop_by_;                // guarded by mu_

  std::thread thread_;
};

// Closes an endpoint through the core when the owner lets go of it.
struct EpDeleter {
  UcxCore* core = nullptr;
  void operator()(ucp_ep_h ep) const { core->close_ep(ep, nullptr); }
};
using EpPtr = std::unique_ptr<Handle<ucp_ep_h>, EpDeleter>;

// Closes one endpoint once, however many parties ask (an error callback,
// revoke(), a destructor), and tells each of them when UCX has finished.
// Progress thread only.
class EpClose {
 public:
  // Starts closing ep if it is open; calls done (if set) once it is closed,
  // and `closed` (if set) first, once, when the close finishes.
  template <typename Keep>
  void request(UcxCore* core, EpPtr& ep, Keep keep_alive,
               std::function<void()> done, std::function<void()> closed = {}) {
    if (done) waiters_.push_back(std::move(done));
    if (ep) {
      in_progress_ = true;
      core->close_ep(ep.release(), [this, keep_alive, closed](ucs_status_t) {
        in_progress_ = false;
        if (closed) closed();
        finish();
      });
      return;
    }
    if (!in_progress_) finish();
  }

 private:
  void finish() {
    auto waiters = std::move(waiters_);
    waiters_.clear();
    for (auto& w : waiters) w();
  }

  bool in_progress_ = false;
  std::vector<std::function<void()>> waiters_;
};

// ---------------------------------------------------------------- target

// Shared by a UcxTarget and the callbacks UCX calls on the progress thread.
struct TargetState : std::enable_shared_from_this<TargetState> {
  explicit TargetState(UcxCore* c) : core(c), ep(nullptr, EpDeleter{c}) {}

  void set_health(Status s) {
    std::lock_guard lock(mu);
    if (health.ok()) health = std::move(s);
  }

  static void on_conn_request(ucp_conn_request_h req, void* arg) {
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
    st->ep.reset(ep);
    std::lock_guard lock(st->mu);
    st->peer = from;
  }

  static void on_ep_error(void* arg, ucp_ep_h, ucs_status_t s) {
    auto* st = static_cast<TargetState*>(arg);
    std::string peer;
    {
      std::lock_guard lock(st->mu);
      peer = st->peer;
    }
    Status status = status_from_ucs(s, "connection from initiator " + peer);
    ucx_log()->info("target: {}", status.to_string());
    st->set_health(std::move(status));
    // A failed endpoint is only good for closing; close it at once.
    // Known UCX 1.13 limit (seen under TSan with UCX_TLS=tcp, about one run
    // in five): when the initiator vanishes mid-transfer, software-RMA puts
    // already received are acknowledged on the failed endpoint and UCX
    // aborts the process (ucp_request.inl "unexpected error: Endpoint
    // timeout" from ucp_put_handler). Closing here narrows the window; it
    // does not close it.
    st->close(nullptr);
  }

  // Progress thread: force-closes the initiator's endpoint, if any.
  void close(std::function<void()> done) {
    ep_close.request(core, ep, shared_from_this(), std::move(done));
  }

  bool healthy() {
    std::lock_guard lock(mu);
    return health.ok();
  }

  UcxCore* const core;
  uint64_t token = 0;  // names this connection to its initiator; set once
  // Progress thread only. The endpoint is closed before the listener goes.
  ListenerPtr listener;
  EpPtr ep;
  EpClose ep_close;
  bool revoked = false;

  std::mutex mu;
  Status health;     // guarded by mu
  std::string peer;  // guarded by mu
};

struct InitState;

// Connections kept after committed migrations for the next migration
// between the same two agents (TransportTarget::keep(),
// TransportInitiator::keep()). The initiator's side is found by the peer
// agent's control address, the target's by the token the initiator then
// presents in HELLO; a token travels only over the control connection.
// At most kMaxKept of each; the oldest is closed to make room. A kept
// endpoint that fails is closed by its error callback and skipped here.
// Thread-safe.
class Parking {
 public:
  explicit Parking(UcxCore* core) : core_(core) {}
  Parking(const Parking&) = delete;
  Parking& operator=(const Parking&) = delete;

  void park_target(std::shared_ptr<TargetState> st);
  // The healthy kept target with this token, taken out; null if none.
  std::shared_ptr<TargetState> take_target(uint64_t token);
  // Takes st out if it is still kept (not adopted meanwhile): true.
  bool unpark_target(const TargetState* st);
  void park_init(const std::string& peer, std::shared_ptr<InitState> st);
  // The healthy kept initiator to peer, taken out; null if none.
  std::shared_ptr<InitState> take_init(const std::string& peer);
  // Closes everything kept and waits for UCX (bounded). Not on the
  // progress thread.
  void clear();

 private:
  static constexpr size_t kMaxKept = 16;
  void close_async(std::shared_ptr<TargetState> st);
  void close_async(std::shared_ptr<InitState> st);

  UcxCore* const core_;
  std::mutex mu_;
  std::deque<std::shared_ptr<TargetState>> targets_;  // guarded by mu_
  std::deque<std::pair<std::string, std::shared_ptr<InitState>>>
      inits_;  // guarded by mu_
};

// The receiving end. Thread-safe.
class UcxTarget final : public TransportTarget {
 public:
  struct Region {
    uint64_t base = 0;
    uint64_t length = 0;
    ucp_mem_h memh = nullptr;  // null for an empty region
  };

  // A target for the initiator that presented `token` (0: none): its kept
  // connection when there is one, else a fresh listener.
  static Result<std::unique_ptr<TransportTarget>> open(
      std::shared_ptr<UcxCore> core, std::shared_ptr<Parking> parking,
      const std::string& host, std::vector<Region> regions, uint64_t token) {
    if (token != 0) {
      if (auto st = parking->take_target(token)) {
        std::unique_ptr<UcxTarget> t(new UcxTarget(core, parking, st));
        auto adopted = core->call([&]() -> Result<std::vector<uint8_t>> {
          if (!st->ep || st->revoked) {
            return Status::unavailable("kept connection is gone");
          }
          ByteWriter w;
          w.put_string(host);
          w.put<uint16_t>(0);  // no listener: reuse the kept endpoint
          w.put<uint64_t>(st->token);
          KVMIG_RETURN_IF_ERROR(pack_regions(st->core, w, regions));
          return w.take();
        });
        if (adopted.ok()) {
          t->address_ = std::move(*adopted);
          ucx_log()->debug("target reuses the connection kept for {}",
                           st->peer);
          return std::unique_ptr<TransportTarget>(std::move(t));
        }
        ucx_log()->debug("target: {}; listening afresh",
                         adopted.status().to_string());
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

  ~UcxTarget() override {
    {
      std::lock_guard lock(revoke_mu_);
      if (kept_) return;  // the connection is the parking's now
    }
    revoke();
  }

  std::vector<uint8_t> address() const override { return address_; }

  void revoke() override {
    {
      std::lock_guard lock(revoke_mu_);
      if (revoked_) return;
      revoked_ = true;
      // Kept, then revoked (the install failed): close it unless another
      // migration has adopted it since.
      if (kept_ && !parking_->unpark_target(state_.get())) return;
    }
    auto done = std::make_shared<std::promise<void>>();
    auto closed = done->get_future();
    core_->post([st = state_, done] {
      st->revoked = true;
      st->listener.reset();
      st->close([done] { done->set_value(); });
    });
    if (closed.wait_for(kCloseGrace) != std::future_status::ready) {
      ucx_log()->warn("target: closing the initiator's endpoint took over {}s",
                      kCloseGrace.count());
    }
  }

  bool keep() override {
    {
      std::lock_guard lock(revoke_mu_);
      if (revoked_ || kept_) return kept_;
    }
    const bool open = core_->call([st = state_.get()] {
      st->listener.reset();  // one initiator per connection, as before
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

  // Progress thread: each region's base, length and packed remote key.
  static Status pack_regions(UcxCore* core, ByteWriter& w,
                             const std::vector<Region>& regions) {
    w.put<uint32_t>(static_cast<uint32_t>(regions.size()));
    for (const Region& r : regions) {
      w.put<uint64_t>(r.base);
      w.put<uint64_t>(r.length);
      if (r.memh == nullptr) {
        w.put_blob({});
        continue;
      }
      void* buf = nullptr;
      size_t size = 0;
      const ucs_status_t s =
          ucp_rkey_pack(core->context(), r.memh, &buf, &size);
      if (s != UCS_OK) return status_from_ucs(s, "ucp_rkey_pack");
      RkeyBufferPtr packed(buf);
      w.put_blob({static_cast<const uint8_t*>(buf), size});
    }
    return Status();
  }

  // Progress thread: starts the listener and builds the address (host,
  // port, token, regions).
  static Result<std::vector<uint8_t>> setup(
      TargetState* st, const std::string& host, const sockaddr_storage& ss,
      const std::vector<Region>& regions) {
    ByteWriter w;
    w.put_string(host);
    const size_t port_at = w.size();
    w.put<uint16_t>(0);  // the listener's port, patched below
    w.put<uint64_t>(st->token);
    KVMIG_RETURN_IF_ERROR(pack_regions(st->core, w, regions));

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
    st->listener.reset(listener);
    ucp_listener_attr_t attr{};
    attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    s = ucp_listener_query(listener, &attr);
    if (s != UCS_OK) return status_from_ucs(s, "ucp_listener_query");
    const uint16_t port =
        attr.sockaddr.ss_family == AF_INET6
            ? ntohs(reinterpret_cast<const sockaddr_in6*>(&attr.sockaddr)
                        ->sin6_port)
            : ntohs(reinterpret_cast<const sockaddr_in*>(&attr.sockaddr)
                        ->sin_port);
    auto out = w.take();
    out[port_at] = static_cast<uint8_t>(port);
    out[port_at + 1] = static_cast<uint8_t>(port >> 8);
    ucx_log()->debug("target listening on {}:{} for {} regions", host, port,
                     regions.size());
    return out;
  }

  const std::shared_ptr<UcxCore> core_;
  const std::shared_ptr<Parking> parking_;
  const std::shared_ptr<TargetState> state_;
  std::vector<uint8_t> address_;
  std::mutex revoke_mu_;
  bool revoked_ = false;  // guarded by revoke_mu_
  bool kept_ = false;     // guarded by revoke_mu_
};

// ------------------------------------------------------------- initiator

// One put, resolved on the caller's thread.
struct Put {
  const void* src = nullptr;
  uint64_t remote = 0;
  size_t length = 0;
  uint32_t region = 0;
  ucp_mem_h memh = nullptr;  // the source's registration, if found
};

struct RemoteRegion {
  uint64_t base = 0;
  uint64_t length = 0;
  std::vector<uint8_t> rkey;
};

// Shared by a UcxInitiator and the callbacks UCX calls on the progress
// thread; lives until its endpoint has finished closing.
struct InitState : std::enable_shared_from_this<InitState> {
  InitState(UcxCore* c, uint32_t max)
      : core(c), max_in_flight(max), ep(nullptr, EpDeleter{c}) {}

  void fail(Status s) {
    std::lock_guard lock(mu);
    if (error.ok()) {
      ucx_log()->info("initiator to {}: {}", peer, s.to_string());
      error = std::move(s);
    }
    cv.notify_all();
  }

  bool failed() {
    std::lock_guard lock(mu);
    return !error.ok();
  }

  // Progress thread: creates the endpoint and flushes it, which completes
  // once wire-up has finished.
  void start_connect(const sockaddr_storage& ss) {
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
    ep.reset(raw);
    start_flush(on_connect_flushed);
  }

  // A kept connection serves a new migration. Caller's thread, before any
  // task for it is posted: the counters the caller waits on start from zero
  // (stale ones from the last migration would satisfy its waits at once).
  void begin_reuse() {
    std::lock_guard lock(mu);
    batches_posted = 0;
    flushes_done = 0;
    connected = false;
  }
  // Progress thread, after begin_reuse(): the new regions' keys once a flush
  // has shown the connection still works.
  void reuse(std::vector<RemoteRegion> regions) {
    if (!ep || closing) {
      return fail(Status::unavailable("ucx: the connection kept to " + peer +
                                      " is gone"));
    }
    rkeys.clear();
    remote = std::move(regions);
    batch.reset();
    next = 0;
    start_flush(on_connect_flushed);
  }

  bool usable() {
    std::lock_guard lock(mu);
    return connected && error.ok();
  }

  void finish_connect() {
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

  void start_flush(ucp_send_nbx_callback_t cb) {
    if (!ep)
      return fail(
          Status::unavailable("ucx: endpoint to " + peer + " is closed"));
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = cb;
    p.user_data = this;
    ucs_status_ptr_t r = ucp_ep_flush_nbx(ep.get(), &p);
    if (UCS_PTR_IS_PTR(r)) return;  // cb runs on completion
    cb(nullptr, UCS_PTR_STATUS(r), this);
  }

  static void on_connect_flushed(void* req, ucs_status_t s, void* user) {
    auto* st = static_cast<InitState*>(user);
    if (req) ucp_request_free(req);
    if (s != UCS_OK)
      return st->fail(status_from_ucs(s, "connect to " + st->peer));
    if (!st->failed()) st->finish_connect();
  }

  static void on_flushed(void* req, ucs_status_t s, void* user) {
    auto* st = static_cast<InitState*>(user);
    if (req) ucp_request_free(req);
    if (s != UCS_OK)
      return st->fail(status_from_ucs(s, "flush to " + st->peer));
    std::lock_guard lock(st->mu);
    ++st->flushes_done;
    st->cv.notify_all();
  }

  static void on_put_done(void* req, ucs_status_t s, void* user) {
    auto* st = static_cast<InitState*>(user);
    ucp_request_free(req);
    --st->in_flight;
    if (s != UCS_OK) st->fail(status_from_ucs(s, "put to " + st->peer));
    st->pump();
  }

  static void on_ep_error(void* arg, ucp_ep_h, ucs_status_t s) {
    auto* st = static_cast<InitState*>(arg);
    st->fail(status_from_ucs(s, "connection to target " + st->peer));
    st->close(nullptr);  // a failed endpoint is only good for closing
  }

  // Progress thread: posts puts of the current batch while fewer than
  // max_in_flight are outstanding; completions call it again.
  void pump() {
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
      ucs_status_ptr_t r = ucp_put_nbx(ep.get(), put.src, put.length,
                                       put.remote, rkeys[put.region].get(), &p);
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

  // Progress thread: force-closes the endpoint; the remote keys go once UCX
  // has finished with it (no request refers to them any more).
  void close(std::function<void()> on_closed) {
    closing = true;
    batch.reset();
    ep_close.request(core, ep, shared_from_this(), std::move(on_closed),
                     [this] { rkeys.clear(); });
  }

  UcxCore* const core;
  const uint32_t max_in_flight;
  std::string peer;                  // set before the first task
  uint64_t token = 0;                // the target's; set before the first task
  std::vector<RemoteRegion> remote;  // set before the first task, or by reuse()

  // Progress thread only. Remote keys are destroyed before the endpoint.
  EpPtr ep;
  EpClose ep_close;
  std::vector<RkeyPtr> rkeys;
  std::shared_ptr<const std::vector<Put>> batch;
  size_t next = 0;
  uint32_t in_flight = 0;
  bool closing = false;

  std::mutex mu;
  std::condition_variable cv;
  Status error;                 // guarded by mu; the first failure, sticky
  bool connected = false;       // guarded by mu
  uint64_t batches_posted = 0;  // guarded by mu
  uint64_t flushes_done = 0;    // guarded by mu
};

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
    if (!kept_) close_and_wait();
    ucx_log()->debug("initiator to {} closed: {} ops, {} bytes, {} flushes",
                     state_->peer.empty() ? "nobody" : state_->peer,
                     ops_posted_, bytes_written_, flushes_requested_);
  }

  // Empty, or the token of the kept connection this initiator holds.
  std::vector<uint8_t> address() const override {
    if (!adopted_) return {};
    ByteWriter w;
    w.put<uint8_t>(kKeptConnection);
    w.put<uint64_t>(state_->token);
    return w.take();
  }

  Status connect(std::span<const uint8_t> target_address,
                 Deadline deadline) override {
    if (connect_called_) {
      return Status::failed_precondition("ucx: connect called twice");
    }
    ByteReader r(target_address);
    std::string host;
    uint16_t port = 0;
    uint64_t token = 0;
    std::vector<RemoteRegion> regions;
    auto parsed = parse(r, host, port, token, regions);
    if (!parsed.ok()) {
      return Status::invalid_argument("ucx: bad target address: " +
                                      parsed.message());
    }
    auto ss = make_sockaddr(host, port);
    if (!ss.ok()) {
      return Status::invalid_argument("ucx: bad target address: host '" + host +
                                      "' port " + std::to_string(port));
    }
    if (port == 0 && (!adopted_ || token != state_->token)) {
      return Status::invalid_argument(
          "ucx: bad target address: it reuses a connection this initiator "
          "does not hold");
    }
    connect_called_ = true;
    for (const auto& region : regions) {
      region_bases_.push_back(region.base);
      region_lengths_.push_back(region.length);
    }
    if (port == 0) {
      state_->begin_reuse();
      core_->post([st = state_, regions = std::move(regions)]() mutable {
        st->reuse(std::move(regions));
      });
    } else {
      if (adopted_) {
        // The target did not know our token (it restarted, or let its side
        // go): the kept connection is useless.
        close_and_wait();
        state_ = std::make_shared<InitState>(core_.get(), max_in_flight_);
        adopted_ = false;
      }
      state_->peer = host + ":" + std::to_string(port);
      state_->token = token;
      state_->remote = std::move(regions);
      core_->post([st = state_, addr = *ss] { st->start_connect(addr); });
    }
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

  Status write(std::span<const WriteOp> ops, Deadline deadline) override {
    KVMIG_RETURN_IF_ERROR(usable());
    KVMIG_RETURN_IF_ERROR(check_write_ops(ops, region_lengths_, "ucx"));
    auto puts = std::make_shared<std::vector<Put>>();
    puts->reserve(ops.size());
    uint64_t bytes = 0;
    core_->with_regions([&](const RegionTable<MemhPtr>& table) {
      for (const WriteOp& op : ops) {
        if (op.length == 0) continue;
        const auto* e = table.find(op.src, op.length);
        puts->push_back(
            Put{op.src, region_bases_[op.dst_region] + op.dst_offset, op.length,
                op.dst_region, e ? e->value.get() : nullptr});
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
  static Status parse(ByteReader& r, std::string& host, uint16_t& port,
                      uint64_t& token, std::vector<RemoteRegion>& out) {
    KVMIG_ASSIGN_OR_RETURN(host, r.get_string(kMaxHostLen, "host"));
    KVMIG_ASSIGN_OR_RETURN(port, r.get<uint16_t>("port"));
    KVMIG_ASSIGN_OR_RETURN(token, r.get<uint64_t>("token"));
    KVMIG_ASSIGN_OR_RETURN(uint32_t n, r.get<uint32_t>("region count"));
    if (n > kMaxRegions || n > r.remaining() / 20) {
      return Status::data_loss("region count " + std::to_string(n) +
                               " does not fit the address");
    }
    std::vector<RemoteRegion> regions(n);
    for (RemoteRegion& region : regions) {
      KVMIG_ASSIGN_OR_RETURN(region.base, r.get<uint64_t>("region base"));
      KVMIG_ASSIGN_OR_RETURN(region.length, r.get<uint64_t>("region length"));
      if (region.base + region.length < region.base) {
        return Status::data_loss("region wraps the address space");
      }
      KVMIG_ASSIGN_OR_RETURN(auto rkey, r.get_blob(kMaxRkeyLen, "remote key"));
      if (rkey.empty() && region.length != 0) {
        return Status::data_loss("non-empty region without a remote key");
      }
      region.rkey.assign(rkey.begin(), rkey.end());
    }
    KVMIG_RETURN_IF_ERROR(r.expect_end("target address"));
    out = std::move(regions);
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
    auto done = std::make_shared<std::promise<void>>();
    auto closed = done->get_future();
    core_->post(
        [st = state_, done] { st->close([done] { done->set_value(); }); });
    if (closed.wait_for(kCloseGrace) != std::future_status::ready) {
      ucx_log()->warn("initiator: closing the endpoint to {} took over {}s",
                      state_->peer, kCloseGrace.count());
    }
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

// --------------------------------------------------------------- parking

void Parking::close_async(std::shared_ptr<TargetState> st) {
  core_->post([st] {
    st->revoked = true;
    st->listener.reset();
    st->close(nullptr);
  });
}

void Parking::close_async(std::shared_ptr<InitState> st) {
  core_->post([st] { st->close(nullptr); });
}

void Parking::park_target(std::shared_ptr<TargetState> st) {
  std::shared_ptr<TargetState> evicted;
  {
    std::lock_guard lock(mu_);
    targets_.push_back(std::move(st));
    if (targets_.size() > kMaxKept) {
      evicted = std::move(targets_.front());
      targets_.pop_front();
    }
  }
  if (evicted) close_async(std::move(evicted));
}

std::shared_ptr<TargetState> Parking::take_target(uint64_t token) {
  std::lock_guard lock(mu_);
  for (auto it = targets_.begin(); it != targets_.end(); ++it) {
    if ((*it)->token != token) continue;
    auto st = std::move(*it);
    targets_.erase(it);
    if (!st->healthy()) {
      close_async(st);
      return nullptr;
    }
    return st;
  }
  return nullptr;
}

bool Parking::unpark_target(const TargetState* st) {
  std::lock_guard lock(mu_);
  for (auto it = targets_.begin(); it != targets_.end(); ++it) {
    if (it->get() == st) {
      targets_.erase(it);
      return true;
    }
  }
  return false;
}

void Parking::park_init(const std::string& peer,
                        std::shared_ptr<InitState> st) {
  std::vector<std::shared_ptr<InitState>> evicted;
  {
    std::lock_guard lock(mu_);
    for (auto it = inits_.begin(); it != inits_.end();) {
      if (it->first == peer) {
        evicted.push_back(std::move(it->second));
        it = inits_.erase(it);
      } else {
        ++it;
      }
    }
    inits_.emplace_back(peer, std::move(st));
    if (inits_.size() > kMaxKept) {
      evicted.push_back(std::move(inits_.front().second));
      inits_.pop_front();
    }
  }
  for (auto& e : evicted) close_async(std::move(e));
}

std::shared_ptr<InitState> Parking::take_init(const std::string& peer) {
  std::lock_guard lock(mu_);
  for (auto it = inits_.begin(); it != inits_.end(); ++it) {
    if (it->first != peer) continue;
    auto st = std::move(it->second);
    inits_.erase(it);
    if (!st->usable()) {
      close_async(st);
      return nullptr;
    }
    return st;
  }
  return nullptr;
}

void Parking::clear() {
  std::deque<std::shared_ptr<TargetState>> targets;
  std::deque<std::pair<std::string, std::shared_ptr<InitState>>> inits;
  {
    std::lock_guard lock(mu_);
    targets.swap(targets_);
    inits.swap(inits_);
  }
  if (targets.empty() && inits.empty()) return;
  auto left =
      std::make_shared<std::atomic<size_t>>(targets.size() + inits.size());
  auto done = std::make_shared<std::promise<void>>();
  auto closed = done->get_future();
  auto one_closed = [left, done] {
    if (--*left == 0) done->set_value();
  };
  core_->post(
      [targets = std::move(targets), inits = std::move(inits), one_closed] {
        for (const auto& st : targets) {
          st->revoked = true;
          st->listener.reset();
          st->close(one_closed);
        }
        for (const auto& [peer, st] : inits) st->close(one_closed);
      });
  if (closed.wait_for(kCloseGrace) != std::future_status::ready) {
    ucx_log()->warn("closing the kept connections took over {}s",
                    kCloseGrace.count());
  }
}

// ------------------------------------------------------------- transport

// Thread-safe: registrations are guarded by the core's region mutex and
// made on its progress thread.
class UcxTransport final : public Transport {
 public:
  UcxTransport(TransportOptions opts, std::shared_ptr<UcxCore> core)
      : opts_(std::move(opts)),
        core_(std::move(core)),
        parking_(std::make_shared<Parking>(core_.get())) {}

  ~UcxTransport() override {
    parking_->clear();
    core_->clear_regions();
  }

  std::string_view name() const override { return "ucx"; }

  Status register_memory(std::span<std::byte> region) override {
    return core_->register_region(region);
  }

  Status deregister_memory(std::span<std::byte> region) override {
    return core_->deregister_region(region);
  }

  Result<std::unique_ptr<TransportInitiator>> create_initiator() override {
    return create_initiator_for("");
  }

  Result<std::unique_ptr<TransportInitiator>> create_initiator_for(
      std::string_view peer) override {
    return std::unique_ptr<TransportInitiator>(new UcxInitiator(
        core_, parking_, opts_.max_in_flight, std::string(peer)));
  }

  Result<std::unique_ptr<TransportTarget>> open_target(
      std::span<const std::span<std::byte>> regions,
      std::span<const uint8_t> initiator_address,
      Deadline /*deadline: nothing here waits on the peer*/) override {
    uint64_t token = 0;
    if (!initiator_address.empty()) {
      ByteReader r(initiator_address);
      auto kind = r.get<uint8_t>("kind");
      auto t = r.get<uint64_t>("token");
      if (!kind.ok() || *kind != kKeptConnection || !t.ok() ||
          !r.expect_end("initiator address").ok()) {
        return Status::invalid_argument(
            "ucx: bad initiator address (" +
            std::to_string(initiator_address.size()) + " bytes)");
      }
      token = *t;
    }
    std::vector<UcxTarget::Region> exported;
    Status bad;
    core_->with_regions([&](const RegionTable<MemhPtr>& table) {
      for (size_t i = 0; i < regions.size() && bad.ok(); ++i) {
        UcxTarget::Region r;
        r.base = reinterpret_cast<uintptr_t>(regions[i].data());
        r.length = regions[i].size();
        if (!regions[i].empty()) {
          const auto* e = table.find(regions[i].data(), regions[i].size());
          if (e == nullptr) {
            bad = Status::invalid_argument(
                "ucx: target region " + std::to_string(i) + " (" +
                std::to_string(regions[i].size()) +
                " bytes) is not inside registered memory");
          } else {
            r.memh = e->value.get();
          }
        }
        exported.push_back(r);
      }
    });
    KVMIG_RETURN_IF_ERROR(bad);
    return UcxTarget::open(core_, parking_, opts_.bind_host,
                           std::move(exported), token);
  }

 private:
  const TransportOptions opts_;
  const std::shared_ptr<UcxCore> core_;
  const std::shared_ptr<Parking> parking_;
};

}  // namespace

Result<std::unique_ptr<Transport>> make_ucx_transport(
    const TransportOptions& opts) {
  KVMIG_ASSIGN_OR_RETURN(auto core, UcxCore::start());
  return std::unique_ptr<Transport>(new UcxTransport(opts, std::move(core)));
}

}  // namespace kvmig
