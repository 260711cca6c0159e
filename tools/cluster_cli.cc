#include "cluster_cli.h"

#include <cstdio>
#include <iostream>

#include "auth.h"
#include "cli_errors.h"
#include "cluster_json.h"
#include "flags.h"
#include "report_json.h"
#include "signals.h"
#include "text.h"

namespace kvmig {
namespace {

void add_etcd_option(CLI::App* cmd, std::string& endpoints, std::string& prefix,
                     bool required) {
  auto* opt = cmd->add_option("--etcd", endpoints,
                              "etcd client URLs, URL[,URL...] "
                              "(http://HOST:PORT or HOST:PORT)")
                  ->check(non_empty());
  if (required) opt->required();
  cmd->add_option("--etcd-prefix", prefix, "key prefix of this cluster in etcd")
      ->check(non_empty());
}

}  // namespace

void add_serve_etcd_flags(CLI::App* serve, ServeEtcdFlags& f) {
  add_etcd_option(serve, f.endpoints, f.prefix, false);
  serve->add_option("--name", f.name,
                    "with --etcd: this agent's name in the cluster "
                    "([A-Za-z0-9._-], unique)");
  serve
      ->add_option("--etcd-ttl", f.ttl_s,
                   "with --etcd: seconds a crashed agent stays listed")
      ->check(CLI::Range(1, 3600));
  serve->add_option("--advertise", f.advertise,
                    "with --etcd: HOST:PORT others reach this agent at "
                    "(default: the listen address)");
}

Result<std::unique_ptr<Registration>> start_registration(
    Agent& agent, const ServeEtcdFlags& f) {
  if (f.endpoints.empty()) {
    if (!f.name.empty() || !f.advertise.empty()) {
      return Status::invalid_argument("--name and --advertise need --etcd");
    }
    return std::unique_ptr<Registration>();
  }
  if (f.name.empty()) {
    return Status::invalid_argument("--etcd needs --name");
  }
  RegistrationOptions options;
  options.etcd.endpoints = split_commas(f.endpoints);
  options.etcd.prefix = f.prefix;
  options.name = f.name;
  options.ttl = std::chrono::seconds(f.ttl_s);
  options.address = f.advertise;
  return Registration::start(agent, std::move(options));
}

void add_cluster_commands(CLI::App& app, ClusterFlags& f) {
  f.agents = app.add_subcommand("agents", "list the agents in etcd");
  f.drain = app.add_subcommand(
      "drain", "mark an agent draining and move every request off it");
  f.rebalance = app.add_subcommand(
      "rebalance", "move requests from loaded agents to idle ones");
  for (CLI::App* cmd : {f.agents, f.drain, f.rebalance}) {
    add_etcd_option(cmd, f.endpoints, f.prefix, true);
    cmd->add_option("--etcd-timeout-ms", f.etcd_timeout_ms,
                    "deadline of one etcd call")
        ->check(CLI::Range(1, 600'000));
    cmd->add_flag("--json", f.as_json, "print JSON");
  }
  for (CLI::App* cmd : {f.drain, f.rebalance}) {
    cmd->add_option("--secret-file", f.secret_file, "the agents' shared secret")
        ->check(non_empty());
    cmd->add_option("--timeout-ms", f.timeout_ms,
                    "deadline of one call to an agent (a migration)")
        ->check(CLI::Range(1, 86'400'000));
    cmd->add_option("--transport", f.transport, "tcp|ucx|verbs")
        ->check(CLI::IsMember({"tcp", "ucx", "verbs"}));
  }
  f.drain->add_option("--agent", f.agent, "the agent's NAME")->required();
  f.drain->add_flag("--live", f.live,
                    "live migrations: the requests keep decoding");
  f.drain->add_flag("--undo", f.undrain,
                    "only clear the draining mark; move nothing");
  auto* once = f.rebalance->add_flag("--once", f.once, "one pass, then exit");
  f.rebalance
      ->add_option("--interval", f.interval_s,
                   "seconds between passes, until SIGINT or SIGTERM")
      ->check(finite_number())
      ->check(CLI::Range(0.05, 86'400.0))
      ->excludes(once);
  f.rebalance
      ->add_option("--threshold", f.threshold,
                   "move while two agents' loads (used/capacity) differ by "
                   "more than this")
      ->check(finite_number())
      ->check(CLI::Range(0.0, 1.0));
  f.rebalance
      ->add_option("--max-moves", f.max_moves, "most migrations per pass")
      ->check(CLI::Range(1u, 100'000u));
  f.rebalance
      ->add_option("--settle-ms", f.settle_ms,
                   "leave requests that arrived by migration less than this "
                   "long ago where they are")
      ->check(CLI::Range(int64_t{0}, int64_t{86'400'000}));
}

namespace {

void print_agents(const std::vector<AgentRecord>& agents) {
  std::printf("%-20s %-22s %-20s %17s %8s %s\n", "NAME", "ADDRESS", "META",
              "FREE/CAPACITY", "REQUESTS", "DRAINING");
  for (const AgentRecord& r : agents) {
    const std::string pages =
        std::to_string(r.free_pages) + "/" + std::to_string(r.capacity_pages);
    std::printf("%-20s %-22s %-20s %17s %8llu %s\n", r.name.c_str(),
                r.address.c_str(), r.meta.to_string().c_str(), pages.c_str(),
                static_cast<unsigned long long>(r.requests),
                r.draining ? "yes" : "no");
  }
}

void print_drain(const DrainReport& r) {
  std::printf("drained %s: %zu requests moved in %u migrations, %zu left\n",
              r.agent.c_str(), r.moved.size(), r.migrations, r.unplaced.size());
  for (const RequestPlacement& p : r.moved) {
    std::printf("  seq %llu -> %s (migration %s)\n",
                static_cast<unsigned long long>(p.seq), p.to.c_str(),
                p.migration_id.c_str());
  }
  for (const RequestPlacement& p : r.unplaced) {
    std::printf("  seq %llu stays: %s\n",
                static_cast<unsigned long long>(p.seq), p.error.c_str());
  }
}

void print_rebalance(const RebalanceReport& r) {
  if (r.moves.empty()) std::printf("balanced: nothing to move\n");
  for (const RebalanceMove& m : r.moves) {
    std::printf("%s (load %.2f) -> %s (load %.2f): %zu requests, %llu pages",
                m.from.c_str(), m.load_from_before, m.to.c_str(),
                m.load_to_before, m.seqs.size(),
                static_cast<unsigned long long>(m.pages));
    if (m.error.empty()) {
      std::printf(", migration %s\n", m.migration_id.c_str());
    } else {
      std::printf(": failed: %s\n", m.error.c_str());
    }
  }
  for (const std::string& s : r.skipped) std::printf("skipped %s\n", s.c_str());
}

Result<std::unique_ptr<Cluster>> connect(const ClusterFlags& f) {
  ClusterOptions options;
  options.etcd.endpoints = split_commas(f.endpoints);
  options.etcd.prefix = f.prefix;
  options.etcd.timeout = std::chrono::milliseconds(f.etcd_timeout_ms);
  options.agent_client.timeout = std::chrono::milliseconds(f.timeout_ms);
  if (!f.secret_file.empty()) {
    KVMIG_ASSIGN_OR_RETURN(options.agent_client.secret,
                           read_secret_file(f.secret_file));
  }
  return Cluster::connect(std::move(options));
}

int run_rebalance(Cluster& cluster, const ClusterFlags& f) {
  RebalanceOptions options;
  options.threshold = f.threshold;
  options.transport = f.transport;
  options.max_moves = f.max_moves;
  options.settle = std::chrono::milliseconds(f.settle_ms);
  if (!f.once) block_stop_signals();
  int status = 0;
  for (;;) {
    auto report = cluster.rebalance_once(options);
    if (!report.ok()) {
      status = fail(report.status(), f.as_json);
    } else {
      const auto j = rebalance_json(*report);
      if (f.as_json) {
        std::cout << json_text(j) << std::endl;
      } else {
        print_rebalance(*report);
        std::fflush(stdout);
      }
      status = j["ok"].get<bool>() ? 0 : 1;
    }
    if (f.once) return status;
    if (wait_for_stop_signal(std::chrono::milliseconds(
            static_cast<int64_t>(f.interval_s * 1000)))) {
      return status;
    }
  }
}

}  // namespace

std::optional<int> run_cluster_command(const ClusterFlags& f) {
  if (!*f.agents && !*f.drain && !*f.rebalance) return std::nullopt;
  auto cluster = connect(f);
  if (!cluster.ok()) {
    return cluster.status().code() == StatusCode::kInvalidArgument
               ? usage_error(cluster.status(), f.as_json)
               : fail(cluster.status(), f.as_json);
  }
  if (*f.agents) {
    auto agents = (*cluster)->agents();
    if (!agents.ok()) return fail(agents.status(), f.as_json);
    if (f.as_json) {
      std::cout << json_text(agents_json(*agents)) << "\n";
    } else {
      print_agents(*agents);
    }
    return 0;
  }
  if (*f.drain) {
    if (f.undrain) {
      Status s = (*cluster)->set_draining(f.agent, false);
      if (!s.ok()) return fail(s, f.as_json);
      if (f.as_json) {
        std::cout << "{\"ok\":true}\n";
      } else {
        std::cout << f.agent << " is no longer draining\n";
      }
      return 0;
    }
    DrainOptions options;
    options.live = f.live;
    options.transport = f.transport;
    auto report = (*cluster)->drain(f.agent, options);
    if (!report.ok()) return fail(report.status(), f.as_json);
    if (f.as_json) {
      std::cout << json_text(drain_json(*report)) << "\n";
    } else {
      print_drain(*report);
    }
    return report->ok() ? 0 : 1;
  }
  return run_rebalance(**cluster, f);
}

}  // namespace kvmig
