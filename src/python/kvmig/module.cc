// The `_kvmig` extension module: kvmig's types, CachePager (subclassable in
// Python), Agent and Client. The package around it (kvmig/__init__.py) adds
// what is better written in Python (regions()). The contract is the
// section "Python" of DESIGN.md.
#include <pybind11/eval.h>
#include <pybind11/operators.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "auth.h"
#include "cluster_json.h"
#include "host_port.h"
#include "kvmig/cluster.h"
#include "kvmig/kvmig.h"
#include "py_pager.h"
#include "report_json.h"

namespace kvmig::python {
namespace {

// A JSON report (the fields of `kvmig ... --json`) as a Python dict.
py::object to_python(const nlohmann::ordered_json& j) {
  static auto* loads =
      new py::object(py::module_::import("json").attr("loads"));
  return (*loads)(json_text(j));
}

std::string secret_from(const std::optional<std::string>& secret_file) {
  if (!secret_file) return "";
  return value_or_raise(read_secret_file(*secret_file));
}

MigrationMode parse_mode(const std::string& mode) {
  if (mode == "move") return MigrationMode::kMove;
  if (mode == "copy") return MigrationMode::kCopy;
  raise_status(Status::invalid_argument(
      "mode must be \"move\" or \"copy\", not \"" + mode + "\""));
}

// settle()'s outcome: true for "committed".
bool parse_outcome(const std::string& outcome) {
  if (outcome == "committed") return true;
  if (outcome == "aborted") return false;
  raise_status(Status::invalid_argument(
      "outcome must be \"committed\" or \"aborted\", not \"" + outcome + "\""));
}

// The keyword arguments of migrate() (agent and client alike).
struct MigrateArgs {
  std::string to;
  std::optional<std::vector<SeqId>> seqs;
  bool all = false;
  std::string mode = "move";
  std::string transport;
  bool live = false;
  bool verify = true;
  bool record_digests = false;
  uint32_t live_max_rounds = 8;
  uint32_t live_converge_pages = 0;
  bool live_abort_if_not_converged = false;
  std::string migration_id;
  int64_t timeout_ms = 0;

