// PoolMemory: where the synthetic engine keeps its page pool, and how the
// engine itself (its "kernels": decode steps, read_page, write_page) gets at
// those bytes. kvmig sees only base() through the pager's layout; for any
// kind but host it never dereferences it and copies through the pager's
// device hooks, which land here.
//
//   host        an anonymous mapping; the engine and kvmig touch it directly.
//   sim-device  a memfd mapped twice: base() is PROT_NONE, so a stray CPU
//               access by kvmig faults at once; the engine copies through
//               the second, readable mapping, as a GPU's kernels would
//               use device memory. Reported as kind cuda (what it stands
//               for). Exports a dmabuf through /dev/udmabuf where there is
//               one.
//   cuda        device memory of GPU `device`, through the CUDA driver API
//               loaded at run time (cuda_driver.h); refused with a clear
//               error on a host without a driver.
//
// Thread-safe: copies to disjoint ranges may run concurrently (the pager
// serializes its own; kvmig's copies target slots the pager lent it).
#ifndef KVMIG_SRC_CACHE_POOL_MEMORY_H_
#define KVMIG_SRC_CACHE_POOL_MEMORY_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "kvmig/pager.h"
#include "kvmig/status.h"
#include "kvmig/types.h"

namespace kvmig {

enum class PoolMemoryKind : uint8_t { kHost = 0, kSimDevice = 1, kCuda = 2 };
// host|sim-device|cuda
Result<PoolMemoryKind> parse_pool_memory_kind(std::string_view name);
std::string_view pool_memory_kind_name(PoolMemoryKind kind);

class PoolMemory {
 public:
  virtual ~PoolMemory() = default;

  // Allocates `length` (> 0) zeroed bytes of the given kind; `device` is the
  // GPU's ordinal (cuda only). ResourceExhausted or Unavailable naming
  // `what` and the reason when it cannot.
  static Result<std::unique_ptr<PoolMemory>> create(PoolMemoryKind kind,
                                                    size_t length, int device,
                                                    std::string_view what);

  // The address kvmig sees (a device pointer for cuda), length() bytes.
  virtual std::byte* base() const = 0;
  virtual size_t length() const = 0;
  // What the layout reports: kHost for host, kCuda otherwise.
  virtual MemoryKind kind() const = 0;
  virtual int device() const = 0;

  // Engine-side copies of [offset, offset + n) to and from host memory.
  // OutOfRange past length(); the device's error otherwise.
  virtual Status read(uint64_t offset, std::span<std::byte> out) const = 0;
  virtual Status write(uint64_t offset, std::span<const std::byte> in) = 0;
  // Sets [offset, offset + n) to zero.
  virtual Status zero(uint64_t offset, uint64_t n) = 0;
  // Copies [from, from + n) to [to, to + n) inside the pool (no overlap).
  virtual Status copy(uint64_t from, uint64_t to, uint64_t n) = 0;

  // A dmabuf fd covering the whole allocation (offset 0 is base()); the fd
  // stays open and owned by this object. Unimplemented with the reason
  // when this memory cannot export one.
  virtual Result<DmabufRegion> export_dmabuf() const = 0;

 protected:
  // OutOfRange unless [offset, offset + n) lies inside length().
  Status check_range(uint64_t offset, uint64_t n, std::string_view op) const;
};

// The cuda kind (cuda_memory.cc): memory of GPU `device` through the
// driver API. Unavailable naming what is missing (no libcuda.so.1, no
// such device, the driver's error) on a host without one.
Result<std::unique_ptr<PoolMemory>> create_cuda_pool_memory(
    size_t length, int device, std::string_view what);

}  // namespace kvmig

#endif  // KVMIG_SRC_CACHE_POOL_MEMORY_H_
