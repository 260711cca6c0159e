// Test helpers that run the real `kvmig` binary: agents as child processes
// (stdout and stderr in files, so a test can wait for a line), and one-shot
// CLI calls.
#ifndef KVMIG_TESTS_E2E_PROCESS_H_
#define KVMIG_TESTS_E2E_PROCESS_H_

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
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

namespace kvmig::testing {

inline std::string kvmig_bin() {
  const char* env = std::getenv("KVMIG_BIN");
  return env ? env : KVMIG_BIN;
}

inline std::string read_file(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A child process with stdout/stderr captured in files under a temp dir.
class Child {
 public:
  // Runs args in the working directory cwd (empty: this process's).
  static std::unique_ptr<Child> spawn(const std::vector<std::string>& args,
                                      const std::string& cwd = "") {
    auto c = std::unique_ptr<Child>(new Child());
    char tmpl[] = "/tmp/kvmig-e2e-XXXXXX";
    c->dir_ = mkdtemp(tmpl);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, (c->dir_ / "out").c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&fa, 2, (c->dir_ / "err").c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (!cwd.empty()) posix_spawn_file_actions_addchdir_np(&fa, cwd.c_str());
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    int rc = posix_spawn(&c->pid_, argv[0], &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) return nullptr;
    return c;
  }

  ~Child() {
    if (pid_ > 0 && !exited_) {
      ::kill(pid_, SIGTERM);
      if (!wait_exit(std::chrono::seconds(10))) {
        ::kill(pid_, SIGKILL);
        wait_exit(std::chrono::seconds(10));
      }
    }
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::string out() const { return read_file(dir_ / "out"); }
  std::string err() const { return read_file(dir_ / "err"); }
  pid_t pid() const { return pid_; }

  // Waits until stdout or stderr contains needle.
  bool wait_for(const std::string& needle, std::chrono::milliseconds limit,
                bool in_stderr = false) const {
    auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      if ((in_stderr ? err() : out()).find(needle) != std::string::npos) {
        return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  }

  void kill(int sig) { ::kill(pid_, sig); }

  // Waits for exit; true with the exit code in exit_code().
  bool wait_exit(std::chrono::milliseconds limit) {
    if (exited_) return true;
    auto end = std::chrono::steady_clock::now() + limit;
    for (;;) {
      int status = 0;
      pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        exited_ = true;
        exit_code_ =
            WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        return true;
      }
      if (std::chrono::steady_clock::now() >= end) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  int exit_code() const { return exit_code_; }

 private:
  Child() = default;
  std::filesystem::path dir_;
  pid_t pid_ = -1;
  bool exited_ = false;
  int exit_code_ = -1;
};

// The host agents listen on: the Soft-RoCE device's address inside the rxe
// guest (RXEVM_IP, so verbs and UCX find its RoCE GID), else loopback.
inline std::string agent_host() {
  const char* ip = std::getenv("RXEVM_IP");
  return ip ? ip : "127.0.0.1";
}

// `kvmig serve` on an ephemeral port of agent_host(), or on `listen`
// ("IPv4:PORT", e.g. to restart an agent where it was). With --inline-kib 0
// unless the flags say otherwise: these tests move tiny caches, which
// serve would send on the control connection, and they are about the
// transports' data paths (the inline path has tests of its own).
class AgentProcess {
 public:
  static std::unique_ptr<AgentProcess> start(std::vector<std::string> flags,
                                             std::string listen = "") {
    if (listen.empty()) listen = agent_host() + ":0";
    std::vector<std::string> args = {kvmig_bin(), "serve", "--listen", listen};
    // Off loopback (the Soft-RoCE guest) an agent without a secret needs
    // --insecure; tests that want authentication pass --secret-file.
    if (agent_host() != "127.0.0.1") args.push_back("--insecure");
    if (std::find(flags.begin(), flags.end(), "--inline-kib") == flags.end()) {
      args.insert(args.end(), {"--inline-kib", "0"});
    }
    args.insert(args.end(), flags.begin(), flags.end());
    auto a = std::unique_ptr<AgentProcess>(new AgentProcess());
    a->child_ = Child::spawn(args);
    if (!a->child_) return nullptr;
    const std::string marker = "listening on ";
    if (!a->child_->wait_for(marker, std::chrono::seconds(30))) {
      ADD_FAILURE() << "agent did not start: " << a->child_->err();
      return nullptr;
    }
    std::string out = a->child_->out();
    size_t at = out.find(marker) + marker.size();
    a->address_ = out.substr(at, out.find('\n', at) - at);
    return a;
  }
  const std::string& address() const { return address_; }
  Child& child() { return *child_; }

 private:
  AgentProcess() = default;
  std::unique_ptr<Child> child_;
  std::string address_;
};

// A plain TCP connection to "IPv4:PORT", for sending raw bytes; -1 on
// failure. The caller closes it.
inline int dial_tcp(const std::string& address) {
  auto colon = address.rfind(':');
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port =
      htons(static_cast<uint16_t>(std::stoi(address.substr(colon + 1))));
  inet_pton(AF_INET, address.substr(0, colon).c_str(), &sa.sin_addr);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

struct CliResult {
  int code = -1;
  std::string out;
  std::string err;
};

// Runs `kvmig args...` to completion, in the working directory cwd (empty:
// this process's).
inline CliResult run_kvmig(
    std::vector<std::string> args,
    std::chrono::seconds limit = std::chrono::seconds(120),
    const std::string& cwd = "") {
  args.insert(args.begin(), kvmig_bin());
  auto c = Child::spawn(args, cwd);
  CliResult r;
  if (!c) return r;
  if (!c->wait_exit(limit)) {
    c->kill(SIGKILL);
    c->wait_exit(std::chrono::seconds(5));
    r.err = "timed out";
    return r;
  }
  r.code = c->exit_code();
  r.out = c->out();
  r.err = c->err();
  return r;
}

}  // namespace kvmig::testing

#endif  // KVMIG_TESTS_E2E_PROCESS_H_
