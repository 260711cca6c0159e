#include "in_doubt.h"

#include <algorithm>
#include <chrono>

#include "auth.h"
#include "context.h"
#include "ids.h"

namespace kvmig {

std::set<SeqId> InDoubtSet::held_seqs() const {
  std::set<SeqId> held;
  for (const auto& d : entries_) held.insert(d.seqs.begin(), d.seqs.end());
  return held;
}

asio::awaitable<Result<OutcomeRespMsg>> query_outcome(MigrationContext& ctx,
                                                      const std::string& to,
                                                      const std::string& id,
                                                      Deadline deadline) {
  auto connected = co_await connect_channel(to, ctx.options.max_frame_bytes,
                                            ctx.options.secret, deadline);
  if (!connected.ok()) co_return connected.status();
  FrameChannel& ch = *connected;
  const std::vector<uint8_t> payload = encode(OutcomeReqMsg{id});
  Status sent = co_await ch.send(MsgType::kOutcomeReq, payload, deadline);
  if (!sent.ok()) co_return sent;
  auto resp = co_await ch.receive(deadline);
  if (!resp.ok()) co_return resp.status();
  if (resp->type != MsgType::kOutcomeResp) {
    co_return Status::protocol("OUTCOME_REQ answered with " +
                               msg_type_name(resp->type));
  }
  co_return decode_outcome_resp(resp->payload);
}

asio::awaitable<Outcome> ask_outcome(MigrationContext& ctx,
                                     const std::string& to,
                                     const std::string& id, Deadline deadline) {
  auto resp = co_await query_outcome(ctx, to, id, deadline);
  if (!resp.ok() || resp->outcome == Outcome::kPending) {
    co_return Outcome::kUnknown;
  }
  const Outcome o = resp->outcome;
  if (o == Outcome::kForgotten) {
    ctx.log->error(
        "[{}] {} cannot tell how migration {} ended (it forgot, or it "
        "restarted over a pager that kept its requests): staying in doubt; "
        "decide with kvmig settle --agent THIS --migration {} --outcome "
        "committed|aborted",
        id.substr(0, 12), to, id, id);
    co_return Outcome::kUnknown;
  }
  // Unknown: never installed there (it restarted over an empty pager, or
  // never got the COMMIT): the requests belong here.
  co_return o == Outcome::kCommitted ? Outcome::kCommitted : Outcome::kAborted;
}

asio::awaitable<Outcome> resolve_outcome(MigrationContext& ctx,
                                         const std::string& to,
                                         const std::string& id) {
  const Deadline give_up = ctx.peer_deadline();
  asio::steady_timer timer(ctx.io);
  while (Clock::now() < give_up) {
    Outcome o = co_await ask_outcome(ctx, to, id, give_up);
    if (o != Outcome::kUnknown) co_return o;
    timer.expires_after(std::chrono::milliseconds(200));
    boost::system::error_code ec;
    co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
  }
  co_return Outcome::kUnknown;
}

void InDoubtSet::enter(MigrationContext& ctx, AgentStatus::InDoubt entry) {
  std::string id = entry.migration_id;
  entries_.push_back(std::move(entry));
  const std::string what = "asking about in-doubt migration " + id;
  asio::co_spawn(ctx.io, keep_asking(ctx, std::move(id)),
                 log_exceptions(ctx.log, what));
}

asio::awaitable<void> InDoubtSet::keep_asking(MigrationContext& ctx,
                                              std::string id) {
  // Quick at first (a brief partition), then every kMaxRetry at most.
  constexpr auto kFirstRetry = std::chrono::milliseconds(250);
  constexpr auto kMaxRetry = std::chrono::seconds(10);
  auto delay =
      std::chrono::duration_cast<std::chrono::milliseconds>(kFirstRetry);
  asio::steady_timer timer(ctx.io);
  for (;;) {
    timer.expires_after(delay);
    boost::system::error_code ec;
    co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    if (ctx.stopping) co_return;
    auto entry =
        std::find_if(entries_.begin(), entries_.end(),
                     [&](const auto& d) { return d.migration_id == id; });
    if (entry == entries_.end()) co_return;
    const std::string to = entry->to;
    // `entry` may move while this waits; settle() looks it up again.
    Outcome o = co_await ask_outcome(ctx, to, id, ctx.peer_deadline());
    if (ctx.stopping) co_return;
    if (o != Outcome::kUnknown && !ctx.snapshot.empty()) {
      // Settling drops or resumes requests: not in the middle of a
      // snapshot. Ask again soon.
      delay = kFirstRetry;
      continue;
    }
    if (o != Outcome::kUnknown) {
      co_await settle(ctx, id, o);
      co_return;
    }
    delay = std::min<std::chrono::milliseconds>(2 * delay, kMaxRetry);
  }
}

namespace {

// The requests of `wanted` the pager still has (the engine may have ended
// some of them meanwhile: held requests can still be dropped).
Result<std::vector<SeqId>> still_live(CachePager& pager,
                                      const std::vector<SeqId>& wanted) {
  auto now = pager.logical_seqs();
  if (!now.ok()) return now.status().with_context("logical_seqs");
  const std::set<SeqId> kept(wanted.begin(), wanted.end());
  std::vector<SeqId> live;
  for (const LogicalSeq& seq : *now) {
    if (kept.count(seq.seq_id)) live.push_back(seq.seq_id);
  }
  return live;
}

}  // namespace

asio::awaitable<Status> InDoubtSet::settle_by_hand(MigrationContext& ctx,
                                                   const std::string& id,
                                                   bool committed) {
  auto it = std::find_if(entries_.begin(), entries_.end(),
                         [&](const auto& d) { return d.migration_id == id; });
  if (it == entries_.end()) {
    co_return Status::not_found("migration " + id + " is not in doubt here");
  }
  if (settling_.count(id)) {
    co_return Status::failed_precondition(
        "migration " + id + " is being settled now (its destination answered)");
  }
  if (!ctx.snapshot.empty()) {
    co_return Status::failed_precondition(
        "a snapshot of this agent is under way (" + ctx.snapshot +
        "): settle again when it ends");
  }
  ctx.log->warn("[{}] settled by hand: {}", id.substr(0, 12),
                committed ? "committed" : "aborted");
  co_await settle(ctx, id, committed ? Outcome::kCommitted : Outcome::kAborted);
  co_return Status();
}

asio::awaitable<void> InDoubtSet::settle(MigrationContext& ctx,
                                         const std::string& id,
                                         Outcome outcome) {
  auto it = std::find_if(entries_.begin(), entries_.end(),
                         [&](const auto& d) { return d.migration_id == id; });
  if (it == entries_.end() || !settling_.insert(id).second) co_return;
  // A copy: `entries_` may move while the pager works.
  const AgentStatus::InDoubt d = *it;
  const std::string tag = migration_tag(id, "->", d.to);
  const bool committed = outcome == Outcome::kCommitted;
  if (d.hold != "none") {
    // A move: committed, the requests live at the destination now; rolled
    // back, they run here again. The pager is called from the data pool.
    CachePager& pager = ctx.pager;
    spdlog::logger& log = *ctx.log;
    const MigrationContext& c = ctx;
    co_await ctx.offload([&pager, &c, &d, &tag, &log, committed] {
      c.fault("src.settling");
      auto live = still_live(pager, d.seqs);
      Status s = live.status();
      if (s.ok()) {
        s = committed
                ? pager.drop_logical_seqs(*live)
                : (d.hold == "seqs" ? pager.unhold_seqs(*live) : Status());
      }
      if (!s.ok()) {
        log.error("{} settling requests {}: {}", tag, join_ids(d.seqs),
                  s.to_string());
      }
      if (d.hold == "engine") {
        Status resumed = pager.resume();
        if (!resumed.ok()) {
          log.error("{} resume: {}", tag, resumed.to_string());
        }
      }
      return 0;
    });
  }
  // Listed until here: the requests are dropped or run again now.
  settling_.erase(id);
  std::erase_if(entries_, [&](const auto& e) { return e.migration_id == id; });
  ctx.log->warn("{} in doubt settled: {}; requests {} {}", tag,
                committed ? "committed at the destination" : "rolled back",
                join_ids(d.seqs),
                committed ? (d.hold == "none" ? "copied" : "dropped here")
                          : "run here again");
  ctx.src_outcomes.remember(
      id, {committed ? "committed" : "aborted",
           committed ? ""
                     : "rolled back at the destination (settled after "
                       "being in doubt)"});
}

}  // namespace kvmig
