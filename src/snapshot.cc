#include "kvmig/snapshot.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "bytes.h"
#include "digest_internal.h"
#include "log.h"

namespace kvmig {
namespace {

constexpr std::array<uint8_t, 8> kHeaderMagic = {'K', 'V', 'M', 'I',
                                                 'G', 'S', 'N', 'P'};
constexpr std::array<uint8_t, 8> kTrailerMagic = {'K', 'V', 'M', 'I',
                                                  'G', 'E', 'N', 'D'};
constexpr uint32_t kVersion = 1;
// magic, version, flags, 5 meta fields, n_seqs, n_pages.
constexpr uint64_t kHeaderBodyBytes = 8 + 4 + 4 + 5 * 4 + 8 + 8;
constexpr uint64_t kHeaderBytes = kHeaderBodyBytes + 8;
constexpr uint64_t kSeqEntryFixedBytes = 8 + 8 + 4;
constexpr uint64_t kTrailerBytes = 8 + 8;
// Buffer size for streaming file I/O.
constexpr size_t kIoChunk = size_t{1} << 20;

std::string num(uint64_t v) { return std::to_string(v); }

// The one mapper from errno to Status for snapshot files.
Status errno_status(const std::string& what, int err) {
  std::string msg = "snapshot: " + what + ": " + std::strerror(err);
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return Status::not_found(std::move(msg));
    case ENOSPC:
    case EDQUOT:
    case ENOMEM:
      return Status::resource_exhausted(std::move(msg));
    case EACCES:
    case EPERM:
    case EROFS:
      return Status::failed_precondition(std::move(msg));
    default:
      return Status::internal(std::move(msg));
  }
}

// Closes a file descriptor on destruction unless released.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd& operator=(Fd&&) = delete;
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  // Closes now, reporting the error close() returns.
  Status close(const std::string& what) {
    int fd = std::exchange(fd_, -1);
    if (fd >= 0 && ::close(fd) != 0) return errno_status(what, errno);
    return Status();
  }

 private:
  int fd_;
};

// Runs a callable when the scope ends.
template <typename F>
class ScopeExit {
 public:
  explicit ScopeExit(F f) : f_(std::move(f)) {}
  ScopeExit(const ScopeExit&) = delete;
  ScopeExit& operator=(const ScopeExit&) = delete;
  ~ScopeExit() { f_(); }

 private:
  F f_;
};

Status write_all(int fd, const uint8_t* p, size_t n, const std::string& what) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno_status(what, errno);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status();
}

// Reads exactly n bytes at offset; DataLoss if the file ends first.
Status pread_all(int fd, void* dst, size_t n, uint64_t offset) {
  auto* p = static_cast<uint8_t*>(dst);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno_status("read at offset " + num(offset), errno);
    }
    if (r == 0) {
      return Status::data_loss("snapshot: truncated: file ended at offset " +
                               num(offset) + " (changed while reading?)");
    }
    p += r;
    n -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return Status();
}

// A buffered file writer that hashes (XXH3-64) every byte it writes.
class HashingWriter {
 public:
  HashingWriter(int fd, std::string what)
      : fd_(fd), what_(std::move(what)), hash_(internal::new_xxh3_state()) {
    buf_.reserve(kIoChunk);
  }

  Status write(const void* data, size_t n) {
    const auto* p = static_cast<const uint8_t*>(data);
    XXH3_64bits_update(hash_.get(), p, n);
    if (buf_.size() + n > kIoChunk) KVMIG_RETURN_IF_ERROR(flush());
    if (n >= kIoChunk) return write_all(fd_, p, n, what_);
    buf_.insert(buf_.end(), p, p + n);
    return Status();
  }
  Status write(std::span<const uint8_t> bytes) {
    return write(bytes.data(), bytes.size());
  }
  Status write_u64(uint64_t v) {
    ByteWriter w;
    w.put(v);
    return write(w.buffer());
  }
  Status flush() {
    Status s = write_all(fd_, buf_.data(), buf_.size(), what_);
    buf_.clear();
    return s;
  }
  // XXH3-64 of every byte written so far.
  uint64_t hash() const { return XXH3_64bits_digest(hash_.get()); }

 private:
  int fd_;
  std::string what_;
  internal::Xxh3State hash_;
  std::vector<uint8_t> buf_;
};

// A sequential buffered reader over a file of known size. Reading past the
// size is DataLoss "truncated" naming `what` and the offset.
class FileReader {
 public:
  FileReader(int fd, uint64_t size) : fd_(fd), size_(size) {}

