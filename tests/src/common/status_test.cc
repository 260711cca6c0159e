#include "kvmig/status.h"

#include <gtest/gtest.h>

#include "testutil.h"

namespace kvmig {
namespace {

Result<int> half(int x) {
  if (x % 2) return Status::invalid_argument("odd: " + std::to_string(x));
  return x / 2;
}

Status quarter(int x, int& out) {
  KVMIG_ASSIGN_OR_RETURN(int h, half(x));
  KVMIG_ASSIGN_OR_RETURN(out, half(h));
  return Status();
}

TEST(StatusTest, OkAndErrors) {
  EXPECT_TRUE(Status().ok());
  Status s = Status::not_found("seq 7");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_EQ(s.to_string(), "NotFound: seq 7");
  EXPECT_EQ(s.with_context("migrate").message(), "migrate: seq 7");
  EXPECT_TRUE(Status().with_context("x").ok());
}

TEST(StatusTest, ResultAndMacros) {
  int out = 0;
  ASSERT_OK(quarter(8, out));
  EXPECT_EQ(out, 2);
  Status s = quarter(6, out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "odd: 3");
  Result<int> r = half(3);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvmig
