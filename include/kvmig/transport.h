// Transport: the data plane. One-sided writes from registered local memory
// into registered memory of a peer, then a flush that returns only when the
// bytes are visible at the target.
//
// The handshake maps onto the migration protocol:
//   source                           destination
//   t.create_initiator()  -> init    (init.address() travels in HELLO)
//                                    t.open_target(regions, init address)
//                                    (target.address() travels in OFFER)
//   init.connect(target address)
//   init.write(...) ... init.flush()
//                                    target.revoke()  (no write lands after)
//                                    or, committed: target.keep()
//   committed: init.keep()
// Where the transport has marks (tcp), the last writes before COMMIT go
// with init.write_marked() instead of write() and flush(), and COMMIT
// carries the mark: the destination sees it land behind every write
// (target.wait_mark(), notify_mark()) before it installs, one round trip
// fewer.
// verbs sends its QP numbers as the initiator address; tcp and ucx send a
// token when they kept a connection to this peer (see keep()), else nothing.
//
// Every call that waits on the peer takes a deadline and returns
// DeadlineExceeded past it; a peer that goes away gives Unavailable.
#ifndef KVMIG_TRANSPORT_H_
#define KVMIG_TRANSPORT_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvmig/status.h"
#include "kvmig/types.h"

namespace kvmig {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;

// One write: `length` bytes from local address `src` (inside a registered
// region) to byte `dst_offset` of the target's region number `dst_region`
// (its index in the list given to open_target()).
struct WriteOp {
  const std::byte* src = nullptr;
  uint32_t dst_region = 0;
  uint64_t dst_offset = 0;
  uint64_t length = 0;
};

// The sending end of one migration's data path. Not thread-safe: one thread
// drives it. Destroying it closes the connection.
class TransportInitiator {
 public:
  virtual ~TransportInitiator() = default;

  // What the target needs to reach this initiator (may be empty).
  virtual std::vector<uint8_t> address() const = 0;

  // Connects to the target whose address() came back in OFFER.
  virtual Status connect(std::span<const uint8_t> target_address,
                         Deadline deadline) = 0;

  // Posts writes. May block for flow control until `deadline`. Checks every
  // op against the target's region bounds before posting any
  // (InvalidArgument). Writes may land in any order; none is known to have
  // landed until flush() succeeds. A transport may read an op's source
  // bytes after write() has returned (a ucx put UCX queued, a verbs work
  // request the adapter has not read yet): they must stay as they are until
  // flush() returns, or the mark of write_marked() has been waited for.
  virtual Status write(std::span<const WriteOp> ops, Deadline deadline) = 0;

  // Returns when every write posted so far is visible in the target's
  // memory; Unavailable or DeadlineExceeded otherwise.
  virtual Status flush(Deadline deadline) = 0;

  // write(ops), then a mark behind every write posted so far (these
  // included), in one go and without waiting for the target; returns the
  // mark's number, greater than any this connection gave before: the
  // target's wait_mark() of it returns once those writes are visible. The
  // caller sends the number by other means (in COMMIT). 0: this transport
  // has no marks (the ops were written; flush() instead). Default: write()
  // and 0.
  virtual Result<uint64_t> write_marked(std::span<const WriteOp> ops,
                                        Deadline deadline) {
    KVMIG_RETURN_IF_ERROR(write(ops, deadline));
    return uint64_t{0};
  }

  // Thread-safe; may be called while another thread is inside write() or
  // flush(): the caller learnt by other means (its control connection
  // broke, a cancel) that the migration is over, and a wait on the peer
  // returns Aborted soon instead of at its deadline; so may every later
  // call. Default: nothing (a transport whose waits end when the peer goes
  // away need not override it; verbs does, as an RC queue pair to a
  // vanished peer may retry for a long time).
  virtual void cancel() {}

  // Applies a target's window_update(): the keys of ranges it allowed after
  // its address(). Call it, on the thread that writes, before writing into
  // those ranges. Default: accepts only an empty update.
  virtual Status add_windows(std::span<const uint8_t> update) {
    if (update.empty()) return Status();
    return Status::invalid_argument("this transport takes no window updates (" +
                                    std::to_string(update.size()) + " bytes)");
  }

  // Counters for reports.
  virtual uint64_t bytes_written() const = 0;
  virtual uint64_t ops_posted() const = 0;

