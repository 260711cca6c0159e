// The cuda kind of PoolMemory (pool_memory.h): one cuMemAlloc allocation in
// the primary context of one GPU, reached through the driver API loaded at
// run time (cuda_driver.h). The copies are the driver's synchronous ones,
// followed by a synchronize where the driver would return early, so that
// when a call returns its bytes have landed for every reader (a NIC
// through the dmabuf, UCX on its own streams), not only for later CUDA
// copies.
#include <unistd.h>

#include <memory>
#include <mutex>
#include <string>

#include "cuda_driver.h"
#include "log.h"
#include "pool_memory.h"

namespace kvmig {
namespace {

using cuda::CUcontext;
using cuda::CudaDriver;
using cuda::CUdevice;
using cuda::CUdeviceptr;

// Thread-safe (see PoolMemory): each call makes the context current on the
// calling thread, since kvmig calls from threads of its own.
class CudaMemory final : public PoolMemory {
 public:
  // Unavailable (no driver, the driver's error), InvalidArgument (no such
  // device) or ResourceExhausted (out of device memory), naming `what`.
  static Result<std::unique_ptr<PoolMemory>> create(size_t length, int ordinal,
                                                    std::string_view what) {
    auto cuda = CudaDriver::get();
    if (!cuda.ok()) return cuda.status().with_context(what);
    auto dev = (*cuda)->device(ordinal);
    if (!dev.ok()) return dev.status().with_context(what);
    std::unique_ptr<CudaMemory> m(
        new CudaMemory(**cuda, ordinal, *dev, length));
    if (Status s = m->init(); !s.ok()) {
      return s.with_context(std::string(what) + ": CUDA device " +
                            std::to_string(ordinal));
    }
    return std::unique_ptr<PoolMemory>(std::move(m));
  }

  CudaMemory(const CudaMemory&) = delete;
  CudaMemory& operator=(const CudaMemory&) = delete;

  // Closes the dmabuf, frees the memory, releases the context: the reverse
  // of init(), as far as it got. Failures are logged.
  ~CudaMemory() override {
    if (dmabuf_fd_ >= 0) ::close(dmabuf_fd_);
    if (ptr_ != 0) {
      Status s = current();
      if (s.ok()) s = cuda_.mem_free(ptr_);
      if (!s.ok()) warn("freeing the pool", s);
    }
    if (context_ != nullptr) {
      if (Status s = cuda_.release_primary_context(device_); !s.ok()) {
        warn("releasing the primary context", s);
      }
    }
  }

  std::byte* base() const override {
    return reinterpret_cast<std::byte*>(ptr_);
  }
  size_t length() const override { return length_; }
  MemoryKind kind() const override { return MemoryKind::kCuda; }
  int device() const override { return ordinal_; }

  Status read(uint64_t offset, std::span<std::byte> out) const override {
    KVMIG_RETURN_IF_ERROR(check_range(offset, out.size(), "pool read"));
    if (out.empty()) return Status();
    KVMIG_RETURN_IF_ERROR(current());
    return cuda_.memcpy_dtoh(out.data(), ptr_ + offset, out.size());
  }

  Status write(uint64_t offset, std::span<const std::byte> in) override {
    KVMIG_RETURN_IF_ERROR(check_range(offset, in.size(), "pool write"));
    if (in.empty()) return Status();
    KVMIG_RETURN_IF_ERROR(current());
    KVMIG_RETURN_IF_ERROR(
        cuda_.memcpy_htod(ptr_ + offset, in.data(), in.size()));
    return cuda_.synchronize();
  }

  Status zero(uint64_t offset, uint64_t n) override {
    KVMIG_RETURN_IF_ERROR(check_range(offset, n, "pool zero"));
    if (n == 0) return Status();
    KVMIG_RETURN_IF_ERROR(current());
    KVMIG_RETURN_IF_ERROR(cuda_.memset_d8(ptr_ + offset, 0, n));
    return cuda_.synchronize();
  }

  Status copy(uint64_t from, uint64_t to, uint64_t n) override {
    KVMIG_RETURN_IF_ERROR(check_range(from, n, "pool copy"));
    KVMIG_RETURN_IF_ERROR(check_range(to, n, "pool copy"));
    if (n == 0) return Status();
    KVMIG_RETURN_IF_ERROR(current());
    KVMIG_RETURN_IF_ERROR(cuda_.memcpy_dtod(ptr_ + to, ptr_ + from, n));
    return cuda_.synchronize();
  }

  // Exported on the first call over the whole allocation, then kept (the
  // fd, or the reason there is none).
  Result<DmabufRegion> export_dmabuf() const override {
    std::lock_guard lock(dmabuf_mu_);
    if (dmabuf_fd_ < 0 && dmabuf_error_.ok()) {
      Status s = current();
      if (s.ok()) {
        // The range must be host-page aligned: ptr_ is (cuMemAlloc), and
        // allocated_ is length_ rounded up.
        auto fd = cuda_.export_dmabuf(ptr_, allocated_);
        if (fd.ok()) dmabuf_fd_ = *fd;
        s = fd.status();
      }
      dmabuf_error_ = s;
    }
    if (!dmabuf_error_.ok()) return dmabuf_error_;
    return DmabufRegion{dmabuf_fd_, 0};
  }

 private:
  CudaMemory(const CudaDriver& cuda, int ordinal, CUdevice device,
             size_t length)
      : cuda_(cuda),
        ordinal_(ordinal),
        device_(device),
        length_(length),
        allocated_(round_up_to_page(length)) {}

  static size_t round_up_to_page(size_t n) {
    const auto page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    return (n + page - 1) / page * page;
  }

  // The device's primary context, then the zeroed allocation.
  Status init() {
    KVMIG_ASSIGN_OR_RETURN(context_, cuda_.retain_primary_context(device_));
    KVMIG_RETURN_IF_ERROR(current());
    KVMIG_ASSIGN_OR_RETURN(ptr_, cuda_.mem_alloc(allocated_));
    KVMIG_RETURN_IF_ERROR(cuda_.memset_d8(ptr_, 0, allocated_));
    return cuda_.synchronize();
  }

  Status current() const { return cuda_.set_current(context_); }

  void warn(std::string_view what, const Status& s) const {
    logger("engine")->warn("CUDA device {}: {}: {}", ordinal_, what,
                           s.to_string());
  }

  const CudaDriver& cuda_;
  const int ordinal_;
  const CUdevice device_;
  const size_t length_;          // what the pool asked for
  const size_t allocated_;       // length_ rounded up to the host page size
  CUcontext context_ = nullptr;  // retained once set
  CUdeviceptr ptr_ = 0;          // allocated once set
  mutable std::mutex dmabuf_mu_;
  mutable int dmabuf_fd_ = -1;   // guarded by dmabuf_mu_
  mutable Status dmabuf_error_;  // guarded by dmabuf_mu_; kept once set
};

}  // namespace

Result<std::unique_ptr<PoolMemory>> create_cuda_pool_memory(
    size_t length, int device, std::string_view what) {
  return CudaMemory::create(length, device, what);
}

}  // namespace kvmig
