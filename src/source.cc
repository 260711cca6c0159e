// The source side of a migration: select, pause, HELLO, OFFER, data, COMMIT,
// DONE, then drop (move) or keep (copy) and resume. Any failure before the
// destination decides rolls back: the destination releases its slots and
// the source resumes with everything it had.
#include <algorithm>
#include <chrono>
#include <set>
#include <string>
#include <unordered_map>

#include "agent_impl.h"
#include "planner.h"
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
  for (SeqId id : ids) out += (out.empty() ? "" : ",") + std::to_string(id);
  return out;
}

// Resumes the pager when the migration leaves scope, however it leaves.
class PauseGuard {
 public:
  explicit PauseGuard(CachePager& pager) : pager_(pager) {}
  ~PauseGuard() { (void)release(); }
  void engage() { engaged_ = true; }
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

}  // namespace

// Everything the data phase needs, built on the io thread and used on a
// pool thread while the io coroutine awaits it.
struct DataPlan {
  CacheMeta meta;
  std::vector<PageIndex> pages;  // distinct source pages, HELLO order
  std::vector<PageIndex> slots;  // their destination slots
  std::optional<PagerLayout> src_layout;
  std::vector<RegionGeometry> dst_regions;
  uint32_t dst_staging_slots = 0;
  uint64_t src_staging_bytes = 0;
};

