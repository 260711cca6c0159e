#include "kvmig/digest.h"

#include <gtest/gtest.h>
#include <xxhash.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "synthetic_pager.h"
#include "testutil.h"

namespace kvmig {
namespace {

CacheMeta tiny() { return *preset_meta("tiny"); }

std::unique_ptr<SyntheticPager> make(PoolLayout layout, uint32_t capacity) {
  auto r = SyntheticPager::create(tiny(), layout, capacity);
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return r.ok() ? std::move(r).value() : nullptr;
}

// Copies seq from `from` into fresh slots of `to` (in reverse slot order)
// and installs it there; returns the new page table.
LogicalSeq copy_seq(SyntheticPager& from, SyntheticPager& to,
                    const LogicalSeq& seq) {
  auto slots = to.allocate_pages(static_cast<uint32_t>(seq.pages.size()));
  EXPECT_TRUE(slots.ok()) << slots.status().to_string();
  std::vector<PageIndex> dst = *slots;
  std::reverse(dst.begin(), dst.end());
  for (size_t i = 0; i < seq.pages.size(); ++i) {
    auto page = from.read_page(seq.pages[i]);
    EXPECT_TRUE(page.ok());
    EXPECT_OK(to.write_page(dst[i], *page));
  }
  LogicalSeq out{seq.seq_id, seq.n_tokens, dst};
  EXPECT_OK(to.install_logical_seqs({out}));
  return out;
}

TEST(DigestTest, HexIsHighThenLowLowercase) {
  Digest d{0x0123456789abcdefull, 0xabcull};
  EXPECT_EQ(d.hex(), "0123456789abcdef0000000000000abc");
  EXPECT_EQ(Digest{}.hex(), std::string(32, '0'));
  EXPECT_EQ(Digest({~0ull, ~0ull}).hex(), std::string(32, 'f'));
}

TEST(DigestTest, MatchesTheDefinition) {
  auto pager = make(PoolLayout::kLayer, 16);
  ASSERT_OK(pager->populate(1, 20, 3));
  const LogicalSeq seq = (*pager->logical_seqs())[0];
  const CacheMeta m = tiny();
  std::vector<std::byte> covered;
  for (size_t i = 0; i < seq.pages.size(); ++i) {
    ASSERT_OK_AND_ASSIGN(PageBytes page, pager->read_page(seq.pages[i]));
    const uint64_t tokens = i == 0 ? 16 : 4;
    for (const auto* half : {&page.k, &page.v}) {
      for (uint32_t l = 0; l < m.n_layers; ++l) {
        auto start = half->begin() + l * m.layer_chunk_bytes();
        covered.insert(covered.end(), start,
                       start + tokens * m.token_bytes_per_layer());
      }
    }
  }
  XXH128_hash_t h = XXH3_128bits(covered.data(), covered.size());
  ASSERT_OK_AND_ASSIGN(Digest d, seq_digest(*pager, seq));
  EXPECT_EQ(d, (Digest{h.high64, h.low64}));
}

TEST(DigestTest, IndependentOfSlotsAndLayout) {
  auto a = make(PoolLayout::kPage, 32);
  auto b = make(PoolLayout::kLayer, 32);
  ASSERT_OK(b->allocate_pages(7));
  ASSERT_OK(a->populate(2, 37, 11, 16));
  ASSERT_OK_AND_ASSIGN(const std::vector<LogicalSeq> seqs, a->logical_seqs());
  for (const LogicalSeq& seq : seqs) {
    LogicalSeq moved = copy_seq(*a, *b, seq);
    EXPECT_NE(moved.pages, seq.pages);
    ASSERT_OK_AND_ASSIGN(Digest da, seq_digest(*a, seq));
    ASSERT_OK_AND_ASSIGN(Digest db, seq_digest(*b, moved));
    EXPECT_EQ(da, db) << seq.seq_id;
  }
}

TEST(DigestTest, CoversEveryTokenByteButNotTheTail) {
  auto pager = make(PoolLayout::kPage, 16);
  ASSERT_OK(pager->populate(1, 20, 3));  // page 1 holds tokens 16..19
  const LogicalSeq seq = (*pager->logical_seqs())[0];
  const CacheMeta m = tiny();
  ASSERT_OK_AND_ASSIGN(const Digest before, seq_digest(*pager, seq));
  ASSERT_OK_AND_ASSIGN(const PageBytes orig, pager->read_page(seq.pages[1]));

  // A byte of V, layer 1, token 3 of the last page (covered).
  PageBytes changed = orig;
  changed.v[m.layer_chunk_bytes() + 3 * m.token_bytes_per_layer() + 5] ^=
      std::byte{1};
  ASSERT_OK(pager->write_page(seq.pages[1], changed));
  ASSERT_OK_AND_ASSIGN(Digest d, seq_digest(*pager, seq));
  EXPECT_NE(d, before);

  // Bytes of tokens 4..15 of the last page, in K and V of every layer (the
  // unused tail): not covered.
  changed = orig;
  for (uint32_t l = 0; l < m.n_layers; ++l) {
    changed.k[l * m.layer_chunk_bytes() + 4 * m.token_bytes_per_layer()] ^=
        std::byte{0xff};
    changed.v[(l + 1) * m.layer_chunk_bytes() - 1] ^= std::byte{0x80};
  }
  ASSERT_OK(pager->write_page(seq.pages[1], changed));
  ASSERT_OK_AND_ASSIGN(d, seq_digest(*pager, seq));
  EXPECT_EQ(d, before);

  // The first page's last byte of K layer 0 (covered: a full page).
  ASSERT_OK_AND_ASSIGN(PageBytes first, pager->read_page(seq.pages[0]));
  first.k[m.layer_chunk_bytes() - 1] ^= std::byte{2};
  ASSERT_OK(pager->write_page(seq.pages[0], first));
  ASSERT_OK_AND_ASSIGN(d, seq_digest(*pager, seq));
  EXPECT_NE(d, before);
}

TEST(DigestTest, RejectsAMalformedSeq) {
  auto pager = make(PoolLayout::kPage, 16);
  ASSERT_OK(pager->populate(1, 20, 3));
  LogicalSeq seq = (*pager->logical_seqs())[0];
  seq.n_tokens = 40;
  EXPECT_EQ(seq_digest(*pager, seq).status().code(),
            StatusCode::kInvalidArgument);
  seq.n_tokens = 20;
  seq.pages[1] = 9;  // a free slot
  EXPECT_EQ(seq_digest(*pager, seq).status().code(),
            StatusCode::kFailedPrecondition);
}

TEST(DigestTest, PageChecksumIsXxh3OfKThenV) {
  PageBytes page;
  page.k = {std::byte{1}, std::byte{2}, std::byte{3}};
  page.v = {std::byte{4}, std::byte{5}};
  const uint8_t all[] = {1, 2, 3, 4, 5};
  EXPECT_EQ(page_checksum(page), XXH3_64bits(all, sizeof(all)));
  PageBytes swapped{page.v, page.k};
  EXPECT_NE(page_checksum(swapped), page_checksum(page));
}

}  // namespace
}  // namespace kvmig
