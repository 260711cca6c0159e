#include "cli.h"

#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <future>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "auth.h"
#include "cli_errors.h"
#include "cluster_cli.h"
#include "flags.h"
#include "host_port.h"
#include "ids.h"
#include "kvmig/kvmig.h"
#include "log.h"
#include "metrics.h"
#include "perf.h"
#include "perf_server.h"
#include "random.h"
#include "report_json.h"
#include "scope_exit.h"
#include "signals.h"
#include "synthetic_pager.h"
#include "text.h"

namespace kvmig {
namespace {

// "SEQS:TOKENS", e.g. "8:1000": decimal digits only, 0 <= SEQS <= 10^6,
// TOKENS >= 1. InvalidArgument "'TEXT': expected ..." otherwise.
Result<std::pair<uint32_t, uint64_t>> parse_populate(const std::string& text) {
  const size_t colon = text.find(':');
  if (colon != std::string::npos) {
    auto seqs = parse_u64(std::string_view(text).substr(0, colon));
    auto tokens = parse_u64(std::string_view(text).substr(colon + 1));
    if (seqs && tokens && *seqs <= 1'000'000 && *tokens > 0) {
      return std::pair<uint32_t, uint64_t>{static_cast<uint32_t>(*seqs),
                                           *tokens};
    }
  }
  return Status::invalid_argument(
      "'" + text +
      "': expected SEQS:TOKENS, e.g. 8:1000 (SEQS 0 to 1000000, TOKENS 1 or "
      "more)");
}

// parse_populate as a CLI11 check: a bad --populate is a usage error.
CLI::Validator populate_spec() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        auto parsed = parse_populate(text);
        return parsed.ok() ? std::string() : parsed.status().message();
      },
      "", "SEQS:TOKENS");
}

// A synthetic cache from the serve/snapshot flags.
struct PoolFlags {
  std::string preset = "tiny";
  std::string layout = "page";
  uint32_t capacity_pages = 1024;
  std::string populate;
  uint64_t seed = 1;
  uint64_t share_prefix = 0;
  std::string memory = "host";
  int device = 0;
};

void add_pool_flags(CLI::App* app, PoolFlags& f) {
  app->add_option("--preset", f.preset, "cache shape: tiny|llama3-8b")
      ->check(CLI::IsMember({"tiny", "llama3-8b"}));
  app->add_option("--layout", f.layout,
                  "page: each page in one piece; layer: one tensor per layer "
                  "for K and for V (vLLM)")
      ->check(CLI::IsMember({"page", "layer"}));
  app->add_option("--capacity-pages", f.capacity_pages,
                  "page slots in the pool")
      ->check(CLI::Range(1u, 1u << 24));
  app->add_option("--populate", f.populate,
                  "SEQS:TOKENS requests to create, e.g. 8:1000")
      ->check(populate_spec());
  app->add_option("--seed", f.seed, "content seed")
      ->transform(unsigned_integer());
  app->add_option("--share-prefix", f.share_prefix,
                  "tokens of shared prefix pages across populated requests")
      ->transform(unsigned_integer());
  app->add_option("--memory", f.memory,
                  "where the pool lives: host; sim-device (a simulated GPU "
                  "that kvmig can reach only through the pager's copies); "
                  "cuda (GPU memory, needs the CUDA driver)")
      ->check(CLI::IsMember({"host", "sim-device", "cuda"}));
  app->add_option("--device", f.device, "GPU ordinal for --memory cuda")
      ->check(CLI::Range(0, 1023));
}

Result<std::unique_ptr<SyntheticPager>> make_pool(const PoolFlags& f) {
  KVMIG_ASSIGN_OR_RETURN(CacheMeta meta, preset_meta(f.preset));
  KVMIG_ASSIGN_OR_RETURN(PoolLayout layout, parse_pool_layout(f.layout));
  KVMIG_ASSIGN_OR_RETURN(PoolMemoryKind memory,
                         parse_pool_memory_kind(f.memory));
  KVMIG_ASSIGN_OR_RETURN(
      auto pager,
      SyntheticPager::create(meta, layout, f.capacity_pages, memory, f.device));
  if (!f.populate.empty()) {
    auto pop = parse_populate(f.populate);
    if (!pop.ok()) return pop.status().with_context("--populate");
    KVMIG_RETURN_IF_ERROR(
        pager->populate(pop->first, pop->second, f.seed, f.share_prefix)
            .with_context("--populate"));
  }
  return pager;
}

