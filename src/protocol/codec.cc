#include "codec.h"

#include <cstring>
#include <string>

namespace kvmig {

// Reads a u32 count and checks it against a limit and against the bytes
// left, given the smallest encoding of one element.
Result<uint32_t> get_count(ByteReader& r, uint32_t limit, size_t min_elem,
                           std::string_view what) {
  KVMIG_ASSIGN_OR_RETURN(uint32_t n, r.get<uint32_t>(what));
  if (n > limit) {
    return Status::resource_exhausted(std::string(what) + ": " +
                                      std::to_string(n) + " exceeds limit " +
                                      std::to_string(limit));
  }
  if (min_elem > 0 && uint64_t{n} * min_elem > r.remaining()) {
    return Status::data_loss(std::string(what) + ": count " +
                             std::to_string(n) + " does not fit in " +
                             std::to_string(r.remaining()) + " bytes left");
  }
  return n;
}

void put_meta(ByteWriter& w, const CacheMeta& m) {
  w.put(m.page_size_tokens);
  w.put(m.n_layers);
  w.put(m.n_heads);
  w.put(m.head_dim);
  w.put(static_cast<uint8_t>(m.dtype));
}

Result<CacheMeta> get_meta(ByteReader& r) {
  CacheMeta m;
  KVMIG_ASSIGN_OR_RETURN(m.page_size_tokens, r.get<uint32_t>("meta tokens"));
  KVMIG_ASSIGN_OR_RETURN(m.n_layers, r.get<uint32_t>("meta layers"));
  KVMIG_ASSIGN_OR_RETURN(m.n_heads, r.get<uint32_t>("meta heads"));
  KVMIG_ASSIGN_OR_RETURN(m.head_dim, r.get<uint32_t>("meta head_dim"));
  KVMIG_ASSIGN_OR_RETURN(uint8_t dtype, r.get<uint8_t>("meta dtype"));
  m.dtype = static_cast<Dtype>(dtype);
  Status valid = m.validate();
  if (!valid.ok()) return Status::data_loss(valid.message());
  return m;
}

void put_seqs(ByteWriter& w, const std::vector<LogicalSeq>& seqs) {
  w.put(static_cast<uint32_t>(seqs.size()));
  for (const LogicalSeq& s : seqs) {
    w.put(s.seq_id);
    w.put(s.n_tokens);
    put_u32s(w, s.pages);
  }
}

Result<std::vector<LogicalSeq>> get_seqs(ByteReader& r, const WireLimits& l) {
  KVMIG_ASSIGN_OR_RETURN(uint32_t n, get_count(r, l.max_seqs, 20, "seq count"));
  std::vector<LogicalSeq> seqs(n);
  for (LogicalSeq& s : seqs) {
    KVMIG_ASSIGN_OR_RETURN(s.seq_id, r.get<uint64_t>("seq id"));
    KVMIG_ASSIGN_OR_RETURN(s.n_tokens, r.get<uint64_t>("seq tokens"));
    KVMIG_ASSIGN_OR_RETURN(s.pages, get_u32s(r, l.max_pages, "seq pages"));
  }
  return seqs;
}

void put_ids(ByteWriter& w, const std::vector<SeqId>& ids) {
  w.put(static_cast<uint32_t>(ids.size()));
  w.put_array(std::span<const SeqId>(ids));
}

Result<std::vector<SeqId>> get_ids(ByteReader& r, const WireLimits& l) {
  KVMIG_ASSIGN_OR_RETURN(uint32_t n, get_count(r, l.max_seqs, 8, "id count"));
  std::vector<SeqId> ids(n);
  KVMIG_RETURN_IF_ERROR(r.get_array(std::span(ids), "seq id"));
  return ids;
}

void put_u32s(ByteWriter& w, const std::vector<uint32_t>& v) {
  w.put(static_cast<uint32_t>(v.size()));
  w.put_array(std::span<const uint32_t>(v));
}

Result<std::vector<uint32_t>> get_u32s(ByteReader& r, uint32_t limit,
                                       std::string_view what) {
  KVMIG_ASSIGN_OR_RETURN(uint32_t n, get_count(r, limit, 4, what));
  std::vector<uint32_t> v(n);
  KVMIG_RETURN_IF_ERROR(r.get_array(std::span(v), what));
  return v;
}

Result<std::vector<uint8_t>> get_blob_copy(ByteReader& r, uint32_t max,
                                           std::string_view what) {
  KVMIG_ASSIGN_OR_RETURN(auto b, r.get_blob(max, what));
  return std::vector<uint8_t>(b.begin(), b.end());
}

void put_double(ByteWriter& w, double d) {
  uint64_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  w.put(bits);
}

Result<double> get_double(ByteReader& r, std::string_view what) {
  KVMIG_ASSIGN_OR_RETURN(uint64_t bits, r.get<uint64_t>(what));
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}

void put_status(ByteWriter& w, const Status& s) {
  w.put(static_cast<uint8_t>(s.code()));
  w.put_string(s.message());
}

Result<ErrorMsg> get_status(ByteReader& r, const WireLimits& l) {
  KVMIG_ASSIGN_OR_RETURN(uint8_t code, r.get<uint8_t>("status code"));
  KVMIG_ASSIGN_OR_RETURN(std::string msg,
                         r.get_string(l.max_string * 16, "status message"));
  if (code == 0 || code > static_cast<uint8_t>(StatusCode::kUnauthenticated)) {
    return Status::data_loss("status code " + std::to_string(code) +
                             " out of range");
  }
  return ErrorMsg{
      Status::from_code(static_cast<StatusCode>(code), std::move(msg))};
}

}  // namespace kvmig
