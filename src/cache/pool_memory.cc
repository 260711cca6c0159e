#include "pool_memory.h"

#include <fcntl.h>
#include <linux/udmabuf.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>

#include "mapped_region.h"

namespace kvmig {

Result<PoolMemoryKind> parse_pool_memory_kind(std::string_view name) {
  if (name == "host") return PoolMemoryKind::kHost;
  if (name == "sim-device") return PoolMemoryKind::kSimDevice;
  if (name == "cuda") return PoolMemoryKind::kCuda;
  return Status::invalid_argument("unknown memory kind '" + std::string(name) +
                                  "' (expected host, sim-device or cuda)");
}

std::string_view pool_memory_kind_name(PoolMemoryKind kind) {
  switch (kind) {
    case PoolMemoryKind::kHost:
      return "host";
    case PoolMemoryKind::kSimDevice:
      return "sim-device";
    case PoolMemoryKind::kCuda:
      return "cuda";
  }
  return "invalid";
}

Status PoolMemory::check_range(uint64_t offset, uint64_t n,
                               std::string_view op) const {
  if (offset > length() || n > length() - offset) {
    return Status::out_of_range(std::string(op) + ": [" +
                                std::to_string(offset) + ", +" +
                                std::to_string(n) + ") outside the pool of " +
                                std::to_string(length()) + " bytes");
  }
  return Status();
}

namespace {

// Copies through a CPU-visible pointer: the host kind's only mapping, the
// simulated device's second one.
class CpuCopies : public PoolMemory {
 public:
  Status read(uint64_t offset, std::span<std::byte> out) const override {
    KVMIG_RETURN_IF_ERROR(check_range(offset, out.size(), "pool read"));
    if (!out.empty()) std::memcpy(out.data(), cpu() + offset, out.size());
    return Status();
  }
  Status write(uint64_t offset, std::span<const std::byte> in) override {
    KVMIG_RETURN_IF_ERROR(check_range(offset, in.size(), "pool write"));
    if (!in.empty()) std::memcpy(cpu() + offset, in.data(), in.size());
    return Status();
  }
  Status zero(uint64_t offset, uint64_t n) override {
    KVMIG_RETURN_IF_ERROR(check_range(offset, n, "pool zero"));
    std::memset(cpu() + offset, 0, n);
    return Status();
  }
  Status copy(uint64_t from, uint64_t to, uint64_t n) override {
    KVMIG_RETURN_IF_ERROR(check_range(from, n, "pool copy"));
    KVMIG_RETURN_IF_ERROR(check_range(to, n, "pool copy"));
    std::memcpy(cpu() + to, cpu() + from, n);
    return Status();
  }

 protected:
  virtual std::byte* cpu() const = 0;
};

class HostMemory final : public CpuCopies {
 public:
  explicit HostMemory(MappedRegion m) : m_(std::move(m)) {}
  std::byte* base() const override { return m_.data(); }
  size_t length() const override { return m_.size(); }
  MemoryKind kind() const override { return MemoryKind::kHost; }
  int device() const override { return 0; }
  Result<DmabufRegion> export_dmabuf() const override {
    return Status::unimplemented("host memory has no dmabuf");
  }

