#include "ucx_core.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <ucs/debug/log_def.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "bytes.h"
#include "ucx_error.h"

namespace kvmig::ucx {
namespace {

constexpr size_t kMaxHostLen = 255;
constexpr uint32_t kMaxRegions = 1u << 20;
constexpr uint32_t kMaxRkeyLen = 64 * 1024;
// How long the idle thread sleeps, with endpoints or listeners open, before
// it progresses UCX although no event came: a safety net, as every lane UCX
// 1.13 selects here (shared memory, tcp, verbs) signals its messages.
constexpr auto kMaxEventWait = std::chrono::milliseconds(10);
// How long after UCX was last busy the thread keeps that safety net with
// nothing open. A force-closed endpoint's connections go after the close
// completes (UCX discards them from ucp_worker_progress, with no event to
// wake it): sleeping until posted work at once left a revoked target's tcp
// connection open and its source's flush waiting for its whole deadline.
constexpr auto kSettle = std::chrono::milliseconds(100);
// Progress calls in a row before the thread turns to its tasks and pollers.
// Unbounded, a peer that never stops writing (puts over UCX's tcp always
// have another message waiting) kept a target's revoke() from running
// until the writes ended.
constexpr int kProgressBurst = 64;
// An initiator address that presents a kept connection: this byte, then the
// connection's token (u64).
constexpr uint8_t kKeptConnection = 1;
// Transports whose RMA a closed endpoint cannot stop (see ucx_core.h).
constexpr const char* kDefaultTls = "^cma";

// Whether UCX_TLS as set (a comma list, "^" first to exclude) can select
// a shared-memory transport, which reads MM_ERROR_HANDLING.
bool tls_may_use_shared_memory(std::string_view tls) {
  const bool excluding = !tls.empty() && tls.front() == '^';
  if (excluding) tls.remove_prefix(1);
  std::istringstream names{std::string(tls)};
  bool named = false;
  for (std::string name; std::getline(names, name, ',');) {
    if (name == "all" && !excluding) return true;
    if (name == "sm" || name == "shm" || name == "mm") {
      if (excluding) return false;
      named = true;
    }
    if (name == "posix" || name == "sysv") named = true;
  }
  return excluding || named;
}

// UCX's log, which writes to stdout (where `--json` output goes), sent to
// this library's log instead, at the same level.
ucs_log_func_rc_t forward_ucx_log(const char* file, unsigned line, const char*,
                                  ucs_log_level_t level,
                                  const ucs_log_component_config_t* component,
                                  const char* format, va_list ap) {
  if (component != nullptr && level > component->log_level &&
      level != UCS_LOG_LEVEL_PRINT) {
    return UCS_LOG_FUNC_RC_STOP;
  }
  spdlog::level::level_enum to = spdlog::level::trace;
  switch (level) {
    case UCS_LOG_LEVEL_FATAL:
    case UCS_LOG_LEVEL_ERROR:
      to = spdlog::level::err;
      break;
    case UCS_LOG_LEVEL_WARN:
      to = spdlog::level::warn;
      break;
    case UCS_LOG_LEVEL_DIAG:
    case UCS_LOG_LEVEL_INFO:
    case UCS_LOG_LEVEL_PRINT:
      to = spdlog::level::info;
      break;
    case UCS_LOG_LEVEL_DEBUG:
      to = spdlog::level::debug;
      break;
    default:
      break;
  }
  const auto& log = ucx_log();
  if (!log->should_log(to)) return UCS_LOG_FUNC_RC_STOP;
  char text[1024];
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
  std::vsnprintf(text, sizeof text, format, ap);
#pragma GCC diagnostic pop
  const char* base = std::strrchr(file, '/');
  log->log(to, "UCX {}:{}: {}", base ? base + 1 : file, line, text);
  return UCS_LOG_FUNC_RC_STOP;
}

}  // namespace

std::shared_ptr<spdlog::logger> ucx_log() {
  // Never destroyed: UCX may log from its own destructors at exit.
  static const auto* const log =
      new std::shared_ptr<spdlog::logger>(logger("ucx"));
  return *log;
}

// ------------------------------------------------------------- sockaddrs

Result<sockaddr_storage> make_sockaddr(const std::string& host, uint16_t port) {
  sockaddr_storage ss{};
  auto* v4 = reinterpret_cast<sockaddr_in*>(&ss);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&ss);
  if (inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(port);
  } else if (inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(port);
  } else {
    return Status::invalid_argument("ucx: '" + host + "' is not an IP address");
  }
  return ss;
}

socklen_t sockaddr_len(const sockaddr_storage& ss) {
  return ss.ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
}

