#include "perf.h"

#include <fmt/format.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "auth.h"
#include "flags.h"
#include "host_port.h"
#include "kvmig/kvmig.h"
#include "log.h"
#include "perf_server.h"
#include "report_json.h"
#include "signals.h"
#include "synthetic_pager.h"
#include "text.h"

namespace kvmig {
namespace {

using json = nlohmann::ordered_json;
using SteadyClock = std::chrono::steady_clock;

int usage_error(const std::string& what) {
  std::cerr << "kvmig perf: " << what << "\nRun with --help for more.\n";
  return 2;
}

int fail(const Status& s, bool as_json, const std::string& what = "") {
  const std::string text = what.empty() ? s.to_string() : what;
  if (as_json) {
    std::cout << json_text(json{{"ok", false}, {"error", text}}) << "\n";
  } else {
    std::cerr << "kvmig perf: " << text << "\n";
  }
  return 1;
}

// --- server -----------------------------------------------------------------

int run_server(const PerfFlags& f) {
  auto hp = parse_host_port(f.listen);
  if (!hp.ok()) return usage_error("--listen: " + hp.status().message());
  AgentOptions options;
  options.listen_host = hp->host;
  options.listen_port = hp->port;
  options.peer_timeout = std::chrono::milliseconds(f.timeout_ms);
  options.insecure = f.insecure;
  if (!f.secret_file.empty()) {
    auto secret = read_secret_file(f.secret_file);
    if (!secret.ok()) return fail(secret.status(), false);
    options.secret = *secret;
  }
  TransportOptions topts = options.transport_options;
  topts.bind_host = hp->host;
  if (f.transports.empty()) {
    // Every built data plane this host can run (verbs needs a device).
    options.transports.clear();
    for (const std::string& name : built_transports()) {
      auto t = make_transport(name, topts);
      if (t.ok()) {
        options.transports.push_back(name);
      } else {
        logger("engine")->info("perf server: not offering {}: {}", name,
                               t.status().to_string());
      }
    }
  } else {
    options.transports = split_commas(f.transports);
  }

  block_stop_signals();

  // The front agent's own cache is never migrated into: one tiny page.
  auto pager =
      SyntheticPager::create(*preset_meta("tiny"), PoolLayout::kPage, 1);
  if (!pager.ok()) return fail(pager.status(), false);
  auto agent = Agent::create(**pager, options);
  if (!agent.ok()) return fail(agent.status(), false);
  enable_perf_sessions(**agent);
  std::string offered;
  for (const std::string& t : options.transports) {
    offered += (offered.empty() ? "" : ",") + t;
  }
  std::cout << "kvmig perf server listening on " << (*agent)->address()
            << " (transports " << offered << ")" << std::endl;

  Status ran = run_until_signal(**agent);
  agent->reset();
  if (!ran.ok()) return fail(ran, false);
  return 0;
}

// --- client -----------------------------------------------------------------

// Nearest-rank percentile of a sorted, non-empty list.
double percentile(const std::vector<double>& sorted, double p) {
  const size_t n = sorted.size();
  size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * n));
  return sorted[std::clamp<size_t>(rank, 1, n) - 1];
}

struct Sample {
  double wall_s = 0;  // Agent::migrate, call to return
  MigrationReport report;
};

// Shows "iteration i/n" on one terminal line; silent when stdout is not a
// terminal or before the run is a second old. clear() erases the line.
class Progress {
 public:
  explicit Progress(uint32_t total)
      : total_(total), tty_(isatty(STDOUT_FILENO) == 1) {}
  void update(uint32_t done, bool warmup, double gbps) {
    if (!tty_ || SteadyClock::now() - start_ < std::chrono::seconds(1)) return;
    std::printf("\r\033[K%s %u/%u  %.3f GB/s", warmup ? "warmup" : "iteration",
                done, total_, gbps);
    std::fflush(stdout);
    shown_ = true;
  }
  void clear() {
    if (!shown_) return;
    std::printf("\r\033[K");
    std::fflush(stdout);
    shown_ = false;
  }

