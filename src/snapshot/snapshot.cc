#include "kvmig/snapshot.h"

#include <sys/stat.h>
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "bytes.h"
#include "digest_internal.h"
#include "errors.h"
#include "file_io.h"
#include "format.h"
#include "log.h"
#include "scope_exit.h"

namespace kvmig {
namespace {

using snapshot_internal::Fd;
using snapshot_internal::HashingReader;
using snapshot_internal::HashingWriter;
using snapshot_internal::Header;
using snapshot_internal::kChecksumBytes;
using snapshot_internal::kHeaderBytes;
using snapshot_internal::kIoChunk;
using snapshot_internal::kPageRefBytes;
using snapshot_internal::kSeqEntryFixedBytes;
using snapshot_internal::kTrailerBytes;
using snapshot_internal::open_for_reading;
using snapshot_internal::pread_all;

std::string num(uint64_t v) { return std::to_string(v); }

// A verified snapshot: its header and sequence table (refs are page numbers
// in the file), and where its pages start.
struct VerifiedSnapshot {
  uint32_t version = 0;
  CacheMeta meta;
  uint64_t n_pages = 0;
  uint64_t file_bytes = 0;
  uint64_t pages_offset = 0;
  std::vector<LogicalSeq> seqs;

  uint64_t page_record_bytes() const {
    return snapshot_internal::page_record_bytes(meta);
  }
  uint64_t page_offset(uint64_t page) const {
    return pages_offset + page * page_record_bytes();
  }
};

// ---- verify_file, step by step, in file order ----

// The size of the file, which must hold at least a header.
Result<uint64_t> file_size(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    return status_from_errno(errno, "snapshot: stat");
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size < kHeaderBytes) {
    return Status::data_loss("snapshot: truncated: header needs " +
                             num(kHeaderBytes) + " bytes, file has " +
                             num(size));
  }
  return size;
}

// Every sequence takes at least kSeqEntryFixedBytes and every page its
// record: counts beyond what the file can hold are damage, caught here before
// anything is allocated for them.
Status check_counts_fit(const Header& h, uint64_t size) {
  const uint64_t fixed = kHeaderBytes + kChecksumBytes + kTrailerBytes;
  const uint64_t room = size > fixed ? size - fixed : 0;
  if (h.n_seqs > room / kSeqEntryFixedBytes) {
    return Status::data_loss("snapshot: truncated or corrupt: header claims " +
                             num(h.n_seqs) + " sequences, a file of " +
                             num(size) + " bytes holds at most " +
                             num(room / kSeqEntryFixedBytes) + " (offset 36)");
  }
  const uint64_t record = snapshot_internal::page_record_bytes(h.meta);
  if (h.n_pages > room / record) {
    return Status::data_loss("snapshot: truncated or corrupt: header claims " +
                             num(h.n_pages) + " pages, a file of " + num(size) +
                             " bytes holds at most " + num(room / record) +
                             " (offset 44)");
  }
  return Status();
}

// Reads the header and checks it and its counts against the file's size.
Result<Header> read_header(HashingReader& in) {
  snapshot_internal::HeaderBytes bytes{};
  KVMIG_RETURN_IF_ERROR(in.read(bytes.data(), bytes.size(), "header"));
  KVMIG_ASSIGN_OR_RETURN(Header h, snapshot_internal::decode_header(bytes));
  KVMIG_RETURN_IF_ERROR(check_counts_fit(h, in.size()));
  return h;
}

// Reads sequence table entry i (at in.offset()), adding its bytes to
// table_hash.
Result<LogicalSeq> read_seq_entry(HashingReader& in, uint64_t i,
                                  XXH3_state_t* table_hash) {
  const uint64_t entry_offset = in.offset();
  const std::string what = "seq table entry " + num(i);
  snapshot_internal::SeqEntryFixedBytes fixed{};
  KVMIG_RETURN_IF_ERROR(in.read(fixed.data(), fixed.size(), what));
  const snapshot_internal::SeqEntryFixed e =
      snapshot_internal::decode_seq_entry_fixed(fixed);
  const uint64_t refs_bytes = uint64_t{e.n_refs} * kPageRefBytes;
  if (refs_bytes > in.remaining()) {
    return Status::data_loss("snapshot: truncated: " + what + " at offset " +
                             num(entry_offset) + " claims " + num(e.n_refs) +
                             " page refs, " + num(in.remaining()) +
                             " bytes remain");
  }
  std::vector<uint8_t> refs(refs_bytes);
  KVMIG_RETURN_IF_ERROR(in.read(refs.data(), refs.size(), what));
  XXH3_64bits_update(table_hash, fixed.data(), fixed.size());
  XXH3_64bits_update(table_hash, refs.data(), refs.size());
  LogicalSeq seq;
  seq.seq_id = e.seq_id;
  seq.n_tokens = e.n_tokens;
  seq.pages = snapshot_internal::decode_page_refs(refs);
  return seq;
}

// Reads the sequence table (its size is bounded by the file's) and checks
// its checksum before its contents. entry_offsets gets where each entry
// starts.
Result<std::vector<LogicalSeq>> read_seq_table(
    HashingReader& in, uint64_t n_seqs, std::vector<uint64_t>& entry_offsets) {
  internal::Xxh3State table_hash = internal::new_xxh3_state();
  std::vector<LogicalSeq> seqs;
  seqs.reserve(n_seqs);
  for (uint64_t i = 0; i < n_seqs; ++i) {
    entry_offsets.push_back(in.offset());
    KVMIG_ASSIGN_OR_RETURN(LogicalSeq seq,
                           read_seq_entry(in, i, table_hash.get()));
    seqs.push_back(std::move(seq));
  }
  const uint64_t sum_offset = in.offset();
  std::array<uint8_t, kChecksumBytes> sum{};
  KVMIG_RETURN_IF_ERROR(in.read(sum.data(), sum.size(), "seq table checksum"));
  if (XXH3_64bits_digest(table_hash.get()) != load_le<uint64_t>(sum.data())) {
    return Status::data_loss(
        "snapshot: seq table checksum mismatch at offset " + num(sum_offset));
  }
  return seqs;
}

// Checks one sequence's token count and page refs; marks its pages in
// referenced. where names the sequence in errors.
Status check_seq(const CacheMeta& meta, uint64_t n_pages, const LogicalSeq& seq,
                 const std::string& where, std::vector<bool>& referenced) {
  if (seq.n_tokens == 0) {
    return Status::data_loss(where + " has no tokens");
  }
  if (seq.pages.size() != meta.pages_for_tokens(seq.n_tokens)) {
    return Status::data_loss(where + ": " + num(seq.pages.size()) +
                             " pages for " + num(seq.n_tokens) +
                             " tokens, which need " +
                             num(meta.pages_for_tokens(seq.n_tokens)));
  }
  std::set<PageIndex> seen;
  for (PageIndex ref : seq.pages) {
    if (ref >= n_pages) {
      return Status::data_loss(where + " refers to page " + num(ref) +
                               ", the file holds " + num(n_pages));
    }
    if (!seen.insert(ref).second) {
      return Status::data_loss(where + " refers to page " + num(ref) +
                               " twice");
    }
    referenced[ref] = true;
  }
  return Status();
}

// Checks the sequence table's contents: unique ids, page counts that fit
// the tokens, refs to stored pages (each once per sequence), and no stored
// page that belongs to no sequence.
Status check_seq_refs(const VerifiedSnapshot& snap,
                      const std::vector<uint64_t>& entry_offsets) {
  std::set<SeqId> ids;
  std::vector<bool> referenced(snap.n_pages, false);
  for (size_t i = 0; i < snap.seqs.size(); ++i) {
    const LogicalSeq& seq = snap.seqs[i];
    const std::string where = "snapshot: seq " + num(seq.seq_id) +
                              " (table entry at offset " +
                              num(entry_offsets[i]) + ")";
    if (!ids.insert(seq.seq_id).second) {
      return Status::data_loss(where + " appears twice");
    }
    KVMIG_RETURN_IF_ERROR(
        check_seq(snap.meta, snap.n_pages, seq, where, referenced));
  }
  for (uint64_t p = 0; p < snap.n_pages; ++p) {
    if (!referenced[p]) {
      return Status::data_loss("snapshot: page " + num(p) +
                               " belongs to no sequence");
    }
  }
  return Status();
}

// Checks that the file is exactly as long as its counts say.
Status check_exact_size(const VerifiedSnapshot& snap) {
  const uint64_t size = snap.file_bytes;
  const uint64_t expected = snap.pages_offset +
                            snap.n_pages * snap.page_record_bytes() +
                            kTrailerBytes;
  if (expected > size) {
    return Status::data_loss("snapshot: truncated: expected " + num(expected) +
                             " bytes, file has " + num(size));
  }
  if (expected < size) {
    return Status::data_loss("snapshot: size mismatch: expected " +
                             num(expected) + " bytes, file has " + num(size) +
                             " (trailing bytes)");
  }
  return Status();
}

// Streams the page section, checking every page's checksum.
Status check_pages(HashingReader& in, const VerifiedSnapshot& snap) {
  const uint64_t kv_bytes = 2 * snap.meta.page_bytes();
  std::vector<uint8_t> buf(std::min<uint64_t>(kIoChunk, kv_bytes));
  std::array<uint8_t, kChecksumBytes> sum{};
  internal::Xxh3State page_hash = internal::new_xxh3_state();
  for (uint64_t p = 0; p < snap.n_pages; ++p) {
    const uint64_t page_offset = in.offset();
    const std::string what = "page " + num(p);
    XXH3_64bits_reset(page_hash.get());
    for (uint64_t left = kv_bytes; left > 0;) {
      const uint64_t n = std::min<uint64_t>(left, buf.size());
      KVMIG_RETURN_IF_ERROR(in.read(buf.data(), n, what));
      XXH3_64bits_update(page_hash.get(), buf.data(), n);
      left -= n;
    }
    KVMIG_RETURN_IF_ERROR(in.read(sum.data(), sum.size(), what));
    if (XXH3_64bits_digest(page_hash.get()) != load_le<uint64_t>(sum.data())) {
      return Status::data_loss("snapshot: page " + num(p) +
                               " checksum mismatch at offset " +
                               num(page_offset));
    }
  }
  return Status();
}

// Reads the trailer and checks it against the hash of every byte before it.
Status check_trailer(HashingReader& in) {
  const uint64_t file_hash = in.hash();
  const uint64_t trailer_offset = in.offset();
  snapshot_internal::TrailerBytes trailer{};
  KVMIG_RETURN_IF_ERROR(in.read(trailer.data(), trailer.size(), "trailer"));
  KVMIG_ASSIGN_OR_RETURN(uint64_t stored, snapshot_internal::decode_trailer(
                                              trailer, trailer_offset));
  if (file_hash != stored) {
    return Status::data_loss("snapshot: file checksum mismatch at offset " +
                             num(trailer_offset + 8));
  }
  return Status();
}

// Reads and checks the whole file (every checksum, the exact size, every
// count and reference) with bounded memory.
Result<VerifiedSnapshot> verify_file(int fd) {
  KVMIG_ASSIGN_OR_RETURN(uint64_t size, file_size(fd));
  HashingReader in(fd, size);
  KVMIG_ASSIGN_OR_RETURN(Header header, read_header(in));
  VerifiedSnapshot snap;
  snap.version = header.version;
  snap.meta = header.meta;
  snap.n_pages = header.n_pages;
  snap.file_bytes = size;
  std::vector<uint64_t> entry_offsets;
  KVMIG_ASSIGN_OR_RETURN(snap.seqs,
                         read_seq_table(in, header.n_seqs, entry_offsets));
  KVMIG_RETURN_IF_ERROR(check_seq_refs(snap, entry_offsets));
  snap.pages_offset = in.offset();
  KVMIG_RETURN_IF_ERROR(check_exact_size(snap));
  KVMIG_RETURN_IF_ERROR(check_pages(in, snap));
  KVMIG_RETURN_IF_ERROR(check_trailer(in));
  return snap;
}

// Reads file page `p` (K, V and its stored checksum) into page; DataLoss if
// it no longer matches its checksum.
Status read_file_page(int fd, const VerifiedSnapshot& snap, uint64_t p,
                      PageBytes& page) {
  const uint64_t pb = snap.meta.page_bytes();
  const uint64_t offset = snap.page_offset(p);
  page.k.resize(pb);
  page.v.resize(pb);
  KVMIG_RETURN_IF_ERROR(pread_all(fd, page.k.data(), pb, offset));
  KVMIG_RETURN_IF_ERROR(pread_all(fd, page.v.data(), pb, offset + pb));
  std::array<uint8_t, kChecksumBytes> sum{};
  KVMIG_RETURN_IF_ERROR(pread_all(fd, sum.data(), sum.size(), offset + 2 * pb));
  if (page_checksum(page) != load_le<uint64_t>(sum.data())) {
    return Status::data_loss("snapshot: page " + num(p) +
                             " checksum mismatch at offset " + num(offset) +
                             " (file changed while reading?)");
  }
  return Status();
}

// ---- capture ----

// The sequence table to write, and the pager pages it refers to in file
// order (a page shared by several sequences is stored once).
struct SeqTable {
  std::vector<uint8_t> table;
  std::vector<PageIndex> pages;
};

SeqTable encode_seq_table(const std::vector<LogicalSeq>& seqs) {
  // Pager index -> page number in the file, in order of first appearance.
  std::unordered_map<PageIndex, uint32_t> file_page;
  SeqTable out;
  ByteWriter table;
  std::vector<uint32_t> refs;
  for (const LogicalSeq& seq : seqs) {
    refs.clear();
    for (PageIndex ix : seq.pages) {
      auto [it, inserted] =
          file_page.try_emplace(ix, static_cast<uint32_t>(out.pages.size()));
      if (inserted) out.pages.push_back(ix);
      refs.push_back(it->second);
    }
    snapshot_internal::encode_seq_entry(table, seq.seq_id, seq.n_tokens, refs);
  }
  out.table = table.take();
  return out;
}

// Reads pager slot ix and writes its page record.
Status write_page_record(CachePager& pager, const CacheMeta& meta, PageIndex ix,
                         HashingWriter& out) {
  Result<PageBytes> page = pager.read_page(ix);
  if (!page.ok()) {
    return page.status().with_context("snapshot: reading slot " + num(ix));
  }
  if (page->k.size() != meta.page_bytes() ||
      page->v.size() != meta.page_bytes()) {
    return Status::internal("snapshot: pager returned slot " + num(ix) +
                            " with " + num(page->k.size()) + "+" +
                            num(page->v.size()) + " bytes, a page is " +
                            num(meta.page_bytes()) + " each");
  }
  KVMIG_RETURN_IF_ERROR(out.write(page->k.data(), page->k.size()));
  KVMIG_RETURN_IF_ERROR(out.write(page->v.data(), page->v.size()));
  return out.write_u64(page_checksum(*page));
}

// Writes the snapshot of a paused pager to fd (what names the file in
// errors); totals gets what it holds.
Status write_snapshot(CachePager& pager, int fd, const std::string& what,
                      SnapshotTotals& totals) {
  const CacheMeta meta = pager.meta();
  KVMIG_ASSIGN_OR_RETURN(std::vector<LogicalSeq> seqs, pager.logical_seqs());
  for (const LogicalSeq& seq : seqs) {
    if (seq.pages.size() > UINT32_MAX) {
      return Status::internal("snapshot: seq " + num(seq.seq_id) +
                              " has too many pages");
    }
  }
  const SeqTable t = encode_seq_table(seqs);
  HashingWriter out(fd, what);
  KVMIG_RETURN_IF_ERROR(out.write(snapshot_internal::encode_header(
      meta, uint64_t{seqs.size()}, uint64_t{t.pages.size()})));
  KVMIG_RETURN_IF_ERROR(out.write(t.table));
  KVMIG_RETURN_IF_ERROR(
      out.write_u64(XXH3_64bits(t.table.data(), t.table.size())));
  for (PageIndex ix : t.pages) {
    KVMIG_RETURN_IF_ERROR(write_page_record(pager, meta, ix, out));
  }
  KVMIG_RETURN_IF_ERROR(
      out.write(snapshot_internal::encode_trailer(out.hash())));
  totals = {uint64_t{seqs.size()}, uint64_t{t.pages.size()}, out.bytes()};
  return out.flush();
}

// ---- restore ----

// FailedPrecondition unless the pager is empty; InvalidArgument if its meta
// differs from the file's.
Status check_restorable(const VerifiedSnapshot& snap, CachePager& pager) {
  const CacheMeta meta = pager.meta();
  if (snap.meta != meta) {
    return Status::invalid_argument(
        "snapshot: file meta " + snap.meta.to_string() +
        " differs from pager meta " + meta.to_string());
  }
  KVMIG_ASSIGN_OR_RETURN(std::vector<LogicalSeq> live, pager.logical_seqs());
  KVMIG_ASSIGN_OR_RETURN(std::vector<PageIndex> occupied,
                         pager.occupied_pages());
  if (!live.empty() || !occupied.empty()) {
    return Status::failed_precondition(
        "snapshot: restore needs an empty pager, it has " + num(live.size()) +
        " sequences and " + num(occupied.size()) + " occupied pages");
  }
  if (snap.n_pages > UINT32_MAX) {
    return Status::resource_exhausted("snapshot: " + num(snap.n_pages) +
                                      " pages exceed any pager");
  }
  return Status();
}

// Writes every file page into its slot and installs the sequences, their
// refs mapped to slots.
Status load_into(int fd, VerifiedSnapshot& snap,
                 const std::vector<PageIndex>& slots, CachePager& pager) {
  PageBytes page;
  for (uint64_t p = 0; p < snap.n_pages; ++p) {
    KVMIG_RETURN_IF_ERROR(read_file_page(fd, snap, p, page));
    if (Status s = pager.write_page(slots[p], page); !s.ok()) {
      return s.with_context("snapshot: restore page " + num(p));
    }
  }
  std::vector<LogicalSeq> seqs = std::move(snap.seqs);
  for (LogicalSeq& seq : seqs) {
    for (PageIndex& ref : seq.pages) ref = slots[ref];
  }
  return pager.install_logical_seqs(seqs).with_context("snapshot: restore");
}

}  // namespace

