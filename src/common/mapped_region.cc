#include "mapped_region.h"

#include <sys/mman.h>

#include <cerrno>
#include <string>
#include <utility>

#include "errors.h"
#include "log.h"

namespace kvmig {

Result<MappedRegion> MappedRegion::create(size_t length, bool populate,
                                          std::string_view what) {
  if (length == 0) {
    return Status::invalid_argument(std::string(what) + ": empty mapping");
  }
  const int flags = MAP_PRIVATE | MAP_ANONYMOUS | (populate ? MAP_POPULATE : 0);
  void* p = mmap(nullptr, length, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    return Status::resource_exhausted(
        status_from_errno(err, std::string(what) + ": mmap of " +
                                   std::to_string(length) + " bytes")
            .message());
  }
  return MappedRegion(static_cast<std::byte*>(p), length);
}

MappedRegion::MappedRegion(MappedRegion&& other) noexcept
    : base_(std::exchange(other.base_, nullptr)),
      length_(std::exchange(other.length_, 0)) {}

MappedRegion& MappedRegion::operator=(MappedRegion&& other) noexcept {
  if (this != &other) {
    reset();
    base_ = std::exchange(other.base_, nullptr);
    length_ = std::exchange(other.length_, 0);
  }
  return *this;
}

MappedRegion::~MappedRegion() { reset(); }

void MappedRegion::reset() {
  if (base_ == nullptr) return;
  if (munmap(base_, length_) != 0) {
    logger("engine")->error("{}",
                            status_from_errno(errno, "munmap").to_string());
  }
  base_ = nullptr;
  length_ = 0;
}

}  // namespace kvmig
