// Accepting control connections, the authentication gate, and dispatch of a
// connection's first frame to what serves it.
#include <optional>
#include <string>
#include <vector>

#include "agent_impl.h"
#include "auth.h"
#include "control_messages.h"
#include "destination_run.h"
#include "kvmig/snapshot.h"
#include "scope_exit.h"
#include "snapshot_dir.h"
#include "source_run.h"

namespace kvmig {
namespace {

asio::awaitable<void> reply_error(MigrationContext& ctx, FrameChannel& channel,
                                  const Status& s) {
  const std::vector<uint8_t> payload = encode(ErrorMsg{s});
  Status sent =
      co_await channel.send(MsgType::kError, payload, ctx.peer_deadline());
  if (!sent.ok()) ctx.log->warn("{}", sent.to_string());
}

// Sends a reply frame, logging a failure (the peer may be gone).
asio::awaitable<void> reply(MigrationContext& ctx, FrameChannel& channel,
                            MsgType type, std::vector<uint8_t> payload) {
  Status sent = co_await channel.send(type, payload, ctx.peer_deadline());
  if (!sent.ok()) ctx.log->warn("{}", sent.to_string());
}

// With a secret, nothing but the handshake comes before authentication.
// Returns the connection's first request frame, or nothing when the
// connection is to be closed (refused, failed: already logged and answered).
asio::awaitable<std::optional<Frame>> admit(MigrationContext& ctx,
                                            FrameChannel& channel) {
  const std::string& secret = ctx.options.secret;
  auto received = [&](const Result<Frame>& frame) {
    if (!frame.ok()) {
      ctx.log->warn("closing connection from {}: {}", channel.peer(),
                    frame.status().to_string());
    }
    return frame.ok();
  };
  auto first = co_await channel.receive(ctx.peer_deadline());
  if (!received(first)) co_return std::nullopt;
  Status refused;
  if (!secret.empty() && first->type != MsgType::kAuthHello) {
    refused = Status::unauthenticated(
        "this agent requires authentication (a shared secret: "
        "--secret-file); got " +
        msg_type_name(first->type));
  } else if (!secret.empty()) {
    const Frame hello = std::move(*first);
    Status authed = co_await authenticate_client(channel, hello, secret,
                                                 ctx.peer_deadline());
    if (!authed.ok()) {
      ctx.log->warn("authentication failed from {}: {}", channel.peer(),
                    authed.to_string());
      co_return std::nullopt;
    }
    first = co_await channel.receive(ctx.peer_deadline());
    if (!received(first)) co_return std::nullopt;
  } else if (first->type == MsgType::kAuthHello) {
    refused = Status::unauthenticated(
        "this agent has no secret and cannot authenticate (start it with "
        "--secret-file)");
  }
  if (refused.ok()) co_return std::move(*first);
  ctx.log->warn("refusing {}: {}", channel.peer(), refused.to_string());
  co_await reply_error(ctx, channel, refused);
  co_return std::nullopt;
}

// STATUS_REQ's payload: empty (digests, as before digests were optional) or
// one byte, 1 for digests and 0 for none.
asio::awaitable<void> serve_status(AgentImpl& impl, FrameChannel& channel,
                                   const Frame& req) {
  if (req.payload.size() > 1 ||
      (req.payload.size() == 1 && req.payload[0] > 1)) {
    Status error = Status::protocol("STATUS_REQ: expected 0 or 1 byte, 0 or 1");
    co_await reply_error(impl.ctx, channel, error);
    co_return;
  }
  const bool digests = req.payload.empty() || req.payload[0] == 1;
  auto st = co_await impl.compute_status(digests);
  if (!st.ok()) {
    Status error = st.status();
    co_await reply_error(impl.ctx, channel, error);
    co_return;
  }
  co_await reply(impl.ctx, channel, MsgType::kStatusResp, encode(*st));
}

asio::awaitable<void> serve_migrate(MigrationContext& ctx,
                                    FrameChannel& channel, const Frame& req) {
  auto request = decode_migrate_request(req.payload, ctx.limits);
  if (!request.ok()) {
    ctx.log->warn("bad MIGRATE_REQ from {}: {}", channel.peer(),
                  request.status().to_string());
    Status error = request.status();
    co_await reply_error(ctx, channel, error);
    co_return;
  }
  auto report = co_await run_source(ctx, std::move(*request));
  if (!report.ok()) {
    Status error = report.status();
    co_await reply_error(ctx, channel, error);
  } else {
    co_await reply(ctx, channel, MsgType::kMigrateResp, encode(*report));
  }
  co_await ctx.run_after_reply();
}

asio::awaitable<void> serve_cancel(MigrationContext& ctx, FrameChannel& channel,
                                   const Frame& req) {
  auto cancel = decode_cancel_req(req.payload, ctx.limits);
  if (!cancel.ok()) {
    Status error = cancel.status();
    co_await reply_error(ctx, channel, error);
    co_return;
  }
  ctx.log->info("cancel of migration {} asked by {}", cancel->migration_id,
                channel.peer());
  auto report = co_await cancel_source(ctx, cancel->migration_id);
  if (!report.ok()) {
    Status error = report.status();
    co_await reply_error(ctx, channel, error);
    co_return;
  }
  co_await reply(ctx, channel, MsgType::kCancelResp, encode(*report));
}

asio::awaitable<void> serve_settle(MigrationContext& ctx, FrameChannel& channel,
                                   const Frame& req) {
  auto settle = decode_settle_req(req.payload, ctx.limits);
  Status done = settle.status();
  if (done.ok()) {
    ctx.log->warn("settling migration {} as {} by the word of {}",
                  settle->migration_id,
                  settle->committed ? "committed" : "aborted", channel.peer());
    done = co_await ctx.in_doubt.settle_by_hand(ctx, settle->migration_id,
                                                settle->committed);
  }
  if (!done.ok()) {
    co_await reply_error(ctx, channel, done);
    co_return;
  }
  co_await reply(ctx, channel, MsgType::kSettleResp, {});
}

// True when the migration committed and its connection may carry the
// source's next HELLO.
asio::awaitable<bool> serve_hello(MigrationContext& ctx, FrameChannel& channel,
                                  const Frame& frame) {
  auto hello = decode_hello(frame.payload, ctx.limits);
  if (!hello.ok()) {
    ctx.log->warn("bad HELLO from {}: {}", channel.peer(),
                  hello.status().to_string());
    const std::vector<uint8_t> payload =
        encode(AbortMsg{hello.status().to_string()});
    Status sent =
        co_await channel.send(MsgType::kAbort, payload, ctx.peer_deadline());
    (void)sent;
    co_return false;
  }
  DestinationRun run(ctx, channel, std::move(*hello));
  co_return co_await run.run();
}

asio::awaitable<void> serve_outcome_query(MigrationContext& ctx,
                                          FrameChannel& channel,
                                          const Frame& frame) {
  auto req = decode_outcome_req(frame.payload, ctx.limits);
  if (!req.ok()) {
    ctx.log->warn("bad OUTCOME_REQ from {}: {}", channel.peer(),
                  req.status().to_string());
    co_return;
  }
  ctx.fault("dst.outcome_query");
  OutcomeRespMsg resp =
      ctx.dst_records.answer_query(req->migration_id, ctx.log);
  resp.incarnation = ctx.incarnation;
  co_await reply(ctx, channel, MsgType::kOutcomeResp, encode(resp));
}

// FailedPrecondition naming what is under way here that a snapshot must
// not overlap: a migration (either role) or another snapshot. OK when
// nothing is (io thread).
Status refuse_snapshot_while_busy(const MigrationContext& ctx) {
  const std::string later = ": snapshots are refused until it ends";
  if (!ctx.snapshot.empty()) {
    return Status::failed_precondition("another snapshot is under way (" +
                                       ctx.snapshot + ")" + later);
  }
  if (!ctx.active.empty()) {
    const ActiveMigration& m = *ctx.active.begin()->second;
    return Status::failed_precondition(
        "a migration is under way here (" + m.id +
        (m.source ? ", source, to " : ", destination, from ") + m.peer + ")" +
        later);
  }
  if (ctx.source_runs > 0) {  // asked for, still choosing its requests
    return Status::failed_precondition(
        "a migration is under way here (from this agent, starting)" + later);
  }
  return Status();
}

// Saves or loads the snapshot a SNAPSHOT_REQ asks for, in the agent's
// snapshot directory, and says what the file holds. Nothing else moves
// requests here meanwhile: ctx.snapshot is set around the capture or
// restore.
asio::awaitable<Result<SnapshotReport>> take_snapshot(MigrationContext& ctx,
                                                      const Frame& frame,
                                                      const std::string& peer) {
  auto req = decode_snapshot_req(frame.payload, ctx.limits);
  if (!req.ok()) co_return req.status();
  if (ctx.options.snapshot_dir.empty()) {
    co_return Status::failed_precondition(
        "snapshots are disabled on this agent: start it with --snapshot-dir");
  }
  const bool load = req->load;
  auto path = co_await ctx.offload([&ctx, &requested = req->path] {
    return resolve_snapshot_path(ctx.options.snapshot_dir, requested);
  });
  if (!path.ok()) co_return path.status();
  // No await from this check to setting ctx.snapshot: no migration starts
  // in between.
  if (Status busy = refuse_snapshot_while_busy(ctx); !busy.ok()) {
    co_return busy;
  }
  ctx.snapshot = (load ? "load from " : "save to ") + *path;
  ScopeExit done([&ctx] { ctx.snapshot.clear(); });
  auto totals = co_await ctx.offload([&ctx, load, &file = *path] {
    ctx.fault("agent.snapshot");
    return load ? restore_with_totals(file, ctx.pager)
                : capture_with_totals(ctx.pager, file);
  });
  if (!totals.ok()) co_return totals.status();
  ctx.log->info("snapshot {} for {}: {} requests, {} pages, {} bytes",
                ctx.snapshot, peer, totals->seqs, totals->pages,
                totals->file_bytes);
  SnapshotReport report;
  report.path = *path;
  report.requests = totals->seqs;
  report.pages = totals->pages;
  report.bytes = totals->file_bytes;
  co_return report;
}

asio::awaitable<void> serve_snapshot(MigrationContext& ctx,
                                     FrameChannel& channel,
                                     const Frame& frame) {
  auto report = co_await take_snapshot(ctx, frame, channel.peer());
  if (!report.ok()) {
    Status error = report.status();
    ctx.log->warn("snapshot for {}: {}", channel.peer(), error.to_string());
    co_await reply_error(ctx, channel, error);
    co_return;
  }
  co_await reply(ctx, channel, MsgType::kSnapshotResp, encode(*report));
}

// Serves one request frame; true when the connection stays open for the
// next (a committed migration's, kept: AgentOptions::kept_connection_idle).
asio::awaitable<bool> dispatch(AgentImpl& impl, FrameChannel& channel,
                               Frame first) {
  MigrationContext& ctx = impl.ctx;
  switch (first.type) {
    case MsgType::kStatusReq:
      co_await serve_status(impl, channel, first);
      co_return false;
    case MsgType::kMigrateReq:
      co_await serve_migrate(ctx, channel, first);
      co_return false;
    case MsgType::kCancelReq:
      co_await serve_cancel(ctx, channel, first);
      co_return false;
    case MsgType::kSettleReq:
      co_await serve_settle(ctx, channel, first);
      co_return false;
    case MsgType::kHello: {
      const bool committed = co_await serve_hello(ctx, channel, first);
      const bool keep = committed &&
                        ctx.options.kept_connection_idle.count() > 0 &&
                        !ctx.stopping;
      co_return keep;
    }
    case MsgType::kOutcomeReq:
      co_await serve_outcome_query(ctx, channel, first);
      co_return false;
    case MsgType::kSnapshotReq:
      co_await serve_snapshot(ctx, channel, first);
      co_return false;
    case MsgType::kAbort: {
      // A source that connected while it held its requests, then gave up
      // before HELLO (its request or its hold failed): nothing to undo.
      auto abort = decode_abort(first.payload, ctx.limits);
      ctx.log->info("{} gave up before HELLO: {}", channel.peer(),
                    abort.ok() ? abort->reason : abort.status().to_string());
      co_return false;
    }
    default:
      break;
  }
  auto handler = impl.session_handlers.find(first.type);
  if (handler != impl.session_handlers.end()) {
    co_await handler->second(ctx, channel, std::move(first));
    co_return false;
  }
  ctx.log->warn("closing connection from {}: unexpected {} as first frame",
                channel.peer(), msg_type_name(first.type));
  co_return false;
}

}  // namespace

asio::awaitable<void> Agent::Impl::accept_loop() {
  while (!ctx.stopping) {
    boost::system::error_code ec;
    asio::ip::tcp::socket socket = co_await acceptor.async_accept(
        asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
      if (ec == asio::error::operation_aborted || ctx.stopping) co_return;
      ctx.log->warn("accept failed: {}", ec.message());
      continue;
    }
    if (open_connections >= ctx.options.max_connections) {
      if (idle_channels.empty()) {
        ctx.log->warn("refusing a connection: {} open, limit {}",
                      open_connections, ctx.options.max_connections);
        continue;  // the socket closes here
      }
      // A kept connection waiting for its source's next migration makes
      // room: that source connects again when it finds it closed.
      FrameChannel* oldest = idle_channels.front();
      idle_channels.pop_front();
      ctx.log->debug("closing the kept connection from {} to admit another",
                     oldest->peer());
      oldest->close();
    }
    asio::co_spawn(ctx.io, serve_connection(std::move(socket)),
                   log_exceptions(ctx.log, "serving a connection"));
  }
}

asio::awaitable<void> Agent::Impl::serve_connection(
    asio::ip::tcp::socket socket) {
  ++open_connections;
  ScopeExit count([this] { --open_connections; });
  FrameChannel channel(std::move(socket), ctx.options.max_frame_bytes);
  channels.insert(&channel);
  ScopeExit unlist([this, &channel] { channels.erase(&channel); });
  std::optional<Frame> next = co_await admit(ctx, channel);
  // (No co_await inside && or ?:: GCC 12 miscompiles those.)
  while (next) {
    const bool kept = co_await dispatch(*this, channel, std::move(*next));
    if (!kept) break;
    next = co_await await_kept(channel);
  }
  channel.close();
}

asio::awaitable<std::optional<Frame>> Agent::Impl::await_kept(
    FrameChannel& channel) {
  idle_channels.push_back(&channel);
  ScopeExit busy([this, &channel] { std::erase(idle_channels, &channel); });
  auto frame =
      co_await channel.receive(Clock::now() + ctx.options.kept_connection_idle);
  if (frame.ok()) co_return std::move(*frame);
  // The source closed its end, the idle time passed, or the agent stops:
  // a kept connection's normal end.
  ctx.log->debug("kept connection from {} ends: {}", channel.peer(),
                 frame.status().to_string());
  co_return std::nullopt;
}

void add_session_handler(Agent& agent, MsgType type, SessionHandler handler) {
  AgentInternals::impl(agent).session_handlers[type] = std::move(handler);
}

}  // namespace kvmig