asio::awaitable<Result<MigrationReport>> Agent::Impl::run_source(
    MigrateRequest req) {
  if (req.live) {
    co_return Status::unimplemented(
        "live (pre-copy) migration is not implemented yet; run without "
        "--live");
  }
  if (source_busy) {
    co_return Status::failed_precondition(
        "a migration from this agent is already running");
  }
  source_busy = true;
  struct Busy {
    bool& b;
    ~Busy() { b = false; }
  } busy{source_busy};

  std::string transport_name =
      req.transport.empty() ? options.transports.front() : req.transport;
  auto transport = transport_named(transport_name);
  if (!transport.ok()) co_return transport.status();

  const std::string id = new_migration_id();
  const std::string tag = "[" + id.substr(0, 12) + " -> " + req.to + "]";
  const auto t_start = Clock::now();

  // 1. Choose the requests; unknown ids are an error before anything moves.
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
    for (SeqId id_ : req.seqs) {
      if (!seen.insert(id_).second) continue;
      if (!live.count(id_))
        unknown.push_back(id_);
      else if (doubtful.count(id_))
        held.push_back(id_);
      else
        ids.push_back(id_);
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

  // 2. Reach the destination before pausing anything.
  auto socket = co_await connect_to(req.to, peer_deadline());
  if (!socket.ok()) co_return socket.status().with_context("destination");
  FrameChannel channel(std::move(*socket), options.max_frame_bytes);

  auto abort_peer = [&](const Status& why) -> asio::awaitable<void> {
    const std::vector<uint8_t> payload1 = encode(AbortMsg{why.to_string()});
    Status sent = co_await channel.send(MsgType::kAbort, payload1,
                                        Clock::now() + std::chrono::seconds(1));
    (void)sent;
    channel.close();
  };

  // 3. Stop-and-copy: pause, then read the page tables that will move.
  PauseGuard pause(pager);
  Status paused = co_await offload([this] { return pager.pause(); });
  if (!paused.ok()) co_return paused.with_context("pause");
  pause.engage();
  const auto t_pause = Clock::now();

  auto now_seqs = pager.logical_seqs();
  if (!now_seqs.ok()) co_return now_seqs.status().with_context("logical_seqs");
  std::vector<LogicalSeq> moving;
  {
    std::unordered_map<SeqId, const LogicalSeq*> by_id;
    for (const LogicalSeq& s : *now_seqs) by_id[s.seq_id] = &s;
    std::vector<SeqId> gone;
    for (SeqId s : ids) {
      auto it = by_id.find(s);
      if (it == by_id.end())
        gone.push_back(s);
      else
        moving.push_back(*it->second);
    }
    if (!gone.empty()) {
      co_return Status::aborted("requests finished before the pause: " +
                                join_ids(gone));
    }
  }
  DataPlan plan;
  plan.meta = pager.meta();
  plan.src_layout = layout;
  std::unordered_map<PageIndex, uint32_t> order;  // page -> HELLO position
  for (const LogicalSeq& s : moving) {
    for (PageIndex p : s.pages) {
      if (order.emplace(p, static_cast<uint32_t>(plan.pages.size())).second) {
        plan.pages.push_back(p);
      }
    }
  }
  if (plan.pages.size() > options.max_pages_per_migration) {
    co_return Status::resource_exhausted(
        std::to_string(plan.pages.size()) + " pages exceed the limit of " +
        std::to_string(options.max_pages_per_migration) + " per migration");
  }
  const uint64_t page_total = 2 * plan.meta.page_bytes();

  // 4. HELLO -> OFFER.
  auto initiator = (*transport)->create_initiator();
  if (!initiator.ok()) co_return initiator.status();
  HelloMsg hello;
  hello.migration_id = id;
  hello.meta = plan.meta;
  hello.n_pages = static_cast<uint32_t>(plan.pages.size());
  hello.n_seqs = static_cast<uint32_t>(moving.size());
  hello.transports = {transport_name};
  hello.initiator_address = (*initiator)->address();
  log->info("{} {} {} requests, {} pages over {}", tag,
            req.mode == MigrationMode::kMove ? "moving" : "copying",
            moving.size(), plan.pages.size(), transport_name);
  const std::vector<uint8_t> payload2 = encode(hello);
  Status sent =
      co_await channel.send(MsgType::kHello, payload2, peer_deadline());
  if (!sent.ok()) co_return sent;
  auto reply = co_await channel.receive(peer_deadline());
  if (!reply.ok()) co_return reply.status().with_context("waiting for OFFER");
  if (reply->type == MsgType::kAbort) {
    auto why = decode_abort(reply->payload, limits);
    co_return Status::aborted(
        "destination refused: " +
        (why.ok() ? why->reason : why.status().to_string()));
  }
  if (reply->type != MsgType::kOffer) {
    Status bad =
        Status::protocol("expected OFFER, got " + msg_type_name(reply->type));
    co_await abort_peer(bad);
    co_return bad;
  }
  auto offer = decode_offer(reply->payload, limits);
  Status offer_ok = offer.status();
  if (offer_ok.ok() && offer->transport != transport_name) {
    offer_ok = Status::protocol("OFFER names transport '" + offer->transport +
                                "', HELLO asked for '" + transport_name + "'");
  }
  if (offer_ok.ok() && offer->slots.size() != plan.pages.size()) {
    offer_ok = Status::protocol(
        "OFFER has " + std::to_string(offer->slots.size()) + " slots for " +
        std::to_string(plan.pages.size()) + " pages");
  }
  if (!offer_ok.ok()) {
    co_await abort_peer(offer_ok);
    co_return offer_ok;
  }
  plan.slots = std::move(offer->slots);
  plan.dst_regions = std::move(offer->regions);
  plan.dst_staging_slots = offer->staging_slots;
  plan.src_staging_bytes = options.staging_bytes;
  fault("src.after_offer");

  // 5. Data: connect the data path, write every page, flush.
  Transport* t = *transport;
  TransportInitiator* init = initiator->get();
  const auto t_data = Clock::now();
  uint32_t batches_done = 0;
  bool staged = !layout || plan.dst_staging_slots > 0;
  // Each batch: (optionally) stage source pages, plan, write, flush; the
  // destination applies staged batches on BATCH / BATCH_ACK.
  const uint32_t n = static_cast<uint32_t>(plan.pages.size());
  uint32_t src_batch = n;
  std::unique_ptr<StagingBuffer> src_staging;
  if (!layout) {
    src_batch = static_cast<uint32_t>(
        std::clamp<uint64_t>(options.staging_bytes / page_total, 1, n));
    auto sb = StagingBuffer::create(*t, page_total, src_batch);
    if (!sb.ok()) {
      Status error = sb.status();
      co_await abort_peer(error);
      co_return sb.status();
    }
    src_staging = std::move(*sb);
  }
  const uint32_t batch = plan.dst_staging_slots > 0
                             ? std::min(src_batch, plan.dst_staging_slots)
                             : src_batch;
  std::vector<std::byte*> src_bases;
  std::vector<RegionGeometry> src_geometry;
  if (layout) {
    src_geometry = geometry_of(*layout);
    for (const StridedRegion& r : *layout) src_bases.push_back(r.base);
  } else {
    src_geometry = {src_staging->geometry()};
    src_bases = {src_staging->slot(0)};
  }

  Status connected = co_await offload(
      [&] { return init->connect(offer->target_address, peer_deadline()); });
  if (!connected.ok()) {
    Status s = connected.with_context("data path");
    co_await abort_peer(s);
    co_return s;
  }

  uint64_t bytes_sent = 0, writes = 0;
  bool mid_reached = false;
  for (uint32_t first = 0; first < n; first += batch) {
    const uint32_t count = std::min(batch, n - first);
    Status batch_status = co_await offload([&]() -> Status {
      std::vector<PagePair> pairs(count);
      for (uint32_t i = 0; i < count; ++i) {
        uint32_t k = first + i;
        if (src_staging) {
          KVMIG_ASSIGN_OR_RETURN(PageBytes page,
                                 pager.read_page(plan.pages[k]));
          src_staging->store(i, page);
        }
        pairs[i].src = src_staging ? i : plan.pages[k];
        pairs[i].dst = plan.dst_staging_slots > 0 ? i : plan.slots[k];
      }
      KVMIG_ASSIGN_OR_RETURN(auto writes_planned,
                             plan_writes(src_geometry, plan.dst_regions, pairs,
                                         page_total, kMaxWriteBytes));
      std::vector<WriteOp> ops;
      ops.reserve(kOpsPerPost);
      for (size_t w = 0; w < writes_planned.size(); ++w) {
        const PlannedWrite& pw = writes_planned[w];
        ops.push_back({src_bases[pw.src_region] + pw.src_offset, pw.dst_region,
                       pw.dst_offset, pw.length});
        if (ops.size() == kOpsPerPost || w + 1 == writes_planned.size()) {
          KVMIG_RETURN_IF_ERROR(init->write(ops, peer_deadline()));
          ops.clear();
        }
        if (!mid_reached && w >= writes_planned.size() / 2 && first == 0) {
          mid_reached = true;
          fault("src.data.mid");
        }
      }
      writes += writes_planned.size();
      bytes_sent += uint64_t{count} * page_total;
      return init->flush(peer_deadline());
    });
    if (!batch_status.ok()) {
      Status s = batch_status.with_context("data");
      log->warn("{} aborting: {}", tag, s.to_string());
      co_await abort_peer(s);
      co_return s;
    }
    if (plan.dst_staging_slots > 0) {
      const std::vector<uint8_t> payload3 = encode(BatchMsg{first, count});
      Status s =
          co_await channel.send(MsgType::kBatch, payload3, peer_deadline());
      if (s.ok()) {
        auto ack = co_await channel.receive(peer_deadline());
        if (!ack.ok()) {
          s = ack.status();
        } else if (ack->type == MsgType::kAbort) {
          auto why = decode_abort(ack->payload, limits);
          s = Status::aborted(
              "destination aborted: " +
              (why.ok() ? why->reason : why.status().to_string()));
        } else if (ack->type != MsgType::kBatchAck) {
          s = Status::protocol("expected BATCH_ACK, got " +
                               msg_type_name(ack->type));
        }
      }
      if (!s.ok()) {
        co_await abort_peer(s);
        co_return s;
      }
    }
    ++batches_done;
  }
  const double data_seconds = seconds_since(t_data);
  src_staging.reset();

  // 6. COMMIT: page tables in destination slots, plus checksums.
  CommitMsg commit;
  for (const LogicalSeq& s : moving) {
    LogicalSeq out{s.seq_id, s.n_tokens, {}};
    out.pages.reserve(s.pages.size());
    for (PageIndex p : s.pages) out.pages.push_back(plan.slots[order.at(p)]);
    commit.seqs.push_back(std::move(out));
  }
  if (req.verify) {
    auto sums = co_await offload([&]() -> Result<std::vector<uint64_t>> {
      std::vector<uint64_t> out;
      out.reserve(n);
      for (PageIndex p : plan.pages) {
        KVMIG_ASSIGN_OR_RETURN(uint64_t c,
                               pager_page_checksum(pager, layout, p));
        out.push_back(c);
      }
      return out;
    });
    if (!sums.ok()) {
      Status error = sums.status();
      co_await abort_peer(error);
      co_return sums.status();
    }
    commit.checksums = std::move(*sums);
  }
  fault("src.before_commit");
  const std::vector<uint8_t> payload4 = encode(commit);
  sent = co_await channel.send(MsgType::kCommit, payload4, peer_deadline());
  Outcome outcome = Outcome::kUnknown;
  Status failure;
  if (sent.ok()) {
    // The destination verifies every page before answering.
    auto verify_time = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(bytes_sent / 1e9));
    auto done = co_await channel.receive(peer_deadline() + verify_time);
    if (done.ok() && done->type == MsgType::kDone) {
      outcome = Outcome::kCommitted;
    } else if (done.ok() && done->type == MsgType::kAbort) {
      auto why = decode_abort(done->payload, limits);
      outcome = Outcome::kAborted;
      failure =
          Status::aborted("destination aborted at commit: " +
                          (why.ok() ? why->reason : why.status().to_string()));
    } else {
      failure = done.ok() ? Status::protocol("expected DONE, got " +
                                             msg_type_name(done->type))
                          : done.status();
    }
  } else {
    failure = sent;
  }
  channel.close();
  if (outcome == Outcome::kUnknown) {
    // The decision is the destination's; ask it.
    log->warn("{} no DONE after COMMIT ({}); asking the destination", tag,
              failure.to_string());
    outcome = co_await resolve_outcome(req.to, id);
    if (outcome == Outcome::kUnknown) {
      in_doubt.push_back({id, ids});
      log->error(
          "{} outcome in doubt: destination unreachable; requests {} "
          "kept and marked in doubt",
          tag, join_ids(ids));
      co_return Status::unavailable("migration " + id +
                                    " is in doubt: no answer from " + req.to +
                                    " after COMMIT (" + failure.to_string() +
                                    "); requests kept, marked in doubt");
    }
  }
  if (outcome != Outcome::kCommitted) {
    log->warn("{} rolled back: {}", tag, failure.to_string());
    co_return failure.ok() ? Status::aborted("destination rolled back")
                           : failure;
  }

  // 7. Committed: the requests belong to the destination now.
  if (req.mode == MigrationMode::kMove) {
    Status dropped = pager.drop_logical_seqs(ids);
    if (!dropped.ok()) {
      log->error("{} committed but drop failed: {}", tag, dropped.to_string());
      co_return dropped.with_context("drop after commit");
    }
  }
  Status resumed = pause.release();
  const double pause_ms = seconds_since(t_pause) * 1e3;
  if (!resumed.ok()) co_return resumed.with_context("resume");

  MigrationReport report;
  report.migration_id = id;
  report.seqs = ids;
  report.pages = n;
  report.bytes = bytes_sent;
  report.writes = writes;
  report.seconds = seconds_since(t_start);
  report.gbps = data_seconds > 0 ? bytes_sent / data_seconds / 1e9 : 0;
  report.pause_ms = pause_ms;
  report.rounds = 1;
  report.transport = transport_name;
  report.staged = staged;
  log->info(
      "{} done: {} pages, {} bytes in {} writes, {:.3f} GB/s, pause "
      "{:.1f} ms, {} batch(es)",
      tag, n, bytes_sent, writes, report.gbps, pause_ms, batches_done);
  co_return report;
}

