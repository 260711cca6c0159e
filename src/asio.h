// The one place kvmig includes Boost.Asio. Boost 1.74's awaitable.hpp uses
// std::exchange without including <utility>.
#ifndef KVMIG_SRC_ASIO_H_
#define KVMIG_SRC_ASIO_H_

#include <utility>

#include <boost/asio.hpp>

namespace kvmig {
namespace asio = boost::asio;
}  // namespace kvmig

#endif  // KVMIG_SRC_ASIO_H_
