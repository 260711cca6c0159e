// Snapshots: a pager's whole content in one file (the seed's capture and
// restore).
//
// File format, version 1, all integers little-endian:
//   header   "KVMIGSNP" | u32 version | u32 flags (0) |
//            meta: u32 page_size_tokens, u32 n_layers, u32 n_heads,
//                  u32 head_dim, u32 dtype |
//            u64 n_seqs | u64 n_pages | u64 XXH3-64 of the header so far
//   seqs     n_seqs x { u64 seq_id | u64 n_tokens | u32 n_refs |
//                       n_refs x u32 page number in this file }
//            u64 XXH3-64 of the sequence table
//   pages    n_pages x { K bytes | V bytes | u64 XXH3-64 of K then V }
//   trailer  "KVMIGEND" | u64 XXH3-64 of every byte before the trailer
// A page shared by several sequences is stored once. Files are written to a
// temporary name in the same directory, fsynced, then renamed: a crash never
// leaves a half-written file under the final name.
#ifndef KVMIG_SNAPSHOT_H_
#define KVMIG_SNAPSHOT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "kvmig/digest.h"
#include "kvmig/pager.h"
#include "kvmig/status.h"
#include "kvmig/types.h"

namespace kvmig {

// Pauses pager, writes every sequence and the pages they own to path, and
// resumes it (also when reading or writing fails). Overwrites path
// atomically: the temporary file has a name of its own (O_EXCL), so
// captures to one path at once (threads or processes) all succeed and path
// ends up as one of them, whole.
Status capture(CachePager& pager, const std::string& path);

// Loads path into pager. Refuses (leaving the pager untouched) a file that is
// corrupt or truncated (DataLoss naming the part and offset), whose meta
// differs from the pager's (InvalidArgument naming both), or a pager that is
// not empty (FailedPrecondition). Allocates, writes and installs; on a
// failure after allocating it releases the slots.
Status restore(const std::string& path, CachePager& pager);

// What one capture wrote, or one restore loaded.
struct SnapshotTotals {
  uint64_t seqs = 0;
  uint64_t pages = 0;  // distinct pages stored
  uint64_t file_bytes = 0;
};

// capture() and restore(), saying what the file holds (no second read).
Result<SnapshotTotals> capture_with_totals(CachePager& pager,
                                           const std::string& path);
Result<SnapshotTotals> restore_with_totals(const std::string& path,
                                           CachePager& pager);

// What a snapshot holds, read without a pager.
struct SnapshotSeqInfo {
  SeqId seq_id = 0;
  uint64_t n_tokens = 0;
  uint32_t n_pages = 0;
  Digest digest;  // same definition as seq_digest()
};
struct SnapshotInfo {
  uint32_t version = 0;
  CacheMeta meta;
  uint64_t n_pages = 0;  // distinct pages stored
  uint64_t file_bytes = 0;
  std::vector<SnapshotSeqInfo> seqs;
};

// Reads and fully verifies path (every checksum); DataLoss on any damage.
Result<SnapshotInfo> inspect_snapshot(const std::string& path);

}  // namespace kvmig

#endif  // KVMIG_SNAPSHOT_H_