  // The migration committed (every write was flushed or marked before
  // COMMIT): the transport may keep this connection for the next initiator
  // made for the same peer (Transport::create_initiator_for) instead of
  // closing it.
  // Default: nothing kept; destruction closes the connection.
  virtual void keep() {}
};

// A byte range of one of a target's regions: [offset, offset + length) of
// region `region` (its index in the list given to open_target()).
struct WriteWindow {
  uint32_t region = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
};

// The receiving end of one migration's data path. Thread-safe.
class TransportTarget {
 public:
  virtual ~TransportTarget() = default;

  // Restricts the initiator's writes to the ranges allowed so far (a
  // migration's slots; a live round adds its own before the source learns
  // them). Once called, a write that is not inside one allowed range
  // changes nothing. Before any call every byte of the regions is allowed.
  // Returns true when the transport checks writes: tcp checks each write
  // record and cuts the initiator off at the first outside (health() says
  // where it aimed); verbs binds a type 2 memory window per contiguous
  // range on this target's own queue pairs (the device refuses a key it
  // did not give this path and, where it checks window bounds as the spec
  // says, a write past one; the initiator refuses to write outside its
  // windows). False when it cannot (ucx: one-sided puts into memory
  // registered once; verbs on a device without type 2 windows): there only
  // revoke() cuts a source off. An error when it could not set the check up
  // (too many ranges, a failed bind): the migration must not go on.
  // The initiator needs the ranges' keys before it writes into them: those
  // of the ranges allowed before address() travel in it, later ones in
  // window_update().
  virtual Result<bool> allow(std::span<const WriteWindow> ranges) {
    (void)ranges;
    return false;
  }
  // False when allow() would restrict nothing (and answer false): a
  // destination then does not build a migration's ranges at all (one per
  // slot and region: thousands for a large migration). Default true.
  virtual bool restricts_writes() const { return true; }

  // What the initiator needs to write into the ranges allowed since the
  // last address() or window_update() (verbs: the windows' keys), for
  // TransportInitiator::add_windows(); empty when it needs nothing.
  virtual std::vector<uint8_t> window_update() { return {}; }

  // What the initiator needs to reach and write this target (goes into
  // OFFER): connection details and the regions' remote keys.
  virtual std::vector<uint8_t> address() const = 0;

  // Cuts the initiator off: after revoke() returns, no write from it can
  // change the target's memory (connection closed, keys and queue pairs
  // destroyed). Idempotent. The destructor revokes too.
  virtual void revoke() = 0;

  // Set once the initiator's connection failed or closed (for logs).
  virtual Status health() const = 0;

  // Returns once the initiator's mark `mark` (TransportInitiator::write_marked)
  // has arrived, every write it posted before the mark being visible then;
  // DeadlineExceeded if it has not by `deadline` (a deadline already past
  // only checks), Unavailable if the connection failed before it, Aborted
  // once revoked. Thread-safe. Default: Unimplemented (no marks).
  virtual Status wait_mark(uint64_t mark, Deadline deadline) {
    (void)mark;
    (void)deadline;
    return Status::unimplemented("this transport has no marks");
  }

  // Calls `wake` once, from any thread (this one, before returning, if it
  // is so already), when wait_mark(mark, now) no longer returns
  // DeadlineExceeded: the mark arrived, the connection failed, or the
  // target was revoked. `wake` must return soon and not call this target.
  // Thread-safe. Default: at once (wait_mark() then says why).
  virtual void notify_mark(uint64_t mark, std::function<void()> wake) {
    (void)mark;
    wake();
  }

  // Ends a committed migration's data path, whose initiator flushed (or
  // marked, and the mark arrived) every write before COMMIT and posts none
  // after. Where the transport can, it keeps the connection for that
  // initiator's next migration (true); otherwise it revokes (false). Either
  // way no write of this migration lands after it returns, and revoke()
  // later still cuts the connection.
  virtual bool keep() {
    revoke();
    return false;
  }
};

// Memory the CPU must not touch (a GPU's): a transport reaches it through
// these copies, in bounded host buffers of its own (tcp), or registers it
// as device memory with its library (ucx: a CUDA memory type; verbs: a
// dmabuf). Every function is thread-safe and is called only for ranges
// inside the registered region.
struct DeviceMemory {
  MemoryKind kind = MemoryKind::kCuda;
  int device = 0;
  // Copies out.size() bytes at device address src into out.
  std::function<Status(const std::byte* src, std::span<std::byte> out)> read;
  // Copies in to device address dst.
  std::function<Status(std::byte* dst, std::span<const std::byte> in)> write;
  // A dmabuf behind the region (its base is byte `offset` of it), or why
  // there is none.
  std::function<Result<DmabufRegion>()> dmabuf;
};

// A transport instance, one per agent and kind. Owns memory registrations.
// Thread-safe.
class Transport {
 public:
  virtual ~Transport() = default;