// --fault POINT=stall:MS | POINT=hold:PATH | POINT=exit (tests only): at
// POINT, say so on stderr, then sleep MS milliseconds, wait until the file
// PATH exists (the test releases it; at most 10 minutes), or exit at once
// with status 99.
Result<std::function<void(std::string_view)>> parse_faults(
    const std::vector<std::string>& specs) {
  struct Fault {
    std::string point;
    bool exit = false;
    int stall_ms = 0;
    std::string hold_path;
  };
  std::vector<Fault> faults;
  for (const std::string& spec : specs) {
    size_t eq = spec.find('=');
    if (eq == std::string::npos) {
      return Status::invalid_argument(
          "--fault '" + spec +
          "': expected POINT=stall:MS, POINT=hold:PATH or POINT=exit");
    }
    Fault f;
    f.point = spec.substr(0, eq);
    std::string action = spec.substr(eq + 1);
    if (action == "exit") {
      f.exit = true;
    } else if (action.rfind("stall:", 0) == 0) {
      auto ms = parse_u64(std::string_view(action).substr(6));
      if (!ms || *ms > 3'600'000) {
        return Status::invalid_argument("--fault '" + spec +
                                        "': MS must be 0 to 3600000");
      }
      f.stall_ms = static_cast<int>(*ms);
    } else if (action.rfind("hold:", 0) == 0 && action.size() > 5) {
      f.hold_path = action.substr(5);
    } else {
      return Status::invalid_argument("--fault '" + spec + "': unknown action");
    }
    faults.push_back(std::move(f));
  }
  if (faults.empty()) return std::function<void(std::string_view)>();
  return std::function<void(std::string_view)>([faults](
                                                   std::string_view point) {
    for (const Fault& f : faults) {
      if (f.point != point) continue;
      std::fprintf(stderr, "kvmig fault: reached %s\n", f.point.c_str());
      std::fflush(stderr);
      if (f.exit) _exit(99);
      std::this_thread::sleep_for(std::chrono::milliseconds(f.stall_ms));
      const auto give_up =
          std::chrono::steady_clock::now() + std::chrono::minutes(10);
      while (!f.hold_path.empty() && access(f.hold_path.c_str(), F_OK) != 0 &&
             std::chrono::steady_clock::now() < give_up) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
  });
}

// Limits an agent enforces, from serve's flags.
struct LimitFlags {
  uint32_t max_frame_mib = 64;
  uint32_t max_pages = 1u << 20;
  uint32_t max_seqs = 1u << 16;
  uint32_t max_connections = 64;
  uint32_t max_migrations = 4;
};

// Reads --secret-file (when given) into copts.secret. The flag cannot be
// given empty (add_secret_flag refuses it), so empty means not given.
Status load_secret(const std::string& secret_file, ClientOptions& copts) {
  if (secret_file.empty()) return Status();
  KVMIG_ASSIGN_OR_RETURN(copts.secret, read_secret_file(secret_file));
  return Status();
}

void add_secret_flag(CLI::App* cmd, std::string& secret_file) {
  cmd->add_option("--secret-file", secret_file,
                  "shared secret (16+ bytes) for mutual HMAC-SHA256 "
                  "authentication of every control connection")
      ->check(non_empty());
}

// ---- serve ----

struct ServeFlags {
  std::string listen = "127.0.0.1:7470";
  PoolFlags pool;
  double decode_rate = 0;
  std::string transports = "tcp";
  int peer_timeout_ms = 10'000;
  uint64_t staging_mib = 64;
  uint32_t inline_kib = 1024;
  int64_t kept_idle_ms = 30'000;
  std::vector<std::string> faults;
  LimitFlags limits;
  std::string secret_file;
  bool insecure = false;
  bool allow_perf = false;
  std::string snapshot_dir;    // empty: snapshot requests refused
  std::string metrics_listen;  // empty: no metrics
  ServeEtcdFlags etcd;
};

void add_limit_flags(CLI::App* serve, LimitFlags& limits) {
  serve
      ->add_option("--max-frame-mib", limits.max_frame_mib,
                   "largest control frame accepted")
      ->check(CLI::Range(1u, 1024u));
  serve
      ->add_option("--max-pages", limits.max_pages,
                   "most pages one migration may move (in or out)")
      ->check(CLI::Range(1u, 1u << 26));
  serve
      ->add_option("--max-seqs", limits.max_seqs,
                   "most requests one migration may move")
      ->check(CLI::Range(1u, 1u << 24));
  serve
      ->add_option("--max-connections", limits.max_connections,
                   "control connections served at once; more are closed")
      ->check(CLI::Range(1u, 1u << 16));
  serve
      ->add_option("--max-migrations", limits.max_migrations,
                   "migrations from this agent at once, of disjoint requests; "
                   "more are refused")
      ->check(CLI::Range(1u, 256u));
}

CLI::App* add_serve_command(CLI::App& app, ServeFlags& f) {
  auto* serve =
      app.add_subcommand("serve", "run an agent over a synthetic cache");
  serve->add_option("--listen", f.listen,
                    "HOST:PORT to listen on (port 0: any)");
  add_pool_flags(serve, f.pool);
  serve
      ->add_option("--decode-rate", f.decode_rate,
                   "tokens per second appended to every request while "
                   "running (0: none)")
      ->check(finite_number())
      ->check(CLI::Range(0.0, 1e6));
  serve->add_option("--transports", f.transports,
                    "data planes accepted, preferred first: tcp,ucx,verbs");
  serve
      ->add_option("--peer-timeout-ms", f.peer_timeout_ms,
                   "deadline for every wait on a peer")
      ->check(CLI::Range(1, 3'600'000));
  serve
      ->add_option("--staging-mib", f.staging_mib,
                   "staging buffer per migration for pagers without a layout")
      ->check(CLI::Range(1, 1 << 16));
  serve
      ->add_option("--inline-kib", f.inline_kib,
                   "a stop-and-copy of at most this many KiB of pages sends "
                   "them on the control connection, not the data path (0: "
                   "never; at most 1024)")
      ->check(CLI::Range(0, 1024));
  serve
      ->add_option("--kept-idle-ms", f.kept_idle_ms,
                   "a committed migration's control connection stays open "
                   "for the next migration between the same two agents, "
                   "for at most this long idle (0: a connection per "
                   "migration)")
      ->check(CLI::Range(0, 3'600'000));
  serve
      ->add_option(
          "--fault", f.faults,
          "testing: POINT=stall:MS, POINT=hold:PATH or POINT=exit at a "
          "protocol point")
      ->group("");
  add_limit_flags(serve, f.limits);
  add_secret_flag(serve, f.secret_file);
  serve->add_flag("--insecure", f.insecure,
                  "without --secret-file, listen on a non-loopback address "
                  "anyway (unauthenticated peers)");
  serve->add_flag("--allow-perf", f.allow_perf,
                  "also serve kvmig perf clients (each session builds a "
                  "cache of the client's shape; off unless asked)");
  serve
      ->add_option("--snapshot-dir", f.snapshot_dir,
                   "directory `snapshot save|load --agent` may write and "
                   "read (paths relative to it, or inside it); without it "
                   "snapshot requests are refused")
      ->check(non_empty());
  serve
      ->add_option("--metrics-listen", f.metrics_listen,
                   "HOST:PORT serving Prometheus text at /metrics (port 0: "
                   "any); off unless given; loopback unless --insecure")
      ->check(CLI::Validator(
          [](std::string& text) {
            return check_metrics_listen(text).message();
          },
          "HOST:PORT"));
  add_serve_etcd_flags(serve, f.etcd);
  return serve;
}

// The agent's options from serve's flags (listen address, secret and fault
// hook aside).
AgentOptions serve_options(const ServeFlags& f) {
  AgentOptions options;
  options.transports = split_commas(f.transports);
  options.peer_timeout = std::chrono::milliseconds(f.peer_timeout_ms);
  options.staging_bytes = f.staging_mib << 20;
  options.inline_page_bytes = f.inline_kib << 10;
  options.kept_connection_idle = std::chrono::milliseconds(f.kept_idle_ms);
  options.insecure = f.insecure;
  options.max_frame_bytes = f.limits.max_frame_mib << 20;
  options.max_pages_per_migration = f.limits.max_pages;
  options.max_seqs_per_migration = f.limits.max_seqs;
  options.max_connections = f.limits.max_connections;
  options.max_migrations = f.limits.max_migrations;
  options.snapshot_dir = f.snapshot_dir;
  return options;
}

int run_serve(const ServeFlags& f) {
  auto hook = parse_faults(f.faults);
  if (!hook.ok()) return usage_error(hook.status(), false);
  ClientOptions copts;
  if (Status s = load_secret(f.secret_file, copts); !s.ok()) {
    return fail(s, false);
  }
  auto hp = parse_host_port(f.listen);
  if (!hp.ok()) return fail(hp.status(), false);
  auto pager = make_pool(f.pool);
  if (!pager.ok()) return fail(pager.status(), false);
  AgentOptions options = serve_options(f);
  options.listen_host = hp->host;
  options.listen_port = hp->port;
  options.secret = copts.secret;
  options.fault_hook = *hook;
  auto metrics = AgentMetrics::create();
  if (!f.metrics_listen.empty()) metrics->observe(options);

  block_stop_signals();

  auto agent = Agent::create(**pager, options);
  if (!agent.ok()) return fail(agent.status(), false);
  if (f.allow_perf) enable_perf_sessions(**agent);
  if (f.decode_rate > 0) (*pager)->start_decoding(f.decode_rate);
  // Serving before registering: the registration reads the agent's status.
  if (Status s = (*agent)->start(); !s.ok()) return fail(s, false);
  // kvmig_etcd_registered reads the registration, once there is one; the
  // registration outlives every scrape (metrics stop first).
  std::atomic<Registration*> registered{nullptr};
  // Stopped before the agent goes, however run_serve ends.
  ScopeExit stop_metrics([&metrics] { metrics->stop(); });
  if (!f.metrics_listen.empty()) {
    Status s =
        metrics->serve(**agent, f.metrics_listen, f.insecure, [&registered] {
          Registration* r = registered.load();
          return r != nullptr && r->registered();
        });
    if (!s.ok()) {
      (*agent)->stop();
      return fail(s, false);
    }
  }
  std::cout << "kvmig agent listening on " << (*agent)->address() << std::endl;
  if (!f.metrics_listen.empty()) {
    std::cout << "kvmig metrics on http://" << metrics->address() << "/metrics"
              << std::endl;
  }
  auto registration = start_registration(**agent, f.etcd);
  if (!registration.ok()) {
    (*agent)->stop();
    return registration.status().code() == StatusCode::kInvalidArgument
               ? usage_error(registration.status(), false)
               : fail(registration.status(), false);
  }
  registered = registration->get();

  while (!wait_for_stop_signal(std::chrono::hours(24))) {
  }
  logger("engine")->info("stopping");
  if (*registration) (*registration)->stop();
  metrics->stop();  // first: no scrape waits on a stopping agent
  (*agent)->stop();
  (*pager)->stop_decoding();
  agent->reset();
  return 0;
}

// ---- status ----

int cmd_status(const std::string& agent, bool as_json, bool digests,
               const ClientOptions& copts) {
  auto st = query_status(agent, copts, {.digests = digests});
  if (!st.ok()) return fail(st.status(), as_json);
  if (as_json) {
    std::cout << json_text(status_json(*st)) << "\n";
    return 0;
  }
  std::cout << "meta " << st->meta.to_string() << ", " << st->free_pages
            << " of " << st->capacity_pages << " pages free, "
            << st->seqs.size() << " requests\n";
  for (const SeqStatus& s : st->seqs) {
    std::cout << "  seq " << s.id << ": " << s.tokens << " tokens, " << s.pages
              << " pages";
    if (digests) std::cout << ", digest " << s.digest;
    std::cout << "\n";
  }
  for (const auto& m : st->migrations) {
    std::cout << "  migrating (" << m.role << "): " << m.migration_id
              << (m.role == "source" ? " to " : " from ") << m.peer << ", "
              << m.phase << " (round " << m.round << "), " << m.bytes
              << " bytes in " << m.seconds << " s\n";
  }
  for (const auto& d : st->in_doubt) {
    std::cout << "  in doubt: migration " << d.migration_id << " to " << d.to
              << ", requests";
    for (SeqId id : d.seqs) std::cout << " " << id;
    std::cout << ", held: " << d.hold << "\n";
  }
  return 0;
}

struct StatusFlags {
  std::string agent;
  bool as_json = false;
  bool digests = false;
  std::string secret_file;
};

CLI::App* add_status_command(CLI::App& app, StatusFlags& f) {
  auto* status = app.add_subcommand("status", "print an agent's requests");
  status->add_option("--agent", f.agent, "HOST:PORT")->required();
  status->add_flag("--json", f.as_json, "print JSON");
  status->add_flag("--digests", f.digests,
                   "each request's digest (reads every page: pauses the "
                   "engine for the read)");
  add_secret_flag(status, f.secret_file);
  return status;
}

int run_status(const StatusFlags& f) {
  ClientOptions copts;
  if (Status s = load_secret(f.secret_file, copts); !s.ok()) {
    return fail(s, f.as_json);
  }
  return cmd_status(f.agent, f.as_json, f.digests, copts);
}

// ---- migrate ----

void print_migration(const MigrateRequest& req, const MigrationReport& r) {
  std::printf(
      "%s %zu requests (%llu pages, %.1f MiB in %llu writes) to %s "
      "over %s in %.3f s: %.3f GB/s, pause %.1f ms\nmigration %s\n",
      req.mode == MigrationMode::kMove ? "moved" : "copied", r.seqs.size(),
      static_cast<unsigned long long>(r.pages), r.bytes / 1048576.0,
      static_cast<unsigned long long>(r.writes), req.to.c_str(),
      r.transport.c_str(), r.seconds, r.gbps, r.pause_ms,
      r.migration_id.c_str());
  if (r.rounds > 1) {
    std::printf("live: %u rounds, pages per round:", r.rounds);
    for (uint64_t n : r.round_pages) {
      std::printf(" %llu", static_cast<unsigned long long>(n));
    }
    std::printf("\n");
  }
  if (!r.left_behind.empty()) {
    std::printf("left at the source (finished or changed shape):");
    for (SeqId id : r.left_behind) {
      std::printf(" %llu", static_cast<unsigned long long>(id));
    }
    std::printf("\n");
  }
}

// "ID,ID,...": request ids, decimal digits only (std::stoull would take
// "-1" for 2^64 - 1), at least one. InvalidArgument naming the bad item.
Result<std::vector<SeqId>> parse_seq_ids(const std::string& text) {
  std::vector<SeqId> ids;
  for (const std::string& item : split_commas(text)) {
    auto id = parse_u64(item);
    if (!id) {
      return Status::invalid_argument("--seqs: '" + item +
                                      "' is not a request id");
    }
    ids.push_back(*id);
  }
  if (ids.empty()) {
    return Status::invalid_argument("--seqs '" + text + "': no request ids");
  }
  return ids;
}

// Prints a migration that did not end well: the error, the migration id to
// ask about, and how it ended if a cancel learned it.
int fail_migration(const Status& s, const std::string& id,
                   const CancelReport* ended, bool as_json, int code = 1) {
  if (as_json) {
    auto j = error_json(s);
    j["migration_id"] = id;
    if (ended) {
      j["outcome"] = ended->outcome;
      if (!ended->detail.empty()) j["detail"] = ended->detail;
    }
    std::cout << json_text(j) << "\n";
  } else {
    std::cerr << "kvmig: " << s.to_string() << "\nmigration " << id;
    if (ended) {
      std::cerr << ": " << ended->outcome
                << (ended->detail.empty() ? "" : " (" + ended->detail + ")");
    }
    std::cerr << "\n";
  }
  return code;
}

// The migration asked of `agent` under req.migration_id, as it ended. The
// agent cancels it at req.timeout; the client waits a grace on top of that
// and then cancels it itself, as it does on SIGINT or SIGTERM, and reports
// what the cancel learned: nothing is left running unseen.
int cmd_migrate(const std::string& agent, const MigrateRequest& req,
                bool as_json, ClientOptions copts) {
  struct Call {
    std::promise<Result<MigrationReport>> result;
  };
  auto call = std::make_shared<Call>();
  auto answer = call->result.get_future();
  // The worker inherits the blocked stop signals: only this thread sees
  // them, in wait_for_stop_signal.
  block_stop_signals();
  std::thread worker([call, agent, req, copts] {
    call->result.set_value(request_migration(agent, req, copts));
  });
  bool interrupted = false;
  while (answer.wait_for(std::chrono::seconds(0)) !=
         std::future_status::ready) {
    if (wait_for_stop_signal(std::chrono::milliseconds(50))) {
      interrupted = true;
      break;
    }
  }
  if (!interrupted) {
    worker.join();
    Result<MigrationReport> report = answer.get();
    if (!report.ok()) {
      Status s = report.status();
      if (s.code() != StatusCode::kDeadlineExceeded) {
        return fail_migration(s, req.migration_id, nullptr, as_json);
      }
      // The agent's timeout cancelled it, or the client's own deadline
      // passed without an answer: a cancel says which, and how it ended.
      ClientOptions short_copts = copts;
      short_copts.timeout = std::chrono::seconds(30);
      auto ended = cancel_migration(agent, req.migration_id, short_copts);
      if (!ended.ok()) {
        return fail_migration(
            Status::deadline_exceeded(
                s.message() + "; cancelling it failed too (" +
                ended.status().to_string() +
                "): its outcome is not known; ask with kvmig cancel --agent " +
                agent + " --migration " + req.migration_id),
            req.migration_id, nullptr, as_json);
      }
      return fail_migration(s, req.migration_id, &*ended, as_json);
    }
    if (as_json) {
      std::cout << json_text(migration_json(*report)) << "\n";
    } else {
      print_migration(req, *report);
    }
    return 0;
  }
  // Interrupted: cancel, and report how the migration ended.
  ClientOptions short_copts = copts;
  short_copts.timeout = std::chrono::seconds(30);
  auto ended = cancel_migration(agent, req.migration_id, short_copts);
  const Status why = Status::aborted("interrupted");
  if (!ended.ok()) {
    // NotFound: the request had not reached the agent, which now refuses it.
    const bool never = ended.status().code() == StatusCode::kNotFound;
    CancelReport none{req.migration_id, "cancelled",
                      "it had not started; the agent refuses it from now on"};
    const int code = fail_migration(
        never ? why
              : Status::aborted("interrupted; cancelling failed (" +
                                ended.status().to_string() +
                                "): its outcome is not known; ask with kvmig "
                                "cancel --agent " +
                                agent + " --migration " + req.migration_id),
        req.migration_id, never ? &none : nullptr, as_json, 130);
    std::cout.flush();
    std::_Exit(code);  // the worker may still wait on the agent
  }
  if (answer.wait_for(std::chrono::seconds(5)) == std::future_status::ready) {
    worker.join();
    Result<MigrationReport> report = answer.get();
    if (report.ok()) {
      // Too late to cancel: it committed, and the report says so.
      std::cerr << "kvmig: interrupted after the decision point: the "
                   "migration committed\n";
      if (as_json) {
        std::cout << json_text(migration_json(*report)) << "\n";
      } else {
        print_migration(req, *report);
      }
      return 0;
    }
    return fail_migration(why, req.migration_id, &*ended, as_json, 130);
  }
  const int code = fail_migration(why, req.migration_id, &*ended, as_json,
                                  ended->outcome == "committed" ? 0 : 130);
  std::cout.flush();
  std::_Exit(code);
}

struct MigrateFlags {
  std::string agent;
  MigrateRequest req;
  std::string seqs_text;
  std::string mode = "move";
  bool no_verify = false;
  int timeout_ms = 600'000;
  std::string no_converge = "finish";
  bool as_json = false;
  std::string secret_file;
};

void add_live_flags(CLI::App* migrate, MigrateFlags& f) {
  migrate->add_flag("--live", f.req.live,
                    "pre-copy in rounds while the engine runs, then pause "
                    "for the last round");
  migrate
      ->add_option("--max-rounds", f.req.live_max_rounds,
                   "live: most rounds before the paused one")
      ->check(CLI::Range(1u, 1000u));
  migrate
      ->add_option("--converge-pages", f.req.live_converge_pages,
                   "live: pause once a round would send at most this "
                   "many pages")
      ->check(CLI::Range(0u, 1u << 24));
  migrate
      ->add_option("--no-converge", f.no_converge,
                   "live, still above --converge-pages after "
                   "--max-rounds: finish (stop-and-copy the rest) or "
                   "abort")
      ->check(CLI::IsMember({"finish", "abort"}));
}

CLI::App* add_migrate_command(CLI::App& app, MigrateFlags& f) {
  auto* migrate = app.add_subcommand("migrate", "move or copy requests");
  migrate->add_option("--agent", f.agent, "source agent HOST:PORT")->required();
  migrate->add_option("--to", f.req.to, "destination agent HOST:PORT")
      ->required();
  auto* seqs_opt =
      migrate->add_option("--seqs", f.seqs_text, "request ids: ID,ID,...");
  auto* all_opt = migrate->add_flag("--all", f.req.all, "every request");
  seqs_opt->excludes(all_opt);
  migrate->add_option("--mode", f.mode, "move (default) or copy")
      ->check(CLI::IsMember({"move", "copy"}));
  add_live_flags(migrate, f);
  migrate->add_flag("--digests", f.req.record_digests,
                    "report each request's digest at the final pause");
  migrate->add_option("--transport", f.req.transport, "tcp|ucx|verbs")
      ->check(CLI::IsMember({"tcp", "ucx", "verbs"}));
  migrate->add_flag("--no-verify", f.no_verify,
                    "skip the destination's per-page checksum check");
  migrate
      ->add_option("--timeout-ms", f.timeout_ms,
                   "cancel the migration if it has not committed by then "
                   "(it rolls back); default 600000")
      ->check(CLI::Range(1, 86'400'000));
  migrate
      ->add_option("--id", f.req.migration_id,
                   "the migration's id (default: a new random one), for "
                   "kvmig cancel")
      ->check([](const std::string& id) {
        Status s = check_migration_id(id);
        return s.ok() ? std::string() : s.message();
      });
  migrate->add_flag("--json", f.as_json, "print JSON");
  add_secret_flag(migrate, f.secret_file);
  return migrate;
}

int run_migrate(const MigrateFlags& f) {
  // Usage first (exit 2), then the secret and the migration (exit 1).
  MigrateRequest req = f.req;
  if (!req.all) {
    if (f.seqs_text.empty()) {
      return usage_error(
          Status::invalid_argument("migrate: give --seqs or --all"), f.as_json);
    }
    auto ids = parse_seq_ids(f.seqs_text);
    if (!ids.ok()) return usage_error(ids.status(), f.as_json);
    req.seqs = std::move(*ids);
  }
  req.mode = f.mode == "copy" ? MigrationMode::kCopy : MigrationMode::kMove;
  req.verify = !f.no_verify;
  req.live_abort_if_not_converged = f.no_converge == "abort";
  ClientOptions copts;
  if (Status s = load_secret(f.secret_file, copts); !s.ok()) {
    return fail(s, f.as_json);
  }
  if (req.migration_id.empty()) req.migration_id = new_migration_id();
  // The agent cancels at the timeout; the client waits for its answer a
  // while longer (the agent may be finishing the commit).
  req.timeout = std::chrono::milliseconds(f.timeout_ms);
  copts.timeout = req.timeout + std::chrono::seconds(30);
  return cmd_migrate(f.agent, req, f.as_json, copts);
}

// ---- settle ----

struct SettleFlags {
  std::string agent;
  std::string migration_id;
  std::string outcome;
  bool as_json = false;
  std::string secret_file;
};

CLI::App* add_settle_command(CLI::App& app, SettleFlags& f) {
  auto* settle = app.add_subcommand(
      "settle",
      "decide a migration the source holds in doubt, when its destination "
      "can never say: committed drops the requests at the source, aborted "
      "lets them run there again");
  settle->add_option("--agent", f.agent, "source agent HOST:PORT")->required();
  settle->add_option("--migration", f.migration_id, "migration id")->required();
  settle->add_option("--outcome", f.outcome, "committed or aborted")
      ->required()
      ->check(CLI::IsMember({"committed", "aborted"}));
  settle->add_flag("--json", f.as_json, "print JSON");
  add_secret_flag(settle, f.secret_file);
  return settle;
}

int run_settle(const SettleFlags& f) {
  if (Status s = check_migration_id(f.migration_id); !s.ok()) {
    return usage_error(s, f.as_json);
  }
  ClientOptions copts;
  if (Status s = load_secret(f.secret_file, copts); !s.ok()) {
    return fail(s, f.as_json);
  }
  Status s = settle_migration(f.agent, f.migration_id, f.outcome == "committed",
                              copts);
  if (!s.ok()) return fail(s, f.as_json);
  if (f.as_json) {
    std::cout << json_text({{"ok", true},
                            {"migration_id", f.migration_id},
                            {"outcome", f.outcome}})
              << "\n";
  } else {
    std::cout << "migration " << f.migration_id << " settled: " << f.outcome
              << "\n";
  }
  return 0;
}

// ---- cancel ----

struct CancelFlags {
  std::string agent;
  std::string migration_id;
  bool as_json = false;
  std::string secret_file;
};

CLI::App* add_cancel_command(CLI::App& app, CancelFlags& f) {
  auto* cancel = app.add_subcommand(
      "cancel",
      "cancel a migration at its source agent (it rolls back unless it "
      "already reached the decision point), and say how it ended");
  cancel->add_option("--agent", f.agent, "source agent HOST:PORT")->required();
  cancel->add_option("--migration", f.migration_id, "migration id")->required();
  cancel->add_flag("--json", f.as_json, "print JSON");
  add_secret_flag(cancel, f.secret_file);
  return cancel;
}

int run_cancel(const CancelFlags& f) {
  if (Status s = check_migration_id(f.migration_id); !s.ok()) {
    return usage_error(s, f.as_json);
  }
  ClientOptions copts;
  if (Status s = load_secret(f.secret_file, copts); !s.ok()) {
    return fail(s, f.as_json);
  }
  auto ended = cancel_migration(f.agent, f.migration_id, copts);
  if (!ended.ok()) return fail(ended.status(), f.as_json);
  if (f.as_json) {
    std::cout << json_text(cancel_json(*ended)) << "\n";
  } else {
    std::cout << "migration " << ended->migration_id << ": " << ended->outcome
              << (ended->detail.empty() ? "" : " (" + ended->detail + ")")
              << "\n";
  }
  return 0;
}

// ---- snapshot: save, load, inspect, verify ----

int print_snapshot(const std::string& file, bool verbose) {
  auto info = inspect_snapshot(file);
  if (!info.ok()) return fail(info.status(), false);
  if (!verbose) {
    std::cout << file << ": OK (" << info->seqs.size() << " requests, "
              << info->n_pages << " pages, " << info->file_bytes << " bytes)\n";
    return 0;
  }
  std::cout << "snapshot " << file << " (version " << info->version << ", "
            << info->file_bytes << " bytes)\n"
            << "meta " << info->meta.to_string() << ", " << info->n_pages
            << " distinct pages\n";
  for (const SnapshotSeqInfo& s : info->seqs) {
    std::cout << "  seq " << s.seq_id << ": " << s.n_tokens << " tokens, "
              << s.n_pages << " pages, digest " << s.digest.hex() << "\n";
  }
  return 0;
}

struct SnapshotFlags {
  PoolFlags pool;
  std::string out_file;
  std::string in_file;
  std::string agent;
  std::string secret_file;
  CLI::App* save = nullptr;
  CLI::App* load = nullptr;
  CLI::App* inspect = nullptr;
  CLI::App* verify = nullptr;
};

CLI::App* add_snapshot_command(CLI::App& app, SnapshotFlags& f) {
  auto* snapshot = app.add_subcommand("snapshot", "save, inspect, verify");
  snapshot->require_subcommand(1);
  f.save = snapshot->add_subcommand(
      "save",
      "write an agent's cache (--agent) or a synthetic one (--preset ... "
      "--populate ...) to FILE");
  add_pool_flags(f.save, f.pool);
  f.save->add_option("--agent", f.agent,
                     "agent HOST:PORT (FILE is on the agent's host, in its "
                     "--snapshot-dir)");
  f.save->add_option("--out", f.out_file, "snapshot file")->required();
  add_secret_flag(f.save, f.secret_file);
  f.load = snapshot->add_subcommand("load",
                                    "restore FILE into an agent's empty cache");
  f.load->add_option("--agent", f.agent, "agent HOST:PORT")->required();
  f.load
      ->add_option("--in", f.in_file,
                   "snapshot file (on the agent's host, in its "
                   "--snapshot-dir)")
      ->required();
  add_secret_flag(f.load, f.secret_file);
  f.inspect = snapshot->add_subcommand("inspect", "print a snapshot");
  f.inspect->add_option("file", f.in_file, "snapshot file")->required();
  f.verify = snapshot->add_subcommand("verify", "check every checksum");
  f.verify->add_option("file", f.in_file, "snapshot file")->required();
  return snapshot;
}

// What an agent says it saved or loaded: "saved PATH on AGENT (N requests,
// P pages, B bytes)". The file is on the agent's host: never opened here.
int print_agent_snapshot(const std::string& agent, const SnapshotRequest& req,
                         const Result<SnapshotReport>& report) {
  if (!report.ok()) return fail(report.status(), false);
  const char* verb = req.load ? "loaded" : "saved";
  if (!report->summarized) {
    std::cout << verb << " " << req.path << " on " << agent
              << " (the agent sent no summary)\n";
    return 0;
  }
  std::cout << verb << " " << report->path << " on " << agent << " ("
            << report->requests << " requests, " << report->pages << " pages, "
            << report->bytes << " bytes)\n";
  return 0;
}

// snapshot save: from an agent (--agent) or from a synthetic pool.
int run_snapshot_save(const SnapshotFlags& f, const ClientOptions& copts) {
  if (!f.agent.empty()) {
    // The path as given: the agent resolves it in its snapshot directory.
    const SnapshotRequest req{false, f.out_file};
    return print_agent_snapshot(f.agent, req,
                                request_snapshot(f.agent, req, copts));
  }
  auto pager = make_pool(f.pool);
  if (!pager.ok()) return fail(pager.status(), false);
  Status s = capture(**pager, f.out_file);
  if (!s.ok()) return fail(s, false);
  return print_snapshot(f.out_file, false);
}

int run_snapshot(const SnapshotFlags& f) {
  ClientOptions copts;
  if (Status s = load_secret(f.secret_file, copts); !s.ok()) {
    return fail(s, false);
  }
  if (*f.load) {
    const SnapshotRequest req{true, f.in_file};
    return print_agent_snapshot(f.agent, req,
                                request_snapshot(f.agent, req, copts));
  }
  if (*f.save) return run_snapshot_save(f, copts);
  if (*f.inspect) return print_snapshot(f.in_file, true);
  if (*f.verify) return print_snapshot(f.in_file, false);
  return 2;
}

}  // namespace

