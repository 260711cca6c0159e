#include "source_run.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>

#include "auth.h"
#include "ids.h"
#include "in_doubt.h"
#include "kvmig/digest.h"
#include "random.h"
#include "scope_exit.h"

namespace kvmig {
namespace {

// Largest single write the planner emits; bounds how long one op holds the
// transport and gives the fault points a middle.
constexpr uint64_t kMaxWriteBytes = 4ull << 20;
// Writes handed to the transport per call.
constexpr size_t kOpsPerPost = 256;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

Status reply_status(const Frame& f, const WireLimits& limits,
                    std::string_view context) {
  if (f.type == MsgType::kAbort) {
    auto why = decode_abort(f.payload, limits);
    return Status::aborted(std::string(context) + ": destination aborted: " +
                           (why.ok() ? why->reason : why.status().to_string()));
  }
  return Status::protocol(std::string(context) + ": unexpected " +
                          msg_type_name(f.type));
}

// "No record of this id" from the agent of `incarnation`: kUnknown; or
// kForgotten from an agent that started over requests of its own, when it
// is that very agent and never forgot a commit.
bool no_record(const Result<OutcomeRespMsg>& answer, uint64_t incarnation) {
  return answer.ok() &&
         (answer->outcome == Outcome::kUnknown ||
          (answer->outcome == Outcome::kForgotten && answer->remembers_all &&
           answer->incarnation == incarnation));
}

// NotFound naming the ids (in the order asked, once each) that `live`
// does not list; OK when it lists them all.
Status refuse_unknown(const std::vector<LogicalSeq>& live,
                      std::span<const SeqId> ids) {
  std::set<SeqId> known;
  for (const LogicalSeq& l : live) known.insert(l.seq_id);
  std::set<SeqId> seen;
  std::vector<SeqId> unknown;
  for (SeqId id : ids) {
    if (!known.count(id) && seen.insert(id).second) unknown.push_back(id);
  }
  if (unknown.empty()) return Status();
  return Status::not_found("unknown request ids: " + join_ids(unknown));
}

// The selection's check against the pager's tables: the unknown ids, or
// why the pager could not list them.
Status check_selection(CachePager& pager, std::span<const SeqId> ids) {
  auto live = pager.logical_seqs();
  return live.ok() ? refuse_unknown(*live, ids)
                   : live.status().with_context("logical_seqs");
}

}  // namespace

const char* EnginePause::scope_name() const {
  switch (scope_) {
    case Scope::kSeqs:
      return "seqs";
    case Scope::kEngine:
      return "engine";
    case Scope::kNone:
      break;
  }
  return "none";
}

Status EnginePause::unhold(const std::vector<SeqId>& ids) {
  if (scope_ != Scope::kSeqs || ids.empty()) return Status();
  std::erase_if(ids_, [&](SeqId s) {
    return std::find(ids.begin(), ids.end(), s) != ids.end();
  });
  return pager_.unhold_seqs(ids);
}

Status EnginePause::release() {
  const Scope scope = std::exchange(scope_, Scope::kNone);
  if (scope == Scope::kNone) return Status();
  if (scope == Scope::kEngine) {
    Status s = pager_.resume();
    if (!s.ok()) logger("engine")->error("resume failed: {}", s.to_string());
    return s;
  }
  Status s = pager_.unhold_seqs(ids_);
  if (s.code() == StatusCode::kNotFound) {
    // Some request went away meanwhile (all or nothing): the live ones.
    auto live = pager_.logical_seqs();
    std::vector<SeqId> still;
    if (live.ok()) {
      for (const LogicalSeq& seq : *live) {
        if (std::find(ids_.begin(), ids_.end(), seq.seq_id) != ids_.end()) {
          still.push_back(seq.seq_id);
        }
      }
    }
    s = live.ok() ? pager_.unhold_seqs(still) : live.status();
  }
  if (!s.ok()) logger("engine")->error("unhold failed: {}", s.to_string());
  return s;
}

SourceRun::SourceRun(MigrationContext& ctx, const MigrateRequest& req,
                     Transport& transport, std::string id)
    : ctx_(ctx),
      req_(req),
      transport_(transport),
      id_(std::move(id)),
      tag_(migration_tag(id_, "->", req.to)),
      meta_(ctx.pager.meta()),
      page_total_(2 * meta_.page_bytes()),
      precopy_(meta_.page_size_tokens),
      pause_(ctx.pager),
      timeout_timer_(ctx.io) {
  progress_.id = id_;
  progress_.peer = req.to;
  progress_.transport = std::string(transport.name());
  progress_.cancel = [this](const Status& why) { cancel(why); };
  listing_.emplace(ctx_, progress_);
}

void SourceRun::cancel(const Status& why) {
  if (committing_ || cancelled_) return;
  ctx_.log->warn("{} cancelling: {}", tag_, why.to_string());
  cancelled_ = why;
  progress_.phase = "cancelling";
  cancel_flag_.store(true, std::memory_order_relaxed);
  if (init_) init_->cancel();
  boost::system::error_code ignored;
  if (channel_) channel_->socket().cancel(ignored);
  if (pause_timer_) pause_timer_->cancel();
}

void SourceRun::enter_phase(const char* p) {
  close_phase();
  phase_ = p;
  if (!cancelled_) progress_.phase = p;
}

void SourceRun::close_phase() {
  const auto now = Clock::now();
  const double ms =
      std::chrono::duration<double, std::milli>(now - phase_start_).count();
  phase_start_ = now;
  auto it = std::find_if(phases_ms_.begin(), phases_ms_.end(),
                         [&](const auto& e) { return e.first == phase_; });
  if (it == phases_ms_.end()) {
    phases_ms_.emplace_back(phase_, ms);
  } else {
    it->second += ms;
  }
}

void SourceRun::arm_timeout() {
  if (req_.timeout.count() <= 0) return;
  timeout_timer_.expires_after(req_.timeout);
  // The timer dies with the run, and then this handler sees an error.
  timeout_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;
    cancel(Status::deadline_exceeded(
        "migration " + id_ +
        " cancelled: not committed within its timeout "
        "of " +
        std::to_string(req_.timeout.count()) +
        " ms; rolled back, the requests run at the source again"));
  });
}

template <typename F>
asio::awaitable<Status> SourceRun::offload_with_progress(F f) {
  // The job reports back through the io thread, which cancels the timer
  // this coroutine waits on between PROGRESS frames.
  struct Job {
    explicit Job(asio::io_context& io) : timer(io) {}
    asio::steady_timer timer;
    bool done = false;  // io thread
    Status result;      // io thread
  };
  auto job = std::make_shared<Job>(ctx_.io);
  asio::post(ctx_.data_pool, [job, f = std::move(f)]() mutable {
    Status s = f();
    asio::post(job->timer.get_executor(), [job, s = std::move(s)]() mutable {
      job->result = std::move(s);
      job->done = true;
      job->timer.cancel();
    });
  });
  // At most a second apart, and well inside the peer timeout.
  const auto every = std::min<Clock::duration>(std::chrono::seconds(1),
                                               ctx_.options.peer_timeout / 4);
  Status link;  // the control connection failed: the destination is gone
  while (!job->done) {
    job->timer.expires_after(every);
    boost::system::error_code ec;
    co_await job->timer.async_wait(
        asio::redirect_error(asio::use_awaitable, ec));
    // Cancelled or cut off: the job ends soon (its write loop sees the flag).
    if (job->done || cancelled_ || !link.ok()) continue;
    ProgressMsg progress;
    progress.bytes = progress_.bytes.load(std::memory_order_relaxed);
    const std::vector<uint8_t> payload = encode(progress);
    link = co_await channel_->send(MsgType::kProgress, payload, deadline());
    if (!link.ok()) {
      // The destination is gone: the job's writes and flush stop waiting.
      cancel_flag_.store(true, std::memory_order_relaxed);
      if (init_) init_->cancel();
    }
  }
  if (job->result.ok() || cancelled_) co_return std::move(job->result);
  // The destination gives a migration up by cutting its data path, then
  // sends ABORT: a write that found the data path gone (Unavailable), or
  // a control connection that broke, is most likely that, and the ABORT
  // (read here: nothing else reads this connection during the data phase)
  // says why. Any other failure is this side's own.
  const bool cut_off =
      !link.ok() || job->result.code() == StatusCode::kUnavailable;
  if (!cut_off) co_return std::move(job->result);
  auto why =
      co_await channel_->receive(Clock::now() + std::chrono::milliseconds(200));
  if (why.ok() && why->type == MsgType::kAbort) {
    auto abort = decode_abort(why->payload, ctx_.limits);
    if (abort.ok())
      co_return Status::aborted("destination aborted: " + abort->reason);
  }
  co_return link.ok() ? std::move(job->result) : link;
}

