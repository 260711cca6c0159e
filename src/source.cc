// The source side of a migration: select, (pause), HELLO, OFFER, data in one
// or more rounds, COMMIT, DONE, then drop (move) or keep (copy) and resume.
// Any failure before the destination decides rolls back: the destination
// releases its slots and the source resumes with everything it had.
//
// Stop-and-copy pauses first and copies everything in one round. Live
// migration copies in rounds while the engine runs (PrecopyState says what
// each round sends), then pauses for a last round.
#include <algorithm>
#include <chrono>
#include <set>
#include <string>

#include "agent_impl.h"
#include "auth.h"
#include "kvmig/digest.h"
#include "planner.h"
#include "precopy.h"
#include "staging.h"

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

std::string join_ids(const std::vector<SeqId>& ids) {
  std::string out;
  for (SeqId id : ids) {
    if (!out.empty()) out += ',';
    out += std::to_string(id);
  }
  return out;
}

// Resumes the pager when the migration leaves scope, however it leaves.
class PauseGuard {
 public:
  explicit PauseGuard(CachePager& pager) : pager_(pager) {}
  ~PauseGuard() { (void)release(); }
  void engage() { engaged_ = true; }
  bool engaged() const { return engaged_; }
  // The pause now belongs to someone else (an in-doubt entry): no resume.
  void hand_over() { engaged_ = false; }
  Status release() {
    if (!engaged_) return Status();
    engaged_ = false;
    Status s = pager_.resume();
    if (!s.ok()) logger("engine")->error("resume failed: {}", s.to_string());
    return s;
  }

 private:
  CachePager& pager_;
  bool engaged_ = false;
};

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

}  // namespace

// One outgoing migration. Its coroutines run on the io thread; its data
// work runs on one pool thread at a time while the coroutine awaits it.
class SourceRun {
 public:
  SourceRun(Agent::Impl& agent, const MigrateRequest& req, Transport& transport,
            std::string id)
      : a_(agent),
        req_(req),
        transport_(transport),
        id_(std::move(id)),
        tag_("[" + id_.substr(0, 12) + " -> " + req.to + "]"),
        meta_(agent.pager.meta()),
        page_total_(2 * meta_.page_bytes()),
        precopy_(meta_.page_size_tokens),
        pause_(agent.pager) {}

  asio::awaitable<Result<MigrationReport>> run(std::vector<SeqId> ids);

 private:
  Deadline deadline() const { return a_.peer_deadline(); }
  asio::awaitable<void> abort_peer(const Status& why);
  asio::awaitable<Status> pause_engine();
  // Plans, allocates and sends one round from a fresh snapshot.
  asio::awaitable<Status> run_round(bool first);
  // Copies the pages at `positions` into their destination slots.
  asio::awaitable<Status> send_positions(
      const std::vector<uint32_t>& positions);
  // Writes positions[first, first + count) and flushes; with verify, also
  // fills sums[first, first + count) with the pages' checksums.
  Status write_batch(const std::vector<uint32_t>& positions, size_t first,
                     size_t count, bool mid_fault, std::vector<uint64_t>& sums);
  asio::awaitable<Result<MigrationReport>> commit();

  Agent::Impl& a_;
  const MigrateRequest& req_;
  Transport& transport_;
  const std::string id_;
  const std::string tag_;
  const CacheMeta meta_;
  const uint64_t page_total_;

  std::optional<FrameChannel> channel_;
  std::unique_ptr<TransportInitiator> init_;
  PrecopyState precopy_;
  PauseGuard pause_;
  std::vector<SeqId> moving_;
  std::vector<SeqId> left_behind_;
  std::vector<uint64_t> round_pages_;

  // Where writes go: the destination's geometry (or staging), from OFFER.
  std::vector<RegionGeometry> dst_regions_;
  uint32_t dst_staging_slots_ = 0;
  // Where writes come from: the pager's layout or a staging buffer.
  std::vector<RegionGeometry> src_geometry_;
  std::vector<std::byte*> src_bases_;
  std::unique_ptr<StagingBuffer> src_staging_;

  Clock::time_point t_start_ = Clock::now();
  Clock::time_point t_pause_;
  double data_seconds_ = 0;
  uint64_t bytes_ = 0, writes_ = 0;
  bool mid_fault_done_ = false;
};