std::string sockaddr_string(const sockaddr_storage& ss) {
  char buf[INET6_ADDRSTRLEN] = {};
  uint16_t port = 0;
  if (ss.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, buf, sizeof(buf));
    port = ntohs(a->sin_port);
  } else if (ss.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof(buf));
    port = ntohs(a->sin6_port);
  } else {
    return "?";
  }
  return std::string(buf) + ":" + std::to_string(port);
}

// ------------------------------------------------------------------ core

Result<std::shared_ptr<UcxCore>> UcxCore::start() {
  static std::once_flag forwarding;
  std::call_once(forwarding, [] { ucs_log_push_handler(forward_ucx_log); });
  std::shared_ptr<UcxCore> core(new UcxCore());
  core->wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (core->wake_fd_ < 0) {
    return Status::internal(std::string("ucx: eventfd: ") +
                            std::strerror(errno));
  }
  std::promise<Status> started;
  auto result = started.get_future();
  core->thread_ =
      std::thread([raw = core.get(), &started] { raw->run(started); });
  Status s = result.get();
  if (!s.ok()) {
    core->thread_.join();
    return s;
  }
  return core;
}

UcxCore::~UcxCore() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    stop_by_ = Clock::now() + kCloseGrace;
    wake_locked();
  }
  if (thread_.joinable()) thread_.join();
  if (wake_fd_ >= 0) ::close(wake_fd_);
}

void UcxCore::post(std::function<void()> fn) {
  std::lock_guard lock(mu_);
  tasks_.push_back(std::move(fn));
  wake_locked();
}

void UcxCore::wake_locked() {
  if (!sleeping_) return;
  sleeping_ = false;  // one write wakes it; the thread clears it anyway
  const uint64_t one = 1;
  // EAGAIN only when the counter is full: the thread is being woken then.
  [[maybe_unused]] const ssize_t n = ::write(wake_fd_, &one, sizeof(one));
}

void UcxCore::post_close_and_wait(
    std::function<void(std::function<void()>)> close, std::string_view what) {
  auto done = std::make_shared<std::promise<void>>();
  auto closed = done->get_future();
  post([close = std::move(close), done] {
    close([done] { done->set_value(); });
  });
  constexpr auto kWait = kDrainCap + kCloseGrace;
  if (closed.wait_for(kWait) == std::future_status::ready) return;
  ucx_log()->warn("closing {} took over {} ms", what,
                  std::chrono::milliseconds(kWait).count());
}

void ListenerDeleter::operator()(ucp_listener_h l) const {
  ucp_listener_destroy(l);
  core->object_closed();
}

void UcxCore::close_ep(ucp_ep_h ep,
                       std::function<void(ucs_status_t)> on_closed) {
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = UCP_EP_CLOSE_FLAG_FORCE;
  ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &p);
  auto finish = [this, on_closed = std::move(on_closed)](ucs_status_t s) {
    object_closed();
    if (s != UCS_OK) {
      ucx_log()->debug("endpoint closed: {}", ucs_status_string(s));
    }
    if (on_closed) on_closed(s);
  };
  if (!UCS_PTR_IS_PTR(r)) return finish(UCS_PTR_STATUS(r));
  add_poller([r, finish] {
    const ucs_status_t s = ucp_request_check_status(r);
    if (s == UCS_INPROGRESS) return false;
    ucp_request_free(r);
    finish(s);
    return true;
  });
}

Result<uint64_t> UcxCore::memory_types() {
  ucp_context_attr_t attr{};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  const ucs_status_t s = ucp_context_query(context(), &attr);
  if (s != UCS_OK) return status_from_ucs(s, "ucp_context_query");
  return attr.memory_types;
}

Status UcxCore::register_region(std::span<std::byte> region,
                                ucs_memory_type_t type) {
  return call([&]() -> Status {
    std::lock_guard lock(regions_mu_);
    KVMIG_RETURN_IF_ERROR(regions_.check_new(region, "ucx"));
    ucp_mem_map_params_t mp{};
    mp.field_mask =
        UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = region.data();
    mp.length = region.size();
    if (type != UCS_MEMORY_TYPE_HOST) {
      mp.field_mask |= UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
      mp.memory_type = type;
    }
    ucp_mem_h memh = nullptr;
    ucs_status_t s = ucp_mem_map(context(), &mp, &memh);
    if (s != UCS_OK) {
      return status_from_ucs(
          s, "ucp_mem_map of " + std::to_string(region.size()) + " bytes");
    }
    Registration r{MemhPtr(memh, MemhDeleter{context()}), {}};
    void* buf = nullptr;
    size_t size = 0;
    s = ucp_rkey_pack(context(), memh, &buf, &size);
    // On failure r unmaps the memory: no registration without its key.
    if (s != UCS_OK) return status_from_ucs(s, "ucp_rkey_pack");
    RkeyBufferPtr packed(buf);
    const auto* bytes = static_cast<const uint8_t*>(buf);
    r.rkey.assign(bytes, bytes + size);
    regions_.add(region, std::move(r));
    return Status();
  });
}