asio::awaitable<void> SourceRun::abort_peer(const Status& why) {
  if (!channel_) co_return;
  const std::vector<uint8_t> payload = encode(AbortMsg{why.to_string()});
  Status sent = co_await channel_->send(MsgType::kAbort, payload,
                                        Clock::now() + std::chrono::seconds(1));
  (void)sent;
  channel_->close();
}

// A pause on its way to the data pool. pause() waits for the engine's step
// in progress; one that never ends (an engine thread that never yields)
// fails the migration at the peer deadline instead of hanging it, and the
// pause, when it does return, is undone on the spot: nothing else would
// ever resume it.
struct SourceRun::PauseRace {
  explicit PauseRace(asio::io_context& io) : timer(io) {}
  asio::steady_timer timer;
  std::mutex mu;
  bool done = false;       // guarded by mu
  bool abandoned = false;  // guarded by mu
  Status result;           // guarded by mu
  bool refused = false;    // result is the selection's; guarded by mu
  EnginePause::Scope scope = EnginePause::Scope::kNone;  // guarded by mu
  Clock::time_point paused_at;                           // guarded by mu
  std::optional<Result<std::vector<LogicalSeq>>> seqs;   // guarded by mu
};

std::shared_ptr<SourceRun::PauseRace> SourceRun::start_pause(bool whole_engine,
                                                             bool check_live) {
  auto race = std::make_shared<PauseRace>(ctx_.io);
  race->timer.expires_at(deadline());
  CachePager& pager = ctx_.pager;
  std::atomic<bool>& holds = ctx_.pager_holds_seqs;
  // A pager whose bookkeeping never waits is asked here first, on the io
  // thread: the selection's check, then a hold that does not wait
  // (try_hold_seqs). Held at once, no trip. Any other answer sends the
  // trip below, whose hold_seqs() decides.
  if (ctx_.pager_never_waits && holds.load(std::memory_order_relaxed)) {
    std::lock_guard lock(race->mu);
    if (check_live) {
      race->result = check_selection(pager, moving_);
      if (!race->result.ok()) {
        race->refused = true;
        race->done = true;
        return race;
      }
      check_live = false;  // checked: the trip need not ask again
    }
    if (pager.try_hold_seqs(moving_).ok()) {
      race->scope = EnginePause::Scope::kSeqs;
      race->paused_at = Clock::now();
      race->seqs = pager.logical_seqs();  // the paused round's snapshot
      race->done = true;
      return race;
    }
  }
  // Only the requests that move, where the pager can hold them one by
  // one; the whole engine for a pager that cannot, or when one of them
  // has finished meanwhile (NotFound: the round then leaves it behind).
  // Any other failure fails the migration, as a failing pause() does.
  // Without whole_engine, a pager that cannot hold them is left running
  // (scope kNone, OK): the caller pauses the engine later.
  asio::post(ctx_.data_pool, [race, &pager, &holds, whole_engine, check_live,
                              ids = moving_] {
    // The selection's check on the same trip: every id live, else nothing
    // is held and the run ends with the ids it does not know.
    if (check_live) {
      Status refused = check_selection(pager, ids);
      if (!refused.ok()) {
        std::lock_guard lock(race->mu);
        if (race->abandoned) return;
        race->result = std::move(refused);
        race->refused = true;
        race->done = true;
        asio::post(race->timer.get_executor(),
                   [race] { race->timer.cancel(); });
        return;
      }
    }
    auto scope = EnginePause::Scope::kSeqs;
    Status s = pager.hold_seqs(ids);
    if (s.code() == StatusCode::kUnimplemented) {
      holds.store(false, std::memory_order_relaxed);
    }
    if (s.code() == StatusCode::kNotFound) {
      logger("engine")->info("hold_seqs: {}{}", s.to_string(),
                             whole_engine ? "; pausing the engine" : "");
    }
    if (s.code() == StatusCode::kUnimplemented ||
        s.code() == StatusCode::kNotFound) {
      scope = EnginePause::Scope::kNone;
      s = Status();
      if (whole_engine) {
        scope = EnginePause::Scope::kEngine;
        s = pager.pause();
      }
    } else if (!s.ok()) {
      s = s.with_context("hold_seqs");
    }
    const auto paused_at = Clock::now();
    // The paused round's snapshot on the same trip: one wake-up less.
    std::optional<Result<std::vector<LogicalSeq>>> seqs;
    if (s.ok() && scope != EnginePause::Scope::kNone) {
      seqs = pager.logical_seqs();
    }
    std::lock_guard lock(race->mu);
    if (race->abandoned) {
      if (s.ok() && scope == EnginePause::Scope::kSeqs) {
        (void)pager.unhold_seqs(ids);
      } else if (s.ok() && scope == EnginePause::Scope::kEngine) {
        (void)pager.resume();
      }
      return;
    }
    race->result = std::move(s);
    race->scope = scope;
    race->paused_at = paused_at;
    race->seqs = std::move(seqs);
    race->done = true;
    // Posted to the io thread, which runs finish_pause(): it either saw
    // `done` or is already waiting on the timer when this runs.
    asio::post(race->timer.get_executor(), [race] { race->timer.cancel(); });
  });
  return race;
}

asio::awaitable<Status> SourceRun::finish_pause(
    std::shared_ptr<PauseRace> race) {
  bool done = false;
  {
    std::lock_guard lock(race->mu);
    done = race->done;
  }
  // A run cancelled meanwhile abandons a pause still under way.
  if (!done && !cancelled_) {
    pause_timer_ = &race->timer;
    ScopeExit unset([this] { pause_timer_ = nullptr; });
    boost::system::error_code ec;
    co_await race->timer.async_wait(
        asio::redirect_error(asio::use_awaitable, ec));
  }
  Status paused;
  bool refused = false;
  auto scope = EnginePause::Scope::kNone;
  Clock::time_point paused_at;
  {
    std::lock_guard lock(race->mu);
    if (!race->done) {
      race->abandoned = true;
      if (cancelled_) co_return *cancelled_;
      co_return Status::deadline_exceeded(
          "pause: the engine did not pause within the peer timeout (" +
          std::to_string(ctx_.options.peer_timeout.count()) +
          " ms); it is resumed as soon as its pause() returns");
    }
    paused = race->result;
    refused = race->refused;
    scope = race->scope;
    paused_seqs_ = std::move(race->seqs);
    paused_at = race->paused_at;
  }
  if (refused) {  // the request's error, not the pause's
    selection_refused_ = true;
    co_return paused;
  }
  if (!paused.ok()) co_return paused.with_context("pause");
  if (scope == EnginePause::Scope::kNone) co_return Status();
  pause_.engage(scope, moving_);
  hold_ = pause_.scope_name();
  t_pause_ = paused_at;
  co_return Status();
}

