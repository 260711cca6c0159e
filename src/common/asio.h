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
#include <exception>
#include <string>

namespace kvmig {
namespace asio = boost::asio;

// What an exception_ptr holds, as text ("" for none).
inline std::string exception_text(const std::exception_ptr& e) {
  if (!e) return "";
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "unknown exception";
  }
}

// A co_spawn completion handler for coroutines nobody waits for: instead
// of asio::detached, which drops an exception silently, it logs it on
// `log` (a spdlog::logger pointer) naming `what`.
template <typename Logger>
auto log_exceptions(Logger log, std::string what) {
  return [log = std::move(log), what = std::move(what)](std::exception_ptr e) {
    if (e) log->error("{}: uncaught exception: {}", what, exception_text(e));
  };
}

}  // namespace kvmig

// KVMIG_RETURN_IF_ERROR for coroutines: co_returns the Status of `expr`
// from the enclosing coroutine if it is not ok.
#define KVMIG_CO_RETURN_IF_ERROR(expr)                \
  do {                                                \
    ::kvmig::Status kvmig_status_ = (expr);           \
    if (!kvmig_status_.ok()) co_return kvmig_status_; \
  } while (0)

#endif  // KVMIG_SRC_ASIO_H_
