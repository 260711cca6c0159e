// "HOST:PORT" addresses of agents. Stateless; thread-safe.
#ifndef KVMIG_SRC_PROTOCOL_HOST_PORT_H_
#define KVMIG_SRC_PROTOCOL_HOST_PORT_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "kvmig/status.h"

namespace kvmig {

struct HostPort {
  std::string host;
  uint16_t port = 0;
};

// Splits "HOST:PORT" (IPv4, a name, or [IPv6]). InvalidArgument otherwise.
Result<HostPort> parse_host_port(std::string_view text);

}  // namespace kvmig

#endif  // KVMIG_SRC_PROTOCOL_HOST_PORT_H_
