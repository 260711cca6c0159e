// libFuzzer target: inspect_snapshot() on an arbitrary file. The bytes go to
// an in-memory file (memfd), read back through its /proc/self/fd path. So
// that the fuzzer gets past the header checksum to the counts and tables
// behind it, the target rewrites that checksum to match (the header is
// kHeaderBytes = 60 bytes: 52 of body, then XXH3-64 of the body).
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "kvmig/snapshot.h"

namespace {

constexpr size_t kHeaderBodyBytes = 52;
constexpr size_t kHeaderBytes = kHeaderBodyBytes + 8;

int memory_file() {
  static const int fd = memfd_create("snapshot_fuzz", 0);
  if (fd < 0) std::abort();
  return fd;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<uint8_t> bytes(data, data + size);
  if (bytes.size() >= kHeaderBytes) {
    uint64_t sum = XXH3_64bits(bytes.data(), kHeaderBodyBytes);
    for (size_t i = 0; i < 8; ++i) {
      bytes[kHeaderBodyBytes + i] = static_cast<uint8_t>(sum >> (8 * i));
    }
  }
  const int fd = memory_file();
  if (ftruncate(fd, 0) != 0) std::abort();
  if (!bytes.empty() && pwrite(fd, bytes.data(), bytes.size(), 0) !=
                            static_cast<ssize_t>(bytes.size())) {
    std::abort();
  }
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  auto info = kvmig::inspect_snapshot(path);
  if (info.ok() && info->file_bytes != bytes.size()) std::abort();
  return 0;
}
