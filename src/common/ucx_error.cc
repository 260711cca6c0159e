#include "ucx_error.h"

#include <string>

namespace kvmig {

Status status_from_ucs(ucs_status_t s, std::string_view what) {
  if (s == UCS_OK) return Status();
  std::string msg = "ucx: " + std::string(what) + ": " + ucs_status_string(s);
  switch (s) {
    case UCS_ERR_TIMED_OUT:
      return Status::deadline_exceeded(std::move(msg));
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_REJECTED:
    case UCS_ERR_NOT_CONNECTED:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_CANCELED:
    case UCS_ERR_IO_ERROR:
    case UCS_ERR_SOME_CONNECTS_FAILED:
    case UCS_ERR_NO_DEVICE:
    case UCS_ERR_BUSY:
      return Status::unavailable(std::move(msg));
    case UCS_ERR_INVALID_PARAM:
    case UCS_ERR_INVALID_ADDR:
      return Status::invalid_argument(std::move(msg));
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE:
    case UCS_ERR_EXCEEDS_LIMIT:
      return Status::resource_exhausted(std::move(msg));
    case UCS_ERR_UNSUPPORTED:
    case UCS_ERR_NOT_IMPLEMENTED:
      return Status::unimplemented(std::move(msg));
    case UCS_ERR_NO_ELEM:
      return Status::not_found(std::move(msg));
    case UCS_ERR_ALREADY_EXISTS:
      return Status::already_exists(std::move(msg));
    default:
      return Status::internal(std::move(msg));
  }
}

}  // namespace kvmig
