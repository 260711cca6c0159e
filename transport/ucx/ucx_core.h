// The ucx transport's shared core: the context, worker and progress thread
// (UcxCore), owning handles for UCP objects, endpoint closing, socket
// addresses, and the address encodings the target and the initiator
// exchange. Private to transport/ucx.
//
// Threading. Each UcxTransport owns one ucp_context and one ucp_worker, and
// one progress thread that creates them, makes every ucp_* call on them
// (endpoints, listeners, puts, flushes, rkeys, mem_map) and destroys them.
// Other threads hand it work through a mutex-protected queue. The worker is
// therefore UCS_THREAD_MODE_SINGLE and every UCX callback (put and flush
// completions, endpoint errors, connection requests) runs on that thread.
// This is simpler to get right than UCS_THREAD_MODE_MULTI, whose locking
// covers the worker but not our own state touched from callbacks; the cost
// is one hand-off per write()/flush() call, not per put. A kept connection
// needs none to be reused (initiator) or adopted and kept (target: its keys
// were packed at registration).
//
// The thread progresses UCX while it makes progress, then sleeps until work is
// posted (an eventfd) or, with an endpoint or a listener open, until UCX has an
// event (UCP_FEATURE_WAKEUP: ucp_worker_arm, then poll on ucp_worker_get_efd
// and the eventfd; at most kMaxEventWait): an idle agent's ucx transport wakes
// only every kMaxEventWait with kept endpoints open, and never with none once
// UCX has been idle for kSettle. The feature changes no lane UCX selects (in
// 1.13 only a tag lane asks for event support), and every lane it selects here
// raises events for what a target must progress: incoming emulated puts over
// shared memory and tcp, completions over verbs. While UCX stays busy
// (kProgressBurst calls in a row made progress) or endpoints are closing it
// polls, yielding the CPU (sched_yield) between rounds: on a host with few
// cores a progress thread that spins outright holds a core the agent's io
// thread and data pool, and a peer agent's threads, must wait for at every
// wake-up. Measured on this 2-vCPU VM (docs/performance.md): spinning
// outright against yielding, a 1-page migration 1.19 -> 0.81 ms; yielding for 2
// ms after activity against sleeping on events at once, 64 pages (1 MiB) 0.81
// of the time and three quarters of the initiator's CPU.
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
// Shared memory. A listener-made endpoint asks for peer error handling, and UCX
// 1.13's shared-memory transports (sysv, posix) offer it only with
// UCX_MM_ERROR_HANDLING=y; without it such an endpoint gets tcp alone even
// between two processes on one host (openucx/ucx#8477). So this transport sets
// it unless the environment does, or names a UCX_TLS without a shared-memory
// transport (UCX then warns that nothing read it). Puts into the agent's own
// memory (not UCX-allocated) then run as emulated RMA over the sysv
// active-message lane, which carries the endpoint id, so a closed endpoint
// stops them as it does on tcp. With no RDMA device an endpoint to another
// host gets tcp.
//
// Closing. Emulated RMA acknowledges every put fragment with a message from
// the target. UCX 1.13 cannot drop such an acknowledgement that is still
// owed when the target's endpoint fails: over shared memory, purging it
// reads fields the request never set (ucp_request_send_state_ff ->
// ucp_request_memory_dereg), and the target's process died of SIGSEGV in CI
// when an initiator gave up at its deadline and force-closed mid-transfer;
// over tcp the target aborts ("Endpoint timeout" in ucp_put_handler). So
// each side drains its endpoint before force-closing it (EpDrain), while
// its flushes complete, for at most kDrainCap: an initiator with puts not yet
// flushed, until its flush completes (then the target owes it nothing); a
// target whose initiator may still be writing (revoke() mid-transfer), until a
// flush finishes at once, which shows that no acknowledgement is pending right
// then, and it closes before UCX can queue another (a put that arrives
// after the close names an endpoint id UCX has released: UCX drops it and
// owes nothing). Without that, a revoke mid-transfer left acknowledgements
// owed in most runs (RevokeMidTransferCutsOffAndLeavesNothingOwed). A drain
// that still progresses is not cut short: under ASan and load, the target's
// drain of the 22 MiB its initiator had in flight took up to 380 ms, near a
// fixed cut at 500 ms. One that stalls (no flush completes for kDrainStall:
// the peer takes no acknowledgement) ends there. An initiator that dies
// mid-transfer can still leave them owed (README, "Status").
#ifndef KVMIG_TRANSPORT_UCX_UCX_CORE_H_
#define KVMIG_TRANSPORT_UCX_UCX_CORE_H_

