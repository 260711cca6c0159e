#include "file_io.h"

#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include "bytes.h"
#include "errors.h"
#include "random.h"
#include "scope_exit.h"

namespace kvmig::snapshot_internal {
namespace {

std::string num(uint64_t v) { return std::to_string(v); }

Status fsync_directory(const std::string& path) {
  std::filesystem::path dir = std::filesystem::path(path).parent_path();
  if (dir.empty()) dir = ".";
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0)
    return status_from_errno(errno, "snapshot: open directory " + dir.string());
  if (::fsync(fd.get()) != 0) {
    return status_from_errno(errno,
                             "snapshot: fsync directory " + dir.string());
  }
  return fd.close("close directory " + dir.string());
}

// A temporary file: its descriptor and its name.
struct TempFile {
  Fd fd;
  std::string name;
};

// Creates a new file next to path, "PATH.tmp.PID.RANDOM", exclusively
// (O_EXCL: never a file another writer has open, in this process or
// another), mode 0644 less the umask.
Result<TempFile> create_temp_beside(const std::string& path) {
  constexpr int kAttempts = 16;
  for (int attempt = 0;; ++attempt) {
    std::array<uint8_t, 8> noise{};
    random_bytes(noise);
    static constexpr char kHex[] = "0123456789abcdef";
    std::string suffix;
    for (uint8_t b : noise) {
      suffix += kHex[b >> 4];
      suffix += kHex[b & 15];
    }
    std::string temp =
        path + ".tmp." + num(static_cast<uint64_t>(::getpid())) + "." + suffix;
    int fd =
        ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0) return TempFile{Fd(fd), std::move(temp)};
    if (errno != EEXIST || attempt + 1 == kAttempts) {
      return status_from_errno(errno, "snapshot: create " + temp);
    }
  }
}

}  // namespace

Fd::Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

Status Fd::close(const std::string& what) {
  int fd = std::exchange(fd_, -1);
  if (fd >= 0 && ::close(fd) != 0)
    return status_from_errno(errno, "snapshot: " + what);
  return Status();
}

Result<Fd> open_for_reading(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return status_from_errno(errno, "snapshot: open " + path);
  return Result<Fd>(Fd(fd));
}

Status write_all(int fd, const uint8_t* p, size_t n, const std::string& what) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return status_from_errno(errno, "snapshot: " + what);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status();
}

Status pread_all(int fd, void* dst, size_t n, uint64_t offset) {
  auto* p = static_cast<uint8_t*>(dst);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, n, static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      return status_from_errno(errno,
                               "snapshot: read at offset " + num(offset));
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

HashingWriter::HashingWriter(int fd, std::string what)
    : fd_(fd), what_(std::move(what)), hash_(internal::new_xxh3_state()) {
  buf_.reserve(kIoChunk);
}

Status HashingWriter::write(const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  XXH3_64bits_update(hash_.get(), p, n);
  bytes_ += n;
  if (buf_.size() + n > kIoChunk) KVMIG_RETURN_IF_ERROR(flush());
  if (n >= kIoChunk) return write_all(fd_, p, n, what_);
  buf_.insert(buf_.end(), p, p + n);
  return Status();
}

Status HashingWriter::write_u64(uint64_t v) {
  std::array<uint8_t, sizeof(v)> bytes{};
  store_le(bytes.data(), v);
  return write(bytes);
}

Status HashingWriter::flush() {
  Status s = write_all(fd_, buf_.data(), buf_.size(), what_);
  buf_.clear();
  return s;
}

uint64_t HashingWriter::hash() const { return XXH3_64bits_digest(hash_.get()); }

HashingReader::HashingReader(int fd, uint64_t size)
    : fd_(fd), size_(size), hash_(internal::new_xxh3_state()) {}

Status HashingReader::read(void* dst, uint64_t n, std::string_view what) {
  if (n > remaining()) {
    return Status::data_loss("snapshot: truncated: " + std::string(what) +
                             " needs " + num(n) + " bytes at offset " +
                             num(offset_) + ", file has " + num(size_));
  }
  auto* out = static_cast<uint8_t*>(dst);
  while (n > 0) {
    if (pos_ == buf_.size()) KVMIG_RETURN_IF_ERROR(refill());
    const size_t take = std::min<uint64_t>(n, buf_.size() - pos_);
    std::memcpy(out, buf_.data() + pos_, take);
    XXH3_64bits_update(hash_.get(), out, take);
    pos_ += take;
    out += take;
    n -= take;
    offset_ += take;
  }
  return Status();
}

uint64_t HashingReader::hash() const { return XXH3_64bits_digest(hash_.get()); }

Status HashingReader::refill() {
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
  return Status();
}

Status write_file_atomically(
    const std::string& path,
    const std::function<Status(int fd, const std::string& what)>& write) {
  KVMIG_ASSIGN_OR_RETURN(TempFile file, create_temp_beside(path));
  Fd& fd = file.fd;
  const std::string& temp = file.name;
  ScopeExit remove_temp([&] { ::unlink(temp.c_str()); });
  KVMIG_RETURN_IF_ERROR(write(fd.get(), "write " + temp));
  if (::fsync(fd.get()) != 0)
    return status_from_errno(errno, "snapshot: fsync " + temp);
  KVMIG_RETURN_IF_ERROR(fd.close("close " + temp));
  if (::rename(temp.c_str(), path.c_str()) != 0) {
    return status_from_errno(errno, "snapshot: rename " + temp + " to " + path);
  }
  remove_temp.release();
  return fsync_directory(path);
}

}  // namespace kvmig::snapshot_internal
