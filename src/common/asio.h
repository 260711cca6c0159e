// The one place kvmig includes Boost.Asio. Boost 1.74's awaitable.hpp uses
// std::exchange without including <utility>.
//
// Coroutine rule (GCC 12): never put a brace-initialised temporary
// (`co_await f(encode(Msg{...}))`) in a co_await full-expression: GCC 12
// destroys it twice. Build payloads and statuses into named locals first.
#ifndef KVMIG_SRC_ASIO_H_
#define KVMIG_SRC_ASIO_H_

// clang-format off
#include <utility>  // before Asio, see above
#include <boost/asio.hpp>
// clang-format on

namespace kvmig {
namespace asio = boost::asio;
}  // namespace kvmig

// KVMIG_RETURN_IF_ERROR for coroutines: co_returns the Status of `expr`
// from the enclosing coroutine if it is not ok.
#define KVMIG_CO_RETURN_IF_ERROR(expr)                \
  do {                                                \
    ::kvmig::Status kvmig_status_ = (expr);           \
    if (!kvmig_status_.ok()) co_return kvmig_status_; \
  } while (0)

#endif  // KVMIG_SRC_ASIO_H_
