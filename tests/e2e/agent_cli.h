// What the two-process tests ask agents through the `kvmig` command line
// (status, digests, waiting for free pages), and which data transports they
// run on here.
#ifndef KVMIG_TESTS_E2E_AGENT_CLI_H_
#define KVMIG_TESTS_E2E_AGENT_CLI_H_

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "kvmig/transport.h"
#include "process.h"

namespace kvmig::testing {

// `kvmig status --json --digests` of agent. A failed call is reported and gives
// an object with no requests, free_pages -1 and nothing in doubt, so later
// lookups stay safe.
inline nlohmann::json status_of(const std::string& agent) {
  CliResult r = run_kvmig({"status", "--agent", agent, "--json", "--digests"});
  EXPECT_EQ(r.code, 0) << agent << ": " << r.out << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out, nullptr, false);
  if (!j.is_object() || !j.contains("seqs")) {
    j = {{"seqs", nlohmann::json::array()},
         {"free_pages", -1},
         {"in_doubt", nlohmann::json::array()},
         {"error", r.out + r.err}};
  }
  return j;
}

// Request id -> digest, from a status.
inline std::map<uint64_t, std::string> digests(const nlohmann::json& status) {
  std::map<uint64_t, std::string> out;
  for (const auto& s : status["seqs"]) {
    out[s["id"].get<uint64_t>()] = s["digest"].get<std::string>();
  }
  return out;
}

// Polls until the agent's free-page count is `expected` (or `limit` passes);
// returns the last status.
inline nlohmann::json wait_for_free_pages(const std::string& agent,
                                          int64_t expected,
                                          std::chrono::milliseconds limit) {
  auto end = std::chrono::steady_clock::now() + limit;
  nlohmann::json now = status_of(agent);
  while (now["free_pages"] != expected &&
         std::chrono::steady_clock::now() < end) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    now = status_of(agent);
  }
  return now;
}

inline bool in_rxe_guest() { return std::getenv("RXEVM_DEV") != nullptr; }

// Empty when this build and machine can run verbs (built, and an RDMA device
// with a GID for agent_host()); otherwise why not.
inline const std::string& verbs_unavailable() {
  static const std::string why = [] {
    TransportOptions opts;
    opts.bind_host = agent_host();
    auto t = make_transport("verbs", opts);
    return t.ok() ? std::string() : t.status().to_string();
  }();
  return why;
}

// The built data transports, verbs only where it can run (inside the
// Soft-RoCE guest, tools/rxe-tests.sh runs the *_verbs / */verbs cases).
inline std::vector<std::string> data_transports() {
  std::vector<std::string> out;
  for (const auto& t : built_transports()) {
    if (t != "verbs" || verbs_unavailable().empty()) out.push_back(t);
  }
  return out;
}

}  // namespace kvmig::testing

#endif  // KVMIG_TESTS_E2E_AGENT_CLI_H_