asio::awaitable<Status> SourceRun::pause_engine() {
  enter_phase("pause");
  co_return co_await finish_pause(start_pause(true));
}

asio::awaitable<Result<MigrationReport>> SourceRun::run(std::vector<SeqId> ids,
                                                        bool check_live) {
  moving_ = std::move(ids);
  progress_.seqs = moving_;
  arm_timeout();
  // The data path's initiator before the control connection: from the
  // moment it accepts, the destination waits at most a peer timeout for
  // HELLO, and building an initiator (a verbs QP on a slow host) must not
  // eat into it.
  auto initiator = transport_.create_initiator_for(req_.to);
  if (!initiator.ok()) co_return initiator.status();
  init_ = std::move(*initiator);
  // Stop-and-copy holds the requests that move while the control
  // connection opens: the pager's trip to the data pool overlaps the
  // connect (or holds them at once: try_hold_seqs, a pager whose
  // bookkeeping never waits). Only a hold: the whole engine (a pager
  // without hold_seqs) pauses once the destination has answered, so an
  // unreachable one never stalls every request here.
  // With check_live the trip goes even if the pager has since answered
  // that it cannot hold (the flag may flip meanwhile): it checks the ids.
  std::shared_ptr<PauseRace> early;
  if (!req_.live &&
      (check_live || ctx_.pager_holds_seqs.load(std::memory_order_relaxed))) {
    early = start_pause(false, check_live);
  }
  auto connected = co_await open_channel(true);
  Status s = cancel_status();
  if (s.ok() && !connected.ok()) {
    s = connected.status().with_context("destination");
  }
  if (s.ok()) channel_.emplace(std::move(*connected));
  if (early) {
    enter_phase("pause");
    Status held = co_await finish_pause(std::move(early));
    // Unknown ids are the request's error, whatever the connect said.
    if (s.ok() || selection_refused_) s = held;
  }
  if (!s.ok()) {
    co_await abort_peer(s);
    co_await resume_engine();
    co_return s;
  }

  if (!req_.live) {
    // Stop-and-copy: one round, paused from the start.
    if (!pause_.engaged()) s = co_await pause_engine();
    if (s.ok()) s = co_await run_round(true);
  } else {
    s = co_await run_live_rounds();
    ctx_.fault("src.live.final");
    // The last round, paused.
    if (s.ok()) s = co_await pause_engine();
    if (s.ok()) s = co_await run_round(false);
  }
  // No round had a page to write (every job connects first): connect now,
  // so that the destination's data path ends as after any migration.
  if (s.ok() && dst_target_) {
    s = co_await ctx_.offload([this] { return connect_data_path(); });
  }
  // A cancelled run fails at whatever it waited on: say why it really ended.
  if (cancelled_) s = *cancelled_;
  if (!s.ok()) {
    ctx_.log->warn("{} aborting: {}", tag_, s.to_string());
    co_await abort_peer(s);
    co_await resume_engine();
    co_return s;
  }
  src_staging_.reset();
  co_return co_await commit();
}

asio::awaitable<Result<FrameChannel>> SourceRun::open_channel(bool may_reuse) {
  if (may_reuse) {
    if (auto kept = ctx_.kept_channels.take(req_.to)) {
      kept_connection_ = true;
      dst_terms_ = kept->terms;
      ctx_.fault("src.kept_taken");
      co_return std::move(kept->channel);
    }
  }
  co_return co_await connect_channel(req_.to, ctx_.options.max_frame_bytes,
                                     ctx_.options.secret, deadline());
}

asio::awaitable<Status> SourceRun::reconnect() {
  channel_->close();
  kept_connection_ = false;
  ctx_.fault("src.kept_retry");
  auto connected = co_await open_channel(false);
  if (!connected.ok()) {
    co_return connected.status().with_context("destination");
  }
  channel_.emplace(std::move(*connected));
  co_return Status();
}

void SourceRun::log_start() {
  if (start_line_.empty()) return;
  ctx_.log->info("{}", start_line_);
  start_line_.clear();
}

asio::awaitable<Result<Frame>> SourceRun::exchange_hello(
    std::span<const uint8_t> payload) {
  for (;;) {
    Status sent = co_await channel_->send(MsgType::kHello, payload, deadline());
    log_start();
    Result<Frame> reply = Status::internal("HELLO not sent");
    if (sent.ok()) {
      reply = co_await channel_->receive(deadline());
    } else {
      reply = sent;
    }
    if (reply.ok() || !kept_connection_ || cancelled_ ||
        reply.status().code() != StatusCode::kUnavailable) {
      co_return reply;
    }
    // The destination closed the kept connection (its idle time ran out,
    // or it made room for another) as HELLO went out. It closes one only
    // while it waits for a next frame, never with a migration on it: HELLO
    // was not read, nothing was started there. Again, once (a new
    // connection is not kept_connection_), on a new connection.
    ctx_.log->info("{} kept connection to {} closed ({}): connecting again",
                   tag_, req_.to, reply.status().message());
    dst_terms_ = {};  // the new connection's OFFER says them again
    KVMIG_CO_RETURN_IF_ERROR(co_await reconnect());
  }
}

asio::awaitable<Status> SourceRun::run_live_rounds() {
  // Pre-copy rounds while the engine runs, until the remainder is small.
  for (;;) {
    ctx_.fault("src.live.round");
    KVMIG_CO_RETURN_IF_ERROR(co_await run_round(round_pages_.empty()));
    auto current =
        co_await ctx_.bookkeeping([this] { return ctx_.pager.logical_seqs(); });
    if (!current.ok()) co_return current.status();
    const size_t remainder = precopy_.plan(*current, moving_, false).pages();
    const bool converged = remainder <= req_.live_converge_pages;
    const bool shrinking = remainder < round_pages_.back();
    const bool out_of_rounds = round_pages_.size() >= req_.live_max_rounds;
    if (converged || !shrinking || out_of_rounds) {
      if (!converged && out_of_rounds && req_.live_abort_if_not_converged) {
        co_return Status::aborted("live migration did not converge in " +
                                  std::to_string(req_.live_max_rounds) +
                                  " rounds (" + std::to_string(remainder) +
                                  " pages left)");
      }
      co_return Status();
    }
  }
}

Status SourceRun::leave_behind(const std::vector<SeqId>& dropped) {
  if (!req_.live) {
    return Status::aborted("requests finished before the pause: " +
                           join_ids(dropped));
  }
  ctx_.log->warn("{} left behind (finished or changed shape): {}", tag_,
                 join_ids(dropped));
  left_behind_.insert(left_behind_.end(), dropped.begin(), dropped.end());
  std::erase_if(moving_, [&](SeqId s) {
    return std::find(dropped.begin(), dropped.end(), s) != dropped.end();
  });
  if (moving_.empty()) {
    return Status::aborted(
        "every request finished or changed shape during the migration");
  }
  return Status();
}