int run_cli(int argc, char** argv) {
  CLI::App app{"kvmig: live migration of paged KV caches"};
  app.require_subcommand(1);
  std::string log_level;
  app.add_option("--log-level", log_level,
                 "trace|debug|info|warn|error|off (default info, or "
                 "KVMIG_LOG_LEVEL)");
  ServeFlags serve_flags;
  CLI::App* serve = add_serve_command(app, serve_flags);
  StatusFlags status_flags;
  CLI::App* status = add_status_command(app, status_flags);
  MigrateFlags migrate_flags;
  CLI::App* migrate = add_migrate_command(app, migrate_flags);
  CancelFlags cancel_flags;
  CLI::App* cancel = add_cancel_command(app, cancel_flags);
  SettleFlags settle_flags;
  CLI::App* settle = add_settle_command(app, settle_flags);
  SnapshotFlags snapshot_flags;
  CLI::App* snapshot = add_snapshot_command(app, snapshot_flags);
  auto* perf = app.add_subcommand(
      "perf", "point-to-point benchmark: --server, or a client of HOST:PORT");
  PerfFlags perf_flags;
  add_perf_flags(perf, perf_flags);
  ClusterFlags cluster_flags;
  add_cluster_commands(app, cluster_flags);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (!log_level.empty()) set_log_level(log_level);
  if (*serve) return run_serve(serve_flags);
  if (*perf) return run_perf(perf_flags, !log_level.empty());
  if (*status) return run_status(status_flags);
  if (*migrate) return run_migrate(migrate_flags);
  if (*cancel) return run_cancel(cancel_flags);
  if (*settle) return run_settle(settle_flags);
  if (*snapshot) return run_snapshot(snapshot_flags);
  if (auto status = run_cluster_command(cluster_flags)) return *status;
  return 2;
}

}  // namespace kvmig
