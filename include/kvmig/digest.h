// Content digests of requests and checksums of pages.
#ifndef KVMIG_DIGEST_H_
#define KVMIG_DIGEST_H_

#include <cstdint>
#include <string>

#include "kvmig/pager.h"
#include "kvmig/status.h"
#include "kvmig/types.h"

namespace kvmig {

// A 128-bit XXH3 digest.
struct Digest {
  uint64_t high = 0;
  uint64_t low = 0;

  // 32 lowercase hex digits, high half first.
  std::string hex() const;

  friend bool operator==(const Digest&, const Digest&) = default;
};

// The digest of a request's content: XXH3-128 over, for each page of the
// sequence in order, the K bytes and then the V bytes of its tokens only
// (the first n_tokens tokens of the request; the unused tail of the last page
// is not covered), layer by layer in canonical order. It does not depend on
// which slots hold the pages, so equal digests before and after a migration
// mean the request arrived intact. Reads pages with read_page(); the caller
// pauses the pager if the sequence may change meanwhile.
Result<Digest> seq_digest(CachePager& pager, const LogicalSeq& seq);

// XXH3-64 over a whole page in canonical byte order (K then V).
uint64_t page_checksum(const PageBytes& page);

}  // namespace kvmig

#endif  // KVMIG_DIGEST_H_
