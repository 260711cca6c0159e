#include "random.h"

#include <fmt/format.h>
#include <openssl/rand.h>

#include <cstdlib>
#include <cstring>

#include "log.h"

namespace kvmig {

void random_bytes(std::span<uint8_t> out) {
  if (RAND_bytes(out.data(), static_cast<int>(out.size())) != 1) {
    logger("engine")->critical("RAND_bytes failed: no random bytes");
    std::abort();
  }
}

uint64_t random_token() {
  uint8_t b[8];
  random_bytes(b);
  uint64_t v;
  std::memcpy(&v, b, sizeof v);
  return v;
}

std::string new_migration_id() {
  // One draw: each RAND_bytes call takes the generator's lock and checks
  // for a fork with a system call.
  uint8_t b[16];
  random_bytes(b);
  uint64_t hi, lo;
  std::memcpy(&hi, b, sizeof hi);
  std::memcpy(&lo, b + 8, sizeof lo);
  return fmt::format("{:016x}{:016x}", hi, lo);
}

}  // namespace kvmig
