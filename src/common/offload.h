// Asio glue for the control plane: run blocking work on a thread pool and
// resume the awaiting coroutine with its result.
#ifndef KVMIG_SRC_COMMON_OFFLOAD_H_
#define KVMIG_SRC_COMMON_OFFLOAD_H_

#include <optional>
#include <utility>

#include "asio.h"

namespace kvmig {

// Runs f() on pool and resumes the caller (on its own executor) with f()'s
// result. f must not throw.
template <typename F>
auto offload(asio::thread_pool& pool, F f) -> asio::awaitable<decltype(f())> {
  using R = decltype(f());
  // co_spawn needs a default-constructible result: carry it in optional.
  std::optional<R> out = co_await asio::co_spawn(
      pool,
      [f = std::move(f)]() mutable -> asio::awaitable<std::optional<R>> {
        co_return std::optional<R>(f());
      },
      asio::use_awaitable);
  co_return std::move(*out);
}

}  // namespace kvmig

#endif  // KVMIG_SRC_COMMON_OFFLOAD_H_
