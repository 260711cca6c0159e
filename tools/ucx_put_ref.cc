// ucx_put_ref: the reference number for the ucx transport. Raw ucp_put_nbx
// of --bytes in --chunk sized puts from this process into ucp_mem_map'd
// memory of a forked child, --iters times, each iteration ended by an
// endpoint flush (the point where the bytes have landed). Prints one JSON
// line: {"gbps":G,"bytes":N,"chunk":C,"iters":I,"seconds":S,"dst_order":O}.
//
// --dst-order random puts the source's chunks, read in order, at shuffled
// chunk positions of the target (a fixed permutation): the access pattern
// of kvmig's `--dst-order random` (pages read in source order, written to
// slots scattered over the pool), without kvmig.
//
// The processes exchange worker addresses and the rkey over a socketpair, so
// UCX may pick any transport between them (shared memory included); set
// UCX_TLS to compare with what a listener-made endpoint gets (e.g. tcp).
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace {

constexpr int kMaxInFlight = 64;

[[noreturn]] void die(const char* who, const char* what) {
  std::fprintf(stderr, "ucx_put_ref (%s): %s\n", who, what);
  std::exit(1);
}

void check(ucs_status_t s, const char* who, const char* what) {
  if (s != UCS_OK) {
    std::fprintf(stderr, "ucx_put_ref (%s): %s: %s\n", who, what,
                 ucs_status_string(s));
    std::exit(1);
  }
}

void send_all(int fd, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  while (n > 0) {
    const ssize_t k = write(fd, b, n);
    if (k <= 0) die("socket", "write failed");
    b += k;
    n -= static_cast<size_t>(k);
  }
}

void recv_all(int fd, void* p, size_t n) {
  auto* b = static_cast<uint8_t*>(p);
  while (n > 0) {
    const ssize_t k = read(fd, b, n);
    if (k <= 0) die("socket", "read failed (peer gone)");
    b += k;
    n -= static_cast<size_t>(k);
  }
}

void send_blob(int fd, const void* p, uint64_t n) {
  send_all(fd, &n, sizeof(n));
  send_all(fd, p, n);
}

std::vector<uint8_t> recv_blob(int fd) {
  uint64_t n = 0;
  recv_all(fd, &n, sizeof(n));
  if (n > (1u << 20)) die("socket", "blob too large");
  std::vector<uint8_t> v(n);
  recv_all(fd, v.data(), n);
  return v;
}

// Where chunk k of the source (bytes in chunks, the last one maybe short)
// lands at the target, in chunks: k itself, or a fixed shuffle (the same
// in both processes).
std::vector<size_t> destination_order(size_t bytes, size_t chunk,
                                      bool shuffle) {
  std::vector<size_t> order(bytes / chunk + (bytes % chunk != 0));
  std::iota(order.begin(), order.end(), size_t{0});
  if (shuffle) std::shuffle(order.begin(), order.end(), std::mt19937_64(42));
  return order;
}

// The byte at offset i of every iteration's source and target.
uint8_t pattern(size_t i) {
  return static_cast<uint8_t>((i * 131) ^ (i >> 12));
}

struct Ucx {
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;

  explicit Ucx(const char* who) {
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_RMA;
    check(ucp_init(&params, nullptr, &context), who, "ucp_init");
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    check(ucp_worker_create(context, &wp, &worker), who, "ucp_worker_create");
  }
  ~Ucx() {
    ucp_worker_destroy(worker);
    ucp_cleanup(context);
  }
  Ucx(const Ucx&) = delete;
  Ucx& operator=(const Ucx&) = delete;

  ucp_mem_h map(void* p, size_t n, const char* who) const {
    ucp_mem_map_params_t mp{};
    mp.field_mask =
        UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = p;
    mp.length = n;
    ucp_mem_h memh = nullptr;
    check(ucp_mem_map(context, &mp, &memh), who, "ucp_mem_map");
    return memh;
  }

  // Progresses until the request completes; returns its status.
  ucs_status_t wait(ucs_status_ptr_t r) const {
    if (!UCS_PTR_IS_PTR(r)) return UCS_PTR_STATUS(r);
    ucs_status_t s;
    while ((s = ucp_request_check_status(r)) == UCS_INPROGRESS) {
      ucp_worker_progress(worker);
    }
    ucp_request_free(r);
    return s;
  }
};

void* map_memory(size_t n, const char* who) {
  void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) die(who, "mmap failed");
  return p;
}