asio::awaitable<Status> SourceRun::run_round(bool first) {
  KVMIG_CO_RETURN_IF_ERROR(cancel_status());
  // The paused round plans from the snapshot the pause took. (Not a ?:
  // around co_await: GCC 12 miscompiles that.)
  Result<std::vector<LogicalSeq>> current = Status::internal("no snapshot");
  if (paused_seqs_) {
    current = std::move(*paused_seqs_);
    paused_seqs_.reset();
  } else {
    current =
        co_await ctx_.bookkeeping([this] { return ctx_.pager.logical_seqs(); });
  }
  if (!current.ok()) co_return current.status().with_context("logical_seqs");
  PrecopyState::Round round =
      precopy_.plan(*current, moving_, pause_.engaged());
  if (!round.dropped.empty()) {
    KVMIG_CO_RETURN_IF_ERROR(leave_behind(round.dropped));
    if (pause_.scope() == EnginePause::Scope::kSeqs) {
      // Held for the last round, and not moving after all: they run on.
      Status unheld = co_await ctx_.bookkeeping(
          [&] { return pause_.unhold(round.dropped); });
      if (!unheld.ok()) {
        ctx_.log->error("{} unhold {}: {}", tag_, join_ids(round.dropped),
                        unheld.to_string());
      }
    }
  }
  const uint64_t total =
      uint64_t{precopy_.positions()} + round.new_pages.size();
  const uint32_t limit = ctx_.options.max_pages_per_migration;
  if (total > limit) {
    co_return Status::resource_exhausted(
        std::to_string(total) + " pages exceed the limit of " +
        std::to_string(limit) + " per migration");
  }

  // Slots for the new pages: OFFER on the first round, ROUND_OFFER later.
  const auto n_new = static_cast<uint32_t>(round.new_pages.size());
  progress_.round++;
  Result<std::vector<PageIndex>> new_slots = std::vector<PageIndex>{};
  if (first) {
    new_slots = co_await hello_and_offer(n_new);
  } else if (n_new > 0) {
    new_slots = co_await ask_round_slots(n_new);
  }
  if (!new_slots.ok()) co_return new_slots.status();
  if (new_slots->size() != n_new) {
    co_return Status::protocol(
        "destination offered " + std::to_string(new_slots->size()) +
        " slots for " + std::to_string(n_new) + " pages");
  }

  const uint32_t first_new = precopy_.positions();
  precopy_.commit_round(round, *current, moving_, *new_slots);
  std::vector<uint32_t> positions = round.resend;
  for (uint32_t k = 0; k < n_new; ++k) positions.push_back(first_new + k);
  round_pages_.push_back(positions.size());
  co_return co_await send_positions(positions);
}

asio::awaitable<Result<std::vector<PageIndex>>> SourceRun::hello_and_offer(
    uint32_t n_pages) {
  enter_phase("offer");
  HelloMsg hello;
  hello.migration_id = id_;
  hello.meta = meta_;
  hello.live = req_.live;
  hello.verify = req_.verify;
  hello.n_pages = n_pages;
  hello.n_seqs = static_cast<uint32_t>(moving_.size());
  hello.seqs = moving_;
  hello.transports = {std::string(transport_.name())};
  hello.initiator_address = init_->address();
  hello.inline_pages = may_inline(n_pages);
  // One exchange: this connection's OFFER said the pages fit.
  hello.pages_follow =
      hello.inline_pages && kept_connection_ &&
      uint64_t{n_pages} * page_total_ <= dst_terms_.inline_limit;
  if (ctx_.log->should_log(spdlog::level::info)) {
    start_line_ = fmt::format(
        "{} {} {} requests{}, {} pages over {}", tag_,
        req_.mode == MigrationMode::kMove ? "moving" : "copying",
        moving_.size(), req_.live ? " live" : "", n_pages,
        hello.pages_follow ? std::string_view("the control connection")
                           : transport_.name());
  }
  if (hello.pages_follow) {
    hello_frame_ = encode(hello);
    hello_ = std::move(hello);
    inline_pages_ = true;
    dst_memory_ = "host";  // inline pages go into host memory only
    std::vector<PageIndex> positions(n_pages);
    for (uint32_t k = 0; k < n_pages; ++k) positions[k] = k;
    co_return positions;
  }
  const std::vector<uint8_t> payload = encode(hello);
  auto reply = co_await exchange_hello(payload);
  if (!reply.ok()) co_return reply.status().with_context("waiting for OFFER");
  if (reply->type == MsgType::kAbort) {
    // Refused before allocating anything: nothing to roll back there.
    auto why = decode_abort(reply->payload, ctx_.limits);
    co_return Status::aborted(
        "destination refused: " +
        (why.ok() ? why->reason : why.status().to_string()));
  }
  if (reply->type != MsgType::kOffer) {
    co_return reply_status(*reply, ctx_.limits, "HELLO");
  }
  auto offer = decode_offer(reply->payload, ctx_.limits);
  if (!offer.ok()) co_return offer.status();
  if (offer->transport != transport_.name()) {
    co_return Status::protocol("OFFER names transport '" + offer->transport +
                               "', HELLO asked for '" +
                               std::string(transport_.name()) + "'");
  }
  if (offer->inline_pages &&
      (!hello.inline_pages || !offer->target_address.empty())) {
    co_return Status::protocol(
        hello.inline_pages
            ? "OFFER takes the pages inline but names a data path"
            : "OFFER takes the pages inline; HELLO did not ask");
  }
  inline_pages_ = offer->inline_pages;
  dst_terms_ = {offer->inline_limit, offer->incarnation};
  dst_regions_ = std::move(offer->regions);
  dst_staging_slots_ = offer->staging_slots;
  dst_memory_ = std::move(offer->memory);
  ctx_.fault("src.after_offer");
  if (!inline_pages_) dst_target_ = std::move(offer->target_address);
  co_return std::move(offer->slots);
}

asio::awaitable<Result<std::vector<PageIndex>>> SourceRun::ask_round_slots(
    uint32_t n_pages) {
  const std::vector<uint8_t> payload = encode(RoundMsg{n_pages});
  Status sent = co_await channel_->send(MsgType::kRound, payload, deadline());
  if (!sent.ok()) co_return sent;
  auto reply = co_await channel_->receive(deadline());
  if (!reply.ok()) {
    co_return reply.status().with_context("waiting for ROUND_OFFER");
  }
  if (reply->type != MsgType::kRoundOffer) {
    co_return reply_status(*reply, ctx_.limits, "ROUND");
  }
  auto offer = decode_round_offer(reply->payload, ctx_.limits);
  if (!offer.ok()) co_return offer.status();
  if (!offer->target_update.empty()) {
    window_updates_.push_back(std::move(offer->target_update));
  }
  co_return std::move(offer->slots);
}

Status SourceRun::write_batch(const std::vector<uint32_t>& positions,
                              size_t first, size_t count, bool mid_fault,
                              bool last, std::vector<uint64_t>& sums) {
  std::vector<PagePair> pairs(count);
  for (size_t i = 0; i < count; ++i) {
    const uint32_t pos = positions[first + i];
    const PageIndex page = precopy_.source_page_at(pos);
    // Pages sent while the engine runs are full, so they hold still.
    if (src_staging_) {
      KVMIG_ASSIGN_OR_RETURN(PageBytes bytes, ctx_.pager.read_page(page));
      src_staging_->store(static_cast<uint32_t>(i), bytes);
      if (req_.verify) sums[first + i] = page_checksum(bytes);
    } else if (req_.verify) {
      KVMIG_ASSIGN_OR_RETURN(
          sums[first + i], pager_page_checksum(ctx_.pager, ctx_.layout, page));
    }
    pairs[i].src = src_staging_ ? static_cast<uint32_t>(i) : page;
    pairs[i].dst = dst_staging_slots_ > 0 ? static_cast<uint32_t>(i)
                                          : precopy_.slot_at(pos);
  }
  KVMIG_ASSIGN_OR_RETURN(
      auto planned, plan_writes(src_geometry_, dst_regions_, pairs, page_total_,
                                kMaxWriteBytes));
  std::vector<WriteOp> ops;
  ops.reserve(kOpsPerPost);
  uint64_t posted = 0;  // bytes in ops
  for (size_t w = 0; w < planned.size(); ++w) {
    const PlannedWrite& pw = planned[w];
    ops.push_back({src_bases_[pw.src_region] + pw.src_offset, pw.dst_region,
                   pw.dst_offset, pw.length});
    posted += pw.length;
    if (ops.size() == kOpsPerPost || w + 1 == planned.size()) {
      if (cancel_flag_.load(std::memory_order_relaxed)) {
        return Status::aborted("cancelled while writing");
      }
      if (last && w + 1 == planned.size()) {
        // COMMIT carries the mark; the destination waits for it, not we
        // for a flush's answer: one round trip fewer while paused.
        KVMIG_ASSIGN_OR_RETURN(data_mark_,
                               init_->write_marked(ops, deadline()));
      } else {
        KVMIG_RETURN_IF_ERROR(init_->write(ops, deadline()));
      }
      ops.clear();
      progress_.bytes.fetch_add(posted, std::memory_order_relaxed);
      posted = 0;
    }
    if (mid_fault && !mid_fault_done_ && w >= planned.size() / 2) {
      mid_fault_done_ = true;
      ctx_.fault("src.data.mid");
    }
  }
  writes_ += planned.size();
  bytes_ += uint64_t{count} * page_total_;
  if (data_mark_ != 0) return Status();
  return init_->flush(deadline());
}