#include <sys/socket.h>
#include <ucp/api/ucp.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../transport_util.h"
#include "kvmig/status.h"
#include "kvmig/transport.h"
#include "log.h"

namespace kvmig::ucx {

// How long teardown waits for UCX to finish closing an endpoint.
constexpr auto kCloseGrace = std::chrono::seconds(2);
// How long either side drains its endpoint before it force-closes it (see
// "Closing" above): until no flush has completed for kDrainStall, and at
// most kDrainCap.
constexpr auto kDrainStall = std::chrono::milliseconds(500);
constexpr auto kDrainCap = std::chrono::seconds(2);

// The "ucx" logger. Thread-safe.
std::shared_ptr<spdlog::logger> ucx_log();

// Owning handles for UCP objects. Each is destroyed on the progress thread
// by whoever owns it there; not thread-safe.
template <typename T>
using Handle = std::remove_pointer_t<T>;

struct ConfigDeleter {
  void operator()(ucp_config_t* c) const { ucp_config_release(c); }
};
struct ContextDeleter {
  void operator()(ucp_context_h c) const { ucp_cleanup(c); }
};
struct WorkerDeleter {
  void operator()(ucp_worker_h w) const { ucp_worker_destroy(w); }
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
using ConfigPtr = std::unique_ptr<ucp_config_t, ConfigDeleter>;
using ContextPtr = std::unique_ptr<Handle<ucp_context_h>, ContextDeleter>;
using WorkerPtr = std::unique_ptr<Handle<ucp_worker_h>, WorkerDeleter>;
using RkeyPtr = std::unique_ptr<Handle<ucp_rkey_h>, RkeyDeleter>;
using RkeyBufferPtr = std::unique_ptr<void, RkeyBufferDeleter>;
using MemhPtr = std::unique_ptr<Handle<ucp_mem_h>, MemhDeleter>;

// One registered region: UCX's handle, and its remote key packed once when
// it was mapped (a key stays good while the mapping does), so a target
// hands out keys without a trip to the progress thread.
struct Registration {
  MemhPtr memh;
  std::vector<uint8_t> rkey;
};

// Socket addresses (stateless; thread-safe).

// host:port as a socket address; InvalidArgument unless host is an IP.
Result<sockaddr_storage> make_sockaddr(const std::string& host, uint16_t port);
socklen_t sockaddr_len(const sockaddr_storage& ss);
// "ip:port", or "?" for a family other than IPv4 and IPv6.
std::string sockaddr_string(const sockaddr_storage& ss);

// The context, the worker and the thread that progresses them (see the top
// of this file). Thread-safe: post(), call() and the region table may be
// used from any thread; context(), worker(), add_poller() and close_ep()
// only on the progress thread (from tasks and UCX callbacks). Must not be
// destroyed on the progress thread.
class UcxCore {
 public:
  static Result<std::shared_ptr<UcxCore>> start();
  ~UcxCore();

  // Queues fn to run on the progress thread.
  void post(std::function<void()> fn);

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

  // Progress thread: an endpoint or a listener was made. close_ep() and
  // ListenerDeleter count it gone (the latter on whichever thread lets go).
  void object_opened() {
    open_objects_.fetch_add(1, std::memory_order_relaxed);
  }
  void object_closed() {
    open_objects_.fetch_sub(1, std::memory_order_relaxed);
  }

