#include "kvmig/types.h"

#include <gtest/gtest.h>

#include <cstdint>

#include "testutil.h"

namespace kvmig {
namespace {

TEST(TypesTest, Presets) {
  ASSERT_OK_AND_ASSIGN(CacheMeta tiny, preset_meta("tiny"));
  EXPECT_EQ(tiny.page_bytes(), 8192u);
  EXPECT_EQ(tiny.to_string(), "16x2x2x64 f16");
  ASSERT_OK_AND_ASSIGN(CacheMeta llama, preset_meta("llama3-8b"));
  EXPECT_EQ(llama.page_bytes(), 1u << 20);
  EXPECT_EQ(llama.layer_chunk_bytes(), 32u << 10);
  EXPECT_EQ(llama.pages_for_tokens(1000), 63u);
  EXPECT_FALSE(preset_meta("gpt5").ok());
}

// A token count near 2^64 must not wrap to zero pages: every door that
// checks pages.size() == pages_for_tokens(n_tokens) relies on it.
TEST(TypesTest, PagesForTokensDoesNotWrap) {
  ASSERT_OK_AND_ASSIGN(CacheMeta tiny, preset_meta("tiny"));
  EXPECT_EQ(tiny.pages_for_tokens(0), 0u);
  EXPECT_EQ(tiny.pages_for_tokens(1), 1u);
  EXPECT_EQ(tiny.pages_for_tokens(16), 1u);
  EXPECT_EQ(tiny.pages_for_tokens(17), 2u);
  EXPECT_EQ(tiny.pages_for_tokens(UINT64_MAX), uint64_t{1} << 60);
  EXPECT_EQ(tiny.pages_for_tokens(UINT64_MAX - 15), (uint64_t{1} << 60) - 1);
  EXPECT_EQ(tiny.pages_for_tokens(UINT64_MAX - 14), uint64_t{1} << 60);
  CacheMeta odd{7, 1, 1, 1, Dtype::kF16};
  EXPECT_EQ(odd.pages_for_tokens(UINT64_MAX), UINT64_MAX / 7 + 1);
}

TEST(TypesTest, MetaValidation) {
  EXPECT_OK(CacheMeta({16, 2, 2, 64, Dtype::kF16}).validate());
  EXPECT_FALSE(CacheMeta({0, 2, 2, 64, Dtype::kF16}).validate().ok());
  EXPECT_FALSE(
      CacheMeta({16, 2, 2, 64, static_cast<Dtype>(9)}).validate().ok());
  Status huge = CacheMeta({1u << 20, 1u << 20, 64, 64, Dtype::kF32}).validate();
  EXPECT_EQ(huge.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(huge.message().find("1 GiB"), std::string::npos);
}

TEST(TypesTest, Dtypes) {
  for (Dtype d : {Dtype::kBf16, Dtype::kF16, Dtype::kF32, Dtype::kFp8E4m3}) {
    ASSERT_OK_AND_ASSIGN(Dtype back, parse_dtype(dtype_name(d)));
    EXPECT_EQ(back, d);
  }
  EXPECT_EQ(dtype_size(Dtype::kFp8E4m3), 1u);
  EXPECT_FALSE(parse_dtype("int4").ok());
}

TEST(TypesTest, LayoutValidation) {
  CacheMeta m{16, 2, 2, 64, Dtype::kF16};
  std::byte buf[64];
  PagerLayout page{{buf, 2 * m.page_bytes(), 2 * m.page_bytes(), 4}};
  EXPECT_OK(validate_layout(m, page));
  PagerLayout short_chunk{{buf, 2 * m.page_bytes(), m.page_bytes(), 4}};
  EXPECT_FALSE(validate_layout(m, short_chunk).ok());
  PagerLayout no_base{{nullptr, 2 * m.page_bytes(), 2 * m.page_bytes(), 4}};
  EXPECT_FALSE(validate_layout(m, no_base).ok());
  EXPECT_FALSE(validate_layout(m, {}).ok());
}

}  // namespace
}  // namespace kvmig
