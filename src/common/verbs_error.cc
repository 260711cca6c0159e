#include "verbs_error.h"

#include <string>

namespace kvmig {

Status status_from_wc(const ibv_wc& wc, std::string_view what) {
  std::string msg = "verbs: " + std::string(what) + ": " +
                    ibv_wc_status_str(wc.status) + " (QP " +
                    std::to_string(wc.qp_num) + ", vendor error " +
                    std::to_string(wc.vendor_err) + ")";
  switch (wc.status) {
    case IBV_WC_RETRY_EXC_ERR:
    case IBV_WC_RNR_RETRY_EXC_ERR:
    case IBV_WC_RESP_TIMEOUT_ERR:
    case IBV_WC_REM_ABORT_ERR:
    case IBV_WC_WR_FLUSH_ERR:
    case IBV_WC_FATAL_ERR:
      return Status::unavailable(std::move(msg));
    default:
      return Status::internal(std::move(msg));
  }
}

}  // namespace kvmig
