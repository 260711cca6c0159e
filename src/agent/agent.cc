// Agent: creation, the serving lifecycle, and the in-process calls
// (migrate, status) that run on the agent's io thread.
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>

#include "agent_impl.h"
#include "ids.h"
#include "snapshot_dir.h"
#include "source_run.h"

namespace kvmig {

Agent::Impl::~Impl() {
  ctx.stopping = true;
  ctx.io.stop();
  if (serve_thread.joinable()) serve_thread.join();
}

Agent::Agent(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Agent::~Agent() { stop(); }

Result<std::unique_ptr<Agent>> Agent::create(CachePager& pager,
                                             AgentOptions options) {
  KVMIG_RETURN_IF_ERROR(pager.meta().validate());
  if (options.transports.empty()) {
    return Status::invalid_argument("agent: no transports enabled");
  }
  if (options.peer_timeout.count() <= 0) {
    return Status::invalid_argument("agent: peer timeout must be positive");
  }
  if (options.kept_connection_idle.count() < 0) {
    return Status::invalid_argument(
        "agent: kept connection idle time must be at least 0 (0: never kept)");
  }
  if (options.max_pages_per_migration == 0 ||
      options.max_seqs_per_migration == 0 || options.max_connections == 0 ||
      options.max_migrations == 0 || options.max_frame_bytes < 4096 ||
      options.staging_bytes == 0) {
    return Status::invalid_argument(
        "agent: limits must be positive (max frame at least 4096 bytes)");
  }
  if (!options.snapshot_dir.empty()) {
    KVMIG_RETURN_IF_ERROR(check_snapshot_dir(options.snapshot_dir)
                              .status()
                              .with_context("agent"));
  }
  auto impl = std::make_unique<Impl>(pager, options);
  KVMIG_RETURN_IF_ERROR(impl->ctx.init());

  boost::system::error_code ec;
  auto address = asio::ip::make_address(options.listen_host, ec);
  if (ec) {
    return Status::invalid_argument("agent: listen host '" +
                                    options.listen_host +
                                    "' is not an IP address");
  }
  if (options.secret.empty() && !options.insecure && !address.is_loopback()) {
    return Status::invalid_argument(
        "agent: refusing to listen on " + options.listen_host +
        " without a shared secret: give --secret-file, or --insecure to "
        "accept unauthenticated peers");
  }
  asio::ip::tcp::endpoint endpoint(address, options.listen_port);
  auto& acceptor = impl->acceptor;
  acceptor.open(endpoint.protocol(), ec);
  if (!ec) acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor.bind(endpoint, ec);
  if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return Status::unavailable(
        "agent: cannot listen on " + options.listen_host + ":" +
        std::to_string(options.listen_port) + ": " + ec.message());
  }
  return std::unique_ptr<Agent>(new Agent(std::move(impl)));
}

std::string Agent::address() const {
  boost::system::error_code ec;
  auto ep = impl_->acceptor.local_endpoint(ec);
  if (ec) return "?";
  return ep.address().to_string() + ":" + std::to_string(ep.port());
}

uint16_t Agent::port() const {
  boost::system::error_code ec;
  auto ep = impl_->acceptor.local_endpoint(ec);
  return ec ? 0 : ep.port();
}

Status Agent::run() {
  auto& impl = *impl_;
  MigrationContext& ctx = impl.ctx;
  logger("engine")->info("agent serving on {} (meta {}, {}, transports {})",
                         address(), ctx.pager.meta().to_string(),
                         ctx.layout ? "zero-copy layout" : "staged pages",
                         ctx.transport_names(" "));
  impl.serving = true;
  asio::co_spawn(ctx.io, impl.accept_loop(),
                 log_exceptions(ctx.log, "accept loop"));
  auto guard = asio::make_work_guard(ctx.io);
  ctx.io.run();
  impl.serving = false;
  impl.abort_pending();
  return Status();
}

bool AgentImpl::add_pending(uint64_t& key, std::function<void()> abort) {
  std::lock_guard lock(pending_mu);
  if (pending_closed) return false;
  key = next_pending++;
  pending.emplace(key, std::move(abort));
  return true;
}

void AgentImpl::remove_pending(uint64_t key) {
  std::lock_guard lock(pending_mu);
  pending.erase(key);
}

void AgentImpl::abort_pending() {
  std::map<uint64_t, std::function<void()>> left;
  {
    std::lock_guard lock(pending_mu);
    pending_closed = true;
    left.swap(pending);
  }
  for (auto& [key, abort] : left) abort();
}

Status Agent::start() {
  if (impl_->serve_thread.joinable()) {
    return Status::failed_precondition("agent: already started");
  }
  impl_->serving = true;  // now: a call right after start() must not fail
  impl_->serve_thread = std::thread([this] { (void)run(); });
  return Status();
}

void AgentImpl::begin_stop() {
  if (stop_begun) return;
  stop_begun = true;
  boost::system::error_code ignored;
  acceptor.close(ignored);
  const Status why = Status::aborted("the agent is stopping");
  for (auto& [key, migration] : ctx.active) {
    if (migration->cancel) migration->cancel(why);
  }
  const Deadline until =
      Clock::now() + 2 * ctx.options.peer_timeout + std::chrono::seconds(1);
  asio::co_spawn(ctx.io, drain(until), [this](std::exception_ptr e) {
    if (e) ctx.log->error("stop: draining failed; stopping at once");
    ctx.io.stop();
  });
}

asio::awaitable<void> AgentImpl::drain(Deadline until) {
  // Polls: stopping is rare, and the runs end in milliseconds once cut off.
  asio::steady_timer tick(ctx.io);
  auto wait = [&]() -> asio::awaitable<void> {
    tick.expires_after(std::chrono::milliseconds(5));
    boost::system::error_code ec;
    co_await tick.async_wait(asio::redirect_error(asio::use_awaitable, ec));
  };
  while (!ctx.active.empty() && Clock::now() < until) co_await wait();
  if (!ctx.active.empty()) {
    ctx.log->error("stop: {} migrations still running after {} ms; stopping",
                   ctx.active.size(),
                   2 * ctx.options.peer_timeout.count() + 1000);
    co_return;
  }
  // No migration left: end every other connection (status, queries, perf).
  for (FrameChannel* channel : channels) channel->close();
  ctx.kept_channels.clear();
  while (open_connections > 0 && Clock::now() < until) co_await wait();
}

void Agent::stop() {
  if (!impl_) return;
  impl_->ctx.stopping = true;
  asio::post(impl_->ctx.io, [impl = impl_.get()] { impl->begin_stop(); });
  if (impl_->serve_thread.joinable() &&
      impl_->serve_thread.get_id() != std::this_thread::get_id()) {
    impl_->serve_thread.join();
  }
}

namespace {

// The caller's end of a call: filled once (the first finish() wins) and
// waited for on a futex. It costs the io thread one system call to wake a
// sleeping caller, and none if the caller is not asleep yet: std::promise
// costs two (pthread_once wakes too), a condition variable one more on the
// caller's side (glibc re-takes the mutex as if contended).
template <typename T>
struct PendingCall {
  enum : uint32_t { kEmpty, kSleeping, kFilled };
  std::atomic<bool> claimed{false};
  std::atomic<uint32_t> state{kEmpty};
  std::optional<Result<T>> result;  // written once, before state is kFilled