  uint64_t offset() const { return offset_; }
  uint64_t size() const { return size_; }
  uint64_t remaining() const { return size_ - offset_; }

  Status read(void* dst, uint64_t n, std::string_view what) {
    if (n > remaining()) {
      return Status::data_loss("snapshot: truncated: " + std::string(what) +
                               " needs " + num(n) + " bytes at offset " +
                               num(offset_) + ", file has " + num(size_));
    }
    auto* out = static_cast<uint8_t*>(dst);
    while (n > 0) {
      if (pos_ == buf_.size()) {
        buf_.resize(kIoChunk);
        const uint64_t want = std::min<uint64_t>(kIoChunk, size_ - file_pos_);
        Status s = pread_all(fd_, buf_.data(), want, file_pos_);
        if (!s.ok()) {
          buf_.clear();
          pos_ = 0;
          return s;
        }
        buf_.resize(want);
        file_pos_ += want;
        pos_ = 0;
      }
      const size_t take = std::min<uint64_t>(n, buf_.size() - pos_);
      std::memcpy(out, buf_.data() + pos_, take);
      pos_ += take;
      out += take;
      n -= take;
      offset_ += take;
    }
    return Status();
  }

 private:
  int fd_;
  uint64_t size_;
  uint64_t offset_ = 0;    // next byte for the caller
  uint64_t file_pos_ = 0;  // next byte to fetch from the file
  std::vector<uint8_t> buf_;
  size_t pos_ = 0;
};

