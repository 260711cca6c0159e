#include "py_pager.h"

#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <utility>

namespace kvmig::python {

py::object& error_type() {
  // Leaked on purpose: a Python object must not be released after the
  // interpreter has gone, which a static destructor could do.
  static auto* type = new py::object();
  return *type;
}

void raise_status(const Status& status) {
  py::object error = error_type()(
      status.message(),
      py::arg("code") = std::string(status_code_name(status.code())));
  PyErr_SetObject(error_type().ptr(), error.ptr());
  throw py::error_already_set();
}

namespace {

StatusCode code_from_name(const std::string& name) {
  for (int c = 1; c <= static_cast<int>(StatusCode::kUnauthenticated); ++c) {
    auto code = static_cast<StatusCode>(c);
    if (status_code_name(code) == name) return code;
  }
  return StatusCode::kInternal;
}

std::string type_name(py::handle obj) {
  return py::str(py::type::handle_of(obj).attr("__qualname__"));
}

// " (at FILE:LINE)" of the innermost frame of a traceback, if any.
std::string where(py::handle trace) {
  if (!trace || trace.is_none()) return "";
  py::handle tb = trace;
  while (!tb.attr("tb_next").is_none()) tb = tb.attr("tb_next");
  std::string file =
      py::str(tb.attr("tb_frame").attr("f_code").attr("co_filename"));
  int line = tb.attr("tb_lineno").cast<int>();
  return " (at " + file + ":" + std::to_string(line) + ")";
}

// Calls the Python override `name` with the GIL held and gives its result to
// `use`. A method the subclass does not define is Unimplemented, as the C++
// defaults are; an exception becomes the returned status.
template <class R, class Use>
R call_python(const CachePager* self, const char* name, Use&& use) {
  py::gil_scoped_acquire gil;
  try {
    py::function fn = py::get_override(self, name);
    if (!fn) {
      return R(
          Status::unimplemented(std::string("pager does not support ") + name));
    }
    return use(fn);
  } catch (py::error_already_set& e) {
    return R(status_from_python(name, e));
  } catch (const py::cast_error& e) {
    return R(
        Status::invalid_argument(std::string("pager.") + name +
                                 "() returned the wrong type: " + e.what()));
  } catch (const std::exception& e) {
    return R(
        Status::internal(std::string("pager.") + name + "(): " + e.what()));
  }
}

// A bytes-like object (bytes, bytearray, memoryview, a numpy array, a CPU
// torch tensor), contiguous and `expect` bytes long, copied into out.
Status copy_page_half(py::handle obj, const std::string& what, uint64_t expect,
                      std::vector<std::byte>& out) {
  const void* data = nullptr;
  uint64_t len = 0;
  Py_buffer view{};
  bool have_view = false;
  if (py::hasattr(obj, "data_ptr") && py::hasattr(obj, "element_size") &&
      !PyObject_CheckBuffer(obj.ptr())) {
    // A torch tensor (no buffer protocol; bf16 has no numpy dtype).
    if (std::string(py::str(obj.attr("device").attr("type"))) != "cpu") {
      return Status::invalid_argument(what + " is a tensor on " +
                                      std::string(py::str(obj.attr("device"))) +
                                      "; only CPU memory is supported");
    }
    if (!obj.attr("is_contiguous")().cast<bool>()) {
      return Status::invalid_argument(what + " is not a contiguous tensor");
    }
    data =
        reinterpret_cast<const void*>(obj.attr("data_ptr")().cast<uintptr_t>());
    len = obj.attr("numel")().cast<uint64_t>() *
          obj.attr("element_size")().cast<uint64_t>();
  } else {
    if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) {
      py::error_already_set e;
      return Status::invalid_argument(what +
                                      " is not a contiguous bytes-like "
                                      "object (" +
                                      type_name(obj) +
                                      "): " + std::string(py::str(e.value())));
    }
    have_view = true;
    data = view.buf;
    len = static_cast<uint64_t>(view.len);
  }
  Status status;
  if (len != expect) {
    status = Status::invalid_argument(what + " is " + std::to_string(len) +
                                      " bytes; a page half is " +
                                      std::to_string(expect));
  } else {
    out.resize(len);
    if (len) std::memcpy(out.data(), data, len);
  }
  if (have_view) PyBuffer_Release(&view);
  return status;
}

template <class Int>
py::list to_list(std::span<const Int> values) {
  py::list out;
  for (Int v : values) out.append(v);
  return out;
}

}  // namespace

