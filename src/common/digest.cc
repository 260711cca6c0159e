#include "kvmig/digest.h"

#include <fmt/format.h>

#include <cstdlib>
#include <string>

#include "digest_internal.h"

namespace kvmig {

std::string Digest::hex() const {
  return fmt::format("{:016x}{:016x}", high, low);
}

namespace internal {

Xxh3State new_xxh3_state() {
  Xxh3State s(XXH3_createState());
  if (!s) std::abort();
  XXH3_64bits_reset(s.get());
  return s;
}

SeqDigester::SeqDigester(const CacheMeta& meta)
    : meta_(meta), state_(new_xxh3_state()) {
  XXH3_128bits_reset(state_.get());
}

void SeqDigester::add_page(std::span<const std::byte> k,
                           std::span<const std::byte> v,
                           uint64_t tokens_in_page) {
  const uint64_t chunk = meta_.layer_chunk_bytes();
  const uint64_t covered = tokens_in_page * meta_.token_bytes_per_layer();
  for (std::span<const std::byte> half : {k, v}) {
    for (uint32_t l = 0; l < meta_.n_layers; ++l) {
      XXH3_128bits_update(state_.get(), half.data() + l * chunk, covered);
    }
  }
}

Digest SeqDigester::finish() const {
  XXH128_hash_t h = XXH3_128bits_digest(state_.get());
  return Digest{h.high64, h.low64};
}

}  // namespace internal

Result<Digest> seq_digest(CachePager& pager, const LogicalSeq& seq) {
  const CacheMeta meta = pager.meta();
  if (seq.pages.size() != meta.pages_for_tokens(seq.n_tokens)) {
    return Status::invalid_argument(
        "seq_digest: seq " + std::to_string(seq.seq_id) + " has " +
        std::to_string(seq.pages.size()) + " pages, " +
        std::to_string(seq.n_tokens) + " tokens need " +
        std::to_string(meta.pages_for_tokens(seq.n_tokens)));
  }
  internal::SeqDigester digester(meta);
  for (size_t i = 0; i < seq.pages.size(); ++i) {
    Result<PageBytes> page = pager.read_page(seq.pages[i]);
    if (!page.ok()) {
      return page.status().with_context("seq_digest: seq " +
                                        std::to_string(seq.seq_id));
    }
    if (page->k.size() != meta.page_bytes() ||
        page->v.size() != meta.page_bytes()) {
      return Status::internal("seq_digest: pager returned a page of " +
                              std::to_string(page->k.size()) + "+" +
                              std::to_string(page->v.size()) + " bytes");
    }
    digester.add_page(page->k, page->v,
                      internal::tokens_in_page(meta, seq.n_tokens, i));
  }
  return digester.finish();
}

uint64_t page_checksum(const PageBytes& page) {
  internal::Xxh3State s = internal::new_xxh3_state();
  XXH3_64bits_update(s.get(), page.k.data(), page.k.size());
  XXH3_64bits_update(s.get(), page.v.data(), page.v.size());
  return XXH3_64bits_digest(s.get());
}

}  // namespace kvmig
