// memcpy_ref: the single-host ceiling for the benchmarks. Copies --bytes
// from one buffer into another in --chunk sized memcpy calls, --iters times
// after one unmeasured pass, on one thread. Both buffers are mmap'd and
// faulted in first (MAP_POPULATE), as the synthetic pager's pools are.
// Prints one JSON line: {"gbps":G,"bytes":N,"chunk":C,"iters":I,"seconds":S}.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>

namespace {

bool parse_size(const char* s, size_t& out) {
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s, &end, 10);
  if (end == s || *end != '\0' || v == 0) return false;
  out = static_cast<size_t>(v);
  return true;
}

void* map(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("memcpy_ref: mmap");
    std::exit(1);
  }
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  size_t bytes = size_t{1} << 30;
  size_t chunk = size_t{2} << 20;
  size_t iters = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    size_t* dst = a == "--bytes"   ? &bytes
                  : a == "--chunk" ? &chunk
                  : a == "--iters" ? &iters
                                   : nullptr;
    if (dst == nullptr || i + 1 >= argc || !parse_size(argv[++i], *dst)) {
      std::fprintf(stderr,
                   "usage: memcpy_ref [--bytes N] [--chunk C] [--iters I]\n");
      return 2;
    }
  }
  if (chunk > bytes) chunk = bytes;
  auto* src = static_cast<unsigned char*>(map(bytes));
  auto* dst = static_cast<unsigned char*>(map(bytes));
  std::memset(src, 0x5a, bytes);
  auto pass = [&] {
    for (size_t off = 0; off < bytes; off += chunk) {
      std::memcpy(dst + off, src + off, std::min(chunk, bytes - off));
    }
  };
  pass();
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < iters; ++i) pass();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
          .count();
  if (std::memcmp(dst, src, bytes) != 0) {
    std::fprintf(stderr, "memcpy_ref: copy does not match\n");
    return 1;
  }
  std::printf(
      "{\"gbps\":%.3f,\"bytes\":%zu,\"chunk\":%zu,\"iters\":%zu,"
      "\"seconds\":%.6f}\n",
      static_cast<double>(bytes) * iters / seconds / 1e9, bytes, chunk, iters,
      seconds);
  munmap(src, bytes);
  munmap(dst, bytes);
  return 0;
}
