// AgentMetrics: an agent's Prometheus metrics, served as text at /metrics
// (`kvmig serve --metrics-listen HOST:PORT`, DESIGN.md "Cluster").
//
// Counted from AgentOptions::on_migration_end, once per migration and side:
//   kvmig_migrations_total{role,transport,outcome}   role source|destination,
//       transport tcp|ucx|verbs|none (ended before one was chosen), outcome
//       committed|aborted|in_doubt
//   kvmig_migration_bytes_total{role,transport}      payload bytes sent or
//       received
//   kvmig_migration_duration_seconds{role}           histogram, every migration
//   kvmig_migration_pause_seconds                    histogram, source
//       migrations that paused the engine (or held the requests)
// Read from Agent::status (no digests: no page read, no pause) at scrape
// time; left out of a scrape when the status fails:
//   kvmig_pages{state="free|used"}, kvmig_requests, kvmig_in_doubt_requests,
//   kvmig_control_connections, kvmig_kept_connections
// and always: kvmig_etcd_registered (0 or 1).
//
// Built only with prometheus-cpp (meson option `metrics`); without it,
// serve() says so and nothing is counted.
#ifndef KVMIG_SRC_METRICS_METRICS_H_
#define KVMIG_SRC_METRICS_METRICS_H_

#include <functional>
#include <memory>
#include <string>

#include "kvmig/agent.h"
#include "kvmig/status.h"

namespace kvmig {

// True when this build has Prometheus metrics.
bool metrics_built();

// The check serve() makes of its address first: "HOST:PORT" (port 0: any)
// with HOST an IP address ([IPv6] in brackets). InvalidArgument otherwise.
Status check_metrics_listen(const std::string& listen);

// Thread-safe.
class AgentMetrics {
 public:
  static std::shared_ptr<AgentMetrics> create();
  ~AgentMetrics();  // stop()s
  AgentMetrics(const AgentMetrics&) = delete;
  AgentMetrics& operator=(const AgentMetrics&) = delete;

  // Chains onto options.on_migration_end (keeping any hook already there)
  // and starts every counter series of options.transports at 0. Call
  // before Agent::create.
  void observe(AgentOptions& options);

  // Serves /metrics on listen ("HOST:PORT", port 0: any) for agent, which
  // must outlive stop(). registered answers kvmig_etcd_registered (empty:
  // 0); it is called on a scrape thread. A host that is not loopback needs
  // insecure (/metrics has no authentication): InvalidArgument otherwise.
  // Unavailable when the address cannot be bound.
  Status serve(Agent& agent, const std::string& listen, bool insecure,
               std::function<bool()> registered);
  // The bound "HOST:PORT" after serve(); empty before.
  std::string address() const;
  // Stops the HTTP server, waiting for a scrape in progress. Idempotent;
  // call before the agent is destroyed.
  void stop();

 private:
  struct Impl;
  explicit AgentMetrics(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvmig

#endif  // KVMIG_SRC_METRICS_METRICS_H_