 private:
  const uint32_t total_;
  const bool tty_;
  const SteadyClock::time_point start_ = SteadyClock::now();
  bool shown_ = false;
};

Result<CacheMeta> client_meta(const PerfFlags& f, std::string* name) {
  if (f.page_kib > 0) {
    // 16 tokens x 2 layers x page_kib heads x 16 dims x f16 = page_kib KiB.
    *name = "custom";
    CacheMeta m{16, 2, f.page_kib, 16, Dtype::kF16};
    KVMIG_RETURN_IF_ERROR(m.validate());
    return m;
  }
  *name = f.preset;
  return preset_meta(f.preset);
}

std::string mib(uint64_t bytes) {
  if (bytes < (1u << 20)) return fmt::format("{:.1f} KiB", bytes / 1024.0);
  return fmt::format("{:.1f} MiB", bytes / 1048576.0);
}

// What the client derives from its flags before it starts anything.
struct ClientPlan {
  std::string preset;  // the preset's name, or "custom" (--page-kib)
  CacheMeta meta;
  PoolLayout src_layout = PoolLayout::kPage;
  PoolLayout dst_layout = PoolLayout::kPage;
  PoolMemoryKind src_memory = PoolMemoryKind::kHost;
  PoolMemoryKind dst_memory = PoolMemoryKind::kHost;
  AllocationOrder dst_order = AllocationOrder::kContiguous;
  uint32_t capacity = 0;  // page slots of either pool
};

// The running client: the source cache and agent, and the perf session
// holding the server's target. Destroyed session first, pager last.
struct Client {
  std::unique_ptr<SyntheticPager> pager;
  std::unique_ptr<Agent> agent;
  std::unique_ptr<PerfSession> session;
  MigrateRequest req;
};

// A client's exit status when it cannot go on; nullopt when it can.
using Exit = std::optional<int>;

// Checks the client's flags (usage errors) and sizes the pools.
Exit plan_client(const PerfFlags& f, ClientPlan& plan) {
  auto meta = client_meta(f, &plan.preset);
  if (!meta.ok()) return usage_error(meta.status().message());
  plan.meta = *meta;
  auto src_layout = parse_pool_layout(f.src_layout);
  auto dst_layout = parse_pool_layout(f.dst_layout);
  auto order = parse_allocation_order(f.dst_order);
  if (!src_layout.ok() || !dst_layout.ok() || !order.ok()) {
    return usage_error("bad --src-layout, --dst-layout or --dst-order");
  }
  plan.src_layout = *src_layout;
  plan.dst_layout = *dst_layout;
  auto src_memory = parse_pool_memory_kind(f.src_memory);
  auto dst_memory = parse_pool_memory_kind(f.dst_memory);
  if (!src_memory.ok() || !dst_memory.ok()) {
    return usage_error("bad --src-memory or --dst-memory");
  }
  plan.src_memory = *src_memory;
  plan.dst_memory = *dst_memory;
  plan.dst_order = *order;
  const uint64_t page_total = 2 * plan.meta.page_bytes();
  // Room for live decoding to grow the request; the destination gets the
  // same so whatever the source holds always fits.
  const uint32_t slack = f.live ? std::max<uint32_t>(16, f.pages) : 0;
  plan.capacity = f.pages + slack;
  if (page_total * plan.capacity > kMaxPerfPoolBytes) {
    return usage_error("--pages " + std::to_string(f.pages) + ": " +
                       mib(page_total * plan.capacity) +
                       " exceeds the limit of " + mib(kMaxPerfPoolBytes));
  }
  return std::nullopt;
}

