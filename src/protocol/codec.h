// The building blocks of every control-message codec (migration, scheduler
// and perf messages): bounds, and the encodings of meta, page tables, id
// lists, doubles and statuses. Decoders check every count against
// WireLimits and against the bytes left before allocating. Stateless;
// thread-safe.
#ifndef KVMIG_SRC_PROTOCOL_CODEC_H_
#define KVMIG_SRC_PROTOCOL_CODEC_H_

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "bytes.h"
#include "kvmig/status.h"
#include "kvmig/types.h"

namespace kvmig {

// Bounds a decoder enforces on counts read from the wire.
struct WireLimits {
  uint32_t max_pages = 1u << 20;
  uint32_t max_seqs = 1u << 16;
  uint32_t max_blob = 1u << 20;  // addresses, keys
  uint32_t max_string = 4096;    // names, ids, messages
  uint32_t max_regions = 4096;   // layout regions
};

// An ERROR frame's payload: why a request was refused.
struct ErrorMsg {
  Status status;
};

// Reads a u32 count and checks it against a limit and against the bytes
// left, given the smallest encoding of one element.
Result<uint32_t> get_count(ByteReader& r, uint32_t limit, size_t min_elem,
                           std::string_view what);
void put_meta(ByteWriter& w, const CacheMeta& m);
Result<CacheMeta> get_meta(ByteReader& r);  // DataLoss unless valid
void put_seqs(ByteWriter& w, const std::vector<LogicalSeq>& seqs);
Result<std::vector<LogicalSeq>> get_seqs(ByteReader& r, const WireLimits& l);
void put_ids(ByteWriter& w, const std::vector<SeqId>& ids);
Result<std::vector<SeqId>> get_ids(ByteReader& r, const WireLimits& l);
void put_u32s(ByteWriter& w, const std::vector<uint32_t>& v);
Result<std::vector<uint32_t>> get_u32s(ByteReader& r, uint32_t limit,
                                       std::string_view what);
Result<std::vector<uint8_t>> get_blob_copy(ByteReader& r, uint32_t max,
                                           std::string_view what);
void put_double(ByteWriter& w, double d);
Result<double> get_double(ByteReader& r, std::string_view what);
// A non-ok Status: its code and message.
void put_status(ByteWriter& w, const Status& s);
Result<ErrorMsg> get_status(ByteReader& r, const WireLimits& l);

// Runs a decoder body over a reader and requires every byte consumed.
template <typename T, typename F>
Result<T> decode_all(std::span<const uint8_t> p, std::string_view what,
                     F&& body) {
  ByteReader r(p);
  Result<T> out = body(r);
  if (!out.ok()) return out.status().with_context(what);
  Status end = r.expect_end(what);
  if (!end.ok()) return end;
  return out;
}

}  // namespace kvmig

#endif  // KVMIG_SRC_PROTOCOL_CODEC_H_
