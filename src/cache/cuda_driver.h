// CudaDriver: the few calls of the CUDA driver API that the cuda kind of
// PoolMemory (cuda_memory.cc) makes, loaded at run time with
// dlopen("libcuda.so.1"): kvmig builds without cuda.h (Debian 12 ships no
// CUDA toolkit) and runs on any host; on one without a driver, get() says
// so. This header is the only place that declares CUDA's types and symbols.
//
// The declarations are copied from cuda.h of the CUDA 12.x driver API. The
// library exports several calls under versioned names (cuda.h #defines
// cuMemAlloc as cuMemAlloc_v2 and so on); those are the ones bound.
// cuMemGetHandleForAddressRange (CUDA >= 11.7) is optional: without it
// there is no dmabuf export, and everything else works.
//
// Thread-safe: the driver is immutable once loaded, and the CUDA driver API
// itself may be called from any thread. The calls act on the calling
// thread's current context: callers make theirs current first.
#ifndef KVMIG_SRC_CACHE_CUDA_DRIVER_H_
#define KVMIG_SRC_CACHE_CUDA_DRIVER_H_

#include <cstddef>
#include <string_view>

#include "kvmig/status.h"

namespace kvmig::cuda {

// From cuda.h (CUDA 12.x).
using CUresult = int;
using CUdevice = int;
using CUcontext = struct CUctx_st*;
using CUdeviceptr = unsigned long long;

class CudaDriver {
 public:
  // The driver, loaded and initialized (cuInit) by the first call, or
  // Unavailable naming what is missing: "no CUDA driver: dlopen
  // libcuda.so.1: <dlerror>", a symbol the library lacks, or "cuInit:
  // <the driver's error>". Every later call returns the same answer.
  static Result<const CudaDriver*> get();

  CudaDriver(const CudaDriver&) = delete;
  CudaDriver& operator=(const CudaDriver&) = delete;

  // The driver's CUDA version, e.g. 12020 for 12.2 (cuDriverGetVersion).
  int version() const { return version_; }

  // The one mapper of CUresult to Status: OK for CUDA_SUCCESS; otherwise
  // "<what>: <the driver's error string> (CUDA error N)", out of memory
  // ResourceExhausted, not supported Unimplemented, an invalid value
  // Internal (kvmig passed it), anything else Unavailable (no device, a
  // driver that does not match, a device fault that left the context
  // unusable).
  Status check(CUresult r, std::string_view what) const;

  // The device with this ordinal; InvalidArgument naming how many devices
  // there are when there is no such device.
  Result<CUdevice> device(int ordinal) const;

  // Retains the device's primary context (shared with every other user of
  // the device in this process, the CUDA runtime included); each retain is
  // undone by one release.
  Result<CUcontext> retain_primary_context(CUdevice device) const;
  Status release_primary_context(CUdevice device) const;
  // Makes ctx the calling thread's current context.
  Status set_current(CUcontext ctx) const;
  // Waits until every copy and memset of the current context has landed.
  Status synchronize() const;

  // Device memory of the current context (cuMemAlloc: aligned to at least
  // the host page size).
  Result<CUdeviceptr> mem_alloc(size_t bytes) const;
  Status mem_free(CUdeviceptr ptr) const;

  // The copies. Device to host returns once the bytes are in host memory;
  // host to device, device to device and memset may return before the
  // device has finished (later CUDA copies see their bytes; anything else
  // that reads device memory, a NIC through a dmabuf, needs synchronize()).
  Status memcpy_htod(CUdeviceptr dst, const void* src, size_t bytes) const;
  Status memcpy_dtoh(void* dst, CUdeviceptr src, size_t bytes) const;
  Status memcpy_dtod(CUdeviceptr dst, CUdeviceptr src, size_t bytes) const;
  Status memset_d8(CUdeviceptr dst, unsigned char value, size_t bytes) const;

  // A new dmabuf fd for [ptr, ptr + bytes), both aligned to the host page
  // size; the caller owns and closes it. Unimplemented "this CUDA driver
  // cannot export dmabufs (cuMemGetHandleForAddressRange: <why>)" when the
  // driver lacks the call or the device refuses.
  Result<int> export_dmabuf(CUdeviceptr ptr, size_t bytes) const;

 private:
  CudaDriver() = default;
  static Result<const CudaDriver*> load();

  // The library's symbols, with cuda.h's signatures; the comment names the
  // exported symbol where it is versioned.
  CUresult (*cuInit_)(unsigned int flags) = nullptr;
  CUresult (*cuDriverGetVersion_)(int* version) = nullptr;
  CUresult (*cuGetErrorString_)(CUresult error, const char** str) = nullptr;
  CUresult (*cuDeviceGetCount_)(int* count) = nullptr;
  CUresult (*cuDeviceGet_)(CUdevice* device, int ordinal) = nullptr;
  CUresult (*cuDevicePrimaryCtxRetain_)(CUcontext* ctx, CUdevice dev) = nullptr;
  CUresult (*cuDevicePrimaryCtxRelease_)(CUdevice dev) = nullptr;  // _v2
  CUresult (*cuCtxSetCurrent_)(CUcontext ctx) = nullptr;
  CUresult (*cuCtxSynchronize_)() = nullptr;
  CUresult (*cuMemAlloc_)(CUdeviceptr* dptr, size_t bytes) = nullptr;  // _v2
  CUresult (*cuMemFree_)(CUdeviceptr dptr) = nullptr;                  // _v2
  CUresult (*cuMemcpyHtoD_)(CUdeviceptr dst, const void* src,
                            size_t bytes) = nullptr;  // _v2
  CUresult (*cuMemcpyDtoH_)(void* dst, CUdeviceptr src,
                            size_t bytes) = nullptr;  // _v2
  CUresult (*cuMemcpyDtoD_)(CUdeviceptr dst, CUdeviceptr src,
                            size_t bytes) = nullptr;  // _v2
  CUresult (*cuMemsetD8_)(CUdeviceptr dst, unsigned char value,
                          size_t n) = nullptr;  // _v2
  // Optional: null when the driver is older than CUDA 11.7. handle_type is
  // CUmemRangeHandleType; handle points to an int for a dmabuf fd.
  CUresult (*cuMemGetHandleForAddressRange_)(
      void* handle, CUdeviceptr dptr, size_t size, int handle_type,
      unsigned long long flags) = nullptr;
  int version_ = 0;
};

}  // namespace kvmig::cuda

#endif  // KVMIG_SRC_CACHE_CUDA_DRIVER_H_