// The source: one request of exactly --pages full pages, served by an
// in-process agent. options gets the agent's options (the secret included).
Exit start_source(const PerfFlags& f, const ClientPlan& plan, Client& c,
                  AgentOptions& options) {
  auto pager = SyntheticPager::create(plan.meta, plan.src_layout, plan.capacity,
                                      plan.src_memory);
  if (!pager.ok()) return fail(pager.status(), f.json);
  c.pager = std::move(*pager);
  Status populated = c.pager->populate(
      1, uint64_t{f.pages} * plan.meta.page_size_tokens, f.seed);
  if (!populated.ok()) return fail(populated, f.json);
  options.transports = {f.transport};
  options.peer_timeout = std::chrono::milliseconds(f.timeout_ms);
  options.inline_page_bytes = f.inline_kib << 10;
  options.kept_connection_idle = std::chrono::milliseconds(f.kept_idle_ms);
  if (!f.secret_file.empty()) {
    auto secret = read_secret_file(f.secret_file);
    if (!secret.ok()) return fail(secret.status(), f.json);
    options.secret = *secret;
  }
  auto agent = Agent::create(*c.pager, options);
  if (!agent.ok()) return fail(agent.status(), f.json);
  c.agent = std::move(*agent);
  Status started = c.agent->start();
  if (!started.ok()) return fail(started, f.json);
  return std::nullopt;
}

// Starts the source, opens the perf session (the server builds the target)
// and prepares the migration request.
Exit start_client(const PerfFlags& f, const ClientPlan& plan, Client& c) {
  AgentOptions options;
  if (Exit e = start_source(f, plan, c, options)) return e;

  PerfSetupMsg setup;
  setup.meta = plan.meta;
  setup.layout = plan.dst_layout;
  setup.capacity_pages = plan.capacity;
  setup.order = plan.dst_order;
  setup.seed = f.seed;
  setup.memory = plan.dst_memory;
  // Building the target faults its whole pool in: allow for that.
  auto session = PerfSession::open(
      f.connect, setup,
      std::chrono::milliseconds(f.timeout_ms) + std::chrono::seconds(60),
      options.secret);
  if (!session.ok()) return fail(session.status(), f.json);
  c.session = std::move(*session);

  c.req.to = c.session->target();
  // Named, as a scheduler's handoff names the request it moves (a
  // stop-and-copy then checks them on its hold's trip); live runs take
  // every request.
  c.req.all = f.live;
  if (!f.live) {
    auto seqs = c.pager->logical_seqs();
    if (!seqs.ok()) return fail(seqs.status(), f.json);
    for (const LogicalSeq& s : *seqs) c.req.seqs.push_back(s.seq_id);
  }
  c.req.mode = MigrationMode::kCopy;
  c.req.live = f.live;
  c.req.transport = f.transport;
  c.req.verify = f.verify;
  if (f.live && f.decode_rate > 0) c.pager->start_decoding(f.decode_rate);
  return std::nullopt;
}

// Runs migration i of total and resets the target: the sample, or on a
// failure (reported after clearing progress) the exit status.
Exit run_iteration(const PerfFlags& f, Client& c, uint32_t i, uint32_t total,
                   Progress& progress, Sample& sample) {
  const auto t0 = SteadyClock::now();
  auto report = c.agent->migrate(c.req);
  const double wall =
      std::chrono::duration<double>(SteadyClock::now() - t0).count();
  if (!report.ok()) {
    progress.clear();
    if (f.live && report.status().code() == StatusCode::kUnimplemented) {
      return fail(report.status(), f.json,
                  "--live: live (pre-copy) migration is not available in "
                  "this build (the source answered Unimplemented: " +
                      report.status().message() + ")");
    }
    return fail(report.status(), f.json,
                "migration " + std::to_string(i + 1) + " of " +
                    std::to_string(total) + " to " + c.req.to +
                    " failed: " + report.status().to_string());
  }
  sample = {wall, *report};
  Status reset = c.session->reset();
  if (!reset.ok()) {
    progress.clear();
    return fail(
        reset, f.json,
        "after migration " + std::to_string(i + 1) + ": " + reset.to_string());
  }
  return std::nullopt;
}

