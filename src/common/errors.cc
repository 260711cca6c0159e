#include "errors.h"

#include <cerrno>
#include <cstring>
#include <string>

#include "asio.h"

namespace kvmig {

Status status_from_errno(int err, std::string_view what) {
  std::string msg = std::string(what) + ": " + std::strerror(err);
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return Status::not_found(std::move(msg));
    case ENOSPC:
    case EDQUOT:
    case ENOMEM:
    case EAGAIN:
      return Status::resource_exhausted(std::move(msg));
    case EACCES:
    case EPERM:
    case EROFS:
      return Status::failed_precondition(std::move(msg));
    case ENODEV:
    case ENXIO:
    case ENETDOWN:
      return Status::unavailable(std::move(msg));
    case ETIMEDOUT:
      return Status::deadline_exceeded(std::move(msg));
    default:
      return Status::internal(std::move(msg));
  }
}

Status status_from_error(const boost::system::error_code& ec,
                         std::string_view what) {
  namespace e = asio::error;
  std::string msg = std::string(what) + ": " + ec.message();
  if (ec == e::timed_out) return Status::deadline_exceeded(std::move(msg));
  if (ec == e::host_not_found || ec == e::host_not_found_try_again) {
    return Status::not_found(std::move(msg));
  }
  if (ec == e::eof || ec == e::connection_reset ||
      ec == e::connection_refused || ec == e::connection_aborted ||
      ec == e::broken_pipe || ec == e::not_connected || ec == e::shut_down ||
      ec == e::host_unreachable || ec == e::network_unreachable ||
      ec == e::network_down || ec == e::network_reset ||
      ec == e::operation_aborted || ec == e::bad_descriptor) {
    return Status::unavailable(std::move(msg));
  }
  return Status::internal(std::move(msg));
}

}  // namespace kvmig