Status SourceRun::connect_data_path() {
  if (dst_target_) {
    data_path_ =
        init_->connect(*dst_target_, deadline()).with_context("data path");
    dst_target_.reset();
  }
  if (!data_path_.ok()) return data_path_;
  for (const std::vector<uint8_t>& update : window_updates_) {
    Status added = init_->add_windows(update);
    if (!added.ok()) return added.with_context("a round's write windows");
  }
  window_updates_.clear();
  return data_path_;
}

Status SourceRun::ensure_source_geometry() {
  if (!src_geometry_.empty()) return Status();
  if (ctx_.layout) {
    src_geometry_ = geometry_of(*ctx_.layout);
    for (const StridedRegion& r : *ctx_.layout) src_bases_.push_back(r.base);
    return Status();
  }
  const auto slots = static_cast<uint32_t>(
      std::clamp<uint64_t>(ctx_.options.staging_bytes / page_total_, 1,
                           ctx_.options.max_pages_per_migration));
  KVMIG_ASSIGN_OR_RETURN(src_staging_,
                         StagingBuffer::create(transport_, page_total_, slots));
  src_geometry_ = {src_staging_->geometry()};
  src_bases_ = {src_staging_->slot(0)};
  return Status();
}

bool SourceRun::may_inline(uint32_t n_pages) const {
  // Stop-and-copy (one round, paused) of pages this side reads itself from
  // host memory. (No "src.data.mid" fault point on this path: one frame
  // has no middle.) Over tcp the control connection beats the data path
  // at any size up to the limit: the same bytes, a round trip fewer.
  const uint64_t limit =
      transport_.name() == "tcp"
          ? ctx_.options.inline_page_bytes
          : std::min(ctx_.options.inline_page_bytes, kInlinePageBytesOverRdma);
  return !req_.live && n_pages > 0 && ctx_.host_layout &&
         uint64_t{n_pages} * page_total_ <= limit;
}

Status SourceRun::read_inline(const std::vector<uint32_t>& positions) {
  // The pages go out with COMMIT (send_commit) straight from host memory,
  // held until the outcome is known, and the destination reads them
  // straight into their slots before it reads COMMIT: neither side copies
  // them (protocol 13: the frame's checksum does not cover them).
  const auto t0 = Clock::now();
  const uint64_t n_bytes = positions.size() * page_total_;
  std::vector<std::span<uint8_t>> chunks;
  chunks.reserve(positions.size() * ctx_.layout->size());
  std::vector<uint64_t> sums;
  for (uint32_t pos : positions) {
    const PageIndex page = precopy_.source_page_at(pos);
    // As plan_writes() checks the data path's: a page the pager named
    // beyond its own layout is its error, not a read out of bounds.
    KVMIG_RETURN_IF_ERROR(
        host_page_chunks(*ctx_.layout, page, page_total_, chunks));
    if (!req_.verify) continue;
    KVMIG_ASSIGN_OR_RETURN(uint64_t sum,
                           pager_page_checksum(ctx_.pager, ctx_.layout, page));
    sums.push_back(sum);
  }
  pages_frame_ = encode(PagesMsg{positions, {}});
  pages_bulk_.assign(chunks.begin(), chunks.end());
  writes_ += positions.size();
  bytes_ += n_bytes;
  progress_.bytes.fetch_add(n_bytes, std::memory_order_relaxed);
  data_seconds_ += seconds_since(t0);
  // Paused: the checksums go with COMMIT.
  if (req_.verify) paused_round_sums_ = VerifyMsg{positions, std::move(sums)};
  return Status();
}

asio::awaitable<Status> SourceRun::send_positions(
    const std::vector<uint32_t>& positions) {
  if (positions.empty()) co_return Status();
  enter_phase("data");
  if (inline_pages_) co_return read_inline(positions);
  const auto t0 = Clock::now();
  KVMIG_CO_RETURN_IF_ERROR(ensure_source_geometry());
  std::vector<uint64_t> sums(req_.verify ? positions.size() : 0);
  size_t batch = positions.size();
  if (src_staging_) batch = std::min<size_t>(batch, src_staging_->slots());
  if (dst_staging_slots_ > 0) {
    batch = std::min<size_t>(batch, dst_staging_slots_);
  }
  for (size_t first = 0; first < positions.size(); first += batch) {
    const size_t count = std::min(batch, positions.size() - first);
    const bool mid_fault = first == 0;
    // The paused round is the last; unstaged, its last job may end in a
    // mark instead of a flush.
    const bool last = pause_.engaged() && dst_staging_slots_ == 0 &&
                      first + count == positions.size();
    KVMIG_CO_RETURN_IF_ERROR(cancel_status());
    // The first job connects the data path too: one trip, not two.
    Status wrote = co_await offload_with_progress([&] {
      KVMIG_RETURN_IF_ERROR(connect_data_path());
      return write_batch(positions, first, count, mid_fault, last, sums);
    });
    if (!data_path_.ok()) co_return data_path_;
    if (!wrote.ok()) co_return wrote.with_context("data");
    if (dst_staging_slots_ == 0) continue;
    KVMIG_CO_RETURN_IF_ERROR(
        co_await send_batch_and_wait(positions, first, count));
  }
  data_seconds_ += seconds_since(t0);
  if (!req_.verify) co_return Status();
  if (pause_.engaged()) {
    // The paused round is the last: its checksums go with COMMIT, and the
    // destination checks them before it installs.
    paused_round_sums_ = VerifyMsg{positions, std::move(sums)};
    co_return Status();
  }
  co_return co_await verify_round(positions, sums);
}

asio::awaitable<Status> SourceRun::send_batch_and_wait(
    const std::vector<uint32_t>& positions, size_t first, size_t count) {
  BatchMsg msg;
  msg.positions.assign(positions.begin() + first,
                       positions.begin() + first + count);
  const std::vector<uint8_t> payload = encode(msg);
  Status sent = co_await channel_->send(MsgType::kBatch, payload, deadline());
  if (!sent.ok()) co_return sent;
  auto ack = co_await channel_->receive(deadline());
  if (!ack.ok()) co_return ack.status().with_context("waiting for BATCH_ACK");
  if (ack->type != MsgType::kBatchAck) {
    co_return reply_status(*ack, ctx_.limits, "BATCH");
  }
  co_return Status();
}

Clock::duration SourceRun::check_time(size_t pages) const {
  // The destination reads each page once to check it: allow 1 GB/s.
  return std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(double(pages) * page_total_ / 1e9));
}

