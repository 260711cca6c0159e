#include "host_port.h"

#include <charconv>
#include <string>

namespace kvmig {

Result<HostPort> parse_host_port(std::string_view text) {
  auto bad = [&](std::string_view why) {
    return Status::invalid_argument("address '" + std::string(text) + "': " +
                                    std::string(why) + " (expected HOST:PORT)");
  };
  size_t colon = text.rfind(':');
  if (colon == std::string_view::npos) return bad("no port");
  std::string_view host = text.substr(0, colon);
  std::string_view port = text.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  } else if (host.find(':') != std::string_view::npos) {
    return bad("IPv6 hosts go in brackets");
  }
  if (host.empty()) return bad("empty host");
  unsigned value = 0;
  auto [end, ec] =
      std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc() || end != port.data() + port.size() || port.empty() ||
      value > 65535) {
    return bad("port is not a number from 0 to 65535");
  }
  return HostPort{std::string(host), static_cast<uint16_t>(value)};
}

}  // namespace kvmig
