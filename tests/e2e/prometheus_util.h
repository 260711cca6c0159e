// HTTP and Prometheus helpers for the two-process tests: a plain GET, an
// agent's /metrics address, and a real Prometheus server scraping agents.
#ifndef KVMIG_TESTS_E2E_PROMETHEUS_UTIL_H_
#define KVMIG_TESTS_E2E_PROMETHEUS_UTIL_H_

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "process.h"

namespace kvmig::testing {

inline constexpr char kPrometheus[] = "/usr/bin/prometheus";

// GET http://address/target (HTTP/1.0: the server closes when done). Sets
// the status code and body; false when the exchange failed.
inline bool http_get(const std::string& address, const std::string& target,
                     int& code, std::string& body) {
  int fd = dial_tcp(address);
  if (fd < 0) return false;
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  const std::string req = "GET " + target + " HTTP/1.0\r\nHost: " + address +
                          "\r\nConnection: close\r\n\r\n";
  bool ok = ::send(fd, req.data(), req.size(), MSG_NOSIGNAL) ==
            static_cast<ssize_t>(req.size());
  std::string response;
  char buf[16384];
  for (ssize_t n; ok && (n = ::recv(fd, buf, sizeof buf, 0)) != 0;) {
    if (n < 0) ok = false;
    if (n > 0) response.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  const size_t end = response.find("\r\n\r\n");
  if (!ok || response.rfind("HTTP/1.", 0) != 0 || end == std::string::npos) {
    return false;
  }
  code = std::stoi(response.substr(9, 3));
  body = response.substr(end + 4);
  return true;
}

// The HOST:PORT of the agent's /metrics, from its "kvmig metrics on" line.
inline std::string metrics_address(AgentProcess& agent) {
  const std::string marker = "kvmig metrics on http://";
  EXPECT_TRUE(agent.child().wait_for("/metrics\n", std::chrono::seconds(10)))
      << agent.child().out() << agent.child().err();
  const std::string out = agent.child().out();
  const size_t at = out.find(marker);
  if (at == std::string::npos) return "";
  const size_t begin = at + marker.size();
  return out.substr(begin, out.find("/metrics", begin) - begin);
}

inline std::string temp_dir() {
  char tmpl[] = "/tmp/kvmig-metrics-XXXXXX";
  return mkdtemp(tmpl);
}

// A loopback port nothing listens on now; 0 on failure.
inline int free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof sa;
  const bool ok = fd >= 0 &&
                  bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len) == 0;
  if (fd >= 0) close(fd);
  return ok ? ntohs(sa.sin_port) : 0;
}

// A real Prometheus server on a free loopback port, scraping `targets`
// (HOST:PORT of /metrics) every second; stopped and its data removed by the
// destructor.
class PrometheusServer {
 public:
  static std::unique_ptr<PrometheusServer> start(
      const std::vector<std::string>& targets) {
    auto p = std::unique_ptr<PrometheusServer>(new PrometheusServer());
    p->dir_ = temp_dir();
    std::ofstream config(p->dir_ + "/prometheus.yml");
    config << "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
              "scrape_configs:\n  - job_name: kvmig\n    static_configs:\n"
              "      - targets: [";
    for (size_t i = 0; i < targets.size(); ++i) {
      config << (i ? ", '" : "'") << targets[i] << "'";
    }
    config << "]\n";
    config.close();
    p->web_ = "127.0.0.1:" + std::to_string(free_port());
    p->child_ = Child::spawn(
        {kPrometheus, "--config.file=" + p->dir_ + "/prometheus.yml",
         "--storage.tsdb.path=" + p->dir_ + "/data",
         "--web.listen-address=" + p->web_, "--log.level=warn"});
    if (!p->child_) return nullptr;
    return p;
  }
  ~PrometheusServer() {
    if (child_) {
      child_->kill(SIGTERM);
      child_->wait_exit(std::chrono::seconds(30));
      child_.reset();
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // The result vector of an instant query (URL-encoded expr); false while
  // the server does not answer with success.
  bool query(const std::string& encoded_expr, nlohmann::json& result) {
    int code = 0;
    std::string body;
    if (!http_get(web_, "/api/v1/query?query=" + encoded_expr, code, body) ||
        code != 200) {
      return false;
    }
    nlohmann::json j = nlohmann::json::parse(body, nullptr, false);
    if (!j.is_object() || j["status"] != "success") return false;
    result = j["data"]["result"];
    return true;
  }
  bool exited() { return child_->wait_exit(std::chrono::milliseconds(0)); }
  std::string log() const { return child_->err(); }

 private:
  PrometheusServer() = default;
  std::string dir_, web_;
  std::unique_ptr<Child> child_;
};

}  // namespace kvmig::testing

#endif  // KVMIG_TESTS_E2E_PROMETHEUS_UTIL_H_