  MigrateRequest request() const {
    if (to.empty()) raise_status(Status::invalid_argument("migrate: give to="));
    if (all == seqs.has_value()) {
      raise_status(Status::invalid_argument(
          "migrate: give either seqs=[...] or all=True"));
    }
    MigrateRequest r;
    r.to = to;
    if (seqs) r.seqs = *seqs;
    r.all = all;
    r.mode = parse_mode(mode);
    r.transport = transport;
    r.live = live;
    r.verify = verify;
    r.record_digests = record_digests;
    r.live_max_rounds = live_max_rounds;
    r.live_converge_pages = live_converge_pages;
    r.live_abort_if_not_converged = live_abort_if_not_converged;
    r.migration_id = migration_id;
    if (timeout_ms < 0) {
      raise_status(Status::invalid_argument("migrate: timeout_ms < 0"));
    }
    r.timeout = std::chrono::milliseconds(timeout_ms);
    return r;
  }
};

#define KVMIG_MIGRATE_KWARGS                                             \
  py::kw_only(), py::arg("to"),                                          \
      py::arg("seqs") = py::none(), py::arg("all") = false,              \
      py::arg("mode") = "move", py::arg("transport") = "",               \
      py::arg("live") = false, py::arg("verify") = true,                 \
      py::arg("record_digests") = false, py::arg("live_max_rounds") = 8, \
      py::arg("live_converge_pages") = 0,                                \
      py::arg("live_abort_if_not_converged") = false,                    \
      py::arg("migration_id") = "", py::arg("timeout_ms") = 0

// migrate(**KVMIG_MIGRATE_KWARGS) for a class with migrate(MigrateArgs).
template <class T>
auto migrate_method() {
  return [](T& self, std::string to, std::optional<std::vector<SeqId>> seqs,
            bool all, std::string mode, std::string transport, bool live,
            bool verify, bool record_digests, uint32_t rounds,
            uint32_t converge, bool abort_if_not, std::string migration_id,
            int64_t timeout_ms) {
    return self.migrate({std::move(to), std::move(seqs), all, std::move(mode),
                         std::move(transport), live, verify, record_digests,
                         rounds, converge, abort_if_not,
                         std::move(migration_id), timeout_ms});
  };
}

// kvmig.Agent: an Agent serving a Python (or C++) pager. It keeps the pager
// object alive for as long as the agent may call it.
class PyAgent {
 public:
  PyAgent(py::object pager, const std::string& listen,
          std::vector<std::string> transports,
          const std::optional<std::string>& secret_file, bool insecure,
          int64_t peer_timeout_ms, uint64_t staging_bytes,
          const std::string& bind_host,
          const std::optional<std::string>& snapshot_dir,
          uint32_t max_migrations, uint32_t inline_page_bytes,
          int64_t kept_idle_ms)
      : pager_obj_(std::move(pager)) {
    if (!py::isinstance<CachePager>(pager_obj_)) {
      raise_status(Status::invalid_argument(
          "kvmig.Agent needs a kvmig.CachePager, not " +
          std::string(
              py::str(py::type::handle_of(pager_obj_).attr("__qualname__")))));
    }
    auto* pager_ptr = pager_obj_.cast<CachePager*>();
    if (auto* py_pager = dynamic_cast<PyPager*>(pager_ptr)) py_pager->prime();
    HostPort hp = value_or_raise(parse_host_port(listen));
    AgentOptions options;
    options.listen_host = hp.host;
    options.listen_port = hp.port;
    options.transports = std::move(transports);
    options.secret = secret_from(secret_file);
    options.insecure = insecure;
    options.peer_timeout = std::chrono::milliseconds(peer_timeout_ms);
    options.staging_bytes = staging_bytes;
    options.transport_options.bind_host = bind_host;
    options.snapshot_dir = snapshot_dir.value_or("");
    options.max_migrations = max_migrations;
    options.inline_page_bytes = inline_page_bytes;
    if (kept_idle_ms < 0) {
      raise_status(Status::invalid_argument(
          "kept_idle_ms must be at least 0 (0: a connection per migration)"));
    }
    options.kept_connection_idle = std::chrono::milliseconds(kept_idle_ms);
    Result<std::unique_ptr<Agent>> agent = [&] {
      py::gil_scoped_release release;
      return Agent::create(*pager_ptr, std::move(options));
    }();
    agent_ = value_or_raise(std::move(agent));
    std::lock_guard lock(live_mu());
    live().insert(this);
  }

  ~PyAgent() {
    {
      std::lock_guard lock(live_mu());
      live().erase(this);
    }
    close();
  }

  void start() {
    Agent& a = agent();
    if (started_) {
      raise_status(Status::failed_precondition("agent: already started"));
    }
    ok_or_raise(a.start());
    started_ = true;
  }

  // Stops serving and lets go of the agent: after stop() nothing calls the
  // pager any more.
  void close() {
    if (!agent_) return;
    py::gil_scoped_release release;  // its threads may wait for the GIL
    agent_.reset();
  }

  std::string address() const { return address_or_raise(); }
  uint16_t port() const {
    if (!agent_) raise_status(stopped());
    return agent_->port();
  }

  py::object migrate(const MigrateArgs& args) {
    MigrateRequest request = args.request();
    Agent& a = agent();
    Result<MigrationReport> report = [&] {
      py::gil_scoped_release release;
      return a.migrate(request);
    }();
    return to_python(migration_json(value_or_raise(std::move(report))));
  }

  py::object cancel(const std::string& migration_id) {
    Agent& a = agent();
    Result<CancelReport> ended = [&] {
      py::gil_scoped_release release;
      return a.cancel(migration_id);
    }();
    return to_python(cancel_json(value_or_raise(std::move(ended))));
  }

  void settle(const std::string& migration_id, const std::string& outcome) {
    const bool committed = parse_outcome(outcome);
    Agent& a = agent();
    Status s = [&] {
      py::gil_scoped_release release;
      return a.settle(migration_id, committed);
    }();
    ok_or_raise(s);
  }