  void finish(Result<T> r) {
    if (claimed.exchange(true, std::memory_order_acq_rel)) return;
    result.emplace(std::move(r));
    if (state.exchange(kFilled, std::memory_order_release) == kSleeping) {
      syscall(SYS_futex, futex_word(), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr,
              0);
    }
  }
  Result<T> wait() {
    uint32_t s = state.load(std::memory_order_acquire);
    while (s != kFilled) {
      if (s == kEmpty && !state.compare_exchange_weak(
                             s, kSleeping, std::memory_order_acquire)) {
        continue;  // s reloaded
      }
      // Returns at once unless state is still kSleeping.
      syscall(SYS_futex, futex_word(), FUTEX_WAIT_PRIVATE, kSleeping, nullptr,
              nullptr, 0);
      s = state.load(std::memory_order_acquire);
    }
    return std::move(*result);
  }

 private:
  uint32_t* futex_word() { return reinterpret_cast<uint32_t*>(&state); }
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t) &&
                std::atomic<uint32_t>::is_always_lock_free);
};

// Runs make() as a coroutine on the agent's io thread and waits for its
// result. FailedPrecondition when nothing would ever run it (the agent is
// not serving) or when called on one of the agent's threads (from a pager
// method: it would wait for itself). If the agent stops first, the call returns
// Aborted as soon as the io thread has stopped.
template <typename T, typename Make>
Result<T> run_on(AgentImpl& impl, std::string_view what, Make make) {
  asio::io_context& io = impl.ctx.io;
  if (!impl.serving || impl.ctx.stopping) {
    return Status::failed_precondition(
        "agent: " + std::string(what) +
        " needs a serving agent (call start() or run() first)");
  }
  if (io.get_executor().running_in_this_thread() ||
      impl.ctx.data_pool.get_executor().running_in_this_thread()) {
    return Status::failed_precondition(
        "agent: " + std::string(what) +
        " called on one of the agent's own threads (from a pager method?) "
        "would wait for itself");
  }
  auto call = std::make_shared<PendingCall<T>>();
  const Status stopped =
      Status::aborted("agent stopped before the call finished");
  uint64_t key = 0;
  if (!impl.add_pending(key, [call, stopped] { call->finish(stopped); })) {
    return stopped;
  }
  asio::co_spawn(
      io,
      [call, make = std::move(make),
       &ctx = impl.ctx]() -> asio::awaitable<void> {
        Result<T> result = co_await make();
        call->finish(std::move(result));
        co_await ctx.run_after_reply();
      },
      [call, log = impl.ctx.log,
       what = std::string(what)](std::exception_ptr e) {
        if (!e) return;
        const std::string text = exception_text(e);
        log->error("{}: uncaught exception: {}", what, text);
        call->finish(Status::internal(what + " failed: " + text));
      });
  Result<T> result = call->wait();
  impl.remove_pending(key);
  return result;
}

}  // namespace