// The target: maps memory, sends its address and rkey, progresses until the
// initiator is done, then checks the bytes and answers 1 (equal) or 0.
int run_target(int fd, size_t bytes, size_t chunk, bool shuffle) {
  const char* who = "target";
  auto* mem = static_cast<uint8_t*>(map_memory(bytes, who));
  std::memset(mem, 0, bytes);
  int rc = 0;
  {
    Ucx ucx(who);
    ucp_mem_h memh = ucx.map(mem, bytes, who);
    void* rkey = nullptr;
    size_t rkey_len = 0;
    check(ucp_rkey_pack(ucx.context, memh, &rkey, &rkey_len), who,
          "ucp_rkey_pack");
    ucp_address_t* addr = nullptr;
    size_t addr_len = 0;
    check(ucp_worker_get_address(ucx.worker, &addr, &addr_len), who,
          "ucp_worker_get_address");
    send_blob(fd, addr, addr_len);
    const uint64_t base = reinterpret_cast<uintptr_t>(mem);
    send_all(fd, &base, sizeof(base));
    send_blob(fd, rkey, rkey_len);
    ucp_rkey_buffer_release(rkey);
    ucp_worker_release_address(ucx.worker, addr);

    // Progress (puts may be emulated with active messages) until told done.
    for (;;) {
      ucp_worker_progress(ucx.worker);
      uint8_t b = 0;
      const ssize_t k = recv(fd, &b, 1, MSG_DONTWAIT);
      if (k == 1) break;
      if (k == 0) die(who, "initiator went away");
    }
    uint8_t ok = 1;
    const std::vector<size_t> order = destination_order(bytes, chunk, shuffle);
    for (size_t i = 0; i < bytes && ok; ++i) {
      if (mem[order[i / chunk] * chunk + i % chunk] != pattern(i)) ok = 0;
    }
    send_all(fd, &ok, 1);
    uint8_t bye = 0;
    recv_all(fd, &bye, 1);  // the initiator closed its endpoint
    check(ucp_mem_unmap(ucx.context, memh), who, "ucp_mem_unmap");
  }
  munmap(mem, bytes);
  return rc;
}

struct InFlight {
  int n = 0;
  ucs_status_t first_error = UCS_OK;
};

void on_put(void* req, ucs_status_t s, void* user) {
  auto* f = static_cast<InFlight*>(user);
  --f->n;
  if (s != UCS_OK && f->first_error == UCS_OK) f->first_error = s;
  ucp_request_free(req);
}

