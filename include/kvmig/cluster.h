// The cluster: agents registered in etcd, and the scheduler calls that use
// that view (list and watch agents, drain one, rebalance).
//
// An agent registers with Registration (serve --etcd does): key
// PREFIX/agents/NAME, a JSON AgentRecord, attached to a lease of its own
// that it keeps alive, so that a crashed agent disappears when the lease
// expires. etcd holds addresses and shapes only: never a secret.
//
// Placement only ever picks agents with an equal meta, not draining, with
// room. Every move is an ordinary migration (request_migration), with its
// rollback; while it runs, the source and the destination are locked
// (PREFIX/locks/NAME, attached to the scheduler's lease), so two schedulers
// never run two migrations on one agent at once, and never move one request
// twice.
#ifndef KVMIG_CLUSTER_H_
#define KVMIG_CLUSTER_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kvmig/agent.h"
#include "kvmig/status.h"
#include "kvmig/types.h"

namespace kvmig {

// Where the cluster's store is.
struct EtcdConfig {
  // etcd client URLs, "http://HOST:PORT" or "HOST:PORT"; at least one. A
  // call that cannot reach one tries the next.
  std::vector<std::string> endpoints;
  // Every key kvmig writes starts with this.
  std::string prefix = "/kvmig";
  // Deadline of one etcd call.
  std::chrono::milliseconds timeout{2'000};
};

// An agent as registered: the value of PREFIX/agents/NAME (JSON, with these
// field names).
struct AgentRecord {
  std::string name;
  std::string address;  // its control port, "HOST:PORT"
  CacheMeta meta;
  uint64_t capacity_pages = 0;
  uint64_t free_pages = 0;
  uint64_t requests = 0;  // live requests
  std::vector<std::string> transports;
  bool draining = false;  // nothing may be placed here
  std::string version;    // kvmig's version
  // etcd's revision of this value (not in the JSON).
  int64_t mod_revision = 0;

  double load() const;  // used pages / capacity; 1 with no capacity
};

// The JSON value, and back (InvalidArgument naming the field).
std::string agent_record_json(const AgentRecord& record);
Result<AgentRecord> parse_agent_record(const std::string& json);

struct RegistrationOptions {
  EtcdConfig etcd;
  // The key's last part: [A-Za-z0-9._-], 1 to 128 characters.
  std::string name;
  // The lease's TTL; kept alive every ttl / 3.
  std::chrono::seconds ttl{5};
  // The address others reach the agent at; empty: Agent::address().
  std::string address;
  // How often the agent's state is compared with what etcd holds; a change
  // is written at most once per interval.
  std::chrono::milliseconds refresh{250};
};

// Keeps one agent registered. Thread-safe; runs a thread of its own.
//
// etcd down: the agent keeps serving; the registration logs it once, retries
// (backing off up to 1 s) and registers again when etcd is back (a new lease
// if the old one expired). The value is rewritten only when it changes;
// at rest, the only writes are the keepalives.
class Registration {
 public:
  // Registers now. AlreadyExists if another live agent holds NAME; an
  // unreachable etcd is not an error (the registration keeps trying;
  // registered() says false until it succeeds). The agent must outlive the
  // registration.
  static Result<std::unique_ptr<Registration>> start(
      Agent& agent, RegistrationOptions options);
  // stop().
  ~Registration();
  Registration(const Registration&) = delete;
  Registration& operator=(const Registration&) = delete;

  // The key is in etcd under this agent's live lease (as of the last call).
  bool registered() const;
  // Deletes the key (revokes the lease) and stops. Idempotent.
  void stop();

  // etcd writes this registration made (puts, transactions, keepalives).
  uint64_t etcd_writes() const;

