// The one mapper from a verbs work completion's status (ibv_wc_status) to
// Status (built with the verbs transport). Stateless; thread-safe.
#ifndef KVMIG_SRC_COMMON_VERBS_ERROR_H_
#define KVMIG_SRC_COMMON_VERBS_ERROR_H_

#include <infiniband/verbs.h>

#include <string_view>

#include "kvmig/status.h"

namespace kvmig {

// The one mapper from a work completion's status to Status: the peer or the
// path failing is Unavailable, anything else (a bad key, a local protection
// error: a bug) Internal.
Status status_from_wc(const ibv_wc& wc, std::string_view what);

}  // namespace kvmig

#endif  // KVMIG_SRC_COMMON_VERBS_ERROR_H_
