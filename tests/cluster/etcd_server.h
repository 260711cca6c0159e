// A real single-member etcd for tests: started on free loopback ports with a
// temporary data dir (/tmp/kvmig-etcd-XXXXXX, removed by the destructor),
// its output in etcd.log there.
//
//   TEST(Foo, Bar) {
//     KVMIG_REQUIRE_ETCD();  // GTEST_SKIP()s when etcd is not installed
//     auto etcd = kvmig::testing::EtcdServer::start();
//     ASSERT_NE(etcd, nullptr);  // start() has ADD_FAILURE()d with the log
//     ... EtcdOptions{{etcd->endpoint()}} ...
//     etcd->kill();      // SIGKILL, like a crash
//     ASSERT_TRUE(etcd->restart());  // same ports and data: the keys survive
//   }
//
// The binary is $KVMIG_ETCD, else /usr/bin/etcd. Not thread-safe: use one
// EtcdServer from one thread.
#ifndef KVMIG_TESTS_CLUSTER_ETCD_SERVER_H_
#define KVMIG_TESTS_CLUSTER_ETCD_SERVER_H_

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

// Skips the current test (from its body or SetUp()) when there is no etcd.
#define KVMIG_REQUIRE_ETCD()                                          \
  do {                                                                \
    if (::kvmig::testing::etcd_binary().empty()) {                    \
      GTEST_SKIP() << "etcd is not installed (/usr/bin/etcd, or set " \
                      "KVMIG_ETCD)";                                  \
    }                                                                 \
  } while (0)

namespace kvmig::testing {

// The etcd binary to run, or "" when it is not there.
inline std::string etcd_binary() {
  const char* env = std::getenv("KVMIG_ETCD");
  std::string path = env != nullptr && *env != '\0' ? env : "/usr/bin/etcd";
  return ::access(path.c_str(), X_OK) == 0 ? path : std::string();
}

// A loopback TCP port nothing listens on right now (bound, then released).
inline uint16_t free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof sa;
  uint16_t port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len) == 0) {
    port = ntohs(sa.sin_port);
  }
  ::close(fd);
  return port;
}

class EtcdServer {
 public:
  // Starts etcd and waits (up to 30 s) until it answers /health. On failure
  // ADD_FAILURE()s with etcd's log and returns nullptr. Call
  // KVMIG_REQUIRE_ETCD() first.
  static std::unique_ptr<EtcdServer> start() {
    auto server = std::unique_ptr<EtcdServer>(new EtcdServer());
    char tmpl[] = "/tmp/kvmig-etcd-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) {
      ADD_FAILURE() << "mkdtemp failed";
      return nullptr;
    }
    server->dir_ = tmpl;
    // Another process may take a free port before etcd binds it: retry.
    for (int attempt = 0; attempt < 3; ++attempt) {
      server->client_port_ = free_loopback_port();
      server->peer_port_ = free_loopback_port();
      if (server->client_port_ == 0 || server->peer_port_ == 0 ||
          server->client_port_ == server->peer_port_) {
        continue;
      }
      std::error_code ec;
      std::filesystem::remove_all(server->dir_ / "data", ec);
      if (server->launch()) return server;
    }
    ADD_FAILURE() << "etcd did not start; its log:\n" << server->log();
    return nullptr;
  }

  ~EtcdServer() {
    stop();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  EtcdServer(const EtcdServer&) = delete;
  EtcdServer& operator=(const EtcdServer&) = delete;

  // "127.0.0.1:PORT", the client URL without "http://".
  std::string endpoint() const {
    return "127.0.0.1:" + std::to_string(client_port_);
  }

  // SIGKILLs etcd (as a crash would) and reaps it.
  void kill() { terminate(SIGKILL); }

  // SIGTERMs etcd and waits for it (SIGKILL after 10 s).
  void stop() { terminate(SIGTERM); }

  // Starts etcd again (stopping it first if it runs) on the same ports and
  // data dir, and waits until it answers. On failure ADD_FAILURE()s with
  // the log and returns false.
  bool restart() {
    stop();
    if (launch()) return true;
    ADD_FAILURE() << "etcd did not restart; its log:\n" << log();
    return false;
  }

  bool running() const { return pid_ > 0; }

  // etcd's stdout and stderr so far, for failure messages.
  std::string log() const {
    std::ifstream in(dir_ / "etcd.log");
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

 private:
  EtcdServer() = default;

  // Spawns etcd and waits until /health says true, or it exits, or 30 s.
  bool launch() {
    const std::string client = "http://" + endpoint();
    const std::string peer = "http://127.0.0.1:" + std::to_string(peer_port_);
    const std::vector<std::string> args = {
        etcd_binary(),
        "--name=kvmig-test",
        "--data-dir=" + (dir_ / "data").string(),
        "--listen-client-urls=" + client,
        "--advertise-client-urls=" + client,
        "--listen-peer-urls=" + peer,
        "--initial-advertise-peer-urls=" + peer,
        "--initial-cluster=kvmig-test=" + peer,
        "--initial-cluster-state=new",
        // Short election ticks: a single member elects itself sooner after
        // a restart.
        "--heartbeat-interval=50",
        "--election-timeout=500",
    };
    const std::string log_path = (dir_ / "etcd.log").string();
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, log_path.c_str(),
                                     O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int rc =
        ::posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) return false;
    pid_ = pid;
    const auto end =
        std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < end) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;  // exited (a port taken, a bad flag): see the log
        return false;
      }
      if (healthy()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    terminate(SIGKILL);
    return false;
  }

  void terminate(int sig) {
    if (pid_ <= 0) return;
    ::kill(pid_, sig);
    const auto end =
        std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (;;) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) break;
      if (std::chrono::steady_clock::now() >= end) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    pid_ = -1;
  }

  // GET /health answers {"health":"true"} (a leader is elected). Each try
  // is bounded by 1 s socket timeouts.
  bool healthy() const {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return false;
    timeval tv{1, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(client_port_);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::string reply;
    if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0) {
      const std::string req = "GET /health HTTP/1.1\r\nHost: " + endpoint() +
                              "\r\nConnection: close\r\n\r\n";
      if (::send(fd, req.data(), req.size(), MSG_NOSIGNAL) ==
          static_cast<ssize_t>(req.size())) {
        char buf[4096];
        for (;;) {
          const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
          if (n <= 0) break;
          reply.append(buf, static_cast<size_t>(n));
        }
      }
    }
    ::close(fd);
    return reply.find("\"health\":\"true\"") != std::string::npos;
  }

  std::filesystem::path dir_;
  uint16_t client_port_ = 0;
  uint16_t peer_port_ = 0;
  pid_t pid_ = -1;
};

}  // namespace kvmig::testing

#endif  // KVMIG_TESTS_CLUSTER_ETCD_SERVER_H_
