// The digest definition shared by seq_digest() (pages read from a pager) and
// inspect_snapshot() (pages read from a file). Not thread-safe (a value).
#ifndef KVMIG_SRC_DIGEST_INTERNAL_H_
#define KVMIG_SRC_DIGEST_INTERNAL_H_

#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "kvmig/digest.h"
#include "kvmig/types.h"

namespace kvmig::internal {

// Owns an XXH3 streaming state.
struct Xxh3StateDeleter {
  void operator()(XXH3_state_t* s) const { XXH3_freeState(s); }
};
using Xxh3State = std::unique_ptr<XXH3_state_t, Xxh3StateDeleter>;

// A fresh state reset for XXH3-64 (and usable for XXH3-128 after
// XXH3_128bits_reset). Never null: aborts on allocation failure like new.
Xxh3State new_xxh3_state();

// Accumulates a request's digest page by page, in the request's page order.
class SeqDigester {
 public:
  explicit SeqDigester(const CacheMeta& meta);

  // Adds page i of the request, which holds tokens_in_page tokens
  // (page_size_tokens except maybe for the last page): for K then V, for each
  // layer in order, the first tokens_in_page tokens of that layer's chunk.
  // k and v are page_bytes() long; tokens_in_page <= page_size_tokens.
  void add_page(std::span<const std::byte> k, std::span<const std::byte> v,
                uint64_t tokens_in_page);

  Digest finish() const;

 private:
  CacheMeta meta_;
  Xxh3State state_;
};

// Tokens of page `page` (0-based) of a request of n_tokens tokens.
inline uint64_t tokens_in_page(const CacheMeta& meta, uint64_t n_tokens,
                               uint64_t page) {
  const uint64_t first = page * meta.page_size_tokens;
  if (first >= n_tokens) return 0;
  const uint64_t rest = n_tokens - first;
  return rest < meta.page_size_tokens ? rest : meta.page_size_tokens;
}

}  // namespace kvmig::internal

#endif  // KVMIG_SRC_DIGEST_INTERNAL_H_
