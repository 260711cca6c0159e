// File I/O for snapshots: an owned descriptor, whole writes and positioned
// reads, buffered writer and reader that hash (XXH3-64) every byte they
// pass, and the atomic write of a file (temporary name, fsync, rename, fsync
// of the directory). Errors are "snapshot: <what>: <strerror>" mapped by
// status_from_errno; reading past a file's end is DataLoss "truncated". Not
// thread-safe (each object is one caller's).
#ifndef KVMIG_SRC_SNAPSHOT_FILE_IO_H_
#define KVMIG_SRC_SNAPSHOT_FILE_IO_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "digest_internal.h"
#include "kvmig/status.h"

namespace kvmig::snapshot_internal {

// Buffer size for streaming file I/O.
inline constexpr size_t kIoChunk = size_t{1} << 20;

// Closes a file descriptor on destruction unless closed first.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd& operator=(Fd&&) = delete;
  ~Fd();
  int get() const { return fd_; }
  // Closes now, reporting the error close() returns.
  Status close(const std::string& what);

 private:
  int fd_;
};

// Opens path read-only.
Result<Fd> open_for_reading(const std::string& path);

// Writes all n bytes, retrying short writes.
Status write_all(int fd, const uint8_t* p, size_t n, const std::string& what);

// Reads exactly n bytes at offset; DataLoss if the file ends first.
Status pread_all(int fd, void* dst, size_t n, uint64_t offset);

// A buffered file writer that hashes every byte it writes.
class HashingWriter {
 public:
  HashingWriter(int fd, std::string what);

  Status write(const void* data, size_t n);
  Status write(std::span<const uint8_t> bytes) {
    return write(bytes.data(), bytes.size());
  }
  Status write_u64(uint64_t v);
  Status flush();
  // XXH3-64 of every byte written so far.
  uint64_t hash() const;
  // Bytes written so far (buffered ones included).
  uint64_t bytes() const { return bytes_; }

 private:
  int fd_;
  std::string what_;
  uint64_t bytes_ = 0;
  internal::Xxh3State hash_;
  std::vector<uint8_t> buf_;
};

// A sequential buffered reader over a file of known size that hashes every
// byte it reads. Reading past the size is DataLoss "truncated" naming `what`
// and the offset.
class HashingReader {
 public:
  HashingReader(int fd, uint64_t size);

  uint64_t offset() const { return offset_; }
  uint64_t size() const { return size_; }
  uint64_t remaining() const { return size_ - offset_; }

  Status read(void* dst, uint64_t n, std::string_view what);
  // XXH3-64 of every byte read so far.
  uint64_t hash() const;

 private:
  Status refill();

  int fd_;
  uint64_t size_;
  uint64_t offset_ = 0;    // next byte for the caller
  uint64_t file_pos_ = 0;  // next byte to fetch from the file
  std::vector<uint8_t> buf_;
  size_t pos_ = 0;
  internal::Xxh3State hash_;
};

// Writes the file at path atomically: write(fd, what) fills a temporary file
// in the same directory (what names it in errors), which is fsynced, closed,
// renamed over path, and the directory fsynced. A failure before the rename
// removes the temporary file and leaves path untouched.
Status write_file_atomically(
    const std::string& path,
    const std::function<Status(int fd, const std::string& what)>& write);

}  // namespace kvmig::snapshot_internal

#endif  // KVMIG_SRC_SNAPSHOT_FILE_IO_H_