  // Posts close(done) to the progress thread and waits until it has called
  // done, for at most a drain and a close; past that, warns that closing
  // `what` took longer, and returns. Not on the progress thread.
  void post_close_and_wait(std::function<void(std::function<void()>)> close,
                           std::string_view what);

  // Force-closes ep (outstanding requests complete with an error) and calls
  // on_closed, if set, once UCX has finished.
  void close_ep(ucp_ep_h ep, std::function<void(ucs_status_t)> on_closed);

  // Registrations (thread-safe). Mapping and unmapping run on the thread.
  // `type`: what the memory is (UCS_MEMORY_TYPE_CUDA for a GPU's); a type
  // other than host needs this UCX build's support (memory_types()).
  Status register_region(std::span<std::byte> region,
                         ucs_memory_type_t type = UCS_MEMORY_TYPE_HOST);
  // The memory types this UCX context supports, as a UCS_BIT mask.
  Result<uint64_t> memory_types();
  Status deregister_region(std::span<std::byte> region);
  void clear_regions();
  // The memory handle of the registration containing [p, +len), or null.
  ucp_mem_h find_memh(const void* p, size_t len) const;
  // find_memh for many ranges under one lock.
  template <typename Fn>
  void with_regions(Fn&& fn) const {
    std::lock_guard lock(regions_mu_);
    fn(regions_);
  }

 private:
  UcxCore() = default;

  // Progress thread: reads UCX's configuration with this transport's
  // defaults (see the top of this file).
  static Result<ConfigPtr> read_config();
  Status init();
  void run(std::promise<Status>& started);
  // Progress thread: calls every poller once, keeping those not finished.
  void run_pollers();
  // Progress thread, idle: blocks until work is posted or, with endpoints
  // or listeners open or while `settling` (UCX was busy within kSettle),
  // until UCX has an event (or kMaxEventWait passes).
  void sleep_until_woken(bool settling);
  // Wakes the progress thread if it sleeps (writes wake_fd_). Called with
  // mu_ held, which guards sleeping_.
  void wake_locked();

  // Progress thread only (created, used and destroyed there).
  ContextPtr context_;
  WorkerPtr worker_;
  std::vector<std::function<bool()>> pollers_;
  std::thread::id thread_id_;
  // Endpoints and listeners open: while there are none (and UCX has
  // settled), the idle thread sleeps until work is posted.
  std::atomic<int> open_objects_{0};
  int event_fd_ = -1;  // the worker's (ucp_worker_get_efd), or -1
  bool arm_failed_ = false;

  mutable std::mutex regions_mu_;
  RegionTable<Registration> regions_;  // guarded by regions_mu_; memh on thread

  std::mutex mu_;
  int wake_fd_ = -1;                         // eventfd; written by wake_locked
  std::deque<std::function<void()>> tasks_;  // guarded by mu_
  bool sleeping_ = false;                    // guarded by mu_
  bool stopping_ = false;                    // guarded by mu_
  Clock::time_point stop_by_;                // guarded by mu_

  std::thread thread_;
};

// Closes an endpoint through the core when the owner lets go of it.
// Progress thread only.
struct EpDeleter {
  UcxCore* core = nullptr;
  void operator()(ucp_ep_h ep) const { core->close_ep(ep, nullptr); }
};
using EpPtr = std::unique_ptr<Handle<ucp_ep_h>, EpDeleter>;

// Destroys a listener and tells the core it is gone.
struct ListenerDeleter {
  UcxCore* core = nullptr;
  void operator()(ucp_listener_h l) const;
};
using ListenerPtr = std::unique_ptr<Handle<ucp_listener_h>, ListenerDeleter>;

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

// Drains an endpoint before it is force-closed (see "Closing" above): flushes
// it until a flush finishes at once, which shows that nothing is pending on
// it right then, while flushes complete, for at most kDrainCap; the close()
// calls made meanwhile wait. Progress thread only.
class EpDrain {
 public:
  // True while a drain runs: the owner's close() then waits (wait()).
  bool running() const { return !waiters_.empty(); }
  void wait(std::function<void()> on_closed) {
    waiters_.push_back(std::move(on_closed));
  }