Status capture(CachePager& pager, const std::string& path) {
  return capture_with_totals(pager, path).status();
}

Result<SnapshotTotals> capture_with_totals(CachePager& pager,
                                           const std::string& path) {
  if (Status s = pager.pause(); !s.ok()) {
    return s.with_context("snapshot: pause");
  }
  Status resumed;
  Status written;
  SnapshotTotals totals;
  {
    ScopeExit resume([&] { resumed = pager.resume(); });
    written = snapshot_internal::write_file_atomically(
        path, [&](int fd, const std::string& what) {
          return write_snapshot(pager, fd, what, totals);
        });
  }
  if (!written.ok()) {
    if (!resumed.ok()) {
      logger("engine")->error("snapshot: resume after a failed capture: {}",
                              resumed.to_string());
    }
    return written;
  }
  KVMIG_RETURN_IF_ERROR(resumed.with_context("snapshot: resume"));
  return totals;
}

Status restore(const std::string& path, CachePager& pager) {
  return restore_with_totals(path, pager).status();
}

Result<SnapshotTotals> restore_with_totals(const std::string& path,
                                           CachePager& pager) {
  KVMIG_ASSIGN_OR_RETURN(Fd fd, open_for_reading(path));
  KVMIG_ASSIGN_OR_RETURN(VerifiedSnapshot snap, verify_file(fd.get()));
  KVMIG_RETURN_IF_ERROR(check_restorable(snap, pager));
  Result<std::vector<PageIndex>> slots =
      pager.allocate_pages(static_cast<uint32_t>(snap.n_pages));
  if (!slots.ok()) return slots.status().with_context("snapshot: restore");
  if (slots->size() != snap.n_pages) {
    return Status::internal("snapshot: pager allocated " + num(slots->size()) +
                            " slots, asked for " + num(snap.n_pages));
  }
  const SnapshotTotals totals{uint64_t{snap.seqs.size()}, snap.n_pages,
                              snap.file_bytes};
  Status s = load_into(fd.get(), snap, *slots, pager);
  if (!s.ok()) {
    if (Status r = pager.release_pages(*slots); !r.ok()) {
      logger("engine")->error(
          "snapshot: releasing {} slots after a failed "
          "restore: {}",
          slots->size(), r.to_string());
    }
    return s;
  }
  return totals;
}

Result<SnapshotInfo> inspect_snapshot(const std::string& path) {
  KVMIG_ASSIGN_OR_RETURN(Fd fd, open_for_reading(path));
  KVMIG_ASSIGN_OR_RETURN(VerifiedSnapshot snap, verify_file(fd.get()));
  SnapshotInfo info;
  info.version = snap.version;
  info.meta = snap.meta;
  info.n_pages = snap.n_pages;
  info.file_bytes = snap.file_bytes;
  PageBytes page;
  for (const LogicalSeq& seq : snap.seqs) {
    internal::SeqDigester digester(snap.meta);
    for (size_t i = 0; i < seq.pages.size(); ++i) {
      KVMIG_RETURN_IF_ERROR(read_file_page(fd.get(), snap, seq.pages[i], page));
      digester.add_page(page.k, page.v,
                        internal::tokens_in_page(snap.meta, seq.n_tokens, i));
    }
    info.seqs.push_back({seq.seq_id, seq.n_tokens,
                         static_cast<uint32_t>(seq.pages.size()),
                         digester.finish()});
  }
  return info;
}

}  // namespace kvmig
