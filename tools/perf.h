// `kvmig perf`: the point-to-point test tool, in the ib_write_bw idiom.
//
//   kvmig perf --server [--listen HOST:PORT]
//   kvmig perf HOST:PORT [--transport T] [--preset P | --page-kib K]
//              [--src-layout L] [--dst-layout L] [--pages N] [--iters N]
//              [--warmup N] [--dst-order contiguous|random] [--live
//              --decode-rate R] [--verify] [--json]
//
// The server is an agent that builds a target cache per client session (see
// src/perf/perf_server.h). The client runs a source agent in-process over a
// synthetic cache holding one request of --pages pages and copies it to the
// server's target --warmup + --iters times through Agent::migrate (the code
// `kvmig migrate` runs), resetting the target between iterations.
#ifndef KVMIG_TOOLS_PERF_H_
#define KVMIG_TOOLS_PERF_H_

#include <cstdint>
#include <string>

namespace CLI {
class App;
}

namespace kvmig {

// Flags of `kvmig perf`; defaults are the documented ones.
struct PerfFlags {
  // Which side.
  bool server = false;
  std::string listen = "127.0.0.1:18515";
  std::string transports;   // server: offered data planes (empty: all built)
  std::string connect;      // client: the server's HOST:PORT
  std::string secret_file;  // both: shared secret (see serve --secret-file)
  bool insecure = false;    // server: listen off loopback without a secret
  // Client.
  std::string transport = "tcp";
  std::string preset = "llama3-8b";
  uint32_t page_kib = 0;  // > 0: K bytes per page, instead of a preset
  std::string src_layout = "page";
  std::string dst_layout = "page";
  std::string src_memory = "host";  // host|sim-device|cuda
  std::string dst_memory = "host";
  uint32_t pages = 64;  // per migration
  uint32_t iters = 10;
  uint32_t warmup = 2;
  std::string dst_order = "contiguous";
  uint64_t seed = 1;
  bool live = false;
  double decode_rate = 0;
  bool verify = false;
  uint32_t inline_kib = 1024;     // AgentOptions::inline_page_bytes, in KiB
  int64_t kept_idle_ms = 30'000;  // AgentOptions::kept_connection_idle
  int timeout_ms = 10'000;
  bool json = false;
};

// Declares the flags on the `perf` subcommand.
void add_perf_flags(CLI::App* app, PerfFlags& flags);

// Runs the server (until SIGINT/SIGTERM) or the client. Exit status: 0 ok,
// 1 failed (a clear message on stderr, or {"ok":false,...} with --json),
// 2 usage error. log_level_given: --log-level was on the command line (the
// client is otherwise quiet below warnings).
int run_perf(const PerfFlags& flags, bool log_level_given);

}  // namespace kvmig

#endif  // KVMIG_TOOLS_PERF_H_
