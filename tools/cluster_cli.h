// The cluster's command-line parts: serve's etcd flags (registration) and
// the scheduler commands agents, drain and rebalance.
#ifndef KVMIG_TOOLS_CLUSTER_CLI_H_
#define KVMIG_TOOLS_CLUSTER_CLI_H_

#include <CLI/CLI.hpp>
#include <memory>
#include <optional>
#include <string>

#include "kvmig/cluster.h"

namespace kvmig {

// serve --etcd URL[,URL...] [--etcd-prefix P] [--name NAME] [--etcd-ttl S]
// [--advertise HOST:PORT]
struct ServeEtcdFlags {
  std::string endpoints;
  std::string prefix = "/kvmig";
  std::string name;
  int ttl_s = 5;
  std::string advertise;
};
void add_serve_etcd_flags(CLI::App* serve, ServeEtcdFlags& f);
// Without --etcd: nullptr. A usage error (--etcd without --name) is
// InvalidArgument.
Result<std::unique_ptr<Registration>> start_registration(
    Agent& agent, const ServeEtcdFlags& f);

// kvmig agents | drain | rebalance
struct ClusterFlags {
  std::string endpoints;
  std::string prefix = "/kvmig";
  int etcd_timeout_ms = 2'000;
  bool as_json = false;
  std::string secret_file;
  int timeout_ms = 600'000;
  // drain
  std::string agent;
  bool live = false;
  std::string transport;
  bool undrain = false;
  // rebalance
  bool once = false;
  double interval_s = 5;
  double threshold = 0.2;
  uint32_t max_moves = 16;
  int64_t settle_ms = 30'000;

  CLI::App* agents = nullptr;
  CLI::App* drain = nullptr;
  CLI::App* rebalance = nullptr;
};
void add_cluster_commands(CLI::App& app, ClusterFlags& f);
// The exit status of the cluster command that was given; nullopt when none.
std::optional<int> run_cluster_command(const ClusterFlags& f);

}  // namespace kvmig

#endif  // KVMIG_TOOLS_CLUSTER_CLI_H_
