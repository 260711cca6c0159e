// Agent: listening, per-connection dispatch, status and outcome queries.
#include <future>
#include <random>
#include <string>

#include "agent_impl.h"
#include "auth.h"
#include "kvmig/digest.h"
#include "kvmig/snapshot.h"
#include "perf_server.h"

namespace kvmig {
namespace {

// Outcomes kept for queries, oldest forgotten first.
constexpr size_t kMaxDstRecords = 4096;

}  // namespace

std::string new_migration_id() {
  std::random_device rd;
  std::uniform_int_distribution<uint64_t> dist;
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx",
                static_cast<unsigned long long>(dist(rd)),
                static_cast<unsigned long long>(dist(rd)));
  return buf;
}

Agent::Impl::Impl(CachePager& pager_in, AgentOptions options_in)
    : pager(pager_in), options(std::move(options_in)), log(logger("control")) {
  limits.max_pages = options.max_pages_per_migration;
  limits.max_seqs = options.max_seqs_per_migration;
}

Agent::Impl::~Impl() {
  stopping = true;
  io.stop();
  if (serve_thread.joinable()) serve_thread.join();
  // Nobody will ask for these any more; their requests stay held (or the
  // engine paused) rather than risk running in two places.
  for (const auto& d : in_doubt) {
    log->error(
        "stopping with migration {} to {} in doubt: its requests stay "
        "held ({})",
        d.migration_id, d.to, d.hold);
  }
}

void Agent::Impl::fault(std::string_view point) const {
  if (options.fault_hook) options.fault_hook(point);
}

Result<Transport*> Agent::Impl::transport_named(std::string_view name) {
  auto it = transports.find(name);
  if (it != transports.end()) return it->second.get();
  std::string enabled;
  for (const auto& [n, t] : transports) {
    if (!enabled.empty()) enabled += ',';
    enabled += n;
  }
  return Status::failed_precondition("transport '" + std::string(name) +
                                     "' is not enabled on this agent "
                                     "(enabled: " +
                                     enabled + "; see serve --transports)");
}

asio::awaitable<void> Agent::Impl::accept_loop() {
  while (!stopping) {
    boost::system::error_code ec;
    asio::ip::tcp::socket socket = co_await acceptor.async_accept(
        asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
      if (ec == asio::error::operation_aborted || stopping) co_return;
      log->warn("accept failed: {}", ec.message());
      continue;
    }
    if (open_connections >= options.max_connections) {
      log->warn("refusing a connection: {} open, limit {}", open_connections,
                options.max_connections);
      continue;  // the socket closes here
    }
    asio::co_spawn(io, serve_connection(std::move(socket)), asio::detached);
  }
}

