#include "format.h"

#include <xxhash.h>

#include <algorithm>
#include <string>

namespace kvmig::snapshot_internal {
namespace {

std::string num(uint64_t v) { return std::to_string(v); }

}  // namespace

std::vector<uint8_t> encode_header(const CacheMeta& meta, uint64_t n_seqs,
                                   uint64_t n_pages) {
  ByteWriter header;
  header.put_bytes(kHeaderMagic);
  header.put(kVersion);
  header.put(uint32_t{0});
  header.put(meta.page_size_tokens);
  header.put(meta.n_layers);
  header.put(meta.n_heads);
  header.put(meta.head_dim);
  header.put(static_cast<uint32_t>(meta.dtype));
  header.put(n_seqs);
  header.put(n_pages);
  header.put(XXH3_64bits(header.buffer().data(), header.size()));
  return header.take();
}

Result<Header> decode_header(const HeaderBytes& bytes) {
  if (!std::equal(kHeaderMagic.begin(), kHeaderMagic.end(), bytes.begin())) {
    return Status::data_loss(
        "snapshot: bad magic at offset 0 (not a kvmig snapshot)");
  }
  if (XXH3_64bits(bytes.data(), kHeaderBodyBytes) !=
      load_le<uint64_t>(bytes.data() + kHeaderBodyBytes)) {
    return Status::data_loss("snapshot: header checksum mismatch at offset " +
                             num(kHeaderBodyBytes));
  }
  ByteReader hr(std::span<const uint8_t>(bytes).subspan(kHeaderMagic.size()));
  // The header's length is fixed: these reads cannot fail.
  Header h;
  h.version = *hr.get<uint32_t>("version");
  const uint32_t flags = *hr.get<uint32_t>("flags");
  h.meta.page_size_tokens = *hr.get<uint32_t>("page_size_tokens");
  h.meta.n_layers = *hr.get<uint32_t>("n_layers");
  h.meta.n_heads = *hr.get<uint32_t>("n_heads");
  h.meta.head_dim = *hr.get<uint32_t>("head_dim");
  const uint32_t dtype = *hr.get<uint32_t>("dtype");
  h.n_seqs = *hr.get<uint64_t>("n_seqs");
  h.n_pages = *hr.get<uint64_t>("n_pages");
  if (h.version != kVersion) {
    return Status::invalid_argument("snapshot: version " + num(h.version) +
                                    " is not supported (this build reads " +
                                    num(kVersion) + ")");
  }
  if (flags != 0) {
    return Status::invalid_argument("snapshot: unknown flags " + num(flags) +
                                    " at offset 12");
  }
  if (dtype > 255) {
    return Status::data_loss("snapshot: bad dtype " + num(dtype) +
                             " at offset 32");
  }
  h.meta.dtype = static_cast<Dtype>(dtype);
  if (Status s = h.meta.validate(); !s.ok()) {
    return Status::data_loss("snapshot: bad meta in header at offset 16: " +
                             s.message());
  }
  return h;
}

void encode_seq_entry(ByteWriter& out, SeqId seq_id, uint64_t n_tokens,
                      std::span<const uint32_t> refs) {
  out.put(seq_id);
  out.put(n_tokens);
  out.put(static_cast<uint32_t>(refs.size()));
  for (uint32_t ref : refs) out.put(ref);
}

SeqEntryFixed decode_seq_entry_fixed(const SeqEntryFixedBytes& bytes) {
  ByteReader er(bytes);
  // The fixed part's length is fixed: these reads cannot fail.
  SeqEntryFixed e;
  e.seq_id = *er.get<uint64_t>("seq_id");
  e.n_tokens = *er.get<uint64_t>("n_tokens");
  e.n_refs = *er.get<uint32_t>("n_refs");
  return e;
}

std::vector<PageIndex> decode_page_refs(std::span<const uint8_t> bytes) {
  std::vector<PageIndex> refs;
  refs.reserve(bytes.size() / kPageRefBytes);
  for (size_t at = 0; at + kPageRefBytes <= bytes.size(); at += kPageRefBytes) {
    refs.push_back(load_le<uint32_t>(bytes.data() + at));
  }
  return refs;
}

TrailerBytes encode_trailer(uint64_t file_checksum) {
  TrailerBytes trailer{};
  std::copy(kTrailerMagic.begin(), kTrailerMagic.end(), trailer.begin());
  store_le(trailer.data() + kTrailerMagic.size(), file_checksum);
  return trailer;
}

Result<uint64_t> decode_trailer(const TrailerBytes& bytes, uint64_t offset) {
  if (!std::equal(kTrailerMagic.begin(), kTrailerMagic.end(), bytes.begin())) {
    return Status::data_loss("snapshot: bad trailer magic at offset " +
                             num(offset));
  }
  return load_le<uint64_t>(bytes.data() + kTrailerMagic.size());
}

}  // namespace kvmig::snapshot_internal
