// Random values for security tokens and ids, from OpenSSL's CSPRNG
// (RAND_bytes). Thread-safe.
#ifndef KVMIG_SRC_COMMON_RANDOM_H_
#define KVMIG_SRC_COMMON_RANDOM_H_

#include <cstdint>
#include <span>
#include <string>

namespace kvmig {

// Fills out with random bytes. Aborts the process if the generator fails (it
// never does on a seeded Linux system; a guessable token is worse).
void random_bytes(std::span<uint8_t> out);

// A random 64-bit value, for tokens a peer learns only over the
// (authenticated) control connection.
uint64_t random_token();

// A fresh random migration id: 32 hex digits.
std::string new_migration_id();

}  // namespace kvmig

#endif  // KVMIG_SRC_COMMON_RANDOM_H_