Status UcxCore::deregister_region(std::span<std::byte> region) {
  return call([&]() -> Status {
    std::lock_guard lock(regions_mu_);
    return regions_.remove(region, "ucx").status();  // unmaps here
  });
}

void UcxCore::clear_regions() {
  call([&] {
    std::lock_guard lock(regions_mu_);
    regions_.clear([](auto& e) { e.value.memh.reset(); });
  });
}

ucp_mem_h UcxCore::find_memh(const void* p, size_t len) const {
  std::lock_guard lock(regions_mu_);
  const auto* e = regions_.find(p, len);
  return e ? e->value.memh.get() : nullptr;
}

Result<ConfigPtr> UcxCore::read_config() {
  ucp_config_t* raw = nullptr;
  ucs_status_t s = ucp_config_read(nullptr, nullptr, &raw);
  if (s != UCS_OK) return status_from_ucs(s, "ucp_config_read");
  ConfigPtr config(raw);
  if (std::getenv("UCX_TLS") == nullptr) {
    s = ucp_config_modify(config.get(), "TLS", kDefaultTls);
    if (s != UCS_OK) return status_from_ucs(s, "set UCX_TLS");
  }
  const char* tls = std::getenv("UCX_TLS");
  if (std::getenv("UCX_MM_ERROR_HANDLING") == nullptr &&
      (tls == nullptr || tls_may_use_shared_memory(tls))) {
    s = ucp_config_modify(config.get(), "MM_ERROR_HANDLING", "y");
    if (s != UCS_OK) return status_from_ucs(s, "set UCX_MM_ERROR_HANDLING");
  }
  return config;
}

Status UcxCore::init() {
  KVMIG_ASSIGN_OR_RETURN(ConfigPtr config, read_config());
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
  params.name = "kvmig";
  ucp_context_h context = nullptr;
  ucs_status_t s = ucp_init(&params, config.get(), &context);
  config.reset();
  if (s != UCS_OK) return status_from_ucs(s, "ucp_init");
  context_.reset(context);

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  ucp_worker_h worker = nullptr;
  s = ucp_worker_create(context_.get(), &wp, &worker);
  if (s != UCS_OK) return status_from_ucs(s, "ucp_worker_create");
  worker_.reset(worker);
  s = ucp_worker_get_efd(worker_.get(), &event_fd_);
  if (s != UCS_OK) {
    event_fd_ = -1;
    ucx_log()->warn("ucp_worker_get_efd: {}; polling every {} ms instead",
                    ucs_status_string(s), kMaxEventWait.count());
  }
  return Status();
}

void UcxCore::run(std::promise<Status>& started) {
  thread_id_ = std::this_thread::get_id();
  Status s = init();
  const bool ok = s.ok();
  started.set_value(std::move(s));  // `started` is gone after this
  if (!ok) {
    worker_.reset();
    context_.reset();
    return;
  }
  std::deque<std::function<void()>> batch;
  bool more = false;  // the last progress burst ended with UCX still busy
  auto last_busy = Clock::now();
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (tasks_.empty()) {
        if (!stopping_ && pollers_.empty() && !more) {
          sleeping_ = true;
          lock.unlock();
          sleep_until_woken(Clock::now() - last_busy < kSettle);
          lock.lock();
          sleeping_ = false;
        } else {
          // Polling (UCX busy, endpoints closing), but not holding a core
          // that a thread woken meanwhile (this agent's io thread or data
          // pool, a peer on this host) needs: see ucx_core.h.
          lock.unlock();
          std::this_thread::yield();
          lock.lock();
        }
      }
      batch.swap(tasks_);
      if (stopping_ && batch.empty() &&
          (pollers_.empty() || Clock::now() > stop_by_)) {
        break;
      }
    }
    bool busy = !batch.empty() || !pollers_.empty();
    for (auto& task : batch) task();
    batch.clear();
    int calls = 0;
    while (calls < kProgressBurst && ucp_worker_progress(worker_.get()) != 0) {
      ++calls;
    }
    more = calls == kProgressBurst;
    if (!pollers_.empty()) run_pollers();
    if (busy || calls > 0) last_busy = Clock::now();
  }
  if (!pollers_.empty()) {
    ucx_log()->warn("{} endpoint closes did not finish before shutdown",
                    pollers_.size());
  }
  pollers_.clear();
  {
    std::lock_guard lock(regions_mu_);
    regions_.clear([](auto& e) { e.value.memh.reset(); });
  }
  // Destroyed on the thread that created them, worker before context.
  worker_.reset();
  context_.reset();
}