// --warmup then --iters migrations; samples gets the measured ones.
Exit run_iterations(const PerfFlags& f, Client& c,
                    std::vector<Sample>& samples) {
  const uint32_t total = f.warmup + f.iters;
  Progress progress(total);
  for (uint32_t i = 0; i < total; ++i) {
    const bool warmup = i < f.warmup;
    Sample sample;
    if (Exit e = run_iteration(f, c, i, total, progress, sample)) return e;
    if (!warmup) samples.push_back(sample);
    progress.update(warmup ? i + 1 : i + 1 - f.warmup, warmup,
                    sample.report.bytes / sample.wall_s / 1e9);
  }
  progress.clear();
  c.pager->stop_decoding();
  return std::nullopt;
}

// The measured migrations, each column sorted.
struct Summary {
  std::vector<double> lat, pause, data_gbps, writes, bytes, pages;
  double seconds = 0;
  double gbps = 0;
  double pages_per_s = 0;
  bool staged = false;
  bool inline_pages = false;  // some migration sent its pages inline
  size_t kept = 0;            // migrations on a kept control connection
  size_t one_exchange = 0;    // ... of them in one exchange (no OFFER)
  std::string transport;
  // Each phase's milliseconds per migration (MigrationReport::phases_ms),
  // in the order first seen.
  std::vector<std::pair<std::string, std::vector<double>>> phases;
};

double p50(const std::vector<double>& v) { return percentile(v, 50); }

Summary summarize(const std::vector<Sample>& samples) {
  Summary s;
  double total_bytes = 0, total_pages = 0;
  for (const Sample& x : samples) {
    s.lat.push_back(x.wall_s * 1e3);
    s.pause.push_back(x.report.pause_ms);
    s.data_gbps.push_back(x.report.gbps);
    s.writes.push_back(static_cast<double>(x.report.writes));
    s.bytes.push_back(static_cast<double>(x.report.bytes));
    s.pages.push_back(static_cast<double>(x.report.pages));
    s.seconds += x.wall_s;
    total_bytes += static_cast<double>(x.report.bytes);
    total_pages += static_cast<double>(x.report.pages);
    s.staged = s.staged || x.report.staged;
    s.inline_pages = s.inline_pages || x.report.inline_pages;
    s.kept += x.report.kept_connection ? 1 : 0;
    s.one_exchange += x.report.one_exchange ? 1 : 0;
    for (const auto& [name, ms] : x.report.phases_ms) {
      auto it = std::find_if(s.phases.begin(), s.phases.end(),
                             [&](const auto& e) { return e.first == name; });
      if (it == s.phases.end()) {
        s.phases.push_back({name, {}});
        it = std::prev(s.phases.end());
      }
      it->second.push_back(ms);
    }
  }
  for (auto& [name, v] : s.phases) std::sort(v.begin(), v.end());
  for (auto* v :
       {&s.lat, &s.pause, &s.data_gbps, &s.writes, &s.bytes, &s.pages}) {
    std::sort(v->begin(), v->end());
  }
  s.gbps = total_bytes / s.seconds / 1e9;
  s.pages_per_s = total_pages / s.seconds;
  s.transport = samples.front().report.transport;
  return s;
}