asio::awaitable<void> SourceRun::abort_peer(const Status& why) {
  if (!channel_) co_return;
  const std::vector<uint8_t> payload = encode(AbortMsg{why.to_string()});
  Status sent = co_await channel_->send(MsgType::kAbort, payload,
                                        Clock::now() + std::chrono::seconds(1));
  (void)sent;
  channel_->close();
}

asio::awaitable<Status> SourceRun::pause_engine() {
  Status paused = co_await a_.offload([this] { return a_.pager.pause(); });
  if (!paused.ok()) co_return paused.with_context("pause");
  pause_.engage();
  t_pause_ = Clock::now();
  co_return Status();
}

asio::awaitable<Status> SourceRun::run_round(bool first) {
  auto current = a_.pager.logical_seqs();
  if (!current.ok()) co_return current.status().with_context("logical_seqs");
  PrecopyState::Round round =
      precopy_.plan(*current, moving_, pause_.engaged());
  if (!round.dropped.empty()) {
    if (!req_.live) {
      co_return Status::aborted("requests finished before the pause: " +
                                join_ids(round.dropped));
    }
    a_.log->warn("{} left behind (finished or changed shape): {}", tag_,
                 join_ids(round.dropped));
    left_behind_.insert(left_behind_.end(), round.dropped.begin(),
                        round.dropped.end());
    std::erase_if(moving_, [&](SeqId s) {
      return std::find(round.dropped.begin(), round.dropped.end(), s) !=
             round.dropped.end();
    });
    if (moving_.empty()) {
      co_return Status::aborted(
          "every request finished or changed shape during the migration");
    }
  }
  const uint64_t total =
      uint64_t{precopy_.positions()} + round.new_pages.size();
  if (total > a_.options.max_pages_per_migration) {
    co_return Status::resource_exhausted(
        std::to_string(total) + " pages exceed the limit of " +
        std::to_string(a_.options.max_pages_per_migration) + " per migration");
  }

  // Slots for the new pages: OFFER on the first round, ROUND_OFFER later.
  std::vector<PageIndex> new_slots;
  if (first) {
    init_ = nullptr;
    auto initiator = transport_.create_initiator_for(req_.to);
    if (!initiator.ok()) co_return initiator.status();
    init_ = std::move(*initiator);
    HelloMsg hello;
    hello.migration_id = id_;
    hello.meta = meta_;
    hello.live = req_.live;
    hello.verify = req_.verify;
    hello.n_pages = static_cast<uint32_t>(round.new_pages.size());
    hello.n_seqs = static_cast<uint32_t>(moving_.size());
    hello.transports = {std::string(transport_.name())};
    hello.initiator_address = init_->address();
    a_.log->info("{} {} {} requests{}, {} pages over {}", tag_,
                 req_.mode == MigrationMode::kMove ? "moving" : "copying",
                 moving_.size(), req_.live ? " live" : "",
                 round.new_pages.size(), transport_.name());
    const std::vector<uint8_t> payload = encode(hello);
    Status sent = co_await channel_->send(MsgType::kHello, payload, deadline());
    if (!sent.ok()) co_return sent;
    auto reply = co_await channel_->receive(deadline());
    if (!reply.ok()) co_return reply.status().with_context("waiting for OFFER");
    if (reply->type == MsgType::kAbort) {
      // Refused before allocating anything: nothing to roll back there.
      auto why = decode_abort(reply->payload, a_.limits);
      co_return Status::aborted(
          "destination refused: " +
          (why.ok() ? why->reason : why.status().to_string()));
    }
    if (reply->type != MsgType::kOffer) {
      co_return reply_status(*reply, a_.limits, "HELLO");
    }
    auto offer = decode_offer(reply->payload, a_.limits);
    if (!offer.ok()) co_return offer.status();
    if (offer->transport != transport_.name()) {
      co_return Status::protocol("OFFER names transport '" + offer->transport +
                                 "', HELLO asked for '" +
                                 std::string(transport_.name()) + "'");
    }
    new_slots = std::move(offer->slots);
    dst_regions_ = std::move(offer->regions);
    dst_staging_slots_ = offer->staging_slots;
    a_.fault("src.after_offer");
    const std::vector<uint8_t> target = std::move(offer->target_address);
    Status connected =
        co_await a_.offload([&] { return init_->connect(target, deadline()); });
    if (!connected.ok()) co_return connected.with_context("data path");
  } else if (!round.new_pages.empty()) {
    const std::vector<uint8_t> payload =
        encode(RoundMsg{static_cast<uint32_t>(round.new_pages.size())});
    Status sent = co_await channel_->send(MsgType::kRound, payload, deadline());
    if (!sent.ok()) co_return sent;
    auto reply = co_await channel_->receive(deadline());
    if (!reply.ok()) {
      co_return reply.status().with_context("waiting for ROUND_OFFER");
    }
    if (reply->type != MsgType::kRoundOffer) {
      co_return reply_status(*reply, a_.limits, "ROUND");
    }
    auto offer = decode_round_offer(reply->payload, a_.limits);
    if (!offer.ok()) co_return offer.status();
    new_slots = std::move(offer->slots);
  }
  if (new_slots.size() != round.new_pages.size()) {
    co_return Status::protocol(
        "destination offered " + std::to_string(new_slots.size()) +
        " slots for " + std::to_string(round.new_pages.size()) + " pages");
  }

  const uint32_t first_new = precopy_.positions();
  precopy_.commit_round(round, *current, moving_, new_slots);
  std::vector<uint32_t> positions = round.resend;
  for (uint32_t k = 0; k < round.new_pages.size(); ++k) {
    positions.push_back(first_new + k);
  }
  round_pages_.push_back(positions.size());
  co_return co_await send_positions(positions);
}

