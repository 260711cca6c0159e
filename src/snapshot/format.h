// The snapshot file's on-disk layout (version 1, described in
// include/kvmig/snapshot.h): its constants, and the encoding and decoding of
// the header, the sequence table entries and the trailer. Decoders check
// what a part can check by itself (magic, checksum, version, flags, meta)
// and fail with DataLoss or InvalidArgument naming the part and the offset.
// Stateless; thread-safe.
#ifndef KVMIG_SRC_SNAPSHOT_FORMAT_H_
#define KVMIG_SRC_SNAPSHOT_FORMAT_H_

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "bytes.h"
#include "kvmig/status.h"
#include "kvmig/types.h"

namespace kvmig::snapshot_internal {

inline constexpr std::array<uint8_t, 8> kHeaderMagic = {'K', 'V', 'M', 'I',
                                                        'G', 'S', 'N', 'P'};
inline constexpr std::array<uint8_t, 8> kTrailerMagic = {'K', 'V', 'M', 'I',
                                                         'G', 'E', 'N', 'D'};
inline constexpr uint32_t kVersion = 1;
// Every checksum is a u64 XXH3-64.
inline constexpr uint64_t kChecksumBytes = 8;
// magic, version, flags, 5 meta fields, n_seqs, n_pages.
inline constexpr uint64_t kHeaderBodyBytes = 8 + 4 + 4 + 5 * 4 + 8 + 8;
inline constexpr uint64_t kHeaderBytes = kHeaderBodyBytes + kChecksumBytes;
// seq_id, n_tokens, n_refs; then n_refs page refs of kPageRefBytes.
inline constexpr uint64_t kSeqEntryFixedBytes = 8 + 8 + 4;
inline constexpr uint64_t kPageRefBytes = 4;
inline constexpr uint64_t kTrailerBytes = 8 + kChecksumBytes;

using HeaderBytes = std::array<uint8_t, kHeaderBytes>;
using SeqEntryFixedBytes = std::array<uint8_t, kSeqEntryFixedBytes>;
using TrailerBytes = std::array<uint8_t, kTrailerBytes>;

// Bytes of one page record: K, V and its checksum.
inline uint64_t page_record_bytes(const CacheMeta& meta) {
  return 2 * meta.page_bytes() + kChecksumBytes;
}

// What a decoded header holds (its flags are always 0).
struct Header {
  uint32_t version = 0;
  CacheMeta meta;
  uint64_t n_seqs = 0;
  uint64_t n_pages = 0;
};

// The header, its checksum included.
std::vector<uint8_t> encode_header(const CacheMeta& meta, uint64_t n_seqs,
                                   uint64_t n_pages);

// Checks, in order, the magic, the checksum, the version, the flags and the
// meta of a header read from offset 0.
Result<Header> decode_header(const HeaderBytes& bytes);

// The fixed part of a sequence table entry.
struct SeqEntryFixed {
  SeqId seq_id = 0;
  uint64_t n_tokens = 0;
  uint32_t n_refs = 0;
};

// Appends one sequence table entry: its fixed part, then its page refs.
void encode_seq_entry(ByteWriter& out, SeqId seq_id, uint64_t n_tokens,
                      std::span<const uint32_t> refs);

SeqEntryFixed decode_seq_entry_fixed(const SeqEntryFixedBytes& bytes);

// The n_refs page refs that follow an entry's fixed part
// (n_refs * kPageRefBytes bytes).
std::vector<PageIndex> decode_page_refs(std::span<const uint8_t> bytes);

// The trailer, given the checksum of every byte before it.
TrailerBytes encode_trailer(uint64_t file_checksum);

// The file checksum a trailer read at `offset` stores; DataLoss if its magic
// is wrong.
Result<uint64_t> decode_trailer(const TrailerBytes& bytes, uint64_t offset);

}  // namespace kvmig::snapshot_internal

#endif  // KVMIG_SRC_SNAPSHOT_FORMAT_H_
