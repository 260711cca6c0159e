// CudaDriver (cuda_driver.h): binds libcuda.so.1's symbols once and wraps
// each call in the one CUresult mapper.
#include "cuda_driver.h"

#include <dlfcn.h>

#include <memory>
#include <string>

namespace kvmig::cuda {
namespace {

// cuda.h's values of the few enumerators kvmig needs.
constexpr CUresult kSuccess = 0;          // CUDA_SUCCESS
constexpr CUresult kInvalidValue = 1;     // CUDA_ERROR_INVALID_VALUE
constexpr CUresult kOutOfMemory = 2;      // CUDA_ERROR_OUT_OF_MEMORY
constexpr CUresult kNotSupported = 801;   // CUDA_ERROR_NOT_SUPPORTED
constexpr int kHandleTypeDmaBufFd = 0x1;  // CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD

// Points slot at symbol; the first missing required symbol goes to missing.
template <typename Fn>
void bind(void* lib, const char* symbol, Fn*& slot, std::string& missing) {
  slot = reinterpret_cast<Fn*>(::dlsym(lib, symbol));
  if (slot == nullptr && missing.empty()) missing = symbol;
}

std::string version_name(int version) {
  return std::to_string(version / 1000) + "." +
         std::to_string(version % 1000 / 10);
}

}  // namespace

Result<const CudaDriver*> CudaDriver::get() {
  // A function-local static: loaded once, thread-safe, failures included.
  static const Result<const CudaDriver*> driver = load();
  return driver;
}

Result<const CudaDriver*> CudaDriver::load() {
  void* lib = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = ::dlerror();
    return Status::unavailable(std::string("no CUDA driver: dlopen "
                                           "libcuda.so.1: ") +
                               (why != nullptr ? why : "unknown error"));
  }
  std::unique_ptr<CudaDriver> d(new CudaDriver());
  std::string missing;
  bind(lib, "cuInit", d->cuInit_, missing);
  bind(lib, "cuDriverGetVersion", d->cuDriverGetVersion_, missing);
  bind(lib, "cuGetErrorString", d->cuGetErrorString_, missing);
  bind(lib, "cuDeviceGetCount", d->cuDeviceGetCount_, missing);
  bind(lib, "cuDeviceGet", d->cuDeviceGet_, missing);
  bind(lib, "cuDevicePrimaryCtxRetain", d->cuDevicePrimaryCtxRetain_, missing);
  bind(lib, "cuDevicePrimaryCtxRelease_v2", d->cuDevicePrimaryCtxRelease_,
       missing);
  bind(lib, "cuCtxSetCurrent", d->cuCtxSetCurrent_, missing);
  bind(lib, "cuCtxSynchronize", d->cuCtxSynchronize_, missing);
  bind(lib, "cuMemAlloc_v2", d->cuMemAlloc_, missing);
  bind(lib, "cuMemFree_v2", d->cuMemFree_, missing);
  bind(lib, "cuMemcpyHtoD_v2", d->cuMemcpyHtoD_, missing);
  bind(lib, "cuMemcpyDtoH_v2", d->cuMemcpyDtoH_, missing);
  bind(lib, "cuMemcpyDtoD_v2", d->cuMemcpyDtoD_, missing);
  bind(lib, "cuMemsetD8_v2", d->cuMemsetD8_, missing);
  std::string optional;
  bind(lib, "cuMemGetHandleForAddressRange", d->cuMemGetHandleForAddressRange_,
       optional);
  Status s = missing.empty()
                 ? d->check(d->cuInit_(0), "cuInit")
                 : Status::unavailable("CUDA driver libcuda.so.1 has no " +
                                       missing + " (older than CUDA 11?)");
  if (s.ok()) {
    s = d->check(d->cuDriverGetVersion_(&d->version_), "cuDriverGetVersion");
  }
  if (!s.ok()) {
    ::dlclose(lib);
    return Status::unavailable(s.message());
  }
  // Never freed: the driver stays loaded for the process's lifetime.
  return d.release();
}

