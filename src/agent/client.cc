// Scheduler-side calls: one connection per request to an agent's port.
#include <string>

#include "asio.h"
#include "auth.h"
#include "channel.h"
#include "control_messages.h"
#include "kvmig/agent.h"
#include "messages.h"

namespace kvmig {
namespace {

// Replies may carry a large status (many requests): allow 256 MiB.
constexpr uint32_t kClientMaxFrame = 256u << 20;

// Sends one request frame and returns the decoded reply of type `expect`;
// an ERROR reply becomes the agent's Status.
template <typename T, typename Decode>
Result<T> call_agent(std::string_view agent, MsgType type,
                     std::vector<uint8_t> payload, MsgType expect,
                     Decode decode, const ClientOptions& options) {
  asio::io_context io;
  Result<T> out = Status::internal("client call did not run");
  const Deadline deadline = Clock::now() + options.timeout;
  WireLimits limits;
  limits.max_seqs = 1u << 24;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto connected = co_await connect_channel(agent, kClientMaxFrame,
                                                  options.secret, deadline);
        if (!connected.ok()) {
          out = connected.status().with_context("agent " + std::string(agent));
          co_return;
        }
        FrameChannel& channel = *connected;
        Status sent = co_await channel.send(type, payload, deadline);
        if (!sent.ok()) {
          out = sent;
          co_return;
        }
        auto reply = co_await channel.receive(deadline);
        if (!reply.ok()) {
          out = reply.status();
        } else if (reply->type == MsgType::kError) {
          auto err = decode_error(reply->payload, limits);
          out = err.ok() ? err->status : err.status();
        } else if (reply->type != expect) {
          out = Status::protocol("agent " + std::string(agent) + " answered " +
                                 msg_type_name(reply->type) + ", expected " +
                                 msg_type_name(expect));
        } else {
          out = decode(reply->payload, limits);
        }
        channel.close();
      },
      [&out](std::exception_ptr e) {
        if (e) out = Status::internal("client call: " + exception_text(e));
      });
  io.run();
  return out;
}

}  // namespace

Result<AgentStatus> query_status(std::string_view agent,
                                 const ClientOptions& options,
                                 const StatusOptions& what) {
  std::vector<uint8_t> payload{static_cast<uint8_t>(what.digests ? 1 : 0)};
  return call_agent<AgentStatus>(agent, MsgType::kStatusReq, std::move(payload),
                                 MsgType::kStatusResp, decode_agent_status,
                                 options);
}

Result<MigrationReport> request_migration(std::string_view agent,
                                          const MigrateRequest& request,
                                          const ClientOptions& options) {
  return call_agent<MigrationReport>(agent, MsgType::kMigrateReq,
                                     encode(request), MsgType::kMigrateResp,
                                     decode_migration_report, options);
}

Result<CancelReport> cancel_migration(std::string_view agent,
                                      std::string_view migration_id,
                                      const ClientOptions& options) {
  CancelReqMsg req;
  req.migration_id = std::string(migration_id);
  return call_agent<CancelReport>(agent, MsgType::kCancelReq, encode(req),
                                  MsgType::kCancelResp, decode_cancel_report,
                                  options);
}

Status settle_migration(std::string_view agent, std::string_view migration_id,
                        bool committed, const ClientOptions& options) {
  struct Empty {};
  SettleReqMsg req;
  req.migration_id = std::string(migration_id);
  req.committed = committed;
  auto r = call_agent<Empty>(
      agent, MsgType::kSettleReq, encode(req), MsgType::kSettleResp,
      [](std::span<const uint8_t> p, const WireLimits&) -> Result<Empty> {
        if (!p.empty()) return Status::protocol("SETTLE_RESP not empty");
        return Empty{};
      },
      options);
  return r.status();
}

Result<SnapshotReport> request_snapshot(std::string_view agent,
                                        const SnapshotRequest& request,
                                        const ClientOptions& options) {
  return call_agent<SnapshotReport>(
      agent, MsgType::kSnapshotReq,
      encode(SnapshotReqMsg{request.load, request.path}),
      MsgType::kSnapshotResp, decode_snapshot_resp, options);
}

Status request_snapshot(std::string_view agent, bool load,
                        const std::string& path, const ClientOptions& options) {
  return request_snapshot(agent, SnapshotRequest{load, path}, options).status();
}

}  // namespace kvmig