 private:
  std::byte* cpu() const override { return m_.data(); }
  MappedRegion m_;
};

// One shared mapping of a memfd at a given protection; unmapped on
// destruction.
class FdMapping {
 public:
  FdMapping() = default;
  FdMapping(std::byte* p, size_t n) : p_(p), n_(n) {}
  FdMapping(FdMapping&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  FdMapping& operator=(FdMapping&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~FdMapping() { reset(); }
  std::byte* data() const { return p_; }

 private:
  void reset() {
    if (p_) ::munmap(p_, n_);
    p_ = nullptr;
  }

  std::byte* p_ = nullptr;
  size_t n_ = 0;
};

Result<FdMapping> map_fd(int fd, size_t length, int prot, bool populate,
                         std::string_view what) {
  void* p = ::mmap(nullptr, length, prot,
                   MAP_SHARED | (populate ? MAP_POPULATE : 0), fd, 0);
  if (p == MAP_FAILED) {
    return Status::resource_exhausted(std::string(what) + ": mmap of " +
                                      std::to_string(length) +
                                      " bytes: " + std::strerror(errno));
  }
  return FdMapping(static_cast<std::byte*>(p), length);
}

class SimDeviceMemory final : public CpuCopies {
 public:
  static Result<std::unique_ptr<PoolMemory>> create(size_t length,
                                                    std::string_view what) {
    const int fd = ::memfd_create("kvmig-sim-device", MFD_ALLOW_SEALING);
    if (fd < 0) {
      return Status::resource_exhausted(
          std::string(what) + ": memfd_create: " + std::strerror(errno));
    }
    std::unique_ptr<SimDeviceMemory> m(new SimDeviceMemory(fd, length));
    if (::ftruncate(fd, static_cast<off_t>(length)) != 0) {
      return Status::resource_exhausted(
          std::string(what) + ": sizing the simulated device to " +
          std::to_string(length) + " bytes: " + std::strerror(errno));
    }
    // udmabuf wants the size sealed; nothing here resizes it.
    (void)::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK);
    KVMIG_ASSIGN_OR_RETURN(m->device_, map_fd(fd, length, PROT_NONE, false,
                                              std::string(what) + " (device)"));
    KVMIG_ASSIGN_OR_RETURN(m->engine_,
                           map_fd(fd, length, PROT_READ | PROT_WRITE, true,
                                  std::string(what) + " (engine)"));
    return std::unique_ptr<PoolMemory>(std::move(m));
  }

  ~SimDeviceMemory() override {
    if (dmabuf_fd_ >= 0) ::close(dmabuf_fd_);
    ::close(fd_);
  }

  std::byte* base() const override { return device_.data(); }
  size_t length() const override { return length_; }
  MemoryKind kind() const override { return MemoryKind::kCuda; }
  int device() const override { return 0; }

  // Through /dev/udmabuf (Linux >= 5.2, CONFIG_UDMABUF), made once.
  Result<DmabufRegion> export_dmabuf() const override {
    std::lock_guard lock(dmabuf_mu_);
    if (!dmabuf_error_.ok()) return dmabuf_error_;
    if (dmabuf_fd_ < 0) {
      const int dev = ::open("/dev/udmabuf", O_RDWR | O_CLOEXEC);
      if (dev < 0) {
        dmabuf_error_ = Status::unimplemented(
            std::string("the simulated device cannot export a dmabuf: "
                        "/dev/udmabuf: ") +
            std::strerror(errno));
        return dmabuf_error_;
      }
      udmabuf_create req{};
      req.memfd = static_cast<uint32_t>(fd_);
      req.flags = UDMABUF_FLAGS_CLOEXEC;
      req.offset = 0;
      req.size = length_;
      dmabuf_fd_ = ::ioctl(dev, UDMABUF_CREATE, &req);
      const int err = errno;
      ::close(dev);
      if (dmabuf_fd_ < 0) {
        dmabuf_error_ = Status::unimplemented(
            std::string("the simulated device cannot export a dmabuf: "
                        "UDMABUF_CREATE: ") +
            std::strerror(err));
        return dmabuf_error_;
      }
    }
    return DmabufRegion{dmabuf_fd_, 0};
  }

 private:
  SimDeviceMemory(int fd, size_t length) : fd_(fd), length_(length) {}
  std::byte* cpu() const override { return engine_.data(); }

  const int fd_;
  const size_t length_;
  FdMapping device_;  // PROT_NONE: what kvmig is shown
  FdMapping engine_;  // read/write: the engine's own access
  mutable std::mutex dmabuf_mu_;
  mutable int dmabuf_fd_ = -1;   // guarded by dmabuf_mu_
  mutable Status dmabuf_error_;  // guarded by dmabuf_mu_
};

}  // namespace

Result<std::unique_ptr<PoolMemory>> PoolMemory::create(PoolMemoryKind kind,
                                                       size_t length,
                                                       int device,
                                                       std::string_view what) {
  if (length == 0) {
    return Status::invalid_argument(std::string(what) + ": empty pool");
  }
  switch (kind) {
    case PoolMemoryKind::kHost: {
      KVMIG_ASSIGN_OR_RETURN(MappedRegion m,
                             MappedRegion::create(length, true, what));
      return std::unique_ptr<PoolMemory>(new HostMemory(std::move(m)));
    }
    case PoolMemoryKind::kSimDevice:
      return SimDeviceMemory::create(length, what);
    case PoolMemoryKind::kCuda:
      return create_cuda_pool_memory(length, device, what);
  }
  return Status::invalid_argument(std::string(what) + ": unknown memory kind");
}

}  // namespace kvmig