json report_json(const PerfFlags& f, const ClientPlan& plan,
                 const std::string& target, const Summary& s) {
  json phases = json::object();
  for (const auto& [name, v] : s.phases) phases[name] = p50(v);
  return {
      {"ok", true},
      {"server", f.connect},
      {"target", target},
      {"transport", s.transport},
      {"preset", plan.preset},
      {"page_bytes", plan.meta.page_bytes()},
      {"src_layout", f.src_layout},
      {"dst_layout", f.dst_layout},
      {"src_memory", f.src_memory},
      {"dst_memory", f.dst_memory},
      {"dst_order", f.dst_order},
      {"mode", "copy"},
      {"verify", f.verify},
      {"live", f.live},
      {"staged", s.staged},
      {"inline_pages", s.inline_pages},
      {"kept_connections", s.kept},
      {"one_exchanges", s.one_exchange},
      {"pages", static_cast<uint64_t>(p50(s.pages))},
      {"bytes", static_cast<uint64_t>(p50(s.bytes))},
      {"writes", static_cast<uint64_t>(p50(s.writes))},
      {"iters", f.iters},
      {"warmup", f.warmup},
      {"seconds", s.seconds},
      {"gbps", s.gbps},
      {"pages_per_s", s.pages_per_s},
      {"data_gbps_p50", p50(s.data_gbps)},
      {"latency_ms",
       {{"p50", p50(s.lat)},
        {"p99", percentile(s.lat, 99)},
        {"max", s.lat.back()},
        {"min", s.lat.front()}}},
      {"pause_ms", {{"p50", p50(s.pause)}, {"max", s.pause.back()}}},
      {"phases_ms", phases},
  };
}

void print_report(const PerfFlags& f, const ClientPlan& plan,
                  const Summary& s) {
  std::printf(
      "kvmig perf to %s over %s: %s (%s K + %s V per page), %s -> %s "
      "layout, %s destination slots, copy, verify %s\n",
      f.connect.c_str(), s.transport.c_str(), plan.preset.c_str(),
      mib(plan.meta.page_bytes()).c_str(), mib(plan.meta.page_bytes()).c_str(),
      f.src_layout.c_str(), f.dst_layout.c_str(), f.dst_order.c_str(),
      f.verify ? "on" : "off");
  std::printf("%12s %8s %6s %8s %10s %7s %9s %8s %8s %9s %8s\n", "bytes",
              "pages", "iters", "GB/s", "pages/s", "writes", "lat p50", "p99",
              "max", "pause p50", "max");
  std::printf(
      "%12llu %8llu %6u %8.3f %10.1f %7llu %9.2f %8.2f %8.2f %9.2f %8.2f\n",
      static_cast<unsigned long long>(p50(s.bytes)),
      static_cast<unsigned long long>(p50(s.pages)), f.iters, s.gbps,
      s.pages_per_s, static_cast<unsigned long long>(p50(s.writes)), p50(s.lat),
      percentile(s.lat, 99), s.lat.back(), p50(s.pause), s.pause.back());
  if (!s.phases.empty()) {
    std::printf("phases p50 (ms):");
    for (const auto& [name, v] : s.phases) {
      std::printf(" %s %.3f", name.c_str(), p50(v));
    }
    std::printf("\n");
  }
  std::printf(
      "(latencies and pauses in ms per migration; GB/s = 10^9 bytes/s "
      "over the migrations' wall time%s%s%s)\n",
      s.staged ? "; some side staged its pages" : "",
      s.inline_pages ? "; pages sent on the control connection (--inline-kib)"
                     : "",
      s.one_exchange > 0 ? "; HELLO, pages and COMMIT in one exchange" : "");
}

int run_client(const PerfFlags& f) {
  ClientPlan plan;
  if (Exit e = plan_client(f, plan)) return *e;
  Client c;
  if (Exit e = start_client(f, plan, c)) return *e;
  std::vector<Sample> samples;
  if (Exit e = run_iterations(f, c, samples)) return *e;
  const Summary summary = summarize(samples);
  if (f.json) {
    std::cout << json_text(report_json(f, plan, c.req.to, summary)) << "\n";
    return 0;
  }
  print_report(f, plan, summary);
  return 0;
}

}  // namespace