  py::object status(bool digests) {
    Agent& a = agent();
    Result<AgentStatus> st = [&] {
      py::gil_scoped_release release;
      return a.status({.digests = digests});
    }();
    return to_python(status_json(value_or_raise(std::move(st))));
  }

  // Every agent still alive when the interpreter exits is closed first:
  // later, no thread could take the GIL to call its pager.
  static void close_all() {
    std::set<PyAgent*> agents;
    {
      std::lock_guard lock(live_mu());
      agents = live();
    }
    for (PyAgent* a : agents) a->close();
  }

 private:
  static Status stopped() {
    return Status::failed_precondition("agent: stopped");
  }
  Agent& agent() {
    if (!agent_) raise_status(stopped());
    return *agent_;
  }
  std::string address_or_raise() const {
    if (!agent_) raise_status(stopped());
    return agent_->address();
  }
  static std::mutex& live_mu() {
    static auto* mu = new std::mutex();
    return *mu;
  }
  static std::set<PyAgent*>& live() {
    static auto* agents = new std::set<PyAgent*>();
    return *agents;
  }

  py::object pager_obj_;
  std::unique_ptr<Agent> agent_;
  bool started_ = false;
};

// kvmig.Client: the scheduler side, no pager.
class PyClient {
 public:
  PyClient(std::string address, const std::optional<std::string>& secret_file,
           int64_t timeout_ms)
      : address_(std::move(address)) {
    value_or_raise(parse_host_port(address_));
    options_.secret = secret_from(secret_file);
    options_.timeout = std::chrono::milliseconds(timeout_ms);
  }

  py::object status(bool digests) {
    Result<AgentStatus> st = [&] {
      py::gil_scoped_release release;
      return query_status(address_, options_, {.digests = digests});
    }();
    return to_python(status_json(value_or_raise(std::move(st))));
  }

  py::object migrate(const MigrateArgs& args) {
    MigrateRequest request = args.request();
    Result<MigrationReport> report = [&] {
      py::gil_scoped_release release;
      return request_migration(address_, request, options_);
    }();
    return to_python(migration_json(value_or_raise(std::move(report))));
  }

  py::object cancel(const std::string& migration_id) {
    Result<CancelReport> ended = [&] {
      py::gil_scoped_release release;
      return cancel_migration(address_, migration_id, options_);
    }();
    return to_python(cancel_json(value_or_raise(std::move(ended))));
  }

  void settle(const std::string& migration_id, const std::string& outcome) {
    const bool committed = parse_outcome(outcome);
    Status s = [&] {
      py::gil_scoped_release release;
      return settle_migration(address_, migration_id, committed, options_);
    }();
    ok_or_raise(s);
  }

  py::dict snapshot(const std::string& path, bool load) {
    Result<SnapshotReport> report = [&] {
      py::gil_scoped_release release;
      return request_snapshot(address_, SnapshotRequest{load, path}, options_);
    }();
    const SnapshotReport r = value_or_raise(std::move(report));
    py::dict out;
    out["path"] = r.summarized ? r.path : path;
    if (r.summarized) {
      out["requests"] = r.requests;
      out["pages"] = r.pages;
      out["bytes"] = r.bytes;
    }
    return out;
  }

  const std::string& address() const { return address_; }

 private:
  std::string address_;
  ClientOptions options_;
};

// f() with the GIL released.
template <typename F>
auto release_gil(F f) {
  py::gil_scoped_release release;
  return f();
}

// kvmig.Cluster: the agents registered in etcd, drain and rebalance
// (include/kvmig/cluster.h); reports are the dicts of `kvmig agents|drain|
// rebalance --json`.
class PyCluster {
 public:
  PyCluster(std::vector<std::string> etcd, std::string prefix,
            const std::optional<std::string>& secret_file,
            int64_t etcd_timeout_ms, int64_t timeout_ms) {
    ClusterOptions options;
    options.etcd.endpoints = std::move(etcd);
    options.etcd.prefix = std::move(prefix);
    options.etcd.timeout = std::chrono::milliseconds(etcd_timeout_ms);
    options.agent_client.secret = secret_from(secret_file);
    options.agent_client.timeout = std::chrono::milliseconds(timeout_ms);
    cluster_ = value_or_raise(Cluster::connect(std::move(options)));
  }

