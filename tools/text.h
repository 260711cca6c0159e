// Small text helpers shared by the command-line tools.
#ifndef KVMIG_TOOLS_TEXT_H_
#define KVMIG_TOOLS_TEXT_H_

#include <sstream>
#include <string>
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

}  // namespace kvmig

#endif  // KVMIG_TOOLS_TEXT_H_
