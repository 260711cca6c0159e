// The ucx transport's kept-endpoint cache (Parking), the per-connection
// state of each side that it holds (TargetState, defined in ucx_target.cc;
// InitState, defined in ucx_initiator.cc), and the two sides' entry points
// for the Transport (ucx_transport.cc). Private to transport/ucx.
#ifndef KVMIG_TRANSPORT_UCX_UCX_KEPT_H_
#define KVMIG_TRANSPORT_UCX_UCX_KEPT_H_

#include <ucp/api/ucp.h>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "kvmig/status.h"
#include "kvmig/transport.h"
#include "ucx_core.h"

namespace kvmig::ucx {

// ---------------------------------------------------------------- target

// Shared by a UcxTarget and the callbacks UCX calls on the progress thread.
// Thread-safe as marked: the fields under mu from any thread, the others on
// the progress thread only.
struct TargetState : std::enable_shared_from_this<TargetState> {
  explicit TargetState(UcxCore* c)
      : core(c),
        listener(nullptr, ListenerDeleter{c}),
        ep(nullptr, EpDeleter{c}) {}

  void set_health(Status s);

  // UCX callbacks (progress thread); arg is the TargetState.
  static void on_conn_request(ucp_conn_request_h req, void* arg);
  static void on_ep_error(void* arg, ucp_ep_h, ucs_status_t s);

  // Progress thread: force-closes the initiator's endpoint, if any. A
  // healthy one is drained first, once (EpDrain, at most kDrainCap): the
  // acknowledgements of the puts it received must not be left owed (see
  // ucx_core.h, "Closing").
  void close(std::function<void()> done);
  // Progress thread: takes no further connection (revoked, the listener
  // gone), then close().
  void shut(std::function<void()> done);

  bool healthy();

  UcxCore* const core;
  // Whether the initiator's endpoint is up: set by the progress thread once
  // it is accepted, cleared when it fails or closes. Read from any thread
  // (a kept connection is adopted and kept again without a trip to the
  // progress thread).
  std::atomic<bool> connected{false};
  uint64_t token = 0;  // names this connection to its initiator; set once
  // Progress thread only. The endpoint is closed before the listener goes.
  ListenerPtr listener;
  EpPtr ep;
  EpClose ep_close;
  EpDrain drain;
  bool revoked = false;
  bool ep_failed = false;  // UCX reported the endpoint failed
  bool drained = false;    // close() has drained the endpoint

  std::mutex mu;
  Status health;     // guarded by mu
  std::string peer;  // guarded by mu
};

// ------------------------------------------------------------- initiator

// One put, resolved on the caller's thread. A plain value.
struct Put {
  const void* src = nullptr;
  uint64_t remote = 0;
  size_t length = 0;
  uint32_t region = 0;
  ucp_mem_h memh = nullptr;  // the source's registration, if found
};

// Shared by a UcxInitiator and the callbacks UCX calls on the progress
// thread; lives until its endpoint has finished closing. Thread-safe as
// marked: the fields under mu from any thread, the progress-thread ones and
// methods only there, the ones set before the first task by the owner.
struct InitState : std::enable_shared_from_this<InitState> {
  InitState(UcxCore* c, uint32_t max)
      : core(c), max_in_flight(max), ep(nullptr, EpDeleter{c}) {}

  void fail(Status s);
  bool failed();

  // Progress thread: creates the endpoint and flushes it, which completes
  // once wire-up has finished.
  void start_connect(const sockaddr_storage& ss);

  // A kept connection serves a new migration. Caller's thread, before any
  // task for it is posted: the counters the caller waits on start from zero
  // (stale ones from the last migration would satisfy its waits at once),
  // and the connection counts as up, so writes may be posted at once.
  void begin_reuse();
  // Progress thread, after begin_reuse() and before any put of the new
  // migration: unpacks the new regions' keys, or fails the state (the
  // endpoint is gone), which every later write and flush then returns. No
  // flush first: the target presented our token, so it holds its end, and
  // a connection that broke since fails the puts and the flush.
  void reuse(std::vector<RemoteRegion> regions);

  bool usable();

  // Progress thread: unpacks the remote keys and reports the connection up.
  void finish_connect();
  // Progress thread: flushes the endpoint; cb runs when that completes.
  void start_flush(ucp_send_nbx_callback_t cb);

  // UCX callbacks (progress thread); user / arg is the InitState.
  static void on_connect_flushed(void* req, ucs_status_t s, void* user);
  static void on_flushed(void* req, ucs_status_t s, void* user);
  static void on_put_done(void* req, ucs_status_t s, void* user);
  static void on_ep_error(void* arg, ucp_ep_h, ucs_status_t s);

  // Progress thread: posts puts of the current batch while fewer than
  // max_in_flight are outstanding; completions call it again.
  void pump();

  // Progress thread: force-closes the endpoint; the remote keys go once UCX
  // has finished with it (no request refers to them any more). Puts sent
  // since the last flush are drained first (EpDrain), unless
  // the endpoint failed: the target must not be left holding
  // acknowledgements it cannot send (see ucx_core.h, "Closing").
  void close(std::function<void()> on_closed);

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
  bool unflushed = false;  // a put was posted that no flush has covered yet
  bool ep_failed = false;  // UCX reported the endpoint failed
  EpDrain drain;

  std::mutex mu;
  std::condition_variable cv;
  Status error;                 // guarded by mu; the first failure, sticky
  bool connected = false;       // guarded by mu
  uint64_t batches_posted = 0;  // guarded by mu
  uint64_t flushes_done = 0;    // guarded by mu
};

// --------------------------------------------------------------- parking

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
  // The kept target with this token if it is connected and healthy, taken
  // out; null (and nothing changed) otherwise.
  std::shared_ptr<TargetState> take_ready_target(uint64_t token);
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
  std::deque<std::shared_ptr<TargetState>> targets_;        // guarded by mu_
  KeptByPeer<std::shared_ptr<InitState>> inits_{kMaxKept};  // guarded by mu_
};

// ----------------------------------------------------------------- sides

// A target region as the Transport resolved it. A plain value.
struct ExportedRegion {
  uint64_t base = 0;
  uint64_t length = 0;
  std::vector<uint8_t> rkey;  // its registration's packed key; empty for an
                              // empty region
};

// ucx_target.cc. A target for the initiator that presented `token` (0:
// none): its kept connection when there is one, else a fresh listener on
// host. Thread-safe.
Result<std::unique_ptr<TransportTarget>> open_ucx_target(
    std::shared_ptr<UcxCore> core, std::shared_ptr<Parking> parking,
    const std::string& host, std::vector<ExportedRegion> regions,
    uint64_t token);

// ucx_target.cc. The target over the kept connection the initiator that
// presented `token` holds, when the parking has it ready (connected,
// healthy): taken without a trip to the progress thread. Null otherwise,
// the parking as it was. Thread-safe.
std::unique_ptr<TransportTarget> adopt_ucx_target(
    std::shared_ptr<UcxCore> core, std::shared_ptr<Parking> parking,
    const std::string& host, const std::vector<ExportedRegion>& regions,
    uint64_t token);

// ucx_initiator.cc. peer: the destination agent's control address, under
// which a connection kept by an earlier initiator is found (empty: never
// reuse or keep). Thread-safe.
std::unique_ptr<TransportInitiator> make_ucx_initiator(
    std::shared_ptr<UcxCore> core, std::shared_ptr<Parking> parking,
    uint32_t max_in_flight, std::string peer);

}  // namespace kvmig::ucx

#endif  // KVMIG_TRANSPORT_UCX_UCX_KEPT_H_