Status SourceRun::write_batch(const std::vector<uint32_t>& positions,
                              size_t first, size_t count, bool mid_fault,
                              std::vector<uint64_t>& sums) {
  std::vector<PagePair> pairs(count);
  for (size_t i = 0; i < count; ++i) {
    uint32_t pos = positions[first + i];
    PageIndex page = precopy_.source_page_at(pos);
    // Pages sent while the engine runs are full, so they hold still.
    if (src_staging_) {
      KVMIG_ASSIGN_OR_RETURN(PageBytes bytes, a_.pager.read_page(page));
      src_staging_->store(static_cast<uint32_t>(i), bytes);
      if (req_.verify) sums[first + i] = page_checksum(bytes);
    } else if (req_.verify) {
      KVMIG_ASSIGN_OR_RETURN(sums[first + i],
                             pager_page_checksum(a_.pager, a_.layout, page));
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
  for (size_t w = 0; w < planned.size(); ++w) {
    const PlannedWrite& pw = planned[w];
    ops.push_back({src_bases_[pw.src_region] + pw.src_offset, pw.dst_region,
                   pw.dst_offset, pw.length});
    if (ops.size() == kOpsPerPost || w + 1 == planned.size()) {
      KVMIG_RETURN_IF_ERROR(init_->write(ops, deadline()));
      ops.clear();
    }
    if (mid_fault && !mid_fault_done_ && w >= planned.size() / 2) {
      mid_fault_done_ = true;
      a_.fault("src.data.mid");
    }
  }
  writes_ += planned.size();
  bytes_ += uint64_t{count} * page_total_;
  return init_->flush(deadline());
}

asio::awaitable<Status> SourceRun::send_positions(
    const std::vector<uint32_t>& positions) {
  if (positions.empty()) co_return Status();
  const auto t0 = Clock::now();
  if (src_geometry_.empty()) {
    if (a_.layout) {
      src_geometry_ = geometry_of(*a_.layout);
      for (const StridedRegion& r : *a_.layout) src_bases_.push_back(r.base);
    } else {
      const auto slots = static_cast<uint32_t>(
          std::clamp<uint64_t>(a_.options.staging_bytes / page_total_, 1,
                               a_.options.max_pages_per_migration));
      auto sb = StagingBuffer::create(transport_, page_total_, slots);
      if (!sb.ok()) co_return sb.status();
      src_staging_ = std::move(*sb);
      src_geometry_ = {src_staging_->geometry()};
      src_bases_ = {src_staging_->slot(0)};
    }
  }
  std::vector<uint64_t> sums(req_.verify ? positions.size() : 0);
  size_t batch = positions.size();
  if (src_staging_) batch = std::min<size_t>(batch, src_staging_->slots());
  if (dst_staging_slots_ > 0)
    batch = std::min<size_t>(batch, dst_staging_slots_);
  for (size_t first = 0; first < positions.size(); first += batch) {
    const size_t count = std::min(batch, positions.size() - first);
    const bool mid_fault = first == 0;
    Status wrote = co_await a_.offload(
        [&] { return write_batch(positions, first, count, mid_fault, sums); });
    if (!wrote.ok()) co_return wrote.with_context("data");
    if (dst_staging_slots_ == 0) continue;
    BatchMsg msg;
    msg.positions.assign(positions.begin() + first,
                         positions.begin() + first + count);
    const std::vector<uint8_t> payload = encode(msg);
    Status sent = co_await channel_->send(MsgType::kBatch, payload, deadline());
    if (!sent.ok()) co_return sent;
    auto ack = co_await channel_->receive(deadline());
    if (!ack.ok()) co_return ack.status().with_context("waiting for BATCH_ACK");
    if (ack->type != MsgType::kBatchAck) {
      co_return reply_status(*ack, a_.limits, "BATCH");
    }
  }
  data_seconds_ += seconds_since(t0);
  if (!req_.verify) co_return Status();
  // Wait until the destination has checked this round, so its checking
  // never lands inside the final pause.
  const std::vector<uint8_t> payload = encode(VerifyMsg{positions, sums});
  Status sent = co_await channel_->send(MsgType::kVerify, payload, deadline());
  if (!sent.ok()) co_return sent;
  const auto check_time =
      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(
          double(positions.size()) * page_total_ / 1e9));
  auto ack = co_await channel_->receive(deadline() + check_time);
  if (!ack.ok()) co_return ack.status().with_context("waiting for VERIFY_ACK");
  if (ack->type != MsgType::kVerifyAck) {
    co_return reply_status(*ack, a_.limits, "VERIFY");
  }
  co_return Status();
}

asio::awaitable<Result<MigrationReport>> SourceRun::run(
    std::vector<SeqId> ids) {
  moving_ = std::move(ids);
  auto connected = co_await connect_channel(req_.to, a_.options.max_frame_bytes,
                                            a_.options.secret, deadline());
  if (!connected.ok()) co_return connected.status().with_context("destination");
  channel_.emplace(std::move(*connected));

  Status s;
  if (!req_.live) {
    // Stop-and-copy: one round, paused from the start.
    s = co_await pause_engine();
    if (s.ok()) s = co_await run_round(true);
  } else {
    // Pre-copy rounds while the engine runs, until the remainder is small.
    while (s.ok()) {
      a_.fault("src.live.round");
      s = co_await run_round(round_pages_.empty());
      if (!s.ok()) break;
      auto current = a_.pager.logical_seqs();
      if (!current.ok()) {
        s = current.status();
        break;
      }
      size_t remainder = precopy_.plan(*current, moving_, false).pages();
      bool converged = remainder <= req_.live_converge_pages;
      bool shrinking = remainder < round_pages_.back();
      bool out_of_rounds = round_pages_.size() >= req_.live_max_rounds;
      if (converged || !shrinking || out_of_rounds) {
        if (!converged && out_of_rounds && req_.live_abort_if_not_converged) {
          s = Status::aborted("live migration did not converge in " +
                              std::to_string(req_.live_max_rounds) +
                              " rounds (" + std::to_string(remainder) +
                              " pages left)");
        }
        break;
      }
    }
    a_.fault("src.live.final");
    // The last round, paused.
    if (s.ok()) s = co_await pause_engine();
    if (s.ok()) s = co_await run_round(false);
  }
  if (!s.ok()) {
    a_.log->warn("{} aborting: {}", tag_, s.to_string());
    co_await abort_peer(s);
    co_return s;
  }
  src_staging_.reset();
  co_return co_await commit();
}

asio::awaitable<Result<MigrationReport>> SourceRun::commit() {
  // Page tables in destination slots (and digests, if asked), read while
  // paused. Checksums went with each round (VERIFY).
  CommitMsg msg;
  std::vector<std::pair<SeqId, std::string>> digests;
  for (const auto& [id, seq] : precopy_.tables()) {
    LogicalSeq out{id, seq.n_tokens, {}};
    out.pages.reserve(seq.pages.size());
    for (PageIndex p : seq.pages) {
      out.pages.push_back(
          precopy_.slot_at(static_cast<uint32_t>(precopy_.position_of(p))));
    }
    msg.seqs.push_back(std::move(out));
  }
  Status read = co_await a_.offload([&]() -> Status {
    if (req_.record_digests) {
      for (const auto& [id, seq] : precopy_.tables()) {
        KVMIG_ASSIGN_OR_RETURN(Digest d, seq_digest(a_.pager, seq));
        digests.emplace_back(id, d.hex());
      }
    }
    return Status();
  });
  if (!read.ok()) {
    co_await abort_peer(read);
    co_return read;
  }
  a_.fault("src.before_commit");
  // A destination that has already closed its end can never read COMMIT:
  // the migration is certainly not committed, so roll back now rather than
  // leave the requests in doubt.
  if (channel_->peer_closed()) {
    Status gone = Status::unavailable("destination " + req_.to +
                                      " closed the connection before COMMIT");
    co_await abort_peer(gone);
    co_return gone;
  }
  const std::vector<uint8_t> payload = encode(msg);
  Status sent = co_await channel_->send(MsgType::kCommit, payload, deadline());
  Outcome outcome = Outcome::kUnknown;
  Status failure;
  if (sent.ok()) {
    auto done = co_await channel_->receive(deadline());
    if (done.ok() && done->type == MsgType::kDone) {
      outcome = Outcome::kCommitted;
    } else if (done.ok() && done->type == MsgType::kAbort) {
      outcome = Outcome::kAborted;
      failure = reply_status(*done, a_.limits, "COMMIT");
    } else {
      failure =
          done.ok() ? reply_status(*done, a_.limits, "COMMIT") : done.status();
    }
  } else {
    failure = sent;
  }
  channel_->close();
  std::vector<SeqId> ids;
  for (const auto& [id, seq] : precopy_.tables()) ids.push_back(id);
  if (outcome == Outcome::kUnknown) {
    // The decision is the destination's; ask it.
    a_.log->warn("{} no DONE after COMMIT ({}); asking the destination", tag_,
                 failure.to_string());
    outcome = co_await a_.resolve_outcome(req_.to, id_);
    if (outcome == Outcome::kUnknown) {
      // The requests may already live at the destination: a move keeps them
      // from running here until the destination answers (DESIGN.md).
      std::string hold = "none";
      if (req_.mode == MigrationMode::kMove) {
        Status held = a_.pager.hold_seqs(ids);
        hold = held.ok() ? "seqs" : "engine";
        if (!held.ok()) {
          a_.log->error(
              "{} cannot hold requests one by one ({}): the engine stays "
              "paused until the destination answers",
              tag_, held.to_string());
          pause_.hand_over();
        }
      }
      a_.log->error(
          "{} outcome in doubt: destination unreachable; requests {} kept "
          "(held: {}), asking again in the background",
          tag_, join_ids(ids), hold);
      a_.enter_in_doubt({id_, ids, req_.to, hold});
      co_return Status::unavailable(
          "migration " + id_ + " is in doubt: no answer from " + req_.to +
          " after COMMIT (" + failure.to_string() + "); requests kept (held: " +
          hold + "), marked in doubt until the destination answers");
    }
  }
  if (outcome != Outcome::kCommitted) {
    a_.log->warn("{} rolled back: {}", tag_, failure.to_string());
    co_return failure.ok() ? Status::aborted("destination rolled back")
                           : failure;
  }

  // Committed: the requests belong to the destination now, and the data
  // path (flushed before COMMIT) may serve the next migration to it.
  if (init_) init_->keep();
  if (req_.mode == MigrationMode::kMove) {
    Status dropped = a_.pager.drop_logical_seqs(ids);
    if (!dropped.ok()) {
      a_.log->error("{} committed but drop failed: {}", tag_,
                    dropped.to_string());
      co_return dropped.with_context("drop after commit");
    }
  }
  Status resumed = pause_.release();
  const double pause_ms = seconds_since(t_pause_) * 1e3;
  if (!resumed.ok()) co_return resumed.with_context("resume");

  MigrationReport report;
  report.migration_id = id_;
  report.seqs = ids;
  report.pages = precopy_.positions();
  report.bytes = bytes_;
  report.writes = writes_;
  report.seconds = seconds_since(t_start_);
  report.gbps = data_seconds_ > 0 ? bytes_ / data_seconds_ / 1e9 : 0;
  report.pause_ms = pause_ms;
  report.rounds = static_cast<uint32_t>(round_pages_.size());
  report.round_pages = round_pages_;
  report.transport = std::string(transport_.name());
  report.staged = !a_.layout || dst_staging_slots_ > 0;
  report.left_behind = left_behind_;
  report.digests = std::move(digests);
  a_.log->info(
      "{} done: {} pages, {} bytes in {} writes, {:.3f} GB/s, {} round(s), "
      "pause {:.1f} ms",
      tag_, report.pages, bytes_, writes_, report.gbps, report.rounds,
      pause_ms);
  co_return report;
}

asio::awaitable<Result<MigrationReport>> Agent::Impl::run_source(
    MigrateRequest req) {
  if (source_busy) {
    co_return Status::failed_precondition(
        "a migration from this agent is already running");
  }
  source_busy = true;
  struct Busy {
    bool& b;
    ~Busy() { b = false; }
  } busy{source_busy};
  if (req.live && (req.live_max_rounds == 0)) {
    co_return Status::invalid_argument("live migration needs max rounds >= 1");
  }

  std::string transport_name =
      req.transport.empty() ? options.transports.front() : req.transport;
  auto transport = transport_named(transport_name);
  if (!transport.ok()) co_return transport.status();

  // Choose the requests; unknown ids are an error before anything moves.
  auto before = pager.logical_seqs();
  if (!before.ok()) co_return before.status().with_context("logical_seqs");
  std::set<SeqId> doubtful;
  for (const auto& d : in_doubt) doubtful.insert(d.seqs.begin(), d.seqs.end());
  std::vector<SeqId> ids;
  if (req.all) {
    for (const LogicalSeq& s : *before) {
      if (!doubtful.count(s.seq_id)) ids.push_back(s.seq_id);
    }
  } else {
    std::set<SeqId> live;
    for (const LogicalSeq& s : *before) live.insert(s.seq_id);
    std::vector<SeqId> unknown, held;
    std::set<SeqId> seen;
    for (SeqId id : req.seqs) {
      if (!seen.insert(id).second) continue;
      if (!live.count(id)) {
        unknown.push_back(id);
      } else if (doubtful.count(id)) {
        held.push_back(id);
      } else {
        ids.push_back(id);
      }
    }
    if (!unknown.empty()) {
      co_return Status::not_found("unknown request ids: " + join_ids(unknown));
    }
    if (!held.empty()) {
      co_return Status::failed_precondition(
          "requests in doubt from an earlier migration: " + join_ids(held));
    }
  }
  if (ids.empty()) co_return Status::invalid_argument("no requests to migrate");
  if (ids.size() > options.max_seqs_per_migration) {
    co_return Status::resource_exhausted(
        std::to_string(ids.size()) + " requests exceed the limit of " +
        std::to_string(options.max_seqs_per_migration) + " per migration");
  }
  SourceRun run(*this, req, **transport, new_migration_id());
  co_return co_await run.run(std::move(ids));
}

asio::awaitable<Outcome> Agent::Impl::ask_outcome(const std::string& to,
                                                  const std::string& id,
                                                  Deadline deadline) {
  auto connected = co_await connect_channel(to, options.max_frame_bytes,
                                            options.secret, deadline);
  if (!connected.ok()) co_return Outcome::kUnknown;
  FrameChannel& ch = *connected;
  const std::vector<uint8_t> payload = encode(OutcomeReqMsg{id});
  Status sent = co_await ch.send(MsgType::kOutcomeReq, payload, deadline);
  if (!sent.ok()) co_return Outcome::kUnknown;
  auto resp = co_await ch.receive(deadline);
  if (!resp.ok() || resp->type != MsgType::kOutcomeResp) {
    co_return Outcome::kUnknown;
  }
  auto o = decode_outcome_resp(resp->payload);
  if (!o.ok() || o->outcome == Outcome::kPending) co_return Outcome::kUnknown;
  // Unknown: the destination holds nothing of it (never got the COMMIT, or
  // restarted with its pager): the requests belong here.
  co_return o->outcome == Outcome::kCommitted ? Outcome::kCommitted
                                              : Outcome::kAborted;
}

asio::awaitable<Outcome> Agent::Impl::resolve_outcome(const std::string& to,
                                                      const std::string& id) {
  const Deadline give_up = peer_deadline();
  asio::steady_timer timer(io);
  while (Clock::now() < give_up) {
    Outcome o = co_await ask_outcome(to, id, give_up);
    if (o != Outcome::kUnknown) co_return o;
    timer.expires_after(std::chrono::milliseconds(200));
    boost::system::error_code ec;
    co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
  }
  co_return Outcome::kUnknown;
}

void Agent::Impl::enter_in_doubt(AgentStatus::InDoubt entry) {
  std::string id = entry.migration_id;
  in_doubt.push_back(std::move(entry));
  asio::co_spawn(io, settle_in_doubt(std::move(id)), asio::detached);
}

asio::awaitable<void> Agent::Impl::settle_in_doubt(std::string id) {
  // Quick at first (a brief partition), then every kMaxRetry at most.
  constexpr auto kFirstRetry = std::chrono::milliseconds(250);
  constexpr auto kMaxRetry = std::chrono::seconds(10);
  auto delay =
      std::chrono::duration_cast<std::chrono::milliseconds>(kFirstRetry);
  asio::steady_timer timer(io);
  for (;;) {
    timer.expires_after(delay);
    boost::system::error_code ec;
    co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    if (stopping) co_return;
    auto entry =
        std::find_if(in_doubt.begin(), in_doubt.end(),
                     [&](const auto& d) { return d.migration_id == id; });
    if (entry == in_doubt.end()) co_return;
    const std::string to = entry->to;
    // `entry` may move while this waits; settle() looks it up again.
    Outcome o = co_await ask_outcome(to, id, peer_deadline());
    if (stopping) co_return;
    if (o != Outcome::kUnknown) {
      settle(id, o);
      co_return;
    }
    delay = std::min<std::chrono::milliseconds>(2 * delay, kMaxRetry);
  }
}

void Agent::Impl::settle(const std::string& id, Outcome outcome) {
  auto it = std::find_if(in_doubt.begin(), in_doubt.end(),
                         [&](const auto& d) { return d.migration_id == id; });
  if (it == in_doubt.end()) return;
  const AgentStatus::InDoubt d = std::move(*it);
  in_doubt.erase(it);
  const std::string tag = "[" + id.substr(0, 12) + " -> " + d.to + "]";
  const bool committed = outcome == Outcome::kCommitted;
  if (d.hold != "none") {
    // A move: committed, the requests live at the destination now; rolled
    // back, they run here again. The engine may have ended some of them
    // meanwhile (held requests can still be dropped): settle the rest.
    std::vector<SeqId> live;
    Status s;
    if (auto now = pager.logical_seqs(); now.ok()) {
      const std::set<SeqId> kept(d.seqs.begin(), d.seqs.end());
      for (const LogicalSeq& seq : *now) {
        if (kept.count(seq.seq_id)) live.push_back(seq.seq_id);
      }
    } else {
      s = now.status().with_context("logical_seqs");
    }
    if (s.ok()) {
      s = committed ? pager.drop_logical_seqs(live)
                    : (d.hold == "seqs" ? pager.unhold_seqs(live) : Status());
    }
    if (!s.ok()) {
      log->error("{} settling requests {}: {}", tag, join_ids(d.seqs),
                 s.to_string());
    }
    if (d.hold == "engine") {
      Status resumed = pager.resume();
      if (!resumed.ok()) log->error("{} resume: {}", tag, resumed.to_string());
    }
  }
  log->warn("{} in doubt settled: {}; requests {} {}", tag,
            committed ? "committed at the destination" : "rolled back",
            join_ids(d.seqs),
            committed ? (d.hold == "none" ? "copied" : "dropped here")
                      : "run here again");
}

}  // namespace kvmig
