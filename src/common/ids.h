// Request id lists as text, for messages and logs: "1,2,3".
#ifndef KVMIG_SRC_COMMON_IDS_H_
#define KVMIG_SRC_COMMON_IDS_H_

#include <string>
#include <string_view>
#include <vector>

#include "kvmig/status.h"
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

// Migration ids a scheduler may choose: 1 to 64 characters of
// [0-9A-Za-z._:-] (the agents make 32 hex digits).
inline constexpr size_t kMaxMigrationIdBytes = 64;
inline Status check_migration_id(std::string_view id) {
  auto allowed = [](char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
           (c >= 'A' && c <= 'Z') || c == '.' || c == '_' || c == ':' ||
           c == '-';
  };
  bool ok = !id.empty() && id.size() <= kMaxMigrationIdBytes;
  for (char c : id) ok = ok && allowed(c);
  if (ok) return Status();
  return Status::invalid_argument(
      "migration id must be 1 to 64 characters of [0-9A-Za-z._:-] (got " +
      std::to_string(id.size()) + " bytes)");
}

}  // namespace kvmig

#endif  // KVMIG_SRC_COMMON_IDS_H_
