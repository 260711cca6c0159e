// One mapper per foreign error space, each to the one error model (Status):
// errno values, and Boost.System / Asio error codes. The UCX and verbs
// mappers sit beside them in ucx_error.h and verbs_error.h (built with their
// transports). Every message is "<what>: <the foreign text>". Stateless;
// thread-safe.
#ifndef KVMIG_SRC_COMMON_ERRORS_H_
#define KVMIG_SRC_COMMON_ERRORS_H_

#include <boost/system/error_code.hpp>
#include <string_view>

#include "kvmig/status.h"

namespace kvmig {

// errno: a missing file NotFound; no space or memory ResourceExhausted; no
// permission FailedPrecondition; a device or network that is gone
// Unavailable; a timeout DeadlineExceeded; anything else Internal.
Status status_from_errno(int err, std::string_view what);

// Asio: a peer that went away or cannot be reached (or an operation
// cancelled because its socket was closed) Unavailable; a timeout
// DeadlineExceeded; an unknown host name NotFound; anything else Internal.
// A caller that cancels an operation for its own deadline reports
// DeadlineExceeded itself before asking this mapper.
Status status_from_error(const boost::system::error_code& ec,
                         std::string_view what);

}  // namespace kvmig

#endif  // KVMIG_SRC_COMMON_ERRORS_H_