Status status_from_python(const char* method, py::error_already_set& error) {
  const std::string at = where(error.trace());
  if (error.matches(error_type())) {
    py::object value = error.value();
    std::string code = py::str(value.attr("code"));
    std::string message = py::str(value.attr("message"));
    return Status::from_code(
        code_from_name(code),
        std::string("pager.") + method + "(): " + message + at);
  }
  return Status::internal(std::string("pager.") + method + "() raised " +
                          type_name(error.value()) + ": " +
                          std::string(py::str(error.value())) + at);
}

void PyPager::prime() {
  if (primed_) return;
  const CachePager* self = this;
  py::function meta_fn = py::get_override(self, "meta");
  if (!meta_fn) {
    raise_status(Status::unimplemented("the pager has no meta() method"));
  }
  py::object meta = meta_fn();
  if (!py::isinstance<CacheMeta>(meta)) {
    raise_status(Status::invalid_argument(
        "pager.meta() must return a kvmig.CacheMeta, not " + type_name(meta)));
  }
  CacheMeta m = meta.cast<CacheMeta>();
  ok_or_raise(m.validate().with_context("pager.meta()"));

  std::optional<PagerLayout> layout;
  if (py::function layout_fn = py::get_override(self, "layout")) {
    py::object regions = layout_fn();
    if (!regions.is_none()) {
      if (!py::isinstance<py::sequence>(regions)) {
        raise_status(Status::invalid_argument(
            "pager.layout() must return a list of kvmig.StridedRegion or "
            "None, not " +
            type_name(regions)));
      }
      layout.emplace();
      size_t i = 0;
      for (py::handle r : regions) {
        if (!py::isinstance<StridedRegion>(r)) {
          raise_status(Status::invalid_argument(
              "pager.layout()[" + std::to_string(i) +
              "] is not a kvmig.StridedRegion but " + type_name(r)));
        }
        StridedRegion region = r.cast<StridedRegion>();
        if (region.kind != MemoryKind::kHost &&
            !(py::get_override(self, "copy_from_device") &&
              py::get_override(self, "copy_to_device"))) {
          raise_status(Status::unimplemented(
              "pager.layout()[" + std::to_string(i) +
              "] is CUDA memory (device " + std::to_string(region.device) +
              "), which kvmig reaches only through the pager's "
              "copy_from_device(region, offset, out) and "
              "copy_to_device(region, offset, data); this pager has not "
              "both"));
        }
        layout->push_back(region);
        ++i;
      }
      ok_or_raise(validate_layout(m, *layout).with_context("pager.layout()"));
    }
  }
  meta_ = m;
  layout_ = std::move(layout);
  primed_ = true;
}

CacheMeta PyPager::meta() const { return meta_; }

std::optional<PagerLayout> PyPager::layout() const { return layout_; }

Status PyPager::pause() {
  return call_python<Status>(this, "pause", [](py::function& fn) {
    fn();
    return Status();
  });
}

Status PyPager::resume() {
  return call_python<Status>(this, "resume", [](py::function& fn) {
    fn();
    return Status();
  });
}

Result<std::vector<PageIndex>> PyPager::occupied_pages() {
  using R = Result<std::vector<PageIndex>>;
  return call_python<R>(this, "occupied_pages", [](py::function& fn) {
    return R(fn().cast<std::vector<PageIndex>>());
  });
}

Result<std::vector<LogicalSeq>> PyPager::logical_seqs() {
  using R = Result<std::vector<LogicalSeq>>;
  return call_python<R>(this, "logical_seqs", [](py::function& fn) {
    return R(fn().cast<std::vector<LogicalSeq>>());
  });
}

Result<PageBytes> PyPager::read_page(PageIndex ix) {
  using R = Result<PageBytes>;
  const uint64_t half = meta_.page_bytes();
  return call_python<R>(this, "read_page", [ix, half](py::function& fn) -> R {
    py::object out = fn(ix);
    const std::string call = "pager.read_page(" + std::to_string(ix) + ")";
    if (!py::isinstance<py::tuple>(out) && !py::isinstance<py::list>(out)) {
      return R(Status::invalid_argument(call + " must return (k, v), not " +
                                        type_name(out)));
    }
    py::sequence kv = out;
    if (kv.size() != 2) {
      return R(Status::invalid_argument(call + " must return (k, v), not " +
                                        std::to_string(kv.size()) + " items"));
    }
    PageBytes page;
    KVMIG_RETURN_IF_ERROR(copy_page_half(kv[0], call + "'s k", half, page.k));
    KVMIG_RETURN_IF_ERROR(copy_page_half(kv[1], call + "'s v", half, page.v));
    return R(std::move(page));
  });
}

