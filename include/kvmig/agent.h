// Agent: what an engine embeds to take part in migrations, and the client
// calls a scheduler uses to drive agents.
//
// One agent owns one TCP port that serves both peers (incoming migrations)
// and schedulers (status, migrate). It drives the engine's CachePager.
#ifndef KVMIG_AGENT_H_
#define KVMIG_AGENT_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvmig/pager.h"
#include "kvmig/status.h"
#include "kvmig/transport.h"
#include "kvmig/types.h"

namespace kvmig {

// How one migration ended, as this agent saw it (for metrics).
struct MigrationEvent {
  enum class Role : uint8_t { kSource, kDestination };
  Role role = Role::kSource;
  std::string transport;  // empty when it ended before one was chosen
  // "committed", "aborted" (rolled back, refused or failed before the
  // decision) or "in_doubt" (source only: the destination's answer to
  // COMMIT never came).
  std::string outcome;
  uint64_t bytes = 0;        // payload bytes sent (source) or received
  double seconds = 0;        // from HELLO to the end
  double pause_seconds = 0;  // source: engine or requests held; else 0
};

// The most page bytes a move over ucx or verbs sends inline, whatever
// AgentOptions::inline_page_bytes allows (over tcp, the option alone).
inline constexpr uint32_t kInlinePageBytesOverRdma = 64u << 10;

// Plain options; every limit is enforced with a clear error.
struct AgentOptions {
  // Where to listen. Port 0 picks a free port (see Agent::port()).
  std::string listen_host = "127.0.0.1";
  uint16_t listen_port = 0;
  // Shared secret: every control connection, in and out (peers, schedulers,
  // outcome queries), first proves it with mutual HMAC-SHA256
  // challenge-response. Empty: no authentication, and then the agent only
  // listens on a loopback address unless `insecure` is set.
  std::string secret;
  bool insecure = false;
  // Transports this agent accepts and may use, in preference order. Each
  // must be built (built_transports()).
  std::vector<std::string> transports = {"tcp"};
  // Data-plane options. An empty bind_host (the default) means the listen
  // host: tcp and ucx listen there, verbs takes its RoCE GID from it.
  TransportOptions transport_options;
  // Deadline for every wait on a peer (a frame, a connect, a flush).
  std::chrono::milliseconds peer_timeout{10'000};
  // Largest control frame accepted, in bytes.
  uint32_t max_frame_bytes = 64u << 20;
  // Most distinct pages one migration may move.
  uint32_t max_pages_per_migration = 1u << 20;
  // Most requests one migration may move.
  uint32_t max_seqs_per_migration = 1u << 16;
  // Most control connections served at once; more are closed at accept.
  uint32_t max_connections = 64;
  // Most migrations from this agent at once, of disjoint requests (a
  // request is in at most one); another is refused (ResourceExhausted).
  uint32_t max_migrations = 4;
  // Staging buffer for pagers without layout(), per migration and side.
  uint64_t staging_bytes = 64ull << 20;
  // A stop-and-copy of at most this many page bytes (K and V), between
  // pagers whose layouts are in host memory, sends its pages on the control
  // connection (PAGES) instead of opening and writing a data path: no
  // data-path round trip or thread hand-off, and no copy (the pages go
  // from page memory to the socket, and from it into their slots). Both
  // sides must allow the size (the source asks, the destination agrees).
  // A move over ucx or verbs goes inline only up to
  // kInlinePageBytesOverRdma as well: those data paths move pages without
  // the CPU, so only a small move's fixed cost is worth saving there.
  // 0: never. The serve flag takes at most 1 MiB.
  uint32_t inline_page_bytes = 1u << 20;
  // A control connection whose migration committed stays open, on both
  // sides, for the next migration between the same two agents (no
  // connect, no handshake): for at most this long idle. A source keeps at
  // most max_migrations per destination; a destination at max_connections
  // closes an idle one to admit a new connection. Each side closes its end
  // after its own idle time; a source whose kept connection turns out
  // closed as it sends HELLO connects again (nothing was started on it).
  // 0: never kept (a connection per migration).
  std::chrono::milliseconds kept_connection_idle{30'000};
  // Test seam: called at named protocol points ("src.data.mid",
  // "dst.before_done", ...) on the thread that reaches them; may sleep or
  // exit the process to cause a fault at that point. Empty: nothing.
  std::function<void(std::string_view point)> fault_hook;
  // The directory snapshot requests (request_snapshot, `kvmig snapshot
  // save|load --agent`) may write and read: a request's path is taken
  // relative to it, or must lie in it once symlinks are resolved (".."
  // refused); it must exist when the agent is created. Empty (the default):
  // every snapshot request is refused, so that no client can make the agent
  // write or read an arbitrary file.
  std::string snapshot_dir;
  // Called once for every migration this agent takes part in (either
  // role), when it ends, on the agent's io thread: must not block or call
  // back into the agent. Empty: nothing.
  std::function<void(const MigrationEvent&)> on_migration_end;
};

enum class MigrationMode : uint8_t { kMove = 0, kCopy = 1 };

// What a scheduler asks a source agent to do.
struct MigrateRequest {
  std::string to;           // destination agent, "HOST:PORT"
  std::vector<SeqId> seqs;  // which requests; ignored when all
  bool all = false;         // every live request
  MigrationMode mode = MigrationMode::kMove;
  std::string transport;  // empty: the first the source prefers
  bool verify = true;     // per-page checksums checked at the destination
  // Record each moved request's digest at the final pause in the report
  // (reads every page while paused: lengthens the pause).
  bool record_digests = false;

  // Live (pre-copy) migration: copy while the engine keeps running, in
  // rounds (first every page, then pages that are new or were not full when
  // copied), until the remainder is at most live_converge_pages, stops
  // shrinking, or live_max_rounds rounds ran; then pause, copy the rest,
  // commit, resume.
  // Default 0: keep copying while newly filled pages remain, so the pause
  // covers only the tails. Measured (tools/bench-live.sh, llama3-8b, 50
  // tokens/s): with 8, the pause grew 1.8 -> 7.3 ms from 1k to 32k tokens
  // (pages filled during the long first round were copied paused); with 0,
  // 1.9 -> 2.4 ms.
  bool live = false;
  uint32_t live_max_rounds = 8;
  uint32_t live_converge_pages = 0;
  // When the remainder is still above live_converge_pages after
  // live_max_rounds: finish with a stop-and-copy of it (false) or abort.
  bool live_abort_if_not_converged = false;

  // The migration's id. Empty: the source agent makes one. A scheduler
  // that picks it (1 to 64 characters of [0-9A-Za-z._:-], unique) can
  // cancel the migration, or learn how it ended, by that id while it waits
  // for the answer (cancel_migration). An id the source agent already
  // knows is refused (AlreadyExists).
  std::string migration_id;
  // The source cancels the migration itself if it has not reached the
  // decision point (sending COMMIT) this long after it started: rolled
  // back, DeadlineExceeded, the requests run at the source again. After the
  // decision point the migration ends as the destination decides. Zero: no
  // limit.
  std::chrono::milliseconds timeout{0};
};

// What became of a migration that a cancel asked about.
struct CancelReport {
  std::string migration_id;
  // "cancelled": stopped by this cancel before the decision point and
  //   rolled back: the requests run at the source again.
  // "aborted": it had already failed (or was refused) and rolled back.
  // "committed": it passed the decision point first: the requests belong
  //   to the destination (a move) or are at both (a copy).
  // "in_doubt": COMMIT went out and the destination has not answered: the
  //   source keeps the requests held and lists the migration in
  //   AgentStatus::in_doubt until it learns the outcome.
  std::string outcome;
  std::string detail;  // how it ended when it did not commit (its error)
};

// The outcome of a successful migration.
struct MigrationReport {
  std::string migration_id;
  std::vector<SeqId> seqs;  // requests that moved (or were copied)
  uint64_t pages = 0;       // distinct pages sent
  uint64_t bytes = 0;       // payload bytes sent
  uint64_t writes = 0;      // transport writes after merging
  double seconds = 0;       // HELLO sent to DONE received
  double gbps = 0;          // bytes / data-phase seconds / 1e9 (GB/s)
  // The moved requests stopped (held, or the engine paused) to released.
  double pause_ms = 0;
  // What the pause stopped: "seqs" (only the requests that move, where the
  // pager has CachePager::hold_seqs; the rest of the engine kept running)
  // or "engine" (the whole engine, for a pager without it).
  std::string hold;
  uint32_t rounds = 1;
  std::vector<uint64_t> round_pages;  // pages sent per round (last: paused)
  std::string transport;
  bool staged = false;  // some side went through a staging buffer
  // The pages went on the control connection (PAGES), not the data path:
  // a small stop-and-copy (AgentOptions::inline_page_bytes).
  bool inline_pages = false;
  // The control connection was one kept from an earlier migration to the
  // same destination (AgentOptions::kept_connection_idle): no connect.
  bool kept_connection = false;
  // HELLO, the pages and COMMIT went out together on a kept connection and
  // DONE came back: one exchange, no OFFER (inline pages whose size that
  // connection's OFFER allowed).
  bool one_exchange = false;
  // Requests asked for but left at the source: they finished or changed
  // shape during a live migration.
  std::vector<SeqId> left_behind;
  // With record_digests: {id, Digest::hex()} of each moved request at the
  // final pause.
  std::vector<std::pair<SeqId, std::string>> digests;
  // Where the time went, as the source saw it: milliseconds per phase, in
  // the order first entered (a live migration's rounds add up): "connect"
  // (the control connection; a stop-and-copy's hold_seqs runs meanwhile),
  // "pause" (waiting for the hold or CachePager::pause, and the paused
  // snapshot of the page tables, past the connect), "offer" (HELLO to OFFER),
  // "data" (the data path's connect, writes posted and flushed), "verify"
  // (VERIFY to VERIFY_ACK), "commit" (COMMIT to DONE, with digests read
  // first if asked), "resume" (drop and resume).
  std::vector<std::pair<std::string, double>> phases_ms;
  // Where the pages were read and written: "host", "cuda" or "cuda+host"
  // (the kinds of each side's layout regions; host without a layout).
  std::string src_memory;
  std::string dst_memory;
};

// One live request as status reports it.
struct SeqStatus {
  SeqId id = 0;
  uint64_t tokens = 0;
  uint32_t pages = 0;
  std::string digest;  // Digest::hex() of seq_digest()
  // Milliseconds since it arrived here by migration; -1 when it did not
  // (or arrived so long ago that the agent forgot).
  int64_t arrived_ms_ago = -1;
};

struct AgentStatus {
  CacheMeta meta;
  uint64_t capacity_pages = 0;
  uint64_t free_pages = 0;
  std::vector<SeqStatus> seqs;
  std::vector<std::string> transports;
  // Where the pages live: "host", "cuda" or "cuda+host".
  std::string memory;
  // Migrations whose outcome this agent could not learn (peer unreachable at
  // the decision point), with the requests they hold. The agent keeps asking
  // the destination in the background and settles each one when it answers.
  struct InDoubt {
    std::string migration_id;
    std::vector<SeqId> seqs;
    std::string to;  // the destination asked
    // How the requests are kept from running meanwhile: "seqs" (held one by
    // one, CachePager::hold_seqs), "engine" (the pager cannot hold single
    // requests: the whole engine stays paused) or "none" (a copy: the
    // requests stay here whatever the outcome).
    std::string hold;
  };
  std::vector<InDoubt> in_doubt;
  // Requests that share pages (a common prefix), transitively: each group
  // with its distinct pages, which a destination must have room for to take
  // the group in one migration. Requests sharing nothing are in no group.
  struct SharedGroup {
    std::vector<SeqId> seqs;  // ascending
    uint64_t pages = 0;       // distinct pages of the group
  };
  std::vector<SharedGroup> shared_groups;
  // Control connections open now (schedulers, peers, queries).
  uint32_t control_connections = 0;
  // Control connections this agent keeps open as a source, each for its
  // next migration to the same destination (AgentOptions::
  // kept_connection_idle; at most max_migrations per destination). Those
  // closed by their destination are closed, and not counted.
  uint32_t kept_connections = 0;
  // Migrations under way here, either role.
  struct Migration {
    std::string migration_id;
    std::string role;  // "source" or "destination"
    std::string peer;  // source: the destination asked; else the source
    // "connect", "pause", "offer", "data", "verify", "commit" (source:
    // COMMIT sent, waiting for DONE), "resume" (source: committed, dropping
    // and resuming), "install" (destination), "cancelling" (a cancel,
    // its timeout or the agent's stop ended it: rolling back).
    std::string phase;
    uint32_t round = 0;       // live rounds started (1: the first)
    std::vector<SeqId> seqs;  // source: the requests; destination: empty
    std::string transport;
    uint64_t bytes = 0;  // source: payload bytes posted to the transport so far
    double seconds = 0;  // since it started
  };
  std::vector<Migration> migrations;
};

struct StatusOptions {
  bool digests = true;
};

// A running agent. Thread-safe: every method may be called from any thread.
// The pager must outlive the agent.
class Agent {
 public:
  // Binds the listen socket, builds the transports and registers the pager's
  // memory with each. Does not serve until run() or start().
  static Result<std::unique_ptr<Agent>> create(CachePager& pager,
                                               AgentOptions options);
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // The bound address, e.g. "127.0.0.1:40123".
  std::string address() const;
  uint16_t port() const;

  // Serves on the calling thread until stop().
  Status run();
  // Serves on a thread of the agent's own; stop() or the destructor ends it.
  Status start();
  // Stops serving: open migrations are aborted (rolled back). Idempotent.
  void stop();

  // Moves or copies requests to another agent, as if a scheduler asked.
  // Blocks until the migration ends. Needs the agent to be serving.
  Result<MigrationReport> migrate(const MigrateRequest& request);

  // This agent's status. With options.digests, each request's digest is
  // computed on the spot, with the engine paused for the read; without, no
  // page is read and the engine is not paused (SeqStatus::digest empty).
  Result<AgentStatus> status(const StatusOptions& options = {});

  // Cancels the migration this agent runs as the source under
  // migration_id, if it has not reached the decision point yet, and waits
  // until it has ended: see CancelReport. A migration that already ended
  // here (recently) is reported as it ended. NotFound for an id this agent
  // never ran as a source; FailedPrecondition when it is the destination of
  // that migration (cancel at the source).
  Result<CancelReport> cancel(std::string_view migration_id);

  // Decides a migration this agent holds in doubt (AgentStatus::in_doubt)
  // by hand, for when its destination can never say: it is gone for good,
  // or it answers that it cannot tell (it forgot, or it was recreated over
  // a pager that kept its requests). committed: the requests live at the
  // destination and are dropped here (a move); aborted: they run here
  // again. The operator must know which is true: kvmig cannot. NotFound
  // when migration_id is not in doubt here.
  Status settle(std::string_view migration_id, bool committed);

 private:
  struct Impl;
  friend struct AgentInternals;  // kvmig's own layers (src/agent)
  explicit Agent(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Scheduler side: talk to an agent at "HOST:PORT" over its control port.
struct ClientOptions {
  std::chrono::milliseconds timeout{60'000};
  std::string secret;  // the agent's shared secret, if it has one
};
// what.digests: as Agent::status (without: no page is read, no pause).
Result<AgentStatus> query_status(std::string_view agent,
                                 const ClientOptions& options = {},
                                 const StatusOptions& what = {});
Result<MigrationReport> request_migration(std::string_view agent,
                                          const MigrateRequest& request,
                                          const ClientOptions& options = {});

// Agent::cancel, over the agent's control port.
Result<CancelReport> cancel_migration(std::string_view agent,
                                      std::string_view migration_id,
                                      const ClientOptions& options = {});

// Agent::settle, over the agent's control port.
Status settle_migration(std::string_view agent, std::string_view migration_id,
                        bool committed, const ClientOptions& options = {});

// A snapshot an agent is asked to take (capture its cache to a file) or to
// load (restore its empty cache from one).
struct SnapshotRequest {
  bool load = false;
  // The file, on the agent's host: relative to the agent's snapshot
  // directory (AgentOptions::snapshot_dir), or an absolute path inside it.
  std::string path;
};

// What the agent saved or loaded.
struct SnapshotReport {
  std::string path;       // the file, absolute, on the agent's host
  uint64_t requests = 0;  // requests in the file
  uint64_t pages = 0;     // distinct pages in the file
  uint64_t bytes = 0;     // the file's size
  // False when the agent answered without a summary (one older than the
  // summary): it succeeded, and the other fields are empty.
  bool summarized = true;
};

// Asks the agent to save or load a snapshot and says what it holds.
// Refused with FailedPrecondition when the agent has no snapshot directory,
// or while a migration from or into it is under way (and a migration is
// refused while a snapshot is under way); InvalidArgument for a path outside
// its snapshot directory. Restoring needs an empty cache.
Result<SnapshotReport> request_snapshot(std::string_view agent,
                                        const SnapshotRequest& request,
                                        const ClientOptions& options = {});
// The same, for callers that need only the outcome.
Status request_snapshot(std::string_view agent, bool load,
                        const std::string& path,
                        const ClientOptions& options = {});

}  // namespace kvmig

#endif  // KVMIG_AGENT_H_
