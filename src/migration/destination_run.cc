#include "destination_run.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_set>

#include "slot_positions.h"
#include "write_windows.h"

namespace kvmig {
namespace {

// Protocol error unless every slot position is below n.
Status check_positions(const std::vector<uint32_t>& positions, size_t n,
                       const char* message) {
  for (uint32_t pos : positions) {
    if (pos >= n) {
      return Status::protocol(std::string(message) + " names slot position " +
                              std::to_string(pos) + " of " + std::to_string(n));
    }
  }
  return Status();
}

}  // namespace

void SlotLease::release() {
  if (slots_.empty()) return;
  Status released = pager_.release_pages(slots_);
  if (!released.ok()) {
    logger("control")->error("{} releasing {} slots: {}", tag_, slots_.size(),
                             released.to_string());
  }
  slots_.clear();
}

DestinationRun::DestinationRun(MigrationContext& ctx, FrameChannel& channel,
                               HelloMsg hello)
    : ctx_(ctx),
      channel_(channel),
      hello_(std::move(hello)),
      id_(hello_.migration_id),
      tag_(migration_tag(id_, "<-", channel.peer())),
      meta_(ctx.pager.meta()),
      page_total_(2 * meta_.page_bytes()),
      slots_(ctx.pager, tag_) {
  progress_.id = id_;
  progress_.source = false;
  progress_.peer = channel.peer();
  progress_.phase = "offer";
  progress_.round = 1;
  progress_.cancel = [this](const Status& why) { cancel(why); };
  listing_.emplace(ctx_, progress_);
}

void DestinationRun::cancel(const Status& why) {
  if (deciding_ || cancelled_) return;
  cancelled_ = why;
  progress_.phase = "cancelling";
  boost::system::error_code ignored;
  channel_.socket().cancel(ignored);
}

asio::awaitable<bool> DestinationRun::run() {
  // Pager calls go to the data pool: a slow engine delays this migration,
  // not the agent's other connections and timers. One trip for the id
  // check, the allocation and, into the pool itself, the data path: each
  // trip costs two thread wake-ups on the migration's fixed cost, none
  // when the pager's bookkeeping and the transport's opening never wait.
  Status s = check_hello();
  if (s.ok()) s = register_id();
  inline_pages_ = s.ok() && takes_inline();
  if (s.ok() && hello_.pages_follow && !inline_pages_) {
    s = Status::invalid_argument(
        "HELLO sends " + std::to_string(hello_.n_pages) +
        " pages with it, but this agent takes " +
        (ctx_.host_layout
             ? "at most " + std::to_string(inline_limit()) + " bytes of pages"
             : std::string("no pages")) +
        " inline");
  }
  if (s.ok()) {
    // On this thread (the pager never waits) the data path opens here only
    // if that needs no wait (a transport whose targets open at once, a
    // kept ucx connection ready to adopt); otherwise open_and_offer()
    // opens it on a data thread.
    s = co_await ctx_.bookkeeping([this]() -> Status {
      KVMIG_RETURN_IF_ERROR(check_ids_not_live());
      KVMIG_RETURN_IF_ERROR(allocate_first_round());
      if (!ctx_.layout || inline_pages_) return Status();
      if (ctx_.pager_never_waits) return open_target_at_once();
      return open_target(ctx_.pager_regions);
    });
  }
  // One exchange: PAGES and COMMIT are on their way already. (Not a ?:
  // around co_await: GCC 12 miscompiles that.)
  if (s.ok() && hello_.pages_follow) {
    s = take_pages_unasked();
  } else if (s.ok()) {
    s = co_await open_and_offer();
  }
  if (cancelled_) s = *cancelled_;
  if (!s.ok()) {
    co_await fail(s);
    co_return false;
  }
  if (!cancelled_) progress_.phase = "data";
  auto commit_frame = co_await receive_until_commit();
  progress_.phase = "install";
  if (cancelled_) commit_frame = *cancelled_;
  deciding_ = true;
  Result<CommitMsg> commit = commit_frame.ok()
                                 ? open_commit(*commit_frame)
                                 : Result<CommitMsg>(commit_frame.status());
  s = commit.status();
  if (s.ok()) s = co_await install(*commit);
  if (!s.ok()) {
    co_await fail(s);
    co_return false;
  }
  report_end("committed");
  ctx_.fault("dst.before_done");
  Status sent =
      co_await channel_.send(MsgType::kDone, {}, ctx_.peer_deadline());
  // Logged once DONE is out: the line's write is off the source's wait.
  ctx_.log->info("{} {}", tag_, installed_line_);
  if (!sent.ok()) {
    // Committed all the same: the source learns it by asking.
    ctx_.log->warn("{} DONE not delivered: {}", tag_, sent.to_string());
    co_return false;
  }
  // The source knows the outcome once it says so; until then the record
  // is kept for its queries.
  auto ack = co_await channel_.receive(ctx_.peer_deadline());
  if (ack.ok() && ack->type == MsgType::kDoneAck) {
    ctx_.dst_records.acknowledge(id_);
    co_return true;
  }
  ctx_.log->info("{} no DONE_ACK ({}): keeping the outcome for queries", tag_,
                 ack.ok() ? msg_type_name(ack->type) : ack.status().message());
  co_return false;
}

asio::awaitable<void> DestinationRun::fail(Status why) {
  ctx_.log->warn("{} aborted{}: {}", tag_,
                 took_with_hello_
                     ? " (slots taken with HELLO over the control connection)"
                     : "",
                 why.to_string());
  if (target_) {
    co_await ctx_.offload([this] {
      target_->revoke();
      return 0;
    });
  }
  staging_.reset();
  co_await ctx_.offload([this] {
    slots_.release();
    return 0;
  });
  if (registered_) ctx_.dst_records.remember(id_, Outcome::kAborted);
  report_end("aborted");
  const std::vector<uint8_t> payload = encode(AbortMsg{why.to_string()});
  Status sent = co_await channel_.send(MsgType::kAbort, payload,
                                       Clock::now() + std::chrono::seconds(1));
  (void)sent;
}

void DestinationRun::report_end(const char* outcome) const {
  if (!ctx_.options.on_migration_end) return;
  MigrationEvent e;
  e.role = MigrationEvent::Role::kDestination;
  if (transport_) e.transport = std::string(transport_->name());
  e.outcome = outcome;
  e.bytes = std::max({verified_pages_, batched_pages_, installed_pages_}) *
            page_total_;
  e.seconds = std::chrono::duration<double>(Clock::now() - t_start_).count();
  ctx_.options.on_migration_end(e);
}

Status DestinationRun::check_hello() {
  const AgentOptions& options = ctx_.options;
  if (!ctx_.dst_records.admits(id_, hello_.resent)) {
    return Status::already_exists("migration id " + id_ + " seen before");
  }
  if (ctx_.active.count({id_, true})) {
    return Status::invalid_argument(
        "migration to itself: the destination is the source agent");
  }
  KVMIG_RETURN_IF_ERROR(ctx_.refuse_during_snapshot("into"));
  if (hello_.meta != meta_) {
    return Status::invalid_argument("cache meta mismatch: source has " +
                                    hello_.meta.to_string() +
                                    ", destination has " + meta_.to_string());
  }
  // A live migration's first round may have no full page yet (short
  // requests): its slots come with later rounds.
  const uint32_t min_pages = hello_.live ? 0 : 1;
  if (hello_.n_pages < min_pages ||
      hello_.n_pages > options.max_pages_per_migration) {
    return Status::resource_exhausted(
        "HELLO asks for " + std::to_string(hello_.n_pages) +
        " pages; this agent takes " + std::to_string(min_pages) + " to " +
        std::to_string(options.max_pages_per_migration));
  }
  if (hello_.n_seqs == 0 || hello_.n_seqs > options.max_seqs_per_migration) {
    return Status::resource_exhausted(
        "HELLO moves " + std::to_string(hello_.n_seqs) +
        " requests; this agent takes 1 to " +
        std::to_string(options.max_seqs_per_migration));
  }
  auto transport = ctx_.common_transport(hello_.transports);
  if (!transport.ok()) return transport.status();
  transport_ = *transport;
  return Status();
}

Status DestinationRun::register_id() {
  // Checked again: another HELLO with this id may have come meanwhile.
  if (!ctx_.dst_records.admits(id_, hello_.resent)) {
    return Status::already_exists("migration id " + id_ + " seen before");
  }
  ctx_.dst_records.remember(id_, Outcome::kPending);
  registered_ = true;
  return Status();
}

Status DestinationRun::check_ids_not_live() {
  auto live = ctx_.pager.logical_seqs();
  if (!live.ok()) return live.status().with_context("logical_seqs");
  std::unordered_set<SeqId> here;
  for (const LogicalSeq& s : *live) here.insert(s.seq_id);
  for (SeqId id : hello_.seqs) {
    if (here.count(id)) {
      return Status::already_exists("request " + std::to_string(id) +
                                    " is already live at the destination");
    }
  }
  return Status();
}

Status DestinationRun::allocate_first_round() {
  if (hello_.n_pages == 0) return Status();
  auto allocated = ctx_.pager.allocate_pages(hello_.n_pages);
  if (!allocated.ok()) {
    auto cap = ctx_.pager.capacity();
    return Status::resource_exhausted(
        "destination full: need " + std::to_string(hello_.n_pages) + " pages" +
        (cap ? ", " + std::to_string(cap->free_pages) + " free" : "") + " (" +
        allocated.status().message() + ")");
  }
  slots_.add(*allocated);
  landed_.assign(slots_.size(), false);
  verified_.assign(slots_.size(), false);
  if (allocated->size() != hello_.n_pages) {
    return Status::internal("pager allocated " +
                            std::to_string(allocated->size()) + " of " +
                            std::to_string(hello_.n_pages) + " pages");
  }
  return Status();
}

Status DestinationRun::open_target(
    const std::vector<std::span<std::byte>>& regions) {
  auto opened = transport_->open_target(regions, hello_.initiator_address,
                                        ctx_.peer_deadline());
  if (!opened.ok()) {
    return opened.status().with_context("opening the data path");
  }
  return restrict_target(std::move(*opened));
}

Status DestinationRun::open_target_at_once() {
  auto opened = transport_->open_target_at_once(
      ctx_.pager_regions, hello_.initiator_address, ctx_.peer_deadline());
  if (!opened.ok()) {
    return opened.status().with_context("opening the data path");
  }
  if (!*opened) return Status();  // it would wait: open_and_offer() opens it
  return restrict_target(std::move(*opened));
}

Status DestinationRun::restrict_target(
    std::unique_ptr<TransportTarget> target) {
  target_ = std::move(target);
  // Zero-copy into the pool: the source may write its own slots only (a
  // staging buffer is this migration's alone).
  if (ctx_.layout && target_->restricts_writes()) {
    auto allowed = target_->allow(windows_for(*ctx_.layout, slots_.slots()));
    if (!allowed.ok()) {
      return allowed.status().with_context("restricting the data path");
    }
  }
  return Status();
}

asio::awaitable<Status> DestinationRun::open_and_offer() {
  // Where the source writes: the pager's own memory, or a staging buffer.
  OfferMsg offer;
  offer.transport = std::string(transport_->name());
  progress_.transport = offer.transport;
  offer.slots = slots_.slots();
  std::vector<std::span<std::byte>> regions;
  if (ctx_.layout) {
    regions = ctx_.pager_regions;
    for (const StridedRegion& r : *ctx_.layout) {
      offer.regions.push_back({r.stride, r.chunk, r.slots});
    }
  } else {
    // Later live rounds batch through the same buffer: size it by the limit,
    // not by the first round.
    const uint64_t most = hello_.live ? ctx_.options.max_pages_per_migration
                                      : std::max<uint32_t>(hello_.n_pages, 1);
    const auto n_staging = static_cast<uint32_t>(std::clamp<uint64_t>(
        ctx_.options.staging_bytes / page_total_, 1, most));
    auto sb = StagingBuffer::create(*transport_, page_total_, n_staging);
    if (!sb.ok()) co_return sb.status();
    staging_ = std::move(*sb);
    regions = {staging_->memory()};
    offer.regions = {staging_->geometry()};
    offer.staging_slots = n_staging;
  }
  if (inline_pages_) {
    offer.inline_pages = true;  // no data path: target_address is empty
  } else if (!target_) {
    Status opened = co_await ctx_.offload([&] { return open_target(regions); });
    if (!opened.ok()) co_return opened;
  }
  if (target_) offer.target_address = target_->address();
  offer.memory = ctx_.memory;
  if (ctx_.host_layout) offer.inline_limit = inline_limit();
  offer.incarnation = ctx_.incarnation;
  const std::vector<uint8_t> payload = encode(offer);
  // Logged before the frame goes out: once the source has OFFER it may
  // act on it (a test may kill this agent), so a line written after the
  // send could be lost to the race.
  ctx_.log->info("{} offered {} slots over {}{}", tag_, slots_.size(),
                 inline_pages_ ? "the control connection"
                               : std::string(transport_->name()),
                 staging_ ? " (staged)" : "");
  Status sent =
      co_await channel_.send(MsgType::kOffer, payload, ctx_.peer_deadline());
  if (!sent.ok()) co_return sent;
  ctx_.fault("dst.after_offer");
  co_return Status();
}

Status DestinationRun::take_pages_unasked() {
  progress_.transport = std::string(transport_->name());
  // No line of its own: a write here would sit on the source's wait for
  // DONE. The line that ends the run says it.
  took_with_hello_ = true;
  ctx_.fault("dst.hello_taken");
  return Status();
}

asio::awaitable<Result<Frame>> DestinationRun::receive_until_commit() {
  // The deadline is on progress, not on size: every frame but a PROGRESS
  // that reports no new bytes restarts it, so a source that writes on
  // keeps its slots and one that stalls (no frame, no byte) loses them
  // after the peer timeout.
  Clock::time_point last_progress = Clock::now();
  uint64_t bytes_seen = 0;
  for (;;) {
    if (cancelled_) co_return *cancelled_;
    auto frame = co_await channel_.receive(
        last_progress + ctx_.options.peer_timeout,
        [this](const Frame& f, uint32_t bulk) { return place_pages(f, bulk); });
    if (!frame.ok()) {
      if (frame.status().code() == StatusCode::kDeadlineExceeded) {
        co_return Status::deadline_exceeded(
            "source " + channel_.peer() + " made no progress for " +
            std::to_string(ctx_.options.peer_timeout.count()) + " ms (" +
            std::to_string(bytes_seen) + " bytes reported posted)");
      }
      co_return frame.status().with_context("waiting for COMMIT");
    }
    if (frame->type == MsgType::kCommit) co_return frame;
    if (frame->type == MsgType::kProgress) {
      auto p = decode_progress(frame->payload);
      if (!p.ok()) co_return p.status();
      ++progress_frames_;
      if (p->bytes > bytes_seen) {
        bytes_seen = p->bytes;
        last_progress = Clock::now();
      }
      continue;
    }
    Status ok;
    if (frame->type == MsgType::kAbort) {
      auto why = decode_abort(frame->payload, ctx_.limits);
      ok = Status::aborted("source aborted: " +
                           (why.ok() ? why->reason : why.status().to_string()));
    } else if (frame->type == MsgType::kRound && hello_.live) {
      ok = co_await on_round(*frame);
    } else if (frame->type == MsgType::kVerify && hello_.verify) {
      ok = co_await on_verify(*frame);
    } else if (frame->type == MsgType::kBatch && staging_) {
      ok = co_await on_batch(*frame);
    } else if (frame->type == MsgType::kPages) {
      on_pages();  // place_pages() refused it unless inline_pages_
    } else {
      ok = Status::protocol("unexpected " + msg_type_name(frame->type) +
                            " during the data phase");
    }
    if (!ok.ok()) co_return ok;
    last_progress = Clock::now();
  }
}

asio::awaitable<Status> DestinationRun::on_round(const Frame& frame) {
  // A live round: more slots, appended to the positions.
  auto round = decode_round(frame.payload);
  if (!round.ok()) co_return round.status();
  progress_.round++;
  const uint32_t limit = ctx_.options.max_pages_per_migration;
  if (round->n_pages == 0 || round->n_pages > limit - slots_.size()) {
    co_return Status::resource_exhausted(
        "ROUND asks for " + std::to_string(round->n_pages) +
        " more pages; this agent takes at most " + std::to_string(limit) +
        " per migration");
  }
  // One trip to the data pool: the allocation, then the new slots' write
  // windows (binding them may take a verbs device a while). None when
  // neither waits.
  Status allowed;
  const bool quick = !target_ || transport_->targets_open_at_once();
  auto more = co_await ctx_.bookkeeping(
      [&] {
        auto got = ctx_.pager.allocate_pages(round->n_pages);
        if (got.ok() && ctx_.layout && target_ && target_->restricts_writes()) {
          allowed = target_->allow(windows_for(*ctx_.layout, *got)).status();
        }
        return got;
      },
      quick);
  if (!more.ok()) {
    co_return Status::resource_exhausted(
        "destination full: need " + std::to_string(round->n_pages) +
        " more pages (" + more.status().message() + ")");
  }
  slots_.add(*more);
  if (!allowed.ok()) {
    co_return allowed.with_context("restricting the data path");
  }
  RoundOfferMsg reply;
  if (target_) reply.target_update = target_->window_update();
  landed_.resize(slots_.size(), false);
  verified_.resize(slots_.size(), false);
  reply.slots = std::move(*more);
  const std::vector<uint8_t> payload = encode(reply);
  co_return co_await channel_.send(MsgType::kRoundOffer, payload,
                                   ctx_.peer_deadline());
}

asio::awaitable<Status> DestinationRun::on_verify(const Frame& frame) {
  // A round's data is flushed: check what landed in those slots.
  auto v = decode_verify(frame.payload, ctx_.limits);
  if (!v.ok()) co_return v.status();
  KVMIG_CO_RETURN_IF_ERROR(co_await check_sums(*v, "VERIFY"));
  co_return co_await channel_.send(MsgType::kVerifyAck, {},
                                   ctx_.peer_deadline());
}

asio::awaitable<Status> DestinationRun::check_sums(const VerifyMsg& v,
                                                   const char* what) {
  co_return co_await ctx_.offload([&] { return verify_sums(v, what); });
}

Status DestinationRun::verify_sums(const VerifyMsg& v, const char* what) {
  KVMIG_RETURN_IF_ERROR(check_positions(v.positions, slots_.size(), what));
  for (size_t k = 0; k < v.positions.size(); ++k) {
    const uint32_t pos = v.positions[k];
    KVMIG_ASSIGN_OR_RETURN(
        uint64_t c, pager_page_checksum(ctx_.pager, ctx_.layout, slots_[pos]));
    if (c != v.checksums[k]) {
      return Status::data_loss("page at position " + std::to_string(pos) +
                               " (slot " + std::to_string(slots_[pos]) +
                               ") checksum mismatch");
    }
    verified_[pos] = true;
    ++verified_pages_;
  }
  return Status();
}

asio::awaitable<Status> DestinationRun::on_batch(const Frame& frame) {
  // Staged pages: staging slot k holds the page for positions[k].
  auto batch = decode_batch(frame.payload, ctx_.limits);
  if (!batch.ok()) co_return batch.status();
  if (batch->positions.empty() || batch->positions.size() > staging_->slots()) {
    co_return Status::protocol(
        "BATCH of " + std::to_string(batch->positions.size()) +
        " pages for a staging buffer of " + std::to_string(staging_->slots()));
  }
  KVMIG_CO_RETURN_IF_ERROR(
      check_positions(batch->positions, slots_.size(), "BATCH"));
  Status applied = co_await ctx_.offload([&]() -> Status {
    for (size_t k = 0; k < batch->positions.size(); ++k) {
      const uint32_t pos = batch->positions[k];
      KVMIG_RETURN_IF_ERROR(ctx_.pager.write_page(
          slots_[pos],
          staging_->load(static_cast<uint32_t>(k), meta_.page_bytes())));
      landed_[pos] = true;
    }
    return Status();
  });
  batched_pages_ += batch->positions.size();
  if (!applied.ok()) co_return applied;
  co_return co_await channel_.send(MsgType::kBatchAck, {},
                                   ctx_.peer_deadline());
}

bool DestinationRun::takes_inline() const {
  // The source asked; a stop-and-copy whose pages fit the limit, into host
  // memory this thread may write.
  const uint64_t bytes = uint64_t{hello_.n_pages} * page_total_;
  return hello_.inline_pages && !hello_.live && ctx_.host_layout &&
         bytes <= inline_limit();
}

uint64_t DestinationRun::inline_limit() const {
  // The option, within one PAGES frame: 4 bytes of position a page and 4
  // of count besides the pages.
  const uint64_t frame = ctx_.options.max_frame_bytes;
  const uint64_t fit = frame < 4 ? 0 : (frame - 4) / (page_total_ + 4);
  return std::min<uint64_t>(ctx_.options.inline_page_bytes, fit * page_total_);
}

Result<std::vector<std::span<uint8_t>>> DestinationRun::place_pages(
    const Frame& frame, uint32_t bulk) {
  std::vector<std::span<uint8_t>> chunks;
  if (frame.type != MsgType::kPages) return chunks;
  if (!inline_pages_) {
    return Status::protocol("unexpected PAGES during the data phase");
  }
  KVMIG_ASSIGN_OR_RETURN(PagesMsg pages,
                         decode_pages(frame.payload, ctx_.limits));
  // The bytes are the frame's bulk, outside the checksum (protocol 13);
  // the payload is the positions alone.
  const uint64_t bytes = pages.bytes.size() + uint64_t{bulk};
  if (pages.positions.empty() || !pages.bytes.empty() ||
      bytes != pages.positions.size() * page_total_) {
    return Status::protocol(
        "PAGES of " + std::to_string(pages.positions.size()) + " pages has " +
        std::to_string(bytes) + " bytes (" + std::to_string(bulk) +
        " of them bulk); a page is " + std::to_string(page_total_));
  }
  KVMIG_RETURN_IF_ERROR(
      check_positions(pages.positions, slots_.size(), "PAGES"));
  // Checked whole before any byte lands: a bad frame changes nothing.
  std::vector<bool> seen(slots_.size(), false);
  chunks.reserve(pages.positions.size() * ctx_.layout->size());
  for (uint32_t pos : pages.positions) {
    if (landed_[pos] || seen[pos]) {
      return Status::protocol("PAGES sends slot position " +
                              std::to_string(pos) + " twice");
    }
    seen[pos] = true;
    // The pager allocated a slot outside its own layout: its fault.
    Status fits =
        host_page_chunks(*ctx_.layout, slots_[pos], page_total_, chunks);
    if (!fits.ok()) return Status::internal("allocated " + fits.message());
  }
  placed_ = std::move(pages.positions);
  return chunks;
}

void DestinationRun::on_pages() {
  for (uint32_t pos : placed_) landed_[pos] = true;
  batched_pages_ += placed_.size();
  placed_.clear();
}

Result<CommitMsg> DestinationRun::open_commit(const Frame& frame) {
  if (!ctx_.dst_records.begin_commit(id_)) {
    return Status::aborted(
        "COMMIT arrived after an outcome query had decided abort");
  }
  KVMIG_ASSIGN_OR_RETURN(CommitMsg commit,
                         decode_commit(frame.payload, ctx_.limits));
  if (commit.seqs.empty() || commit.seqs.size() > hello_.n_seqs ||
      (!hello_.live && commit.seqs.size() != hello_.n_seqs)) {
    return Status::protocol("COMMIT has " + std::to_string(commit.seqs.size()) +
                            " requests, HELLO announced " +
                            std::to_string(hello_.n_seqs));
  }
  if (!commit.verify.positions.empty() && !hello_.verify) {
    return Status::protocol("COMMIT carries checksums, HELLO asked for none");
  }
  if (commit.data_mark != 0 && (!target_ || staging_)) {
    return Status::protocol("COMMIT names data mark " +
                            std::to_string(commit.data_mark) +
                            ", but this migration's writes are staged");
  }
  if (hello_.pages_follow) {
    // Sent before the slots were known: slot positions, mapped here.
    for (LogicalSeq& seq : commit.seqs) {
      for (PageIndex& p : seq.pages) {
        if (p >= slots_.size()) {
          return Status::protocol("COMMIT of request " +
                                  std::to_string(seq.seq_id) +
                                  " names slot position " + std::to_string(p) +
                                  " of " + std::to_string(slots_.size()));
        }
        p = slots_[p];
      }
    }
  }
  return commit;
}

Status DestinationRun::check_commit(const CommitMsg& commit) {
  // The page tables use only allocated slots; every slot is used (a live
  // migration may leave some unused: requests left behind).
  KVMIG_RETURN_IF_ERROR(check_tables(commit));
  if (!hello_.live && !unused_.empty()) {
    return Status::protocol(std::to_string(unused_.size()) +
                            " allocated slots are used by no request");
  }
  return Status();
}

Status DestinationRun::check_tables(const CommitMsg& commit) {
  const SlotPositions position_of(slots_.slots());
  std::vector<bool> used(slots_.size(), false);
  for (const LogicalSeq& s : commit.seqs) {
    // Named only when refused: no string per request on the way through.
    auto which = [&] { return "request " + std::to_string(s.seq_id); };
    // Refused before anything is installed (the slots go back on ABORT).
    if (s.n_tokens == 0) {
      return Status::invalid_argument(which() + " has no tokens");
    }
    if (s.pages.size() != meta_.pages_for_tokens(s.n_tokens)) {
      return Status::invalid_argument(
          which() + " has " + std::to_string(s.n_tokens) + " tokens in " +
          std::to_string(s.pages.size()) + " pages; " +
          std::to_string(s.n_tokens) + " tokens need " +
          std::to_string(meta_.pages_for_tokens(s.n_tokens)) + " pages of " +
          std::to_string(meta_.page_size_tokens) + " tokens");
    }
    for (PageIndex p : s.pages) {
      auto at = [&] {
        return which() + " points at slot " + std::to_string(p);
      };
      const uint32_t pos = position_of.find(p);
      if (pos == SlotPositions::kNone) {
        return Status::protocol(at() + ", not one allocated for it");
      }
      if (hello_.verify && !verified_[pos]) {
        return Status::protocol(at() + ", which no checksum covered");
      }
      if (staging_ && !landed_[pos]) {
        return Status::protocol(at() + ", which no BATCH filled");
      }
      if (inline_pages_ && !landed_[pos]) {
        return Status::protocol(at() + ", which no PAGES filled");
      }
      used[pos] = true;
    }
  }
  for (uint32_t pos = 0; pos < slots_.size(); ++pos) {
    if (!used[pos]) unused_.push_back(slots_[pos]);
  }
  return Status();
}

void DestinationRun::note_arrivals(const CommitMsg& commit) {
  auto& arrivals = ctx_.arrivals;
  const auto now = Clock::now();
  for (const LogicalSeq& seq : commit.seqs) arrivals[seq.seq_id] = now;
  while (arrivals.size() > MigrationContext::kMaxArrivals) {
    auto oldest = arrivals.begin();
    for (auto it = arrivals.begin(); it != arrivals.end(); ++it) {
      if (it->second < oldest->second) oldest = it;
    }
    arrivals.erase(oldest);
  }
}

asio::awaitable<Status> DestinationRun::wait_for_mark(uint64_t mark) {
  // Usually there before COMMIT. If not, the target wakes this coroutine
  // when it comes (or the connection fails); no thread waits meanwhile.
  Status landed = target_->wait_mark(mark, Deadline::min());
  if (landed.code() == StatusCode::kDeadlineExceeded) {
    auto timer = std::make_shared<asio::steady_timer>(ctx_.io);
    timer->expires_at(ctx_.peer_deadline());
    target_->notify_mark(mark, [timer] {
      asio::post(timer->get_executor(), [timer] { timer->cancel(); });
    });
    boost::system::error_code ec;
    co_await timer->async_wait(asio::redirect_error(asio::use_awaitable, ec));
    landed = target_->wait_mark(mark, Deadline::min());
  }
  co_return landed.with_context("COMMIT's data");
}

asio::awaitable<Status> DestinationRun::install(const CommitMsg& commit) {
  // Once the source's writes have landed (flushed before COMMIT, or its
  // mark arrived) and COMMIT checks out, end the data path (the source
  // posts no write after COMMIT), then install: revoked, or kept for the
  // source's next migration where the transport can; a failed install
  // still revokes it (fail()).
  if (commit.data_mark != 0) {
    KVMIG_CO_RETURN_IF_ERROR(co_await wait_for_mark(commit.data_mark));
  }
  const bool quick =
      (!target_ || transport_->targets_open_at_once()) &&
      commit.verify.positions.size() * page_total_ <= ctx_.kQuickPageBytes;
  Status installed = co_await ctx_.bookkeeping(
      [&]() -> Status {
        if (!commit.verify.positions.empty()) {
          KVMIG_RETURN_IF_ERROR(verify_sums(commit.verify, "COMMIT"));
        }
        KVMIG_RETURN_IF_ERROR(check_commit(commit));
        if (target_) {
          const bool kept = target_->keep();
          ctx_.log->debug("{} data path {}", tag_, kept ? "kept" : "revoked");
        }
        return ctx_.pager.install_logical_seqs(commit.seqs)
            .with_context("install");
      },
      quick);
  if (!installed.ok()) co_return installed;
  ctx_.dst_records.remember(id_, Outcome::kCommitted);
  note_arrivals(commit);
  installed_pages_ = slots_.size();
  const size_t used = slots_.size() - unused_.size();
  slots_.taken();
  if (!unused_.empty()) {
    // Pages of requests the source left behind.
    Status released = co_await ctx_.bookkeeping(
        [this] { return ctx_.pager.release_pages(unused_); });
    if (!released.ok()) {
      ctx_.log->error("{} releasing {} unused slots: {}", tag_, unused_.size(),
                      released.to_string());
    }
  }
  installed_line_ = fmt::format(
      "installed {} requests in {} slots{} ({} PROGRESS frames)",
      commit.seqs.size(), used,
      took_with_hello_ ? " taken with HELLO over the control connection" : "",
      progress_frames_);
  co_return Status();
}

}  // namespace kvmig