Result<std::vector<PageIndex>> PyPager::allocate_pages(uint32_t n) {
  using R = Result<std::vector<PageIndex>>;
  return call_python<R>(this, "allocate_pages", [n](py::function& fn) {
    auto slots = fn(n).cast<std::vector<PageIndex>>();
    if (slots.size() != n) {
      return R(Status::internal("pager.allocate_pages(" + std::to_string(n) +
                                ") returned " + std::to_string(slots.size()) +
                                " slots"));
    }
    return R(std::move(slots));
  });
}

Status PyPager::write_page(PageIndex ix, const PageBytes& page) {
  return call_python<Status>(this, "write_page", [&](py::function& fn) {
    // Copies: the bytes are kvmig's and freed after the call, so a view of
    // them must not outlive it (this path is the staged one; layout() is
    // the zero-copy path).
    auto view = [](const std::vector<std::byte>& half) {
      return py::memoryview(
          py::bytes(reinterpret_cast<const char*>(half.data()), half.size()));
    };
    fn(ix, view(page.k), view(page.v));
    return Status();
  });
}

Status PyPager::install_logical_seqs(const std::vector<LogicalSeq>& seqs) {
  return call_python<Status>(this, "install_logical_seqs",
                             [&](py::function& fn) {
                               fn(py::cast(seqs));
                               return Status();
                             });
}

Status PyPager::release_pages(std::span<const PageIndex> ixs) {
  return call_python<Status>(this, "release_pages", [&](py::function& fn) {
    fn(to_list(ixs));
    return Status();
  });
}

Status PyPager::drop_logical_seqs(std::span<const SeqId> ids) {
  return call_python<Status>(this, "drop_logical_seqs", [&](py::function& fn) {
    fn(to_list(ids));
    return Status();
  });
}

Status PyPager::hold_seqs(std::span<const SeqId> ids) {
  return call_python<Status>(this, "hold_seqs", [&](py::function& fn) {
    fn(to_list(ids));
    return Status();
  });
}

Status PyPager::unhold_seqs(std::span<const SeqId> ids) {
  return call_python<Status>(this, "unhold_seqs", [&](py::function& fn) {
    fn(to_list(ids));
    return Status();
  });
}

namespace {

// A memoryview of kvmig's buffer for one call: released when the call ends
// (raising or not), so Python code that kept it cannot reach the buffer
// after kvmig reused it. Needs the GIL.
class CallView {
 public:
  CallView(const void* data, size_t n, bool readonly)
      : view_(py::memoryview::from_memory(const_cast<void*>(data),
                                          static_cast<ssize_t>(n), readonly)) {}
  ~CallView() {
    PyObject* r = PyObject_CallMethod(view_.ptr(), "release", nullptr);
    if (r == nullptr) PyErr_Clear();
    Py_XDECREF(r);
  }
  CallView(const CallView&) = delete;
  CallView& operator=(const CallView&) = delete;
  const py::memoryview& get() const { return view_; }

 private:
  py::memoryview view_;
};

}  // namespace

Status PyPager::copy_from_device(uint32_t region, uint64_t offset,
                                 std::span<std::byte> out) {
  return call_python<Status>(this, "copy_from_device", [&](py::function& fn) {
    CallView view(out.data(), out.size(), /*readonly=*/false);
    fn(region, offset, view.get());
    return Status();
  });
}

Status PyPager::copy_to_device(uint32_t region, uint64_t offset,
                               std::span<const std::byte> in) {
  return call_python<Status>(this, "copy_to_device", [&](py::function& fn) {
    CallView view(in.data(), in.size(), /*readonly=*/true);
    fn(region, offset, view.get());
    return Status();
  });
}

Result<DmabufRegion> PyPager::export_dmabuf(uint32_t region) {
  using R = Result<DmabufRegion>;
  return call_python<R>(this, "export_dmabuf", [&](py::function& fn) {
    auto [fd, offset] = fn(region).cast<std::pair<int, uint64_t>>();
    return R(DmabufRegion{fd, offset});
  });
}

std::optional<PagerCapacity> PyPager::capacity() const {
  using R = Result<PagerCapacity>;
  R cap = call_python<R>(this, "capacity", [](py::function& fn) {
    py::object out = fn();
    if (out.is_none()) return R(Status::not_found("no capacity"));
    auto [total, free] = out.cast<std::pair<uint64_t, uint64_t>>();
    return R(PagerCapacity{total, free});
  });
  if (!cap.ok()) return std::nullopt;
  return *cap;
}

}  // namespace kvmig::python