asio::awaitable<Status> SourceRun::verify_round(
    const std::vector<uint32_t>& positions, const std::vector<uint64_t>& sums) {
  enter_phase("verify");
  KVMIG_CO_RETURN_IF_ERROR(cancel_status());
  const std::vector<uint8_t> payload = encode(VerifyMsg{positions, sums});
  Status sent = co_await channel_->send(MsgType::kVerify, payload, deadline());
  if (!sent.ok()) co_return sent;
  auto ack =
      co_await channel_->receive(deadline() + check_time(positions.size()));
  if (!ack.ok()) co_return ack.status().with_context("waiting for VERIFY_ACK");
  if (ack->type != MsgType::kVerifyAck) {
    co_return reply_status(*ack, ctx_.limits, "VERIFY");
  }
  co_return Status();
}

CommitMsg SourceRun::commit_tables() const {
  // Page tables in destination slots. Checksums went with each round.
  CommitMsg msg;
  for (const auto& [id, seq] : precopy_.tables()) {
    LogicalSeq out{id, seq.n_tokens, {}};
    out.pages.reserve(seq.pages.size());
    for (PageIndex p : seq.pages) {
      out.pages.push_back(
          precopy_.slot_at(static_cast<uint32_t>(precopy_.position_of(p))));
    }
    msg.seqs.push_back(std::move(out));
  }
  return msg;
}

asio::awaitable<Outcome> SourceRun::send_commit(const CommitMsg& msg,
                                                Status& why) {
  const std::vector<uint8_t> payload = encode(msg);
  // With the inline pages, if any: PAGES then COMMIT in one write; one
  // exchange: HELLO, PAGES, COMMIT.
  std::vector<FrameChannel::OutFrame> frames;
  if (!hello_frame_.empty()) frames.push_back({MsgType::kHello, hello_frame_});
  if (!pages_frame_.empty()) {
    frames.push_back({MsgType::kPages, pages_frame_, pages_bulk_});
  }
  frames.push_back({MsgType::kCommit, payload});
  Status sent = co_await channel_->send_all(frames, deadline());
  log_start();
  if (!sent.ok()) {
    why = sent;
    co_return Outcome::kUnknown;
  }
  auto done = co_await channel_->receive(
      deadline() + check_time(msg.verify.positions.size()));
  // DONE: commit() has DONE_ACK sent.
  if (done.ok() && done->type == MsgType::kDone) co_return Outcome::kCommitted;
  const char* asked = hello_frame_.empty() ? "COMMIT" : "HELLO";
  why = done.ok() ? reply_status(*done, ctx_.limits, asked) : done.status();
  co_return done.ok() && done->type == MsgType::kAbort ? Outcome::kAborted
                                                       : Outcome::kUnknown;
}

asio::awaitable<Outcome> SourceRun::send_commit_again(const CommitMsg& msg,
                                                      Status& why) {
  // The destination closes a kept connection only while it waits for a
  // next frame: closed as the exchange went out, it read nothing (unless
  // the close was a reset on the way: below), and says so when asked: no
  // record of this id from the agent of this connection's OFFER. Anything
  // else is its answer, or no answer (the caller asks on, in doubt if it
  // must).
  channel_->close();
  auto asked = co_await query_outcome(ctx_, req_.to, id_, deadline());
  if (!no_record(asked, dst_terms_.incarnation)) {
    ctx_.log->warn("{} kept connection to {} failed during the exchange ({})",
                   tag_, req_.to, why.to_string());
    co_return Outcome::kUnknown;
  }
  ctx_.log->info("{} kept connection to {} closed ({}): sending again", tag_,
                 req_.to, why.message());
  if (asked->incarnation != dst_terms_.incarnation) {
    // Another agent answers there now (restarted): what the old one
    // offered says nothing of it, and is not kept for the next migration.
    dst_terms_ = {};
  }
  // That answer fenced the id there (a first exchange still on its way is
  // refused when it comes): this one says it is the resend, which the
  // fence lets in.
  hello_.resent = true;
  hello_frame_ = encode(hello_);
  if (Status again = co_await reconnect(); !again.ok()) {
    why = again;
    // Nothing reached it: nothing to decide there.
    co_return Outcome::kAborted;
  }
  const Outcome again = co_await send_commit(msg, why);
  if (again != Outcome::kAborted) co_return again;
  // Refused, for what the ABORT says. The fence keeps the first exchange
  // from having started there since the answer; a second query confirms
  // the refusal all the same (a refusal once meant the first exchange had
  // committed, before the fence): only "no record" or "aborted" rolls
  // back, anything else has the caller ask until the destination knows.
  auto after = co_await query_outcome(ctx_, req_.to, id_, deadline());
  if (no_record(after, asked->incarnation) ||
      (after.ok() && after->outcome == Outcome::kAborted)) {
    co_return Outcome::kAborted;
  }
  co_return Outcome::kUnknown;
}

namespace {

// Lets the destination forget the outcome record (nobody will ask about
// it), then keeps the connection, idle again, for the next migration to
// `peer`: a failed ack closes it, as does a stopping agent.
asio::awaitable<void> acknowledge_done(MigrationContext& ctx, std::string peer,
                                       std::string tag, FrameChannel channel,
                                       KeptTerms terms) {
  Status acked =
      co_await channel.send(MsgType::kDoneAck, {}, ctx.peer_deadline());
  if (!acked.ok()) {
    ctx.log->info("{} DONE_ACK: {}", tag, acked.message());
    co_return;
  }
  if (ctx.stopping) co_return;
  ctx.kept_channels.put(peer, std::move(channel), terms);
}

// Writes a line once the caller has its reply.
asio::awaitable<void> log_after_reply(std::shared_ptr<spdlog::logger> log,
                                      std::string line) {
  log->info("{}", line);
  co_return;
}

}  // namespace

