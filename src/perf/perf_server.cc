#include "perf_server.h"

#include <utility>
#include <vector>

#include "auth.h"
#include "synthetic_pager.h"

namespace kvmig {
namespace {

// How long a session waits for the client's next frame: longer than any
// one migration the client runs between two resets.
constexpr auto kSessionIdle = std::chrono::minutes(10);
// A perf client's frames are small; its server's answers too.
constexpr uint32_t kPerfMaxFrame = 1u << 20;

// One session's target: an agent over its own pager.
struct Target {
  // Declared before agent: the agent must go first.
  std::unique_ptr<SyntheticPager> pager;
  std::unique_ptr<Agent> agent;
};

Result<std::unique_ptr<Target>> build_target(const AgentOptions& base,
                                             const PerfSetupMsg& setup) {
  const uint64_t pool_bytes =
      2 * setup.meta.page_bytes() * uint64_t{setup.capacity_pages};
  if (pool_bytes > kMaxPerfPoolBytes) {
    return Status::resource_exhausted(
        "perf: a pool of " + std::to_string(setup.capacity_pages) +
        " pages is " + std::to_string(pool_bytes >> 20) +
        " MiB, more than the server's limit of " +
        std::to_string(kMaxPerfPoolBytes >> 20) + " MiB");
  }
  auto target = std::make_unique<Target>();
  KVMIG_ASSIGN_OR_RETURN(
      target->pager,
      SyntheticPager::create(setup.meta, setup.layout, setup.capacity_pages,
                             setup.memory));
  target->pager->set_allocation_order(setup.order, setup.seed);
  AgentOptions options = base;
  options.listen_port = 0;
  options.inline_page_bytes = kMaxPerfInlineBytes;
  KVMIG_ASSIGN_OR_RETURN(target->agent, Agent::create(*target->pager, options));
  KVMIG_RETURN_IF_ERROR(target->agent->start());
  return target;
}

// Drops every request on pager; returns the free slots left.
Result<uint32_t> drop_all(SyntheticPager& pager) {
  KVMIG_ASSIGN_OR_RETURN(std::vector<LogicalSeq> seqs, pager.logical_seqs());
  std::vector<SeqId> ids;
  ids.reserve(seqs.size());
  for (const LogicalSeq& s : seqs) ids.push_back(s.seq_id);
  KVMIG_RETURN_IF_ERROR(pager.drop_logical_seqs(ids));
  return static_cast<uint32_t>(pager.capacity()->free_pages);
}

}  // namespace

void enable_perf_sessions(Agent& agent) {
  add_session_handler(agent, MsgType::kPerfSetup, serve_perf_session);
}

asio::awaitable<void> serve_perf_session(MigrationContext& ctx,
                                         FrameChannel& channel, Frame first) {
  std::unique_ptr<Target> target;
  // Stopping an agent joins its thread: do it on the data pool.
  auto tear_down = [&]() -> asio::awaitable<void> {
    if (!target) co_return;
    std::unique_ptr<Target> doomed = std::move(target);
    bool done = co_await ctx.offload([&doomed] {
      doomed.reset();
      return true;
    });
    (void)done;
  };
  Frame frame = std::move(first);
  Status failed;
  for (;;) {
    if (frame.type == MsgType::kPerfSetup) {
      auto setup = decode_perf_setup(frame.payload, ctx.limits);
      if (!setup.ok()) {
        failed = setup.status();
        break;
      }
      co_await tear_down();
      const PerfSetupMsg& s = *setup;
      auto built = co_await ctx.offload(
          [&ctx, &s] { return build_target(ctx.options, s); });
      if (!built.ok()) {
        failed = built.status().with_context("perf setup");
        break;
      }
      target = std::move(*built);
      ctx.log->info(
          "perf session from {}: target {} ({}, {} layout, {} slots, {} "
          "allocation)",
          channel.peer(), target->agent->address(), s.meta.to_string(),
          pool_layout_name(s.layout), s.capacity_pages,
          allocation_order_name(s.order));
    } else if (frame.type == MsgType::kPerfReset && target) {
      auto dropped = drop_all(*target->pager);
      if (!dropped.ok()) {
        failed = dropped.status().with_context("perf reset");
        break;
      }
    } else {
      failed = Status::protocol("perf session: unexpected " +
                                msg_type_name(frame.type));
      break;
    }
    PerfReadyMsg ready;
    ready.address = target->agent->address();
    ready.free_pages =
        static_cast<uint32_t>(target->pager->capacity()->free_pages);
    const std::vector<uint8_t> payload = encode(ready);
    Status sent = co_await channel.send(MsgType::kPerfReady, payload,
                                        ctx.peer_deadline());
    if (!sent.ok()) break;
    auto next = co_await channel.receive(Clock::now() + kSessionIdle);
    if (!next.ok()) break;  // the client is done (or gone)
    frame = std::move(*next);
  }
  if (!failed.ok()) {
    ctx.log->warn("perf session from {}: {}", channel.peer(),
                  failed.to_string());
    const std::vector<uint8_t> payload = encode(ErrorMsg{failed});
    Status sent =
        co_await channel.send(MsgType::kError, payload, ctx.peer_deadline());
    (void)sent;
  }
  co_await tear_down();
}

// --- client -----------------------------------------------------------------

namespace {

// Runs make() as a coroutine on io until it finishes.
template <typename T, typename Make>
Result<T> run_blocking(asio::io_context& io, Make make) {
  Result<T> out = Status::internal("perf session call did not run");
  io.restart();
  asio::co_spawn(
      io,
      [&out, &make]() -> asio::awaitable<void> {
        Result<T> r = co_await make();
        out = std::move(r);
      },
      [&out](std::exception_ptr e) {
        if (e) out = Status::internal("perf session: " + exception_text(e));
      });
  io.run();
  return out;
}

}  // namespace

PerfSession::PerfSession(std::string server, std::chrono::milliseconds timeout)
    : server_(std::move(server)), timeout_(timeout) {}

PerfSession::~PerfSession() {
  if (channel_) channel_->close();
}

Result<std::unique_ptr<PerfSession>> PerfSession::open(
    std::string_view server, const PerfSetupMsg& setup,
    std::chrono::milliseconds timeout, const std::string& secret) {
  std::unique_ptr<PerfSession> session(
      new PerfSession(std::string(server), timeout));
  PerfSession& s = *session;
  const Deadline deadline = Clock::now() + timeout;
  auto channel = run_blocking<FrameChannel>(s.io_, [&]() {
    return connect_channel(s.server_, kPerfMaxFrame, secret, deadline);
  });
  if (!channel.ok()) {
    return channel.status().with_context("perf server " + s.server_);
  }
  s.channel_ = std::make_unique<FrameChannel>(std::move(*channel));
  KVMIG_RETURN_IF_ERROR(s.exchange(MsgType::kPerfSetup, encode(setup)));
  return session;
}

Status PerfSession::reset() {
  return exchange(MsgType::kPerfReset, {}).with_context("perf reset");
}

Status PerfSession::exchange(MsgType type, std::vector<uint8_t> payload) {
  if (!channel_) return Status::failed_precondition("perf session closed");
  const Deadline deadline = Clock::now() + timeout_;
  FrameChannel& channel = *channel_;
  auto reply =
      run_blocking<Frame>(io_, [&]() -> asio::awaitable<Result<Frame>> {
        Status sent = co_await channel.send(type, payload, deadline);
        if (!sent.ok()) co_return sent;
        co_return co_await channel.receive(deadline);
      });
  const std::string who = "perf server " + server_;
  if (!reply.ok()) return reply.status().with_context(who);
  WireLimits limits;
  if (reply->type == MsgType::kError) {
    auto err = decode_error(reply->payload, limits);
    return (err.ok() ? err->status : err.status()).with_context(who);
  }
  if (reply->type != MsgType::kPerfReady) {
    return Status::protocol(who + " answered " + msg_type_name(reply->type) +
                            ", expected PERF_READY");
  }
  KVMIG_ASSIGN_OR_RETURN(PerfReadyMsg ready,
                         decode_perf_ready(reply->payload, limits));
  target_ = ready.address;
  free_pages_ = ready.free_pages;
  return Status();
}

}  // namespace kvmig
