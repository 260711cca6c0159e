// The bridge between Python and kvmig's C++ interfaces: a CachePager whose
// methods are a Python subclass's (kvmig.CachePager), and the conversions of
// Status to and from kvmig.Error.
//
// Threads: kvmig calls a pager from its own threads. Every PyPager method
// takes the GIL for the Python call and nothing else, and holds no C++ lock
// while it waits for it, so a Python thread holding the GIL (the engine's
// decode loop, or the caller of agent.migrate()) never deadlocks with it:
// the blocking calls of the binding release the GIL first.
#ifndef KVMIG_SRC_PYTHON_PY_PAGER_H_
#define KVMIG_SRC_PYTHON_PY_PAGER_H_

#include <pybind11/pybind11.h>

#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kvmig/pager.h"
#include "kvmig/status.h"

namespace kvmig::python {

namespace py = pybind11;

// The kvmig.Error class; set once by the module's initialisation.
py::object& error_type();

// Raises kvmig.Error(status.message(), code=<name>). Never returns.
[[noreturn]] void raise_status(const Status& status);
// Returns the value of an OK result, or raises kvmig.Error.
template <class T>
T value_or_raise(Result<T>&& result) {
  if (!result.ok()) raise_status(result.status());
  return std::move(*result);
}
inline void ok_or_raise(const Status& status) {
  if (!status.ok()) raise_status(status);
}

// The status a Python exception stands for: a kvmig.Error keeps its code,
// anything else is Internal; the text names the pager method and the
// exception. Needs the GIL.
Status status_from_python(const char* method, py::error_already_set& error);

// A CachePager implemented in Python. meta() and layout() are read once, by
// prime(), since both are constant for the pager's lifetime and kvmig reads
// them from any thread.
class PyPager : public CachePager {
 public:
  // Reads meta() and layout() from the Python object; raises what they
  // raise, or kvmig.Error when they return the wrong type or a layout kvmig
  // cannot use (device memory without copy_from_device/copy_to_device).
  // Needs the GIL. Idempotent.
  void prime();

  CacheMeta meta() const override;
  Status pause() override;
  Status resume() override;
  Result<std::vector<PageIndex>> occupied_pages() override;
  Result<std::vector<LogicalSeq>> logical_seqs() override;
  Result<PageBytes> read_page(PageIndex ix) override;
  Result<std::vector<PageIndex>> allocate_pages(uint32_t n) override;
  Status write_page(PageIndex ix, const PageBytes& page) override;
  Status install_logical_seqs(const std::vector<LogicalSeq>& seqs) override;
  std::optional<PagerLayout> layout() const override;
  Status release_pages(std::span<const PageIndex> ixs) override;
  Status drop_logical_seqs(std::span<const SeqId> ids) override;
  Status hold_seqs(std::span<const SeqId> ids) override;
  Status unhold_seqs(std::span<const SeqId> ids) override;
  std::optional<PagerCapacity> capacity() const override;
  // pager.copy_from_device(region, offset, out): out is a writable
  // memoryview of the bytes to fill; copy_to_device(region, offset, data):
  // a read-only one; export_dmabuf(region) -> (fd, offset).
  Status copy_from_device(uint32_t region, uint64_t offset,
                          std::span<std::byte> out) override;
  Status copy_to_device(uint32_t region, uint64_t offset,
                        std::span<const std::byte> in) override;
  Result<DmabufRegion> export_dmabuf(uint32_t region) override;

 private:
  bool primed_ = false;  // written under the GIL before any kvmig thread runs
  CacheMeta meta_;
  std::optional<PagerLayout> layout_;
};

}  // namespace kvmig::python

#endif  // KVMIG_SRC_PYTHON_PY_PAGER_H_