asio::awaitable<Result<MigrationReport>> SourceRun::commit() {
  enter_phase("commit");
  CommitMsg msg = commit_tables();
  msg.verify = std::move(paused_round_sums_);
  msg.data_mark = data_mark_;
  // Digests, if asked, read while paused.
  std::vector<std::pair<SeqId, std::string>> digests;
  Status read;
  if (req_.record_digests) {
    read = co_await ctx_.offload([&]() -> Status {
      for (const auto& [id, seq] : precopy_.tables()) {
        KVMIG_ASSIGN_OR_RETURN(Digest d, seq_digest(ctx_.pager, seq));
        digests.emplace_back(id, d.hex());
      }
      return Status();
    });
  }
  if (cancelled_) read = *cancelled_;
  if (!read.ok()) {
    co_await abort_peer(read);
    co_await resume_engine();
    co_return read;
  }
  ctx_.fault("src.before_commit");
  // A destination that has already closed its end can never read COMMIT:
  // the migration is certainly not committed, so roll back now rather than
  // leave the requests in doubt.
  bool closed = channel_->peer_closed();  // a system call: asked once
  if (closed && !hello_frame_.empty()) {
    // One exchange, nothing sent yet: the destination closed the kept
    // connection (its idle time ran out, or it made room for another) and
    // knows nothing of this migration. Once, on a new connection
    // (kept_connection_ goes false).
    ctx_.log->info("{} kept connection to {} closed: connecting again", tag_,
                   req_.to);
    if (Status gone = co_await reconnect(); !gone.ok()) {
      co_await resume_engine();
      co_return gone;
    }
    closed = channel_->peer_closed();
  }
  if (closed) {
    Status gone = Status::unavailable("destination " + req_.to +
                                      " closed the connection before COMMIT");
    co_await abort_peer(gone);
    co_await resume_engine();
    co_return gone;
  }
  // The decision point: from here on the destination decides, and a
  // cancel is answered with how it decided.
  if (cancelled_) {
    co_await abort_peer(*cancelled_);
    co_await resume_engine();
    co_return *cancelled_;
  }
  committing_ = true;
  timeout_timer_.cancel();
  Status failure;
  if (!hello_frame_.empty()) ctx_.fault("src.one_exchange");
  Outcome outcome = co_await send_commit(msg, failure);
  if (outcome == Outcome::kUnknown && !hello_frame_.empty() &&
      kept_connection_ && failure.code() == StatusCode::kUnavailable) {
    outcome = co_await send_commit_again(msg, failure);
  }
  if (outcome == Outcome::kCommitted) {  // DONE came on the connection
    // DONE_ACK, then the connection back for the next migration there,
    // once the caller has its report (its wake-up and the ack's system
    // call overlap), before the io thread takes its next call.
    ctx_.after_reply.push_back(acknowledge_done(
        ctx_, req_.to, tag_, std::move(*channel_), dst_terms_));
    channel_.reset();
  } else {
    channel_->close();
  }
  std::vector<SeqId> ids;
  for (const auto& [id, seq] : precopy_.tables()) ids.push_back(id);
  if (outcome == Outcome::kUnknown) {
    // The decision is the destination's; ask it.
    ctx_.log->warn("{} no DONE after COMMIT ({}); asking the destination", tag_,
                   failure.to_string());
    outcome = co_await resolve_outcome(ctx_, req_.to, id_);
    if (outcome == Outcome::kUnknown) {
      // The requests may already live at the destination: a move keeps
      // them from running here until the destination answers (DESIGN.md).
      // Held since the pause, where the pager holds requests one by one.
      Status held;
      if (req_.mode == MigrationMode::kMove &&
          pause_.scope() != EnginePause::Scope::kSeqs) {
        held = co_await ctx_.offload([&] { return ctx_.pager.hold_seqs(ids); });
      }
      co_return enter_in_doubt(ids, failure, held);
    }
  }
  if (outcome != Outcome::kCommitted) {
    ctx_.log->warn("{} rolled back: {}", tag_, failure.to_string());
    co_await resume_engine();
    co_return failure.ok() ? Status::aborted("destination rolled back")
                           : failure;
  }
  // Committed: the requests belong to the destination now.
  enter_phase("resume");
  // Drop and resume in one trip to the data pool (none when the pager's
  // bookkeeping never waits). Held requests that were dropped have nothing
  // left to unhold; the others run on.
  Status dropped, resumed;
  co_await ctx_.bookkeeping([&] {
    if (req_.mode == MigrationMode::kMove) {
      dropped = ctx_.pager.drop_logical_seqs(ids);
      if (dropped.ok() && pause_.scope() == EnginePause::Scope::kSeqs) {
        pause_.hand_over();
      }
    }
    resumed = pause_.release();
    return 0;
  });
  co_return finish(ids, std::move(digests), dropped, resumed);
}

asio::awaitable<void> SourceRun::resume_engine() {
  if (!pause_.engaged()) co_return;
  co_await ctx_.offload([this] { return pause_.release(); });
}

Status SourceRun::enter_in_doubt(const std::vector<SeqId>& ids,
                                 const Status& why, const Status& held) {
  std::string hold = "none";
  if (req_.mode == MigrationMode::kMove) {
    hold = held.ok() ? "seqs" : "engine";
    if (!held.ok()) {
      ctx_.log->error(
          "{} cannot hold requests one by one ({}): the engine stays "
          "paused until the destination answers",
          tag_, held.to_string());
    }
    // The in-doubt entry releases it: an engine pause, or a hold that
    // began with the migration's pause.
    if (!held.ok() || pause_.scope() == EnginePause::Scope::kSeqs) {
      pause_.hand_over();
    }
  }
  ctx_.log->error(
      "{} outcome in doubt: destination unreachable; requests {} kept "
      "(held: {}), asking again in the background",
      tag_, join_ids(ids), hold);
  ctx_.in_doubt.enter(ctx_, {id_, ids, req_.to, hold});
  outcome_ = "in_doubt";
  return Status::unavailable(
      "migration " + id_ + " is in doubt: no answer from " + req_.to +
      " after COMMIT (" + why.to_string() + "); requests kept (held: " + hold +
      "), marked in doubt until the destination answers");
}

Result<MigrationReport> SourceRun::finish(
    const std::vector<SeqId>& ids,
    std::vector<std::pair<SeqId, std::string>> digests, const Status& dropped,
    const Status& resumed) {
  // Committed: the requests belong to the destination now, and the data
  // path (flushed or marked before COMMIT) may serve the next migration to
  // it.
  outcome_ = "committed";
  if (init_) init_->keep();
  if (!dropped.ok()) {
    ctx_.log->error("{} committed but drop failed: {}", tag_,
                    dropped.to_string());
    return dropped.with_context("drop after commit");
  }
  pause_seconds_ = seconds_since(t_pause_);
  const double pause_ms = pause_seconds_ * 1e3;
  if (!resumed.ok()) return resumed.with_context("resume");

  close_phase();  // first: the phases add up to no more than `seconds`
  MigrationReport report;
  report.migration_id = id_;
  report.seqs = ids;
  report.pages = precopy_.positions();
  report.bytes = bytes_;
  report.writes = writes_;
  report.seconds = seconds_since(t_start_);
  report.gbps = data_seconds_ > 0 ? bytes_ / data_seconds_ / 1e9 : 0;
  report.pause_ms = pause_ms;
  report.hold = hold_;
  report.rounds = static_cast<uint32_t>(round_pages_.size());
  report.round_pages = round_pages_;
  report.transport = std::string(transport_.name());
  report.staged = !ctx_.layout || dst_staging_slots_ > 0;
  report.inline_pages = inline_pages_;
  report.kept_connection = kept_connection_;
  report.one_exchange = !hello_frame_.empty();
  report.left_behind = left_behind_;
  report.digests = std::move(digests);
  report.phases_ms = phases_ms_;
  report.src_memory = ctx_.memory;
  report.dst_memory = dst_memory_;
  // Logged once the caller has the report: the line's write is off its
  // wait.
  if (ctx_.log->should_log(spdlog::level::info)) {
    ctx_.after_reply.push_back(log_after_reply(
        ctx_.log,
        fmt::format("{} done: {} pages, {} bytes in {} writes, {:.3f} GB/s, "
                    "{} round(s), pause {:.1f} ms",
                    tag_, report.pages, bytes_, writes_, report.gbps,
                    report.rounds, pause_ms)));
  }
  return report;
}

MigrationEvent SourceRun::ended() const {
  MigrationEvent e;
  e.role = MigrationEvent::Role::kSource;
  e.transport = std::string(transport_.name());
  e.outcome = outcome_;
  e.bytes = bytes_;
  e.seconds = seconds_since(t_start_);
  // Committed: paused to resumed. Otherwise the pause (if any) ends now, or
  // lasts on as an in-doubt hold.
  const bool paused = t_pause_ != Clock::time_point{};
  e.pause_seconds = pause_seconds_ > 0 ? pause_seconds_
                    : paused           ? seconds_since(t_pause_)
                                       : 0;
  return e;
}