Status CudaDriver::check(CUresult r, std::string_view what) const {
  if (r == kSuccess) return Status();
  const char* text = nullptr;
  if (cuGetErrorString_(r, &text) != kSuccess || text == nullptr) {
    text = "unrecognized error";
  }
  std::string msg = std::string(what) + ": " + text + " (CUDA error " +
                    std::to_string(r) + ")";
  switch (r) {
    case kOutOfMemory:
      return Status::resource_exhausted(std::move(msg));
    case kNotSupported:
      return Status::unimplemented(std::move(msg));
    case kInvalidValue:
      return Status::internal(std::move(msg));
    default:
      return Status::unavailable(std::move(msg));
  }
}

Result<CUdevice> CudaDriver::device(int ordinal) const {
  int count = 0;
  KVMIG_RETURN_IF_ERROR(check(cuDeviceGetCount_(&count), "cuDeviceGetCount"));
  if (ordinal < 0 || ordinal >= count) {
    return Status::invalid_argument(
        "no CUDA device " + std::to_string(ordinal) + ": this host has " +
        std::to_string(count) + (count == 1 ? " device" : " devices"));
  }
  CUdevice dev = 0;
  KVMIG_RETURN_IF_ERROR(check(cuDeviceGet_(&dev, ordinal), "cuDeviceGet"));
  return dev;
}

Result<CUcontext> CudaDriver::retain_primary_context(CUdevice device) const {
  CUcontext ctx = nullptr;
  KVMIG_RETURN_IF_ERROR(check(cuDevicePrimaryCtxRetain_(&ctx, device),
                              "cuDevicePrimaryCtxRetain"));
  return ctx;
}

Status CudaDriver::release_primary_context(CUdevice device) const {
  return check(cuDevicePrimaryCtxRelease_(device), "cuDevicePrimaryCtxRelease");
}

Status CudaDriver::set_current(CUcontext ctx) const {
  return check(cuCtxSetCurrent_(ctx), "cuCtxSetCurrent");
}

Status CudaDriver::synchronize() const {
  return check(cuCtxSynchronize_(), "cuCtxSynchronize");
}

Result<CUdeviceptr> CudaDriver::mem_alloc(size_t bytes) const {
  CUdeviceptr ptr = 0;
  KVMIG_RETURN_IF_ERROR(
      check(cuMemAlloc_(&ptr, bytes),
            "cuMemAlloc of " + std::to_string(bytes) + " bytes"));
  return ptr;
}

Status CudaDriver::mem_free(CUdeviceptr ptr) const {
  return check(cuMemFree_(ptr), "cuMemFree");
}

Status CudaDriver::memcpy_htod(CUdeviceptr dst, const void* src,
                               size_t bytes) const {
  return check(cuMemcpyHtoD_(dst, src, bytes), "cuMemcpyHtoD");
}

Status CudaDriver::memcpy_dtoh(void* dst, CUdeviceptr src, size_t bytes) const {
  return check(cuMemcpyDtoH_(dst, src, bytes), "cuMemcpyDtoH");
}

Status CudaDriver::memcpy_dtod(CUdeviceptr dst, CUdeviceptr src,
                               size_t bytes) const {
  return check(cuMemcpyDtoD_(dst, src, bytes), "cuMemcpyDtoD");
}

Status CudaDriver::memset_d8(CUdeviceptr dst, unsigned char value,
                             size_t bytes) const {
  return check(cuMemsetD8_(dst, value, bytes), "cuMemsetD8");
}

Result<int> CudaDriver::export_dmabuf(CUdeviceptr ptr, size_t bytes) const {
  if (cuMemGetHandleForAddressRange_ == nullptr) {
    return Status::unimplemented(
        "this CUDA driver cannot export dmabufs "
        "(cuMemGetHandleForAddressRange: not in libcuda.so.1 of CUDA " +
        version_name(version_) + ", needs 11.7 or later)");
  }
  int fd = -1;
  Status s = check(
      cuMemGetHandleForAddressRange_(&fd, ptr, bytes, kHandleTypeDmaBufFd, 0),
      "cuMemGetHandleForAddressRange");
  if (!s.ok()) {
    return Status::unimplemented("this CUDA driver cannot export dmabufs (" +
                                 s.message() + ")");
  }
  return fd;
}

}  // namespace kvmig::cuda