Result<MigrationReport> Agent::migrate(const MigrateRequest& request) {
  return run_on<MigrationReport>(
      *impl_, "migrate",
      [impl = impl_.get(), request] { return run_source(impl->ctx, request); });
}

Result<CancelReport> Agent::cancel(std::string_view migration_id) {
  return run_on<CancelReport>(
      *impl_, "cancel", [impl = impl_.get(), id = std::string(migration_id)] {
        return cancel_source(impl->ctx, id);
      });
}

Status Agent::settle(std::string_view migration_id, bool committed) {
  struct Empty {};
  auto done = run_on<Empty>(
      *impl_, "settle",
      [impl = impl_.get(), id = std::string(migration_id),
       committed]() -> asio::awaitable<Result<Empty>> {
        KVMIG_CO_RETURN_IF_ERROR(check_migration_id(id));
        KVMIG_CO_RETURN_IF_ERROR(co_await impl->ctx.in_doubt.settle_by_hand(
            impl->ctx, id, committed));
        co_return Empty{};
      });
  return done.status();
}

Result<AgentStatus> Agent::status(const StatusOptions& options) {
  return run_on<AgentStatus>(*impl_, "status", [impl = impl_.get(), options] {
    return impl->compute_status(options.digests);
  });
}

}  // namespace kvmig
