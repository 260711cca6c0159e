// The destination side of a migration: check HELLO, allocate every slot
// once, OFFER, receive the data (directly into the slots, or staged), check
// COMMIT, cut the source off, verify, install, DONE. Until install, any
// failure releases the slots, after cutting the source off so that no late
// write can land in a slot that is given back.
#include <algorithm>
#include <map>
#include <set>
#include <string>

#include "agent_impl.h"
#include "staging.h"

namespace kvmig {
namespace {

// While waiting for COMMIT the destination allows the data phase at least
// this rate on top of the peer timeout (a stalled source still times out; a
// dead one is seen at once as a closed connection).
constexpr double kMinDataBytesPerSecond = 20e6;

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

asio::awaitable<void> Agent::Impl::run_destination(FrameChannel& channel,
                                                   HelloMsg hello) {
  const std::string& id = hello.migration_id;
  const std::string tag =
      "[" + id.substr(0, 12) + " <- " + channel.peer() + "]";
  const CacheMeta meta = pager.meta();

  // Every exit before install: cut the source off, give the slots back,
  // remember the outcome and tell the source why (best effort).
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<StagingBuffer> staging;
  std::vector<PageIndex> slots;
  bool registered = false;  // this session owns dst_records[id]
  auto fail = [&](Status why) -> asio::awaitable<void> {
    log->warn("{} aborted: {}", tag, why.to_string());
    if (target)
      co_await offload([&] {
        target->revoke();
        return 0;
      });
    staging.reset();
    if (!slots.empty()) {
      Status released = pager.release_pages(slots);
      if (!released.ok()) {
        log->error("{} releasing {} slots: {}", tag, slots.size(),
                   released.to_string());
      }
      slots.clear();
    }
    if (registered) remember_outcome(id, Outcome::kAborted);
    const std::vector<uint8_t> payload1 = encode(AbortMsg{why.to_string()});
    Status sent = co_await channel.send(MsgType::kAbort, payload1,
                                        Clock::now() + std::chrono::seconds(1));
    (void)sent;
  };

  // 1. Check HELLO against this agent.
  if (dst_records.count(id)) {
    Status error =
        Status::already_exists("migration id " + id + " seen before");
    co_await fail(error);
    co_return;
  }
  if (hello.meta != meta) {
    Status error = Status::invalid_argument(
        "cache meta mismatch: source has " + hello.meta.to_string() +
        ", destination has " + meta.to_string());
    co_await fail(error);
    co_return;
  }
  // A live migration's first round may have no full page yet (short
  // requests): its slots come with later rounds.
  const uint32_t min_pages = hello.live ? 0 : 1;
  if (hello.n_pages < min_pages ||
      hello.n_pages > options.max_pages_per_migration) {
    Status error = Status::resource_exhausted(
        "HELLO asks for " + std::to_string(hello.n_pages) +
        " pages; this agent takes " + std::to_string(min_pages) + " to " +
        std::to_string(options.max_pages_per_migration));
    co_await fail(error);
    co_return;
  }
  if (hello.n_seqs == 0 || hello.n_seqs > options.max_seqs_per_migration) {
    Status error = Status::resource_exhausted(
        "HELLO moves " + std::to_string(hello.n_seqs) +
        " requests; this agent takes 1 to " +
        std::to_string(options.max_seqs_per_migration));
    co_await fail(error);
    co_return;
  }
  Transport* transport = nullptr;
  for (const std::string& name : hello.transports) {
    auto it = transports.find(name);
    if (it != transports.end()) {
      transport = it->second.get();
      break;
    }
  }
  if (!transport) {
    std::string offered, accepted;
    for (const auto& n : hello.transports) offered += n + " ";
    for (const auto& [n, t] : transports) accepted += n + " ";
    Status error = Status::failed_precondition(
        "no common transport: source offers [ " + offered +
        "], destination accepts [ " + accepted + "]");
    co_await fail(error);
    co_return;
  }
  remember_outcome(id, Outcome::kPending);
  registered = true;

  // 2. Allocate every slot once (a live migration: this round's slots).
  Result<std::vector<PageIndex>> allocated = std::vector<PageIndex>{};
  if (hello.n_pages > 0) allocated = pager.allocate_pages(hello.n_pages);
  if (!allocated.ok()) {
    auto cap = pager.capacity();
    Status error = Status::resource_exhausted(
        "destination full: need " + std::to_string(hello.n_pages) + " pages" +
        (cap ? ", " + std::to_string(cap->free_pages) + " free" : "") + " (" +
        allocated.status().message() + ")");
    co_await fail(error);
    co_return;
  }
  slots = std::move(*allocated);
  if (slots.size() != hello.n_pages) {
    Status error =
        Status::internal("pager allocated " + std::to_string(slots.size()) +
                         " of " + std::to_string(hello.n_pages) + " pages");
    co_await fail(error);
    co_return;
  }

  // 3. Where the source writes: the pager's own memory, or a staging buffer.
  const uint64_t page_total = 2 * meta.page_bytes();
  OfferMsg offer;
  offer.transport = std::string(transport->name());
  offer.slots = slots;
  std::vector<std::span<std::byte>> regions;
  if (layout) {
    regions = pager_regions;
    for (const StridedRegion& r : *layout) {
      offer.regions.push_back({r.stride, r.chunk, r.slots});
    }
  } else {
    // Later live rounds batch through the same buffer: size it by the limit,
    // not by the first round.
    const uint64_t most = hello.live ? options.max_pages_per_migration
                                     : std::max<uint32_t>(hello.n_pages, 1);
    uint32_t n_staging = static_cast<uint32_t>(
        std::clamp<uint64_t>(options.staging_bytes / page_total, 1, most));
    auto sb = StagingBuffer::create(*transport, page_total, n_staging);
    if (!sb.ok()) {
      Status error = sb.status();
      co_await fail(error);
      co_return;
    }
    staging = std::move(*sb);
    regions = {staging->memory()};
    offer.regions = {staging->geometry()};
    offer.staging_slots = n_staging;
  }
  auto opened = co_await offload([&] {
    return transport->open_target(regions, hello.initiator_address,
                                  peer_deadline());
  });
  if (!opened.ok()) {
    Status error = opened.status().with_context("opening the data path");
    co_await fail(error);
    co_return;
  }
  target = std::move(*opened);
  offer.target_address = target->address();
  const std::vector<uint8_t> payload2 = encode(offer);
  Status sent =
      co_await channel.send(MsgType::kOffer, payload2, peer_deadline());
  if (!sent.ok()) {
    co_await fail(sent);
    co_return;
  }
  log->info("{} offered {} slots over {}{}", tag, slots.size(),
            transport->name(), staging ? " (staged)" : "");
  fault("dst.after_offer");

  // 4. Wait for the data to land: live rounds, staged batches, then COMMIT.
  // Each wait allows the data phase at least kMinDataBytesPerSecond for
  // every slot allocated so far, on top of the peer timeout.
  auto data_deadline = [&] {
    return peer_deadline() +
           std::chrono::duration_cast<Clock::duration>(
               std::chrono::duration<double>(double(slots.size()) * page_total /
                                             kMinDataBytesPerSecond));
  };
  std::vector<bool> landed(slots.size(), false);    // staged positions written
  std::vector<bool> verified(slots.size(), false);  // checked against VERIFY
  Result<Frame> frame = Status::internal("no frame yet");
  for (;;) {
    frame = co_await channel.receive(data_deadline());
    if (!frame.ok()) {
      Status error = frame.status().with_context("waiting for COMMIT");
      co_await fail(error);
      co_return;
    }
    if (frame->type == MsgType::kCommit) break;
    Status ok;
    if (frame->type == MsgType::kAbort) {
      auto why = decode_abort(frame->payload, limits);
      ok = Status::aborted("source aborted: " +
                           (why.ok() ? why->reason : why.status().to_string()));
    } else if (frame->type == MsgType::kRound && hello.live) {
      // A live round: more slots, appended to the positions.
      auto round = decode_round(frame->payload);
      ok = round.status();
      if (ok.ok() &&
          (round->n_pages == 0 ||
           round->n_pages > options.max_pages_per_migration - slots.size())) {
        ok = Status::resource_exhausted(
            "ROUND asks for " + std::to_string(round->n_pages) +
            " more pages; this agent takes at most " +
            std::to_string(options.max_pages_per_migration) + " per migration");
      }
      if (ok.ok()) {
        auto more = pager.allocate_pages(round->n_pages);
        if (!more.ok()) {
          ok = Status::resource_exhausted(
              "destination full: need " + std::to_string(round->n_pages) +
              " more pages (" + more.status().message() + ")");
        } else {
          slots.insert(slots.end(), more->begin(), more->end());
          landed.resize(slots.size(), false);
          verified.resize(slots.size(), false);
          const std::vector<uint8_t> payload = encode(RoundOfferMsg{*more});
          ok = co_await channel.send(MsgType::kRoundOffer, payload,
                                     peer_deadline());
        }
      }
    } else if (frame->type == MsgType::kVerify && hello.verify) {
      // A round's data is flushed: check what landed in those slots.
      auto v = decode_verify(frame->payload, limits);
      ok = v.status();
      if (ok.ok()) ok = check_positions(v->positions, slots.size(), "VERIFY");
      if (ok.ok()) {
        ok = co_await offload([&]() -> Status {
          for (size_t k = 0; k < v->positions.size(); ++k) {
            uint32_t pos = v->positions[k];
            KVMIG_ASSIGN_OR_RETURN(
                uint64_t c, pager_page_checksum(pager, layout, slots[pos]));
            if (c != v->checksums[k]) {
              return Status::data_loss(
                  "page at position " + std::to_string(pos) + " (slot " +
                  std::to_string(slots[pos]) + ") checksum mismatch");
            }
            verified[pos] = true;
          }
          return Status();
        });
      }
      if (ok.ok()) {
        ok = co_await channel.send(MsgType::kVerifyAck, {}, peer_deadline());
      }
    } else if (frame->type == MsgType::kBatch && staging) {
      // Staged pages: staging slot k holds the page for positions[k].
      auto batch = decode_batch(frame->payload, limits);
      ok = batch.status();
      if (ok.ok() && (batch->positions.empty() ||
                      batch->positions.size() > staging->slots())) {
        ok = Status::protocol("BATCH of " +
                              std::to_string(batch->positions.size()) +
                              " pages for a staging buffer of " +
                              std::to_string(staging->slots()));
      }
      if (ok.ok()) {
        ok = check_positions(batch->positions, slots.size(), "BATCH");
      }
      if (ok.ok()) {
        ok = co_await offload([&]() -> Status {
          for (size_t k = 0; k < batch->positions.size(); ++k) {
            uint32_t pos = batch->positions[k];
            KVMIG_RETURN_IF_ERROR(pager.write_page(
                slots[pos],
                staging->load(static_cast<uint32_t>(k), meta.page_bytes())));
            landed[pos] = true;
          }
          return Status();
        });
      }
      if (ok.ok()) {
        ok = co_await channel.send(MsgType::kBatchAck, {}, peer_deadline());
      }
    } else {
      ok = Status::protocol("unexpected " + msg_type_name(frame->type) +
                            " during the data phase");
    }
    if (!ok.ok()) {
      co_await fail(ok);
      co_return;
    }
  }
  if (dst_records[id].fenced) {
    Status error = Status::aborted(
        "COMMIT arrived after an outcome query had decided abort");
    co_await fail(error);
    co_return;
  }
  dst_records[id].committing = true;

  // 5. Check COMMIT: the page tables use only allocated slots; every slot is
  // used (a live migration may leave some unused: requests left behind).
  auto commit = decode_commit(frame->payload, limits);
  Status valid = commit.status();
  if (valid.ok() &&
      (commit->seqs.empty() || commit->seqs.size() > hello.n_seqs ||
       (!hello.live && commit->seqs.size() != hello.n_seqs))) {
    valid = Status::protocol(
        "COMMIT has " + std::to_string(commit->seqs.size()) +
        " requests, HELLO announced " + std::to_string(hello.n_seqs));
  }
  std::map<PageIndex, uint32_t> position_of;
  for (uint32_t pos = 0; pos < slots.size(); ++pos)
    position_of[slots[pos]] = pos;
  std::vector<bool> used(slots.size(), false);
  if (valid.ok()) {
    for (const LogicalSeq& s : commit->seqs) {
      if (s.pages.size() != meta.pages_for_tokens(s.n_tokens)) {
        valid =
            Status::protocol("request " + std::to_string(s.seq_id) + " has " +
                             std::to_string(s.n_tokens) + " tokens in " +
                             std::to_string(s.pages.size()) + " pages");
        break;
      }
      for (PageIndex p : s.pages) {
        auto it = position_of.find(p);
        if (it == position_of.end()) {
          valid = Status::protocol("request " + std::to_string(s.seq_id) +
                                   " points at slot " + std::to_string(p) +
                                   ", not one allocated for it");
          break;
        }
        if (hello.verify && !verified[it->second]) {
          valid = Status::protocol("request " + std::to_string(s.seq_id) +
                                   " points at slot " + std::to_string(p) +
                                   ", which no VERIFY covered");
          break;
        }
        if (staging && !landed[it->second]) {
          valid = Status::protocol("request " + std::to_string(s.seq_id) +
                                   " points at slot " + std::to_string(p) +
                                   ", which no BATCH filled");
          break;
        }
        used[it->second] = true;
      }
      if (!valid.ok()) break;
    }
  }
  std::vector<PageIndex> unused;
  for (uint32_t pos = 0; pos < slots.size(); ++pos) {
    if (!used[pos]) unused.push_back(slots[pos]);
  }
  if (valid.ok() && !hello.live && !unused.empty()) {
    valid = Status::protocol(std::to_string(unused.size()) +
                             " allocated slots are used by no request");
  }
  if (!valid.ok()) {
    co_await fail(valid);
    co_return;
  }

  // 6. End the data path (the source flushed every write before COMMIT and
  //    posts none after), then install: revoked, or kept for the source's
  //    next migration where the transport can; a failed install below still
  //    revokes it.
  co_await offload([&] {
    const bool kept = target->keep();
    log->debug("{} data path {}", tag, kept ? "kept" : "revoked");
    return 0;
  });
  Status install = pager.install_logical_seqs(commit->seqs);
  if (!install.ok()) {
    Status error = install.with_context("install");
    co_await fail(error);
    co_return;
  }
  remember_outcome(id, Outcome::kCommitted);
  if (!unused.empty()) {
    // Pages of requests the source left behind.
    Status released = pager.release_pages(unused);
    if (!released.ok()) {
      log->error("{} releasing {} unused slots: {}", tag, unused.size(),
                 released.to_string());
    }
  }
  log->info("{} installed {} requests in {} slots", tag, commit->seqs.size(),
            slots.size() - unused.size());
  fault("dst.before_done");
  sent = co_await channel.send(MsgType::kDone, {}, peer_deadline());
  if (!sent.ok()) {
    // Committed all the same: the source learns it by asking.
    log->warn("{} DONE not delivered: {}", tag, sent.to_string());
  }
}

}  // namespace kvmig