asio::awaitable<void> Agent::Impl::serve_connection(
    asio::ip::tcp::socket socket) {
  ++open_connections;
  struct Count {
    uint32_t& n;
    ~Count() { --n; }
  } count{open_connections};

  FrameChannel channel(std::move(socket), options.max_frame_bytes);
  auto first = co_await channel.receive(peer_deadline());
  if (!first.ok()) {
    log->warn("closing connection from {}: {}", channel.peer(),
              first.status().to_string());
    co_return;
  }
  // With a secret, nothing but the handshake comes before authentication.
  Status refused;
  if (!options.secret.empty()) {
    if (first->type != MsgType::kAuthHello) {
      refused = Status::unauthenticated(
          "this agent requires authentication (a shared secret: "
          "--secret-file); got " +
          msg_type_name(first->type));
    } else {
      const Frame hello = std::move(*first);
      Status authed = co_await authenticate_client(
          channel, hello, options.secret, peer_deadline());
      if (!authed.ok()) {
        log->warn("authentication failed from {}: {}", channel.peer(),
                  authed.to_string());
        channel.close();
        co_return;
      }
      first = co_await channel.receive(peer_deadline());
      if (!first.ok()) {
        log->warn("closing connection from {}: {}", channel.peer(),
                  first.status().to_string());
        co_return;
      }
    }
  } else if (first->type == MsgType::kAuthHello) {
    refused = Status::unauthenticated(
        "this agent has no secret and cannot authenticate (start it with "
        "--secret-file)");
  }
  if (!refused.ok()) {
    log->warn("refusing {}: {}", channel.peer(), refused.to_string());
    const std::vector<uint8_t> payload = encode(ErrorMsg{refused});
    Status sent =
        co_await channel.send(MsgType::kError, payload, peer_deadline());
    (void)sent;
    channel.close();
    co_return;
  }
  auto reply_error = [&](const Status& s) -> asio::awaitable<void> {
    const std::vector<uint8_t> payload1 = encode(ErrorMsg{s});
    Status sent =
        co_await channel.send(MsgType::kError, payload1, peer_deadline());
    if (!sent.ok()) log->warn("{}", sent.to_string());
  };

  switch (first->type) {
    case MsgType::kStatusReq: {
      auto st = co_await compute_status();
      if (!st.ok()) {
        Status error = st.status();
        co_await reply_error(error);
        break;
      }
      const std::vector<uint8_t> payload2 = encode(*st);
      Status sent = co_await channel.send(MsgType::kStatusResp, payload2,
                                          peer_deadline());
      if (!sent.ok()) log->warn("{}", sent.to_string());
      break;
    }
    case MsgType::kMigrateReq: {
      auto req = decode_migrate_request(first->payload, limits);
      if (!req.ok()) {
        log->warn("bad MIGRATE_REQ from {}: {}", channel.peer(),
                  req.status().to_string());
        Status error = req.status();
        co_await reply_error(error);
        break;
      }
      auto report = co_await run_source(std::move(*req));
      if (!report.ok()) {
        Status error = report.status();
        co_await reply_error(error);
        break;
      }
      const std::vector<uint8_t> payload3 = encode(*report);
      Status sent = co_await channel.send(MsgType::kMigrateResp, payload3,
                                          peer_deadline());
      if (!sent.ok()) log->warn("{}", sent.to_string());
      break;
    }
    case MsgType::kHello: {
      auto hello = decode_hello(first->payload, limits);
      if (!hello.ok()) {
        log->warn("bad HELLO from {}: {}", channel.peer(),
                  hello.status().to_string());
        const std::vector<uint8_t> payload4 =
            encode(AbortMsg{hello.status().to_string()});
        Status sent =
            co_await channel.send(MsgType::kAbort, payload4, peer_deadline());
        (void)sent;
        break;
      }
      co_await run_destination(channel, std::move(*hello));
      break;
    }
    case MsgType::kOutcomeReq: {
      auto req = decode_outcome_req(first->payload, limits);
      if (!req.ok()) {
        log->warn("bad OUTCOME_REQ from {}: {}", channel.peer(),
                  req.status().to_string());
        break;
      }
      OutcomeRespMsg resp = answer_outcome_query(req->migration_id);
      const std::vector<uint8_t> payload5 = encode(resp);
      Status sent = co_await channel.send(MsgType::kOutcomeResp, payload5,
                                          peer_deadline());
      if (!sent.ok()) log->warn("{}", sent.to_string());
      break;
    }
    case MsgType::kSnapshotReq: {
      auto req = decode_snapshot_req(first->payload, limits);
      Status done = req.status();
      if (done.ok()) {
        const SnapshotReqMsg& r = *req;
        done = co_await offload([this, &r] {
          return r.load ? restore(r.path, pager) : capture(pager, r.path);
        });
        log->info("snapshot {} {} for {}: {}", r.load ? "load from" : "save to",
                  r.path, channel.peer(), done.to_string());
      }
      if (!done.ok()) {
        co_await reply_error(done);
        break;
      }
      Status sent =
          co_await channel.send(MsgType::kSnapshotResp, {}, peer_deadline());
      if (!sent.ok()) log->warn("{}", sent.to_string());
      break;
    }
    case MsgType::kPerfSetup:
      co_await serve_perf_session(*this, channel, std::move(*first));
      break;
    default:
      log->warn("closing connection from {}: unexpected {} as first frame",
                channel.peer(), msg_type_name(first->type));
      break;
  }
  channel.close();
}

asio::awaitable<Result<AgentStatus>> Agent::Impl::compute_status() {
  AgentStatus st;
  st.meta = pager.meta();
  for (const auto& [name, t] : transports) st.transports.push_back(name);
  st.in_doubt = in_doubt;
  // Digests are computed with the engine paused, so no request is seen torn.
  auto seqs = co_await offload([this]() -> Result<std::vector<SeqStatus>> {
    KVMIG_RETURN_IF_ERROR(pager.pause());
    std::vector<SeqStatus> out;
    Status status;
    auto all = pager.logical_seqs();
    if (!all.ok()) {
      status = all.status();
    } else {
      for (const LogicalSeq& seq : *all) {
        auto d = seq_digest(pager, seq);
        if (!d.ok()) {
          status = d.status();
          break;
        }
        out.push_back({seq.seq_id, seq.n_tokens,
                       static_cast<uint32_t>(seq.pages.size()), d->hex()});
      }
    }
    Status resumed = pager.resume();
    KVMIG_RETURN_IF_ERROR(status);
    KVMIG_RETURN_IF_ERROR(resumed);
    return out;
  });
  if (!seqs.ok()) co_return seqs.status().with_context("status");
  st.seqs = std::move(*seqs);
  if (auto cap = pager.capacity()) {
    st.capacity_pages = cap->capacity_pages;
    st.free_pages = cap->free_pages;
  }
  co_return st;
}

