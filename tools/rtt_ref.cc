// rtt_ref: the unit of a migration's fixed cost in the benchmarks. Two
// processes (this one and a forked child) on loopback TCP with Nagle off
// send one 64-byte message back and forth, --iters times after --warmup
// unmeasured ones; each round trip is timed on its own.
//
// --bytes N makes the request N bytes (the answer stays 64): one transfer
// of N bytes on a warm connection, from the first byte sent to its answer,
// with blocking sockets and nothing else to do: what moving N bytes in one
// go costs to start and finish, which a stream like iperf3's, never
// waiting for an answer, hides. Not a floor: a 1 MiB inline migration
// (protocol 13) has measured below it (docs/performance.md).
//
// Prints one JSON line: {"p50_us":P,"min_us":M,"p99_us":Q,"iters":I,
// "bytes":N,"gbps":G}, G being N times the iterations over their summed
// time (10^9 bytes/s), as `kvmig perf` counts its GB/s.
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

namespace {

constexpr size_t kAnswer = 64;
constexpr size_t kMaxBytes = size_t{1} << 30;

[[noreturn]] void die(const char* what) {
  std::perror(what);
  std::exit(1);
}

bool parse_count(const char* s, size_t& out) {
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s, &end, 10);
  if (end == s || *end != '\0' || v == 0) return false;
  out = static_cast<size_t>(v);
  return true;
}

void no_delay(int fd) {
  const int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) {
    die("rtt_ref: TCP_NODELAY");
  }
}

// Moves exactly n bytes, or exits.
void send_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t k = send(fd, p, n, 0);
    if (k <= 0) die("rtt_ref: send");
    p += k;
    n -= static_cast<size_t>(k);
  }
}

bool recv_all(int fd, char* p, size_t n) {
  while (n > 0) {
    const ssize_t k = recv(fd, p, n, 0);
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  size_t iters = 2000;
  size_t warmup = 200;
  size_t bytes = kAnswer;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    size_t* dst = a == "--iters"    ? &iters
                  : a == "--warmup" ? &warmup
                  : a == "--bytes"  ? &bytes
                                    : nullptr;
    if (dst == nullptr || i + 1 >= argc || !parse_count(argv[++i], *dst) ||
        bytes > kMaxBytes) {
      std::fprintf(stderr,
                   "usage: rtt_ref [--iters N] [--warmup N] [--bytes N (at "
                   "most 1 GiB)]\n");
      return 2;
    }
  }
  const int lfd = socket(AF_INET, SOCK_STREAM, 0);
  if (lfd < 0) die("rtt_ref: socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (bind(lfd, reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
      listen(lfd, 1) != 0 ||
      getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    die("rtt_ref: listen");
  }
  const pid_t child = fork();
  if (child < 0) die("rtt_ref: fork");
  std::vector<char> request(bytes);
  std::array<char, kAnswer> answer{};
  if (child == 0) {  // answers each request until the parent closes
    const int fd = accept(lfd, nullptr, nullptr);
    if (fd < 0) die("rtt_ref: accept");
    no_delay(fd);
    while (recv_all(fd, request.data(), request.size())) {
      send_all(fd, answer.data(), answer.size());
    }
    _exit(0);
  }
  close(lfd);
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0 ||
      connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    die("rtt_ref: connect");
  }
  no_delay(fd);
  std::vector<double> us;
  us.reserve(iters);
  for (size_t i = 0; i < warmup + iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    send_all(fd, request.data(), request.size());
    if (!recv_all(fd, answer.data(), answer.size())) die("rtt_ref: recv");
    const auto t1 = std::chrono::steady_clock::now();
    if (i >= warmup) {
      us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
  }
  close(fd);
  int status = 0;
  waitpid(child, &status, 0);
  double total_us = 0;
  for (double u : us) total_us += u;
  const double gbps = static_cast<double>(bytes) *
                      static_cast<double>(us.size()) / total_us / 1e3;
  std::sort(us.begin(), us.end());
  std::printf(
      "{\"p50_us\":%.2f,\"min_us\":%.2f,\"p99_us\":%.2f,\"iters\":%zu,"
      "\"bytes\":%zu,\"gbps\":%.3f}\n",
      us[us.size() / 2], us.front(), us[us.size() * 99 / 100], us.size(), bytes,
      gbps);
  return 0;
}