  // "tcp", "ucx" or "verbs".
  virtual std::string_view name() const = 0;

  // Registers [region.data(), +size) for use as a write source or target.
  // Regions are registered once (agent start, or when a staging buffer is
  // made) and may overlap nothing else registered.
  virtual Status register_memory(std::span<std::byte> region) = 0;

  // Registers [region.data(), +size) of device memory (see DeviceMemory),
  // which this transport must never dereference. Default: refused, naming
  // the transport. A transport that refuses says what it lacks (a UCX
  // build without CUDA support, a device without dmabuf registration).
  virtual Status register_device_memory(
      std::span<std::byte> region, std::shared_ptr<const DeviceMemory> device) {
    (void)region;
    (void)device;
    return Status::unimplemented(std::string(name()) +
                                 " cannot register device memory");
  }

  // Undoes register_memory (or register_device_memory). The caller
  // guarantees no initiator or target still uses the region.
  virtual Status deregister_memory(std::span<std::byte> region) = 0;

  // Makes the sending end of a new data path.
  virtual Result<std::unique_ptr<TransportInitiator>> create_initiator() = 0;
  // The same, towards the agent `peer` (its control address): may reuse a
  // connection an earlier initiator to that peer kept.
  virtual Result<std::unique_ptr<TransportInitiator>> create_initiator_for(
      std::string_view peer) {
    (void)peer;
    return create_initiator();
  }

  // Accepts writes from the initiator whose address() is given, into
  // regions (each registered; region i is dst_region i of WriteOp).
  virtual Result<std::unique_ptr<TransportTarget>> open_target(
      std::span<const std::span<std::byte>> regions,
      std::span<const uint8_t> initiator_address, Deadline deadline) = 0;

  // True when open_target(), and allow() and keep() on its targets once
  // every write was flushed, return at once: no device call, no wait on
  // the peer or on a busy thread. A destination whose pager's bookkeeping
  // never waits (CachePager::bookkeeping_never_waits) then makes them on
  // its control thread along with the allocation and the install. Default
  // false.
  virtual bool targets_open_at_once() const { return false; }

  // open_target() where that needs no wait (no trip to another thread, no
  // peer, no device call), allow() on the target too; null where it would
  // wait, and then nothing changed: call open_target() from a thread that
  // may wait. So a destination whose pager never waits opens a transport
  // whose targets do not all open at once on its control thread when this
  // one does (ucx: the initiator presents a kept connection that is ready).
  // Default: open_target() where targets_open_at_once(), else null.
  virtual Result<std::unique_ptr<TransportTarget>> open_target_at_once(
      std::span<const std::span<std::byte>> regions,
      std::span<const uint8_t> initiator_address, Deadline deadline) {
    if (!targets_open_at_once()) {
      return std::unique_ptr<TransportTarget>();
    }
    return open_target(regions, initiator_address, deadline);
  }
};

// Options for building a transport.
struct TransportOptions {
  // Host address the target side listens on / advertises (tcp, ucx), or the
  // IP whose RoCE GID verbs uses. Empty: inside an Agent, its listen host;
  // on its own (make_transport), 127.0.0.1.
  std::string bind_host;
  // Verbs: device name (empty: the first device with an active port).
  std::string device;
  // Writes in flight at most (ucx, verbs), to bound memory and queue depth.
  uint32_t max_in_flight = 64;
  // Verbs: queue pairs per peer.
  uint32_t queue_pairs = 1;
};

// Names of the transports compiled into this build, e.g. {"tcp", "ucx"}.
std::vector<std::string> built_transports();

// Builds the transport called name. NotFound for a name kvmig does not know;
// Unimplemented for one this build does not include (says which meson option
// enables it).
Result<std::unique_ptr<Transport>> make_transport(std::string_view name,
                                                  const TransportOptions& opts);

}  // namespace kvmig

#endif  // KVMIG_TRANSPORT_H_