  // Starts draining ep. True: the drain runs and holds on_closed (moved
  // from); false: nothing was pending, on_closed is untouched and the
  // caller closes now. The drain ends when a flush finishes at once or
  // fails, once owner->ep_failed is set, once no flush has completed for
  // kDrainStall, or after kDrainCap; then each
  // waiter goes to owner->close(), which must not drain again. The poller
  // that ends it runs between two progress calls, so the close follows
  // the empty flush before UCX can queue anything new.
  template <typename Owner>
  bool start(UcxCore* core, ucp_ep_h ep, std::shared_ptr<Owner> owner,
             std::string who, std::function<void()>& on_closed) {
    ucs_status_ptr_t r = flush(ep);
    if (!UCS_PTR_IS_PTR(r)) return false;
    waiters_.push_back(std::move(on_closed));
    const auto t0 = Clock::now();
    core->add_poller([this, owner = std::move(owner), who = std::move(who), ep,
                      r, t0, last_done = t0, flushes = 1]() mutable {
      ucs_status_t s = ucp_request_check_status(r);
      const auto now = Clock::now();
      if (s == UCS_OK && !owner->ep_failed) {
        last_done = now;
        // What was pending when that flush began has gone; more may have
        // come since (puts that arrived meanwhile owe acknowledgements).
        ucp_request_free(r);
        r = flush(ep);
        ++flushes;
        s = UCS_PTR_IS_PTR(r) ? UCS_INPROGRESS : UCS_PTR_STATUS(r);
        if (!UCS_PTR_IS_PTR(r)) r = nullptr;
      }
      if (s == UCS_INPROGRESS && !owner->ep_failed &&
          now < last_done + kDrainStall && now < t0 + kDrainCap) {
        return false;
      }
      ucx_log()->debug("{}: drained in {} flushes and {} us before closing: {}",
                       who, flushes,
                       std::chrono::duration_cast<std::chrono::microseconds>(
                           Clock::now() - t0)
                           .count(),
                       ucs_status_string(s));
      if (r != nullptr) ucp_request_free(r);  // the close completes it
      auto waiters = std::move(waiters_);
      waiters_.clear();
      for (auto& w : waiters) owner->close(std::move(w));
      return true;
    });
    return true;
  }

 private:
  static ucs_status_ptr_t flush(ucp_ep_h ep) {
    ucp_request_param_t p{};
    return ucp_ep_flush_nbx(ep, &p);
  }

  std::vector<std::function<void()>> waiters_;
};

// ------------------------------------------------------------- addresses
//
// Stateless encodings (thread-safe), little-endian as ByteWriter writes.
//
// A target's address (TransportTarget::address(), sent in OFFER): host
// (string), port (u16; 0: no listener, reuse the kept connection the token
// names), token (u64, names the connection), region count (u32), then per
// region base (u64), length (u64) and packed remote key (blob; empty for an
// empty region).
//
// An initiator's address (sent in HELLO): empty, or kKeptConnection (u8)
// and the token (u64) of the kept connection it holds.

// One target region as the initiator sees it. A plain value.
struct RemoteRegion {
  uint64_t base = 0;
  uint64_t length = 0;
  std::vector<uint8_t> rkey;
};

// A decoded target address. A plain value.
struct TargetAddress {
  std::string host;
  uint16_t port = 0;
  uint64_t token = 0;
  std::vector<RemoteRegion> regions;
};

std::vector<uint8_t> encode_target_address(const TargetAddress& a);
// DataLoss for a truncated or inconsistent address.
Result<TargetAddress> decode_target_address(std::span<const uint8_t> bytes);

// The address of an initiator that holds the kept connection `token`.
std::vector<uint8_t> encode_initiator_address(uint64_t token);
// The token an initiator address presents, 0 for an empty one;
// InvalidArgument for a malformed one.
Result<uint64_t> decode_initiator_address(std::span<const uint8_t> bytes);

}  // namespace kvmig::ucx

#endif  // KVMIG_TRANSPORT_UCX_UCX_CORE_H_
