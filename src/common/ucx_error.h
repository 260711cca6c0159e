// The one mapper from UCX's ucs_status_t to Status (built with the ucx
// transport). Stateless; thread-safe.
#ifndef KVMIG_SRC_COMMON_UCX_ERROR_H_
#define KVMIG_SRC_COMMON_UCX_ERROR_H_

#include <ucs/type/status.h>

#include <string_view>

#include "kvmig/status.h"

namespace kvmig {

// UCS_OK is success; a peer that went away or cannot be reached
// Unavailable; a timeout DeadlineExceeded; a bad parameter or address
// InvalidArgument; no memory or resource ResourceExhausted; anything else
// Internal. The message is "ucx: <what>: <UCX's text>".
Status status_from_ucs(ucs_status_t s, std::string_view what);

}  // namespace kvmig

#endif  // KVMIG_SRC_COMMON_UCX_ERROR_H_
