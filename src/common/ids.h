// Request id lists as text, for messages and logs: "1,2,3".
#ifndef KVMIG_SRC_COMMON_IDS_H_
#define KVMIG_SRC_COMMON_IDS_H_

#include <string>
#include <vector>

#include "kvmig/types.h"

namespace kvmig {

// Joined without std::string's operator+ (GCC 12's false -Wrestrict at -O3).
inline std::string join_ids(const std::vector<SeqId>& ids) {
  std::string out;
  for (SeqId id : ids) {
    if (!out.empty()) out += ',';
    out += std::to_string(id);
  }
  return out;
}

}  // namespace kvmig

#endif  // KVMIG_SRC_COMMON_IDS_H_