namespace {

// The requests a migration moves: every live one not in doubt and not in
// another migration from here (all), or the ones asked for, each live, not
// in doubt and not moving already. Unknown ids are an error before
// anything moves; without `live` (named requests only), the run checks
// them on its hold's trip instead.
Result<std::vector<SeqId>> select_requests(
    MigrationContext& ctx, const MigrateRequest& req,
    const std::vector<LogicalSeq>* live) {
  const std::set<SeqId> doubtful = ctx.in_doubt.held_seqs();
  std::vector<SeqId> ids;
  if (req.all) {
    for (const LogicalSeq& s : *live) {
      if (!doubtful.count(s.seq_id) && !ctx.moving.count(s.seq_id)) {
        ids.push_back(s.seq_id);
      }
    }
    return ids;
  }
  if (live) KVMIG_RETURN_IF_ERROR(refuse_unknown(*live, req.seqs));
  std::vector<SeqId> held, busy;
  std::set<std::string> busy_in;
  std::set<SeqId> seen;
  for (SeqId id : req.seqs) {
    if (!seen.insert(id).second) continue;
    if (doubtful.count(id)) {
      held.push_back(id);
    } else if (auto m = ctx.moving.find(id); m != ctx.moving.end()) {
      busy.push_back(id);
      busy_in.insert(m->second);
    } else {
      ids.push_back(id);
    }
  }
  if (!held.empty()) {
    return Status::failed_precondition(
        "requests in doubt from an earlier migration: " + join_ids(held));
  }
  if (!busy.empty()) {
    std::string in;
    for (const std::string& m : busy_in) in += (in.empty() ? "" : ", ") + m;
    return Status::failed_precondition("requests " + join_ids(busy) +
                                       " are moving already (migration " + in +
                                       ")");
  }
  return ids;
}

// run_source's checks, then the run. transport: the one chosen, once it
// is known; ended: how the run ended, if one started; cancelled: whether
// a cancel (or the timeout) ended it.
asio::awaitable<Result<MigrationReport>> checked_run(
    MigrationContext& ctx, const MigrateRequest& req, const std::string& id,
    std::string& transport_out, std::optional<MigrationEvent>& ended,
    bool& cancelled) {
  if (req.live && (req.live_max_rounds == 0)) {
    co_return Status::invalid_argument("live migration needs max rounds >= 1");
  }
  if (req.timeout.count() < 0) {
    co_return Status::invalid_argument(
        "migration timeout must not be negative");
  }
  const std::string transport_name =
      req.transport.empty() ? ctx.options.transports.front() : req.transport;
  auto transport = ctx.transport_named(transport_name);
  if (!transport.ok()) co_return transport.status();
  transport_out = transport_name;
  // Named requests moved stop-and-copy by a pager that can hold them are
  // checked against the pager on the hold's trip (SourceRun::run), which
  // overlaps the connect: one trip to the data pool fewer. The rest are
  // checked here, against a snapshot.
  const bool check_in_hold =
      !req.all && !req.live &&
      ctx.pager_holds_seqs.load(std::memory_order_relaxed);
  Result<std::vector<LogicalSeq>> live = std::vector<LogicalSeq>{};
  if (!check_in_hold) {
    live =
        co_await ctx.bookkeeping([&ctx] { return ctx.pager.logical_seqs(); });
    // A cancel that came meanwhile found no run yet and left its mark.
    if (const auto* mark = ctx.src_outcomes.find(id)) {
      cancelled = true;
      co_return Status::aborted("migration " + id + " " + mark->detail);
    }
    if (!live.ok()) co_return live.status().with_context("logical_seqs");
  }
  auto ids = select_requests(ctx, req, check_in_hold ? nullptr : &*live);
  if (!ids.ok()) co_return ids.status();
  if (ids->empty()) {
    co_return Status::invalid_argument("no requests to migrate");
  }
  if (ids->size() > ctx.options.max_seqs_per_migration) {
    co_return Status::resource_exhausted(
        std::to_string(ids->size()) + " requests exceed the limit of " +
        std::to_string(ctx.options.max_seqs_per_migration) + " per migration");
  }
  // Chosen and reserved with no wait in between: another run from here
  // (io thread too) sees them as moving from now on.
  for (SeqId s : *ids) ctx.moving.emplace(s, id);
  ScopeExit unreserve([&ctx, &id] {
    std::erase_if(ctx.moving, [&](const auto& e) { return e.second == id; });
  });
  SourceRun run(ctx, req, **transport, id);
  auto report = co_await run.run(std::move(*ids), check_in_hold);
  ended = run.ended();
  cancelled = run.cancelled();
  co_return report;
}

// The id the run goes by: the scheduler's, if it is well-formed and new
// here, or a fresh one.
Result<std::string> migration_id_for(MigrationContext& ctx,
                                     const MigrateRequest& req) {
  if (req.migration_id.empty()) return new_migration_id();
  KVMIG_RETURN_IF_ERROR(check_migration_id(req.migration_id));
  if (ctx.active.count({req.migration_id, true}) ||
      ctx.active.count({req.migration_id, false}) ||
      ctx.src_outcomes.find(req.migration_id) != nullptr ||
      ctx.dst_records.contains(req.migration_id)) {
    return Status::already_exists("migration id " + req.migration_id +
                                  " is already known to this agent");
  }
  return req.migration_id;
}

}  // namespace

asio::awaitable<Result<CancelReport>> cancel_source(MigrationContext& ctx,
                                                    std::string id) {
  KVMIG_CO_RETURN_IF_ERROR(check_migration_id(id));
  if (auto dst = ctx.active.find({id, false}); dst != ctx.active.end()) {
    co_return Status::failed_precondition(
        "this agent is the destination of migration " + id +
        ": cancel it at its source, " + dst->second->peer);
  }
  if (auto src = ctx.active.find({id, true}); src != ctx.active.end()) {
    if (src->second->cancel) {
      src->second->cancel(
          Status::aborted("migration " + id + " cancelled by request"));
    }
    // Past the decision point it ends as the destination decides: DONE,
    // or outcome queries, within two peer timeouts.
    const Deadline until =
        Clock::now() + 2 * ctx.options.peer_timeout + std::chrono::seconds(1);
    if (!co_await ctx.wait_source_end(id, until)) {
      co_return Status::unavailable("migration " + id +
                                    " is still ending; ask again");
    }
  }
  const SourceOutcomes::Entry* ended = ctx.src_outcomes.find(id);
  if (ended == nullptr) {
    ctx.src_outcomes.remember(
        id, {"cancelled", "cancelled before it reached this agent"});
    co_return Status::not_found("no migration " + id +
                                " from this agent (a request with this id "
                                "that arrives from now on is refused)");
  }
  CancelReport report;
  report.migration_id = id;
  report.outcome = ended->outcome;
  report.detail = ended->detail;
  co_return report;
}

asio::awaitable<Result<MigrationReport>> run_source(MigrationContext& ctx,
                                                    MigrateRequest req) {
  const Clock::time_point t0 = Clock::now();
  std::string transport;
  std::optional<MigrationEvent> ended;
  bool cancelled = false;
  auto id = migration_id_for(ctx, req);
  const uint32_t most = ctx.options.max_migrations;
  Result<MigrationReport> result = Status::resource_exhausted(
      std::to_string(ctx.source_runs) +
      " migrations from this agent are "
      "under way, the most it runs at once (serve --max-migrations " +
      std::to_string(most) + "); try again when one has ended");
  if (!id.ok()) {
    result = id.status();
  } else if (Status s = ctx.refuse_during_snapshot("from"); !s.ok()) {
    result = s;
  } else if (ctx.source_runs < most) {
    ++ctx.source_runs;
    ScopeExit one_less([&ctx] { --ctx.source_runs; });
    result = co_await checked_run(ctx, req, *id, transport, ended, cancelled);
  }
  if (id.ok()) {
    // What a cancel that comes now is told; wakes the ones waiting.
    SourceOutcomes::Entry entry;
    entry.outcome = result.ok()                             ? "committed"
                    : cancelled                             ? "cancelled"
                    : ended && ended->outcome == "in_doubt" ? "in_doubt"
                                                            : "aborted";
    if (!result.ok()) entry.detail = result.status().to_string();
    ctx.src_outcomes.remember(*id, std::move(entry));
    ctx.source_ended(*id);
  }
  // Exactly once per migration asked for, refusals included.
  if (ctx.options.on_migration_end) {
    MigrationEvent refused;
    refused.role = MigrationEvent::Role::kSource;
    refused.transport = transport;
    refused.outcome = "aborted";
    refused.seconds = seconds_since(t0);
    ctx.options.on_migration_end(ended ? *ended : refused);
  }
  co_return result;
}

}  // namespace kvmig