void add_perf_flags(CLI::App* app, PerfFlags& f) {
  auto* connect = app->add_option("server", f.connect,
                                  "client: the perf server's HOST:PORT");
  auto* server =
      app->add_flag("--server", f.server, "run the server (no HOST:PORT)");
  server->excludes(connect);
  app->add_option("--listen", f.listen,
                  "server: HOST:PORT to listen on (port 0: any)")
      ->excludes(connect);
  app->add_option("--transports", f.transports,
                  "server: data planes offered (default: every one built "
                  "that this host can run)")
      ->excludes(connect);
  app->add_option("--secret-file", f.secret_file,
                  "shared secret for mutual authentication (both sides)")
      ->check(non_empty());
  app->add_flag("--insecure", f.insecure,
                "server: listen off loopback without a secret")
      ->excludes(connect);
  app->add_option("--transport", f.transport, "client: tcp|ucx|verbs")
      ->check(CLI::IsMember({"tcp", "ucx", "verbs"}));
  auto* preset = app->add_option("--preset", f.preset,
                                 "client: cache shape tiny|llama3-8b")
                     ->check(CLI::IsMember({"tiny", "llama3-8b"}));
  app->add_option("--page-kib", f.page_kib,
                  "client: KiB of K (and of V) per page, instead of --preset")
      ->check(CLI::Range(1u, 1u << 16))
      ->excludes(preset);
  app->add_option("--src-layout", f.src_layout, "client: page|layer")
      ->check(CLI::IsMember({"page", "layer"}));
  app->add_option("--dst-layout", f.dst_layout, "client: page|layer")
      ->check(CLI::IsMember({"page", "layer"}));
  app->add_option("--src-memory", f.src_memory,
                  "client: where the source pool lives, host|sim-device|cuda")
      ->check(CLI::IsMember({"host", "sim-device", "cuda"}));
  app->add_option("--dst-memory", f.dst_memory,
                  "client: where the server's target pool lives, "
                  "host|sim-device|cuda")
      ->check(CLI::IsMember({"host", "sim-device", "cuda"}));
  app->add_option("--pages", f.pages, "client: pages per migration")
      ->check(CLI::Range(1u, 1u << 20));
  app->add_option("--iters", f.iters, "client: measured migrations")
      ->check(CLI::Range(1u, 1'000'000u));
  app->add_option("--warmup", f.warmup, "client: unmeasured migrations first")
      ->check(CLI::Range(0u, 1'000'000u));
  app->add_option("--dst-order", f.dst_order,
                  "client: destination slot allocation, contiguous|random")
      ->check(CLI::IsMember({"contiguous", "random"}));
  app->add_option("--seed", f.seed, "client: content and --dst-order seed")
      ->transform(unsigned_integer());
  auto* live =
      app->add_flag("--live", f.live, "client: pre-copy while decoding");
  app->add_option("--decode-rate", f.decode_rate,
                  "client, with --live: tokens per second appended to the "
                  "request while it migrates")
      ->check(finite_number())
      ->check(CLI::Range(0.0, 1e6))
      ->needs(live);
  app->add_flag("--verify", f.verify,
                "client: per-page checksums checked at the destination");
  app->add_option("--inline-kib", f.inline_kib,
                  "client: a migration of at most this many KiB of pages "
                  "sends them on the control connection (0: always the data "
                  "path; at most 1024)")
      ->check(CLI::Range(0u, kMaxPerfInlineBytes >> 10));
  app->add_option("--kept-idle-ms", f.kept_idle_ms,
                  "client: keep a committed migration's control connection "
                  "for the next one for at most this long idle (0: a "
                  "connection per migration)")
      ->check(CLI::Range(int64_t{0}, int64_t{3'600'000}));
  app->add_option("--timeout-ms", f.timeout_ms, "deadline for every peer wait")
      ->check(CLI::Range(1, 3'600'000));
  app->add_flag("--json", f.json, "client: print one JSON object");
}

int run_perf(const PerfFlags& f, bool log_level_given) {
  if (f.server) return run_server(f);
  if (f.connect.empty()) {
    return usage_error("give the server's HOST:PORT, or --server");
  }
  auto hp = parse_host_port(f.connect);
  if (!hp.ok()) return usage_error(hp.status().message());
  if (!log_level_given && std::getenv("KVMIG_LOG_LEVEL") == nullptr) {
    set_log_level("warn");  // no per-migration info lines
  }
  return run_client(f);
}

}  // namespace kvmig