uint64_t le_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A verified snapshot: its header and sequence table (refs are page numbers
// in the file), and where its pages start.
struct VerifiedSnapshot {
  uint32_t version = 0;
  CacheMeta meta;
  uint64_t n_pages = 0;
  uint64_t file_bytes = 0;
  uint64_t pages_offset = 0;
  std::vector<LogicalSeq> seqs;

  uint64_t page_record_bytes() const { return 2 * meta.page_bytes() + 8; }
  uint64_t page_offset(uint64_t page) const {
    return pages_offset + page * page_record_bytes();
  }
};

Result<Fd> open_for_reading(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_status("open " + path, errno);
  return Result<Fd>(Fd(fd));
}

// Reads and checks the whole file (every checksum, the exact size, every
// count and reference) with bounded memory.
Result<VerifiedSnapshot> verify_file(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return errno_status("stat", errno);
  VerifiedSnapshot snap;
  snap.file_bytes = static_cast<uint64_t>(st.st_size);
  const uint64_t size = snap.file_bytes;
  if (size < kHeaderBytes) {
    return Status::data_loss("snapshot: truncated: header needs " +
                             num(kHeaderBytes) + " bytes, file has " +
                             num(size));
  }
  FileReader in(fd, size);
  internal::Xxh3State file_hash = internal::new_xxh3_state();

  // Header.
  std::array<uint8_t, kHeaderBytes> header{};
  KVMIG_RETURN_IF_ERROR(in.read(header.data(), header.size(), "header"));
  XXH3_64bits_update(file_hash.get(), header.data(), header.size());
  if (!std::equal(kHeaderMagic.begin(), kHeaderMagic.end(), header.begin())) {
    return Status::data_loss(
        "snapshot: bad magic at offset 0 (not a kvmig snapshot)");
  }
  if (XXH3_64bits(header.data(), kHeaderBodyBytes) !=
      le_u64(header.data() + kHeaderBodyBytes)) {
    return Status::data_loss("snapshot: header checksum mismatch at offset " +
                             num(kHeaderBodyBytes));
  }
  ByteReader hr(std::span<const uint8_t>(header).subspan(8));
  // The header's length was checked: these reads cannot fail.
  const uint32_t version = *hr.get<uint32_t>("version");
  const uint32_t flags = *hr.get<uint32_t>("flags");
  snap.meta.page_size_tokens = *hr.get<uint32_t>("page_size_tokens");
  snap.meta.n_layers = *hr.get<uint32_t>("n_layers");
  snap.meta.n_heads = *hr.get<uint32_t>("n_heads");
  snap.meta.head_dim = *hr.get<uint32_t>("head_dim");
  const uint32_t dtype = *hr.get<uint32_t>("dtype");
  const uint64_t n_seqs = *hr.get<uint64_t>("n_seqs");
  snap.n_pages = *hr.get<uint64_t>("n_pages");
  if (version != kVersion) {
    return Status::invalid_argument("snapshot: version " + num(version) +
                                    " is not supported (this build reads " +
                                    num(kVersion) + ")");
  }
  snap.version = version;
  if (flags != 0) {
    return Status::invalid_argument("snapshot: unknown flags " + num(flags) +
                                    " at offset 12");
  }
  if (dtype > 255) {
    return Status::data_loss("snapshot: bad dtype " + num(dtype) +
                             " at offset 32");
  }
  snap.meta.dtype = static_cast<Dtype>(dtype);
  if (Status s = snap.meta.validate(); !s.ok()) {
    return Status::data_loss("snapshot: bad meta in header at offset 16: " +
                             s.message());
  }
  // Every sequence takes at least kSeqEntryFixedBytes and every page its
  // record: counts beyond what the file can hold are damage, caught here
  // before anything is allocated for them.
  const uint64_t fixed = kHeaderBytes + 8 + kTrailerBytes;
  const uint64_t room = size > fixed ? size - fixed : 0;
  if (n_seqs > room / kSeqEntryFixedBytes) {
    return Status::data_loss("snapshot: truncated or corrupt: header claims " +
                             num(n_seqs) + " sequences, a file of " +
                             num(size) + " bytes holds at most " +
                             num(room / kSeqEntryFixedBytes) + " (offset 36)");
  }
  if (snap.n_pages > room / snap.page_record_bytes()) {
    return Status::data_loss(
        "snapshot: truncated or corrupt: header claims " + num(snap.n_pages) +
        " pages, a file of " + num(size) + " bytes holds at most " +
        num(room / snap.page_record_bytes()) + " (offset 44)");
  }

  // Sequence table (its size is bounded by the file's): check its checksum
  // before its contents.
  internal::Xxh3State table_hash = internal::new_xxh3_state();
  std::vector<uint64_t> entry_offsets;
  snap.seqs.reserve(n_seqs);
  for (uint64_t i = 0; i < n_seqs; ++i) {
    entry_offsets.push_back(in.offset());
    const std::string what = "seq table entry " + num(i);
    std::array<uint8_t, kSeqEntryFixedBytes> fixed_part{};
    KVMIG_RETURN_IF_ERROR(in.read(fixed_part.data(), fixed_part.size(), what));
    ByteReader er(fixed_part);
    LogicalSeq seq;
    seq.seq_id = *er.get<uint64_t>("seq_id");
    seq.n_tokens = *er.get<uint64_t>("n_tokens");
    const uint32_t n_refs = *er.get<uint32_t>("n_refs");
    if (uint64_t{n_refs} * 4 > in.remaining()) {
      return Status::data_loss("snapshot: truncated: " + what + " at offset " +
                               num(entry_offsets.back()) + " claims " +
                               num(n_refs) + " page refs, " +
                               num(in.remaining()) + " bytes remain");
    }
    std::vector<uint8_t> refs(uint64_t{n_refs} * 4);
    KVMIG_RETURN_IF_ERROR(in.read(refs.data(), refs.size(), what));
    ByteReader rr(refs);
    seq.pages.reserve(n_refs);
    for (uint32_t r = 0; r < n_refs; ++r) {
      seq.pages.push_back(*rr.get<uint32_t>("ref"));
    }
    XXH3_64bits_update(table_hash.get(), fixed_part.data(), fixed_part.size());
    XXH3_64bits_update(table_hash.get(), refs.data(), refs.size());
    XXH3_64bits_update(file_hash.get(), fixed_part.data(), fixed_part.size());
    XXH3_64bits_update(file_hash.get(), refs.data(), refs.size());
    snap.seqs.push_back(std::move(seq));
  }
  const uint64_t table_sum_offset = in.offset();
  std::array<uint8_t, 8> sum{};
  KVMIG_RETURN_IF_ERROR(in.read(sum.data(), sum.size(), "seq table checksum"));
  if (XXH3_64bits_digest(table_hash.get()) != le_u64(sum.data())) {
    return Status::data_loss(
        "snapshot: seq table checksum mismatch at offset " +
        num(table_sum_offset));
  }
  XXH3_64bits_update(file_hash.get(), sum.data(), sum.size());
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
    if (seq.n_tokens == 0 ||
        seq.pages.size() != snap.meta.pages_for_tokens(seq.n_tokens)) {
      return Status::data_loss(where + ": " + num(seq.pages.size()) +
                               " pages for " + num(seq.n_tokens) + " tokens");
    }
    std::set<PageIndex> seen;
    for (PageIndex ref : seq.pages) {
      if (ref >= snap.n_pages) {
        return Status::data_loss(where + " refers to page " + num(ref) +
                                 ", the file holds " + num(snap.n_pages));
      }
      if (!seen.insert(ref).second) {
        return Status::data_loss(where + " refers to page " + num(ref) +
                                 " twice");
      }
      referenced[ref] = true;
    }
  }
  for (uint64_t p = 0; p < snap.n_pages; ++p) {
    if (!referenced[p]) {
      return Status::data_loss("snapshot: page " + num(p) +
                               " belongs to no sequence");
    }
  }

  // Exact size.
  snap.pages_offset = in.offset();
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

  // Pages, streamed.
  std::vector<uint8_t> buf(
      std::min<uint64_t>(kIoChunk, 2 * snap.meta.page_bytes()));
  internal::Xxh3State page_hash = internal::new_xxh3_state();
  for (uint64_t p = 0; p < snap.n_pages; ++p) {
    const uint64_t page_offset = in.offset();
    const std::string what = "page " + num(p);
    XXH3_64bits_reset(page_hash.get());
    for (uint64_t left = 2 * snap.meta.page_bytes(); left > 0;) {
      const uint64_t n = std::min<uint64_t>(left, buf.size());
      KVMIG_RETURN_IF_ERROR(in.read(buf.data(), n, what));
      XXH3_64bits_update(page_hash.get(), buf.data(), n);
      XXH3_64bits_update(file_hash.get(), buf.data(), n);
      left -= n;
    }
    KVMIG_RETURN_IF_ERROR(in.read(sum.data(), sum.size(), what));
    XXH3_64bits_update(file_hash.get(), sum.data(), sum.size());
    if (XXH3_64bits_digest(page_hash.get()) != le_u64(sum.data())) {
      return Status::data_loss("snapshot: page " + num(p) +
                               " checksum mismatch at offset " +
                               num(page_offset));
    }
  }

  // Trailer.
  const uint64_t trailer_offset = in.offset();
  std::array<uint8_t, kTrailerBytes> trailer{};
  KVMIG_RETURN_IF_ERROR(in.read(trailer.data(), trailer.size(), "trailer"));
  if (!std::equal(kTrailerMagic.begin(), kTrailerMagic.end(),
                  trailer.begin())) {
    return Status::data_loss("snapshot: bad trailer magic at offset " +
                             num(trailer_offset));
  }
  if (XXH3_64bits_digest(file_hash.get()) != le_u64(trailer.data() + 8)) {
    return Status::data_loss("snapshot: file checksum mismatch at offset " +
                             num(trailer_offset + 8));
  }
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
  std::array<uint8_t, 8> sum{};
  KVMIG_RETURN_IF_ERROR(pread_all(fd, sum.data(), 8, offset + 2 * pb));
  if (page_checksum(page) != le_u64(sum.data())) {
    return Status::data_loss("snapshot: page " + num(p) +
                             " checksum mismatch at offset " + num(offset) +
                             " (file changed while reading?)");
  }
  return Status();
}

