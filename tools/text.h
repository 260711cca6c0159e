// Small text helpers shared by the command-line tools.
#ifndef KVMIG_TOOLS_TEXT_H_
#define KVMIG_TOOLS_TEXT_H_

#include <charconv>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace kvmig {

// "a,b,,c" -> {"a", "b", "c"}: the non-empty comma-separated items.
inline std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

// A decimal integer from 0 to 2^64 - 1, digits only: no sign (std::stoull
// takes "-1" for 2^64 - 1), space, or base prefix. nullopt otherwise.
inline std::optional<uint64_t> parse_u64(std::string_view text) {
  uint64_t value = 0;
  const char* end = text.data() + text.size();
  auto [at, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || at != end) return std::nullopt;
  return value;
}

}  // namespace kvmig

#endif  // KVMIG_TOOLS_TEXT_H_