void Agent::Impl::remember_outcome(const std::string& id, Outcome outcome) {
  auto [it, inserted] = dst_records.try_emplace(id);
  it->second.outcome = outcome;
  if (inserted) {
    dst_record_order.push_back(id);
    while (dst_record_order.size() > kMaxDstRecords) {
      const std::string& oldest = dst_record_order.front();
      auto old = dst_records.find(oldest);
      // Never forget a migration that is still under way.
      if (old != dst_records.end() &&
          old->second.outcome == Outcome::kPending) {
        break;
      }
      dst_records.erase(oldest);
      dst_record_order.pop_front();
    }
  }
}

OutcomeRespMsg Agent::Impl::answer_outcome_query(const std::string& id) {
  auto it = dst_records.find(id);
  if (it == dst_records.end()) return {Outcome::kUnknown};
  DstRecord& rec = it->second;
  if (rec.outcome == Outcome::kPending && !rec.committing) {
    // The source lost contact before we accepted its COMMIT: decide abort
    // now, so a COMMIT still in flight is refused.
    rec.fenced = true;
    log->warn("[{}] outcome query before COMMIT: fenced as aborted", id);
    return {Outcome::kAborted};
  }
  return {rec.outcome};
}

// --- Agent -------------------------------------------------------------------

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
  if (options.max_pages_per_migration == 0 ||
      options.max_seqs_per_migration == 0 || options.max_connections == 0 ||
      options.max_frame_bytes < 4096 || options.staging_bytes == 0) {
    return Status::invalid_argument(
        "agent: limits must be positive (max frame at least 4096 bytes)");
  }
  auto impl = std::make_unique<Impl>(pager, options);
  impl->layout = pager.layout();
  if (impl->layout) {
    KVMIG_RETURN_IF_ERROR(validate_layout(pager.meta(), *impl->layout)
                              .with_context("agent: pager layout"));
    for (const StridedRegion& r : *impl->layout) {
      impl->pager_regions.emplace_back(r.base, r.span_bytes());
    }
  }

  TransportOptions topts = options.transport_options;
  if (topts.bind_host.empty()) topts.bind_host = options.listen_host;
  for (const std::string& name : options.transports) {
    if (impl->transports.count(name)) continue;
    KVMIG_ASSIGN_OR_RETURN(auto transport, make_transport(name, topts));
    for (auto region : impl->pager_regions) {
      KVMIG_RETURN_IF_ERROR(transport->register_memory(region).with_context(
          "agent: registering pager memory with " + name));
    }
    impl->transports.emplace(name, std::move(transport));
  }

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
  std::string transports;
  for (const auto& [n, t] : impl.transports) transports += n + " ";
  logger("engine")->info("agent serving on {} (meta {}, {}, transports {})",
                         address(), impl.pager.meta().to_string(),
                         impl.layout ? "zero-copy layout" : "staged pages",
                         transports);
  asio::co_spawn(impl.io, impl.accept_loop(), asio::detached);
  auto guard = asio::make_work_guard(impl.io);
  impl.io.run();
  return Status();
}

Status Agent::start() {
  if (impl_->serve_thread.joinable()) {
    return Status::failed_precondition("agent: already started");
  }
  impl_->serve_thread = std::thread([this] { (void)run(); });
  return Status();
}

void Agent::stop() {
  if (!impl_) return;
  impl_->stopping = true;
  asio::post(impl_->io, [impl = impl_.get()] {
    boost::system::error_code ignored;
    impl->acceptor.close(ignored);
    impl->io.stop();
  });
  if (impl_->serve_thread.joinable() &&
      impl_->serve_thread.get_id() != std::this_thread::get_id()) {
    impl_->serve_thread.join();
  }
}

namespace {

// Runs make() as a coroutine on io and waits for its result. If the agent
// stops first and the coroutine is dropped, the promise breaks: Aborted.
template <typename T, typename Make>
Result<T> run_on(asio::io_context& io, Make make) {
  auto promise = std::make_shared<std::promise<Result<T>>>();
  auto future = promise->get_future();
  asio::co_spawn(
      io,
      [promise, make = std::move(make)]() -> asio::awaitable<void> {
        Result<T> result = co_await make();
        promise->set_value(std::move(result));
      },
      asio::detached);
  try {
    return future.get();
  } catch (const std::future_error&) {
    return Status::aborted("agent stopped before the call finished");
  }
}

}  // namespace

Result<MigrationReport> Agent::migrate(const MigrateRequest& request) {
  return run_on<MigrationReport>(impl_->io, [impl = impl_.get(), request] {
    return impl->run_source(request);
  });
}

Result<AgentStatus> Agent::status() {
  return run_on<AgentStatus>(
      impl_->io, [impl = impl_.get()] { return impl->compute_status(); });
}

}  // namespace kvmig