  py::object agents() {
    auto list = release_gil([&] { return cluster_->agents(); });
    return to_python(agents_json(value_or_raise(std::move(list))));
  }

  void set_draining(const std::string& name, bool draining) {
    ok_or_raise(
        release_gil([&] { return cluster_->set_draining(name, draining); }));
  }

  py::object drain(const std::string& name, bool live,
                   const std::string& transport) {
    DrainOptions options;
    options.live = live;
    options.transport = transport;
    auto report = release_gil([&] { return cluster_->drain(name, options); });
    return to_python(drain_json(value_or_raise(std::move(report))));
  }

  py::object rebalance_once(double threshold, bool live,
                            const std::string& transport, uint32_t max_moves,
                            int64_t settle_ms) {
    RebalanceOptions options;
    options.settle = std::chrono::milliseconds(settle_ms);
    options.threshold = threshold;
    options.live = live;
    options.transport = transport;
    options.max_moves = max_moves;
    auto report =
        release_gil([&] { return cluster_->rebalance_once(options); });
    return to_python(rebalance_json(value_or_raise(std::move(report))));
  }

 private:
  std::unique_ptr<Cluster> cluster_;
};

Dtype dtype_or_raise(const std::string& name) {
  return value_or_raise(parse_dtype(name));
}

MemoryKind kind_or_raise(const std::string& name) {
  if (name == "host") return MemoryKind::kHost;
  if (name == "cuda") return MemoryKind::kCuda;
  raise_status(Status::invalid_argument(
      "memory kind must be \"host\" or \"cuda\", not \"" + name + "\""));
}

const char* kind_name(MemoryKind kind) {
  return kind == MemoryKind::kCuda ? "cuda" : "host";
}

// kvmig.Error(message, code="Internal"): str() is "Code: message", like a
// C++ Status.
void define_error(py::module_& m) {
  py::dict scope;
  scope["__builtins__"] = py::module_::import("builtins");
  scope["__name__"] = "kvmig";
  py::exec(R"(
class Error(RuntimeError):
    """A kvmig failure. .code is the status code name ("NotFound",
    "InvalidArgument", ...); .message the text. Raise it from a pager
    method to fail with that code."""

    def __init__(self, message="", code="Internal"):
        super().__init__(message)
        self.message = str(message)
        self.code = str(code)

    def __str__(self):
        return f"{self.code}: {self.message}"
)",
           scope);
  error_type() = scope["Error"];
  m.attr("Error") = error_type();
}

}  // namespace
}  // namespace kvmig::python

