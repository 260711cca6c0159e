// Shared test helpers.
#ifndef KVMIG_TESTS_TESTUTIL_H_
#define KVMIG_TESTS_TESTUTIL_H_

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "kvmig/status.h"

// Asserts that a Status (or Result) is ok, printing it otherwise.
#define ASSERT_OK(expr)                                                 \
  do {                                                                  \
    const ::kvmig::Status kvmig_s_ = ::kvmig::testing::as_status(expr); \
    ASSERT_TRUE(kvmig_s_.ok()) << kvmig_s_.to_string();                 \
  } while (0)
#define EXPECT_OK(expr)                                                 \
  do {                                                                  \
    const ::kvmig::Status kvmig_s_ = ::kvmig::testing::as_status(expr); \
    EXPECT_TRUE(kvmig_s_.ok()) << kvmig_s_.to_string();                 \
  } while (0)

// Assigns the value of a Result to lhs, failing the test on error.
#define ASSERT_OK_AND_ASSIGN(lhs, expr) \
  ASSERT_OK_AND_ASSIGN_IMPL_(KVMIG_CONCAT_(kvmig_r_, __LINE__), lhs, expr)
#define ASSERT_OK_AND_ASSIGN_IMPL_(tmp, lhs, expr)   \
  auto tmp = (expr);                                 \
  ASSERT_TRUE(tmp.ok()) << tmp.status().to_string(); \
  lhs = std::move(tmp).value()

namespace kvmig::testing {

inline Status as_status(const Status& s) { return s; }
template <typename T>
Status as_status(const Result<T>& r) {
  return r.status();
}

// Polls pred every 20 ms until it holds or `limit` has passed; whether it
// held. For state that another thread or process reaches in its own time.
template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit) {
  const auto end = std::chrono::steady_clock::now() + limit;
  for (;;) {
    if (pred()) return true;
    if (std::chrono::steady_clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace kvmig::testing

#endif  // KVMIG_TESTS_TESTUTIL_H_