asio::awaitable<Outcome> Agent::Impl::resolve_outcome(const std::string& to,
                                                      const std::string& id) {
  const Deadline give_up = peer_deadline();
  asio::steady_timer timer(io);
  while (Clock::now() < give_up) {
    auto socket = co_await connect_to(to, give_up);
    if (socket.ok()) {
      FrameChannel ch(std::move(*socket), options.max_frame_bytes);
      const std::vector<uint8_t> payload5 = encode(OutcomeReqMsg{id});
      Status sent = co_await ch.send(MsgType::kOutcomeReq, payload5, give_up);
      if (sent.ok()) {
        auto resp = co_await ch.receive(give_up);
        if (resp.ok() && resp->type == MsgType::kOutcomeResp) {
          auto o = decode_outcome_resp(resp->payload);
          if (o.ok() && o->outcome != Outcome::kPending) {
            // Unknown: the destination holds nothing of it (never got the
            // COMMIT, or lost its state): the requests stay here.
            co_return o->outcome == Outcome::kCommitted ? Outcome::kCommitted
                                                        : Outcome::kAborted;
          }
        }
      }
    }
    timer.expires_after(std::chrono::milliseconds(200));
    boost::system::error_code ec;
    co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
  }
  co_return Outcome::kUnknown;
}

}  // namespace kvmig