int run_initiator(int fd, size_t bytes, size_t chunk, int iters, bool shuffle) {
  const char* who = "initiator";
  auto* src = static_cast<uint8_t*>(map_memory(bytes, who));
  for (size_t i = 0; i < bytes; ++i) src[i] = pattern(i);
  double seconds = 0;
  uint8_t verified = 0;
  {
    Ucx ucx(who);
    ucp_mem_h memh = ucx.map(src, bytes, who);
    const auto peer = recv_blob(fd);
    uint64_t base = 0;
    recv_all(fd, &base, sizeof(base));
    const auto packed_rkey = recv_blob(fd);

    ucp_ep_params_t ep_params{};
    ep_params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
    ep_params.address = reinterpret_cast<const ucp_address_t*>(peer.data());
    ucp_ep_h ep = nullptr;
    check(ucp_ep_create(ucx.worker, &ep_params, &ep), who, "ucp_ep_create");
    ucp_rkey_h rkey = nullptr;
    check(ucp_ep_rkey_unpack(ep, packed_rkey.data(), &rkey), who,
          "ucp_ep_rkey_unpack");

    InFlight inflight;
    ucp_request_param_t put{};
    put.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK |
                       UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMH;
    put.cb.send = on_put;
    put.user_data = &inflight;
    put.memh = memh;
    ucp_request_param_t flush{};

    const std::vector<size_t> order = destination_order(bytes, chunk, shuffle);
    auto one_pass = [&] {
      for (size_t off = 0; off < bytes; off += chunk) {
        while (inflight.n >= kMaxInFlight) ucp_worker_progress(ucx.worker);
        const size_t n = std::min(chunk, bytes - off);
        ucs_status_ptr_t r = ucp_put_nbx(
            ep, src + off, n, base + order[off / chunk] * chunk, rkey, &put);
        if (UCS_PTR_IS_PTR(r)) {
          ++inflight.n;
        } else {
          check(UCS_PTR_STATUS(r), who, "ucp_put_nbx");
        }
      }
      // Local completion is not delivery: only the flush says it landed.
      check(ucx.wait(ucp_ep_flush_nbx(ep, &flush)), who, "ucp_ep_flush_nbx");
      while (inflight.n > 0) ucp_worker_progress(ucx.worker);
      check(inflight.first_error, who, "put completion");
    };

    one_pass();  // warm-up: wire-up, registration caches
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) one_pass();
    seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
            .count();

    const uint8_t done = 1;
    send_all(fd, &done, 1);
    recv_all(fd, &verified, 1);

    ucp_rkey_destroy(rkey);
    ucp_request_param_t close{};
    close.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    close.flags = 0;  // graceful: flushes first
    const ucs_status_t cs = ucx.wait(ucp_ep_close_nbx(ep, &close));
    if (cs != UCS_OK) {
      std::fprintf(stderr, "ucx_put_ref: ucp_ep_close_nbx: %s\n",
                   ucs_status_string(cs));
    }
    send_all(fd, &done, 1);
    check(ucp_mem_unmap(ucx.context, memh), who, "ucp_mem_unmap");
  }
  munmap(src, bytes);
  if (!verified) die(who, "target memory does not match the source");
  const double total = static_cast<double>(bytes) * iters;
  std::printf(
      "{\"gbps\":%.3f,\"bytes\":%zu,\"chunk\":%zu,\"iters\":%d,"
      "\"seconds\":%.6f,\"dst_order\":\"%s\"}\n",
      total / seconds / 1e9, bytes, chunk, iters, seconds,
      shuffle ? "random" : "contiguous");
  return 0;
}

bool parse_size(const char* s, size_t& out) {
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s, &end, 10);
  if (end == s || *end != '\0' || v == 0) return false;
  out = static_cast<size_t>(v);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  size_t bytes = size_t{1} << 30;
  size_t chunk = size_t{2} << 20;
  size_t iters = 5;
  bool shuffle = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--dst-order" && i + 1 < argc) {
      const std::string_view v = argv[++i];
      if (v == "random" || v == "contiguous") {
        shuffle = v == "random";
        continue;
      }
    }
    size_t* dst = a == "--bytes"   ? &bytes
                  : a == "--chunk" ? &chunk
                  : a == "--iters" ? &iters
                                   : nullptr;
    if (dst == nullptr || i + 1 >= argc || !parse_size(argv[++i], *dst)) {
      std::fprintf(stderr,
                   "usage: ucx_put_ref [--bytes N] [--chunk C] [--iters I] "
                   "[--dst-order contiguous|random]\n");
      return 2;
    }
  }
  if (chunk > bytes) chunk = bytes;
  if (shuffle && bytes % chunk != 0) {
    std::fprintf(stderr,
                 "ucx_put_ref: --dst-order random needs --bytes a multiple "
                 "of --chunk\n");
    return 2;
  }

  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) die("main", "socketpair");
  const pid_t child = fork();
  if (child < 0) die("main", "fork");
  if (child == 0) {
    close(fds[0]);
    std::exit(run_target(fds[1], bytes, chunk, shuffle));
  }
  close(fds[1]);
  const int rc =
      run_initiator(fds[0], bytes, chunk, static_cast<int>(iters), shuffle);
  int status = 0;
  waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    die("main", "target process failed");
  }
  return rc;
}