// Writes the snapshot of a paused pager to fd (what names the file in errors).
Status write_snapshot(CachePager& pager, int fd, const std::string& what) {
  const CacheMeta meta = pager.meta();
  KVMIG_ASSIGN_OR_RETURN(std::vector<LogicalSeq> seqs, pager.logical_seqs());

  // Pager index -> page number in the file, in order of first appearance.
  std::unordered_map<PageIndex, uint32_t> file_page;
  std::vector<PageIndex> pages;
  ByteWriter table;
  for (const LogicalSeq& seq : seqs) {
    if (seq.pages.size() > UINT32_MAX) {
      return Status::internal("snapshot: seq " + num(seq.seq_id) +
                              " has too many pages");
    }
    table.put(seq.seq_id);
    table.put(seq.n_tokens);
    table.put(static_cast<uint32_t>(seq.pages.size()));
    for (PageIndex ix : seq.pages) {
      auto [it, inserted] =
          file_page.try_emplace(ix, static_cast<uint32_t>(pages.size()));
      if (inserted) pages.push_back(ix);
      table.put(it->second);
    }
  }
  const uint64_t table_sum = XXH3_64bits(table.buffer().data(), table.size());

  ByteWriter header;
  header.put_bytes(kHeaderMagic);
  header.put(kVersion);
  header.put(uint32_t{0});
  header.put(meta.page_size_tokens);
  header.put(meta.n_layers);
  header.put(meta.n_heads);
  header.put(meta.head_dim);
  header.put(static_cast<uint32_t>(meta.dtype));
  header.put(uint64_t{seqs.size()});
  header.put(uint64_t{pages.size()});
  header.put(XXH3_64bits(header.buffer().data(), header.size()));

  HashingWriter out(fd, what);
  KVMIG_RETURN_IF_ERROR(out.write(header.buffer()));
  KVMIG_RETURN_IF_ERROR(out.write(table.buffer()));
  KVMIG_RETURN_IF_ERROR(out.write_u64(table_sum));
  for (size_t i = 0; i < pages.size(); ++i) {
    Result<PageBytes> page = pager.read_page(pages[i]);
    if (!page.ok()) {
      return page.status().with_context("snapshot: reading slot " +
                                        num(pages[i]));
    }
    if (page->k.size() != meta.page_bytes() ||
        page->v.size() != meta.page_bytes()) {
      return Status::internal("snapshot: pager returned slot " + num(pages[i]) +
                              " with " + num(page->k.size()) + "+" +
                              num(page->v.size()) + " bytes, a page is " +
                              num(meta.page_bytes()) + " each");
    }
    KVMIG_RETURN_IF_ERROR(out.write(page->k.data(), page->k.size()));
    KVMIG_RETURN_IF_ERROR(out.write(page->v.data(), page->v.size()));
    KVMIG_RETURN_IF_ERROR(out.write_u64(page_checksum(*page)));
  }
  const uint64_t file_sum = out.hash();
  KVMIG_RETURN_IF_ERROR(out.write(kTrailerMagic));
  KVMIG_RETURN_IF_ERROR(out.write_u64(file_sum));
  return out.flush();
}