 private:
  struct Impl;
  explicit Registration(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct ClusterOptions {
  EtcdConfig etcd;
  // For the calls to agents (status, migrate): secret and deadline.
  ClientOptions agent_client;
  // TTL of the scheduler's own lease, which its locks hang on: a scheduler
  // that dies frees its locks after this long.
  std::chrono::seconds lock_ttl{10};
  // How long a move waits for a locked agent before trying elsewhere.
  std::chrono::milliseconds lock_wait{5'000};
};

// Where one request went.
struct RequestPlacement {
  SeqId seq = 0;
  std::string from;          // agent name
  std::string to;            // agent name; empty when not placed
  std::string migration_id;  // empty when not placed
  std::string error;         // why it was not placed; empty when placed
};

struct DrainOptions {
  bool live = false;      // live migrations (the engine keeps decoding)
  std::string transport;  // empty: the source's preference
};

struct DrainReport {
  std::string agent;
  std::vector<RequestPlacement> moved;     // placed elsewhere
  std::vector<RequestPlacement> unplaced;  // still at the agent, and why
  // Requests that finished at the source during a live move.
  std::vector<SeqId> finished;
  uint32_t migrations = 0;  // migrations run (failed ones included)
  double plan_ms = 0;       // time spent planning
  bool ok() const { return unplaced.empty(); }
};

struct RebalanceOptions {
  // Pair the most with the least loaded agent (of one meta) while their
  // loads differ by more than this.
  double threshold = 0.2;
  bool live = true;
  std::string transport;
  // Most migrations one call runs.
  uint32_t max_moves = 16;
  // Hysteresis: a request that arrived by migration less than this ago
  // stays where it is (SeqStatus::arrived_ms_ago), so two passes, or two
  // schedulers, never move one request twice in a row.
  std::chrono::milliseconds settle{30'000};
};

struct RebalanceMove {
  std::string from, to;
  std::vector<SeqId> seqs;
  uint64_t pages = 0;
  std::string migration_id;  // empty when it failed
  std::string error;
  double load_from_before = 0, load_to_before = 0;
};

struct RebalanceReport {
  std::vector<RebalanceMove> moves;
  // Pairs over the threshold left alone, and why (locked by another
  // scheduler, nothing small enough to move without overshooting, ...).
  std::vector<std::string> skipped;
};

// A running watch (Cluster::watch); destroying it stops it.
class ClusterWatch {
 public:
  virtual ~ClusterWatch() = default;
};

// The scheduler's view of the cluster. Thread-safe.
class Cluster {
 public:
  // Checks the endpoints; the first call connects.
  static Result<std::unique_ptr<Cluster>> connect(ClusterOptions options);
  ~Cluster();
  Cluster(const Cluster&) = delete;
  Cluster& operator=(const Cluster&) = delete;

  // Every registered agent, by name.
  Result<std::vector<AgentRecord>> agents();
  // Calls on_change with every agent now, then again on each change, on the
  // watch's thread; on_error when the watch broke (it reconnects).
  Result<std::unique_ptr<ClusterWatch>> watch(
      std::function<void(const std::vector<AgentRecord>&)> on_change,
      std::function<void(const Status&)> on_error = {});

  // Marks the agent draining in etcd (or not), keeping its lease.
  Status set_draining(const std::string& name, bool draining);
  // Marks NAME draining, then moves every request off it to agents with an
  // equal meta, not draining, with room; requests sharing pages go
  // together. A destination that fails is skipped and its requests tried
  // elsewhere. Errors only when NAME or etcd cannot be reached; what could
  // not be placed is in the report.
  Result<DrainReport> drain(const std::string& name,
                            const DrainOptions& options = {});
  // One pass: while the most and the least loaded agent of one meta differ
  // by more than the threshold, moves that agent's shortest requests
  // (fewest pages) to the other, never so many that the order of their
  // loads flips (so nothing ever moves back and forth).
  Result<RebalanceReport> rebalance_once(const RebalanceOptions& options = {});

 private:
  struct Impl;
  explicit Cluster(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvmig

#endif  // KVMIG_CLUSTER_H_