void UcxCore::sleep_until_woken(bool settling) {
  pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {event_fd_, POLLIN, 0}};
  nfds_t n = 1;
  int timeout_ms = -1;  // nothing a peer can reach: only posted work can come
  if (settling || open_objects_.load(std::memory_order_relaxed) != 0) {
    timeout_ms = static_cast<int>(kMaxEventWait.count());
    if (event_fd_ >= 0) {
      const ucs_status_t s = ucp_worker_arm(worker_.get());
      if (s == UCS_ERR_BUSY) return;  // events came meanwhile: progress
      if (s == UCS_OK) {
        n = 2;
      } else if (!arm_failed_) {
        arm_failed_ = true;
        ucx_log()->warn("ucp_worker_arm: {}; polling every {} ms instead",
                        ucs_status_string(s), timeout_ms);
      }
    }
  }
  if (::poll(fds, n, timeout_ms) > 0 && (fds[0].revents & POLLIN) != 0) {
    uint64_t count = 0;
    [[maybe_unused]] const ssize_t r = ::read(wake_fd_, &count, sizeof(count));
  }
}

void UcxCore::run_pollers() {
  auto current = std::move(pollers_);
  pollers_.clear();
  std::vector<std::function<bool()>> keep;
  for (auto& p : current) {
    if (!p()) keep.push_back(std::move(p));
  }
  for (auto& p : pollers_) keep.push_back(std::move(p));  // added meanwhile
  pollers_ = std::move(keep);
}

// ------------------------------------------------------------- addresses

std::vector<uint8_t> encode_target_address(const TargetAddress& a) {
  ByteWriter w;
  w.put_string(a.host);
  w.put<uint16_t>(a.port);
  w.put<uint64_t>(a.token);
  w.put<uint32_t>(static_cast<uint32_t>(a.regions.size()));
  for (const RemoteRegion& r : a.regions) {
    w.put<uint64_t>(r.base);
    w.put<uint64_t>(r.length);
    w.put_blob(r.rkey);
  }
  return w.take();
}

Result<TargetAddress> decode_target_address(std::span<const uint8_t> bytes) {
  ByteReader r(bytes);
  TargetAddress a;
  KVMIG_ASSIGN_OR_RETURN(a.host, r.get_string(kMaxHostLen, "host"));
  KVMIG_ASSIGN_OR_RETURN(a.port, r.get<uint16_t>("port"));
  KVMIG_ASSIGN_OR_RETURN(a.token, r.get<uint64_t>("token"));
  KVMIG_ASSIGN_OR_RETURN(uint32_t n, r.get<uint32_t>("region count"));
  // Each region takes at least 20 bytes: base, length, key length.
  if (n > kMaxRegions || n > r.remaining() / 20) {
    return Status::data_loss("region count " + std::to_string(n) +
                             " does not fit the address");
  }
  a.regions.resize(n);
  for (RemoteRegion& region : a.regions) {
    KVMIG_ASSIGN_OR_RETURN(region.base, r.get<uint64_t>("region base"));
    KVMIG_ASSIGN_OR_RETURN(region.length, r.get<uint64_t>("region length"));
    if (region.base + region.length < region.base) {
      return Status::data_loss("region wraps the address space");
    }
    KVMIG_ASSIGN_OR_RETURN(auto rkey, r.get_blob(kMaxRkeyLen, "remote key"));
    if (rkey.empty() && region.length != 0) {
      return Status::data_loss("non-empty region without a remote key");
    }
    region.rkey.assign(rkey.begin(), rkey.end());
  }
  KVMIG_RETURN_IF_ERROR(r.expect_end("target address"));
  return a;
}

std::vector<uint8_t> encode_initiator_address(uint64_t token) {
  ByteWriter w;
  w.put<uint8_t>(kKeptConnection);
  w.put<uint64_t>(token);
  return w.take();
}

Result<uint64_t> decode_initiator_address(std::span<const uint8_t> bytes) {
  if (bytes.empty()) return uint64_t{0};
  ByteReader r(bytes);
  auto kind = r.get<uint8_t>("kind");
  auto t = r.get<uint64_t>("token");
  if (!kind.ok() || *kind != kKeptConnection || !t.ok() ||
      !r.expect_end("initiator address").ok()) {
    return Status::invalid_argument("ucx: bad initiator address (" +
                                    std::to_string(bytes.size()) + " bytes)");
  }
  return *t;
}

}  // namespace kvmig::ucx