Status fsync_directory(const std::string& path) {
  std::filesystem::path dir = std::filesystem::path(path).parent_path();
  if (dir.empty()) dir = ".";
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0)
    return errno_status("open directory " + dir.string(), errno);
  if (::fsync(fd.get()) != 0) {
    return errno_status("fsync directory " + dir.string(), errno);
  }
  return fd.close("close directory " + dir.string());
}

Status capture_paused(CachePager& pager, const std::string& path) {
  const std::string temp =
      path + ".tmp." + num(static_cast<uint64_t>(getpid()));
  Fd fd(::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) return errno_status("create " + temp, errno);
  bool keep = false;
  ScopeExit remove_temp([&] {
    if (!keep) ::unlink(temp.c_str());
  });
  KVMIG_RETURN_IF_ERROR(write_snapshot(pager, fd.get(), "write " + temp));
  if (::fsync(fd.get()) != 0) return errno_status("fsync " + temp, errno);
  KVMIG_RETURN_IF_ERROR(fd.close("close " + temp));
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    return errno_status("rename " + temp + " to " + path, errno);
  }
  keep = true;
  return fsync_directory(path);
}

}  // namespace

Status capture(CachePager& pager, const std::string& path) {
  if (Status s = pager.pause(); !s.ok()) {
    return s.with_context("snapshot: pause");
  }
  Status resumed;
  Status written;
  {
    ScopeExit resume([&] { resumed = pager.resume(); });
    written = capture_paused(pager, path);
  }
  if (!written.ok()) {
    if (!resumed.ok()) {
      logger("engine")->error("snapshot: resume after a failed capture: {}",
                              resumed.to_string());
    }
    return written;
  }
  return resumed.with_context("snapshot: resume");
}

Status restore(const std::string& path, CachePager& pager) {
  KVMIG_ASSIGN_OR_RETURN(Fd fd, open_for_reading(path));
  KVMIG_ASSIGN_OR_RETURN(VerifiedSnapshot snap, verify_file(fd.get()));
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
  Result<std::vector<PageIndex>> slots =
      pager.allocate_pages(static_cast<uint32_t>(snap.n_pages));
  if (!slots.ok()) return slots.status().with_context("snapshot: restore");
  if (slots->size() != snap.n_pages) {
    return Status::internal("snapshot: pager allocated " + num(slots->size()) +
                            " slots, asked for " + num(snap.n_pages));
  }
  auto load = [&]() -> Status {
    PageBytes page;
    for (uint64_t p = 0; p < snap.n_pages; ++p) {
      KVMIG_RETURN_IF_ERROR(read_file_page(fd.get(), snap, p, page));
      if (Status s = pager.write_page((*slots)[p], page); !s.ok()) {
        return s.with_context("snapshot: restore page " + num(p));
      }
    }
    std::vector<LogicalSeq> seqs = std::move(snap.seqs);
    for (LogicalSeq& seq : seqs) {
      for (PageIndex& ref : seq.pages) ref = (*slots)[ref];
    }
    return pager.install_logical_seqs(seqs).with_context("snapshot: restore");
  };
  Status s = load();
  if (!s.ok()) {
    if (Status r = pager.release_pages(*slots); !r.ok()) {
      logger("engine")->error(
          "snapshot: releasing {} slots after a failed "
          "restore: {}",
          slots->size(), r.to_string());
    }
  }
  return s;
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