PYBIND11_MODULE(_kvmig, m) {
  using namespace kvmig;
  using namespace kvmig::python;
  m.doc() = "kvmig: live migration of paged KV caches (C++ engine binding)";
  define_error(m);

  py::class_<CacheMeta>(m, "CacheMeta")
      .def(py::init([](uint32_t page_size_tokens, uint32_t n_layers,
                       uint32_t n_heads, uint32_t head_dim,
                       const std::string& dtype) {
             return CacheMeta{page_size_tokens, n_layers, n_heads, head_dim,
                              dtype_or_raise(dtype)};
           }),
           py::kw_only(), py::arg("page_size_tokens"), py::arg("n_layers"),
           py::arg("n_heads"), py::arg("head_dim"), py::arg("dtype"))
      .def_readwrite("page_size_tokens", &CacheMeta::page_size_tokens)
      .def_readwrite("n_layers", &CacheMeta::n_layers)
      .def_readwrite("n_heads", &CacheMeta::n_heads)
      .def_readwrite("head_dim", &CacheMeta::head_dim)
      .def_property(
          "dtype",
          [](const CacheMeta& c) { return std::string(dtype_name(c.dtype)); },
          [](CacheMeta& c, const std::string& d) {
            c.dtype = dtype_or_raise(d);
          })
      .def("page_bytes", &CacheMeta::page_bytes,
           "bytes of K in one page (and the same of V)")
      .def("layer_chunk_bytes", &CacheMeta::layer_chunk_bytes,
           "bytes of K (or V) of one layer in one page")
      .def("token_bytes_per_layer", &CacheMeta::token_bytes_per_layer)
      .def("pages_for_tokens", &CacheMeta::pages_for_tokens)
      .def("validate", [](const CacheMeta& c) { ok_or_raise(c.validate()); })
      .def(py::self == py::self)
      .def("__repr__", [](const CacheMeta& c) {
        return "kvmig.CacheMeta(" + c.to_string() + ")";
      });

  m.def(
      "preset_meta",
      [](const std::string& name) { return value_or_raise(preset_meta(name)); },
      py::arg("name"), "a named shape: \"tiny\" or \"llama3-8b\"");
  m.def("built_transports", &built_transports,
        "the transports this build includes");

  py::class_<LogicalSeq>(m, "LogicalSeq")
      .def(py::init([](SeqId seq_id, uint64_t n_tokens,
                       std::vector<PageIndex> pages) {
             return LogicalSeq{seq_id, n_tokens, std::move(pages)};
           }),
           py::arg("seq_id"), py::arg("n_tokens"), py::arg("pages"))
      .def_readwrite("seq_id", &LogicalSeq::seq_id)
      .def_readwrite("n_tokens", &LogicalSeq::n_tokens)
      .def_readwrite("pages", &LogicalSeq::pages)
      .def(py::self == py::self)
      .def("__repr__", [](const LogicalSeq& s) {
        return "kvmig.LogicalSeq(seq_id=" + std::to_string(s.seq_id) +
               ", n_tokens=" + std::to_string(s.n_tokens) + ", pages=[" +
               std::to_string(s.pages.size()) + " pages])";
      });

  py::class_<StridedRegion>(m, "StridedRegion")
      .def(py::init([](uintptr_t base, uint64_t stride, uint64_t chunk,
                       uint32_t slots, const std::string& kind, int device) {
             return StridedRegion{reinterpret_cast<std::byte*>(base),
                                  stride,
                                  chunk,
                                  slots,
                                  kind_or_raise(kind),
                                  device};
           }),
           py::kw_only(), py::arg("base"), py::arg("stride"), py::arg("chunk"),
           py::arg("slots"), py::arg("kind") = "host", py::arg("device") = 0)
      .def_property_readonly("base",
                             [](const StridedRegion& r) {
                               return reinterpret_cast<uintptr_t>(r.base);
                             })
      .def_readonly("stride", &StridedRegion::stride)
      .def_readonly("chunk", &StridedRegion::chunk)
      .def_readonly("slots", &StridedRegion::slots)
      .def_property_readonly(
          "kind", [](const StridedRegion& r) { return kind_name(r.kind); })
      .def_readonly("device", &StridedRegion::device)
      .def("span_bytes", &StridedRegion::span_bytes)
      .def("__repr__", [](const StridedRegion& r) {
        return "kvmig.StridedRegion(base=" +
               std::to_string(reinterpret_cast<uintptr_t>(r.base)) +
               ", stride=" + std::to_string(r.stride) +
               ", chunk=" + std::to_string(r.chunk) +
               ", slots=" + std::to_string(r.slots) + ", kind=\"" +
               kind_name(r.kind) + "\")";
      });

  m.def(
      "validate_layout",
      [](const CacheMeta& meta, const PagerLayout& layout) {
        ok_or_raise(validate_layout(meta, layout));
      },
      py::arg("meta"), py::arg("layout"),
      "raises kvmig.Error unless the regions describe pages of meta");

  py::class_<CachePager, PyPager>(m, "CachePager",
                                  "Subclass and implement the nine methods "
                                  "(and any optional ones); call "
                                  "super().__init__().")
      .def(py::init<>());

  py::class_<PyAgent>(m, "Agent")
      .def(py::init<py::object, const std::string&, std::vector<std::string>,
                    const std::optional<std::string>&, bool, int64_t, uint64_t,
                    const std::string&, const std::optional<std::string>&,
                    uint32_t, uint32_t, int64_t>(),
           py::arg("pager"), py::kw_only(), py::arg("listen") = "127.0.0.1:0",
           py::arg("transports") = std::vector<std::string>{"tcp"},
           py::arg("secret_file") = py::none(), py::arg("insecure") = false,
           py::arg("peer_timeout_ms") = 10'000,
           py::arg("staging_bytes") = uint64_t{64} << 20,
           py::arg("bind_host") = "", py::arg("snapshot_dir") = py::none(),
           py::arg("max_migrations") = 4,
           py::arg("inline_page_bytes") = uint32_t{1} << 20,
           py::arg("kept_idle_ms") = 30'000)
      .def("start", &PyAgent::start, "serve on a thread of the agent's own")
      .def("stop", &PyAgent::close,
           "stop serving (open migrations roll back); idempotent")
      .def_property_readonly("address", &PyAgent::address)
      .def_property_readonly("port", &PyAgent::port)
      .def("migrate", migrate_method<PyAgent>(), KVMIG_MIGRATE_KWARGS)
      .def("cancel", &PyAgent::cancel, py::arg("migration_id"))
      .def("settle", &PyAgent::settle, py::arg("migration_id"), py::kw_only(),
           py::arg("outcome"))
      .def("status", &PyAgent::status, py::kw_only(), py::arg("digests") = true)
      .def("__enter__",
           [](PyAgent& a) -> PyAgent& {
             a.start();
             return a;
           })
      .def("__exit__", [](PyAgent& a, py::args) { a.close(); });

  py::class_<PyClient>(m, "Client")
      .def(py::init<std::string, const std::optional<std::string>&, int64_t>(),
           py::arg("address"), py::kw_only(),
           py::arg("secret_file") = py::none(), py::arg("timeout_ms") = 60'000)
      .def_property_readonly("address", &PyClient::address)
      .def("status", &PyClient::status, py::kw_only(),
           py::arg("digests") = true)
      .def("migrate", migrate_method<PyClient>(), KVMIG_MIGRATE_KWARGS)
      .def("cancel", &PyClient::cancel, py::arg("migration_id"))
      .def("settle", &PyClient::settle, py::arg("migration_id"), py::kw_only(),
           py::arg("outcome"))
      .def("snapshot", &PyClient::snapshot, py::arg("path"), py::kw_only(),
           py::arg("load") = false,
           "the agent captures its cache to path (load: restores it), a "
           "file in the agent's snapshot directory (relative to it, or "
           "inside it); returns {path, requests, pages, bytes}");

  py::class_<PyCluster>(m, "Cluster")
      .def(py::init<std::vector<std::string>, std::string,
                    const std::optional<std::string>&, int64_t, int64_t>(),
           py::kw_only(), py::arg("etcd"), py::arg("prefix") = "/kvmig",
           py::arg("secret_file") = py::none(),
           py::arg("etcd_timeout_ms") = 2'000, py::arg("timeout_ms") = 600'000)
      .def("agents", &PyCluster::agents,
           "every registered agent: the dict of `kvmig agents --json`")
      .def("set_draining", &PyCluster::set_draining, py::arg("name"),
           py::arg("draining") = true)
      .def("drain", &PyCluster::drain, py::arg("name"), py::kw_only(),
           py::arg("live") = false, py::arg("transport") = "",
           "moves every request off the agent: the dict of `kvmig drain "
           "--json`")
      .def("rebalance_once", &PyCluster::rebalance_once, py::kw_only(),
           py::arg("threshold") = 0.2, py::arg("live") = true,
           py::arg("transport") = "", py::arg("max_moves") = 16,
           py::arg("settle_ms") = 30'000,
           "one pass: the dict of `kvmig rebalance --once --json`");

  py::module_::import("atexit").attr("register")(
      py::cpp_function([] { PyAgent::close_all(); }));
}
