#include "synthetic_pager.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <utility>

#include "pool_memory.h"

namespace kvmig {
namespace {

enum class SlotState : uint8_t { kFree, kAllocated, kOwned };

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t mix(uint64_t h, uint64_t v) {
  uint64_t s = h ^ v;
  return splitmix64(s);
}

// Fills dst with the bytes of one token of one layer (K or V): a function of
// (seed, owner, position, layer, kv) only.
void fill_token(std::byte* dst, uint64_t n, uint64_t seed, uint64_t owner,
                uint64_t pos, uint32_t layer, bool is_v) {
  uint64_t state = mix(mix(mix(mix(0x6b766d6967ull, seed), owner), pos),
                       (uint64_t{layer} << 1) | (is_v ? 1 : 0));
  uint64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t r = splitmix64(state);
    std::memcpy(dst + i, &r, 8);
  }
  if (i < n) {
    uint64_t r = splitmix64(state);
    std::memcpy(dst + i, &r, n - i);
  }
}

std::string ix_str(PageIndex ix) { return std::to_string(ix); }

}  // namespace

Result<PoolLayout> parse_pool_layout(std::string_view name) {
  if (name == "page") return PoolLayout::kPage;
  if (name == "layer") return PoolLayout::kLayer;
  return Status::invalid_argument("unknown pool layout '" + std::string(name) +
                                  "' (page|layer)");
}

Result<AllocationOrder> parse_allocation_order(std::string_view name) {
  if (name == "contiguous") return AllocationOrder::kContiguous;
  if (name == "random") return AllocationOrder::kRandom;
  return Status::invalid_argument("unknown allocation order '" +
                                  std::string(name) + "' (contiguous|random)");
}

std::string_view allocation_order_name(AllocationOrder order) {
  switch (order) {
    case AllocationOrder::kContiguous:
      return "contiguous";
    case AllocationOrder::kRandom:
      return "random";
  }
  return "invalid";
}

std::string_view pool_layout_name(PoolLayout layout) {
  switch (layout) {
    case PoolLayout::kPage:
      return "page";
    case PoolLayout::kLayer:
      return "layer";
  }
  return "invalid";
}

struct SyntheticPager::State {
  // Immutable after create().
  std::vector<std::unique_ptr<PoolMemory>> memory;  // one per region
  PagerLayout regions;

  // Guarded by mu.
  std::mutex mu;
  std::vector<SlotState> slot_state;
  std::vector<uint32_t> refcount;
  uint32_t n_free = 0;
  PageIndex free_hint = 0;  // no free slot below this index
  std::map<SeqId, LogicalSeq> seqs;
  std::set<SeqId> held;  // live sequences decode_step() skips
  uint32_t pause_depth = 0;
  AllocationOrder order = AllocationOrder::kContiguous;
  std::mt19937_64 order_rng;  // kRandom's generator

  // Decode thread. control_mu serializes start/stop; wake_mu guards stop.
  std::mutex control_mu;
  std::mutex wake_mu;
  std::condition_variable wake_cv;
  bool stop = false;
  std::thread decoder;
};

SyntheticPager::SyntheticPager(const CacheMeta& meta, PoolLayout layout,
                               uint32_t capacity)
    : meta_(meta),
      pool_layout_(layout),
      capacity_(capacity),
      state_(std::make_unique<State>()) {}

SyntheticPager::~SyntheticPager() { stop_decoding(); }

Result<std::unique_ptr<SyntheticPager>> SyntheticPager::create(
    const CacheMeta& meta, PoolLayout layout, uint32_t capacity_pages,
    PoolMemoryKind memory, int device) {
  KVMIG_RETURN_IF_ERROR(meta.validate());
  if (capacity_pages == 0) {
    return Status::invalid_argument("synthetic pager: capacity must be > 0");
  }
  if (layout != PoolLayout::kPage && layout != PoolLayout::kLayer) {
    return Status::invalid_argument("synthetic pager: unknown pool layout");
  }
  std::unique_ptr<SyntheticPager> pager(
      new SyntheticPager(meta, layout, capacity_pages));
  State& st = *pager->state_;

  const uint64_t chunk = layout == PoolLayout::kPage ? 2 * meta.page_bytes()
                                                     : meta.layer_chunk_bytes();
  const uint32_t n_regions =
      layout == PoolLayout::kPage ? 1 : 2 * meta.n_layers;
  const uint64_t len = chunk * capacity_pages;  // < 2^31 * 2^32: no overflow
  if (len > SIZE_MAX) {
    return Status::resource_exhausted("synthetic pager: pool too large");
  }
  for (uint32_t r = 0; r < n_regions; ++r) {
    KVMIG_ASSIGN_OR_RETURN(
        std::unique_ptr<PoolMemory> m,
        PoolMemory::create(memory, len, device, "synthetic pager"));
    st.regions.push_back(StridedRegion{m->base(), chunk, chunk, capacity_pages,
                                       m->kind(), m->device()});
    st.memory.push_back(std::move(m));
  }
  st.slot_state.assign(capacity_pages, SlotState::kFree);
  st.refcount.assign(capacity_pages, 0);
  st.n_free = capacity_pages;
  return pager;
}

namespace {

// Canonical-order access to a pool's page memory, through the memory's own
// copies (the engine's "kernels"). The caller holds the pager's mutex.
struct Pool {
  const CacheMeta& meta;
  const std::vector<std::unique_ptr<PoolMemory>>& memory;
  const PagerLayout& regions;

  // Which region holds canonical byte `offset` of page ix, and where in its
  // memory; [offset, offset + n) stays inside one region's chunk.
  std::pair<PoolMemory*, uint64_t> locate(PageIndex ix, uint64_t offset) const {
    uint64_t r = 0;
    if (regions.size() > 1) {
      r = offset / meta.layer_chunk_bytes();
      offset %= meta.layer_chunk_bytes();
    }
    return {memory[r].get(), uint64_t{ix} * regions[r].stride + offset};
  }
  Status read(PageIndex ix, uint64_t offset, std::span<std::byte> out) const {
    auto [m, at] = locate(ix, offset);
    return m->read(at, out);
  }
  Status write(PageIndex ix, uint64_t offset,
               std::span<const std::byte> in) const {
    auto [m, at] = locate(ix, offset);
    return m->write(at, in);
  }
  // Canonical offset of a token's bytes in layer l, K or V.
  uint64_t token_offset(uint64_t token_in_page, uint32_t layer,
                        bool is_v) const {
    return (is_v ? meta.page_bytes() : 0) +
           uint64_t{layer} * meta.layer_chunk_bytes() +
           token_in_page * meta.token_bytes_per_layer();
  }
  Status zero_page(PageIndex ix) const {
    const uint64_t chunk = meta.layer_chunk_bytes();
    for (uint64_t c = 0; c < 2ull * meta.n_layers; ++c) {
      auto [m, at] = locate(ix, c * chunk);
      KVMIG_RETURN_IF_ERROR(m->zero(at, chunk));
    }
    return Status();
  }
  Status write_token(PageIndex ix, uint64_t pos, uint64_t seed,
                     uint64_t owner) const {
    const uint64_t t = pos % meta.page_size_tokens;
    const uint64_t n = meta.token_bytes_per_layer();
    std::vector<std::byte> bytes(n);
    for (int kv = 0; kv < 2; ++kv) {
      for (uint32_t l = 0; l < meta.n_layers; ++l) {
        fill_token(bytes.data(), n, seed, owner, pos, l, kv == 1);
        KVMIG_RETURN_IF_ERROR(write(ix, token_offset(t, l, kv == 1), bytes));
      }
    }
    return Status();
  }
  Status copy_page(PageIndex from, PageIndex to) const {
    const uint64_t chunk = meta.layer_chunk_bytes();
    for (uint64_t c = 0; c < 2ull * meta.n_layers; ++c) {
      auto [m, src] = locate(from, c * chunk);
      auto [m2, dst] = locate(to, c * chunk);
      KVMIG_RETURN_IF_ERROR(m->copy(src, dst, chunk));
    }
    return Status();
  }
};

// Content seed of decode-appended tokens. It is the same in every pager, so a
// token appended to a request depends only on its seq id and position: a
// request decoded on the source and one decoded after migrating to another
// pager grow the same bytes.
constexpr uint64_t kDecodeSeed = 0x64656364;

}  // namespace

Status SyntheticPager::pause() {
  std::lock_guard lock(state_->mu);
  ++state_->pause_depth;
  return Status();
}

Status SyntheticPager::resume() {
  std::lock_guard lock(state_->mu);
  if (state_->pause_depth == 0) {
    return Status::failed_precondition("resume: pager is not paused");
  }
  --state_->pause_depth;
  return Status();
}

Result<std::vector<PageIndex>> SyntheticPager::occupied_pages() {
  std::lock_guard lock(state_->mu);
  std::vector<PageIndex> out;
  out.reserve(capacity_ - state_->n_free);
  for (PageIndex ix = 0; ix < capacity_; ++ix) {
    if (state_->slot_state[ix] != SlotState::kFree) out.push_back(ix);
  }
  return out;
}

Result<std::vector<LogicalSeq>> SyntheticPager::logical_seqs() {
  std::lock_guard lock(state_->mu);
  std::vector<LogicalSeq> out;
  out.reserve(state_->seqs.size());
  for (const auto& [id, seq] : state_->seqs) out.push_back(seq);
  return out;
}

Result<PageBytes> SyntheticPager::read_page(PageIndex ix) {
  std::lock_guard lock(state_->mu);
  if (ix >= capacity_) {
    return Status::out_of_range("read_page: index " + ix_str(ix) +
                                " out of range (capacity " +
                                std::to_string(capacity_) + ")");
  }
  if (state_->slot_state[ix] == SlotState::kFree) {
    return Status::failed_precondition("read_page: slot " + ix_str(ix) +
                                       " is free");
  }
  const Pool pool{meta_, state_->memory, state_->regions};
  const uint64_t pb = meta_.page_bytes();
  const uint64_t chunk = meta_.layer_chunk_bytes();
  PageBytes page;
  page.k.resize(pb);
  page.v.resize(pb);
  for (uint32_t l = 0; l < meta_.n_layers; ++l) {
    KVMIG_RETURN_IF_ERROR(
        pool.read(ix, l * chunk, std::span(page.k).subspan(l * chunk, chunk)));
    KVMIG_RETURN_IF_ERROR(pool.read(
        ix, pb + l * chunk, std::span(page.v).subspan(l * chunk, chunk)));
  }
  return page;
}

Result<std::vector<PageIndex>> SyntheticPager::allocate_pages(uint32_t n) {
  std::lock_guard lock(state_->mu);
  State& st = *state_;
  if (n > st.n_free) {
    return Status::resource_exhausted("allocate_pages: need " +
                                      std::to_string(n) + ", " +
                                      std::to_string(st.n_free) + " free");
  }
  std::vector<PageIndex> out;
  out.reserve(n);
  if (st.order == AllocationOrder::kRandom) {
    // A partial Fisher-Yates shuffle of the free slots: n distinct draws.
    std::vector<PageIndex> free_slots;
    free_slots.reserve(st.n_free);
    for (PageIndex ix = st.free_hint; ix < capacity_; ++ix) {
      if (st.slot_state[ix] == SlotState::kFree) free_slots.push_back(ix);
    }
    for (uint32_t i = 0; i < n; ++i) {
      std::uniform_int_distribution<size_t> pick(i, free_slots.size() - 1);
      std::swap(free_slots[i], free_slots[pick(st.order_rng)]);
      st.slot_state[free_slots[i]] = SlotState::kAllocated;
      out.push_back(free_slots[i]);
    }
    st.n_free -= n;
    // free_hint stays a lower bound: the slots below it are still not free.
    return out;
  }
  for (PageIndex ix = st.free_hint; out.size() < n && ix < capacity_; ++ix) {
    if (st.slot_state[ix] == SlotState::kFree) {
      st.slot_state[ix] = SlotState::kAllocated;
      out.push_back(ix);
    }
  }
  st.n_free -= n;
  if (!out.empty()) st.free_hint = out.back() + 1;
  return out;
}

void SyntheticPager::set_allocation_order(AllocationOrder order,
                                          uint64_t seed) {
  std::lock_guard lock(state_->mu);
  state_->order = order;
  state_->order_rng.seed(seed);
}

Status SyntheticPager::write_page(PageIndex ix, const PageBytes& page) {
  std::lock_guard lock(state_->mu);
  if (ix >= capacity_) {
    return Status::out_of_range("write_page: index " + ix_str(ix) +
                                " out of range (capacity " +
                                std::to_string(capacity_) + ")");
  }
  const uint64_t pb = meta_.page_bytes();
  if (page.k.size() != pb || page.v.size() != pb) {
    return Status::invalid_argument(
        "write_page: slot " + ix_str(ix) + ": k is " +
        std::to_string(page.k.size()) + " bytes and v is " +
        std::to_string(page.v.size()) + ", a page needs " + std::to_string(pb) +
        " each");
  }
  if (state_->slot_state[ix] == SlotState::kFree) {
    return Status::failed_precondition("write_page: slot " + ix_str(ix) +
                                       " is free");
  }
  const Pool pool{meta_, state_->memory, state_->regions};
  const uint64_t chunk = meta_.layer_chunk_bytes();
  for (uint32_t l = 0; l < meta_.n_layers; ++l) {
    KVMIG_RETURN_IF_ERROR(
        pool.write(ix, l * chunk, std::span(page.k).subspan(l * chunk, chunk)));
    KVMIG_RETURN_IF_ERROR(pool.write(
        ix, pb + l * chunk, std::span(page.v).subspan(l * chunk, chunk)));
  }
  return Status();
}

Status SyntheticPager::install_logical_seqs(
    const std::vector<LogicalSeq>& seqs) {
  std::lock_guard lock(state_->mu);
  State& st = *state_;
  std::set<SeqId> batch_ids;
  // The slots of the request being checked: a bit per pool slot, cleared
  // again after each request (a slot may be in several requests, never
  // twice in one).
  std::vector<bool> in_seq(capacity_, false);
  for (const LogicalSeq& seq : seqs) {
    auto where = [&] {
      return "install_logical_seqs: seq " + std::to_string(seq.seq_id);
    };
    if (st.seqs.count(seq.seq_id) != 0) {
      return Status::already_exists(where() + " is already live");
    }
    if (!batch_ids.insert(seq.seq_id).second) {
      return Status::invalid_argument(where() + " appears twice in the batch");
    }
    if (seq.n_tokens == 0) {
      return Status::invalid_argument(where() + " has no tokens");
    }
    if (seq.pages.size() != meta_.pages_for_tokens(seq.n_tokens)) {
      return Status::invalid_argument(
          where() + " has " + std::to_string(seq.pages.size()) + " pages, " +
          std::to_string(seq.n_tokens) + " tokens need " +
          std::to_string(meta_.pages_for_tokens(seq.n_tokens)));
    }
    Status bad;
    size_t checked = 0;
    for (PageIndex ix : seq.pages) {
      if (ix >= capacity_) {
        bad = Status::out_of_range(where() + ": page index " + ix_str(ix) +
                                   " out of range (capacity " +
                                   std::to_string(capacity_) + ")");
      } else if (st.slot_state[ix] == SlotState::kFree) {
        bad = Status::failed_precondition(where() + ": slot " + ix_str(ix) +
                                          " is free");
      } else if (in_seq[ix]) {
        bad = Status::invalid_argument(where() + ": slot " + ix_str(ix) +
                                       " appears twice");
      }
      if (!bad.ok()) break;
      in_seq[ix] = true;
      ++checked;
    }
    for (size_t i = 0; i < checked; ++i) in_seq[seq.pages[i]] = false;
    if (!bad.ok()) return bad;
  }
  for (const LogicalSeq& seq : seqs) {
    for (PageIndex ix : seq.pages) {
      st.slot_state[ix] = SlotState::kOwned;
      ++st.refcount[ix];
    }
    st.seqs.emplace(seq.seq_id, seq);
  }
  return Status();
}

std::optional<PagerLayout> SyntheticPager::layout() const {
  return state_->regions;
}

bool SyntheticPager::bookkeeping_never_waits() const {
  // The mutex is held longest by a decode step: in host memory one token's
  // K and V copied per request. On a (simulated) device the step runs the
  // device's copies, as a model's step would: not promised.
  return state_->regions.front().kind == MemoryKind::kHost;
}

namespace {

Status check_region(uint32_t region, size_t n_regions, std::string_view op) {
  if (region >= n_regions) {
    return Status::out_of_range(std::string(op) + ": region " +
                                std::to_string(region) + " of " +
                                std::to_string(n_regions));
  }
  return Status();
}

}  // namespace

// The regions' memory never moves and copies of disjoint ranges may run
// together: no lock (kvmig's copies touch only slots it was lent).
Status SyntheticPager::copy_from_device(uint32_t region, uint64_t offset,
                                        std::span<std::byte> out) {
  KVMIG_RETURN_IF_ERROR(
      check_region(region, state_->memory.size(), "copy_from_device"));
  return state_->memory[region]->read(offset, out);
}

Status SyntheticPager::copy_to_device(uint32_t region, uint64_t offset,
                                      std::span<const std::byte> in) {
  KVMIG_RETURN_IF_ERROR(
      check_region(region, state_->memory.size(), "copy_to_device"));
  return state_->memory[region]->write(offset, in);
}

Result<DmabufRegion> SyntheticPager::export_dmabuf(uint32_t region) {
  KVMIG_RETURN_IF_ERROR(
      check_region(region, state_->memory.size(), "export_dmabuf"));
  return state_->memory[region]->export_dmabuf();
}

Status SyntheticPager::release_pages(std::span<const PageIndex> ixs) {
  std::lock_guard lock(state_->mu);
  State& st = *state_;
  std::set<PageIndex> seen;
  for (PageIndex ix : ixs) {
    if (ix >= capacity_) {
      return Status::out_of_range("release_pages: index " + ix_str(ix) +
                                  " out of range (capacity " +
                                  std::to_string(capacity_) + ")");
    }
    if (st.slot_state[ix] == SlotState::kFree) {
      return Status::failed_precondition("release_pages: slot " + ix_str(ix) +
                                         " is free");
    }
    if (st.slot_state[ix] == SlotState::kOwned) {
      return Status::failed_precondition("release_pages: slot " + ix_str(ix) +
                                         " is owned by a sequence");
    }
    if (!seen.insert(ix).second) {
      return Status::invalid_argument("release_pages: slot " + ix_str(ix) +
                                      " appears twice");
    }
  }
  for (PageIndex ix : ixs) {
    st.slot_state[ix] = SlotState::kFree;
    st.free_hint = std::min(st.free_hint, ix);
  }
  st.n_free += static_cast<uint32_t>(ixs.size());
  return Status();
}

Status SyntheticPager::drop_logical_seqs(std::span<const SeqId> ids) {
  std::lock_guard lock(state_->mu);
  State& st = *state_;
  std::set<SeqId> seen;
  for (SeqId id : ids) {
    if (st.seqs.count(id) == 0) {
      return Status::not_found("drop_logical_seqs: seq " + std::to_string(id) +
                               " is not live");
    }
    if (!seen.insert(id).second) {
      return Status::invalid_argument("drop_logical_seqs: seq " +
                                      std::to_string(id) + " appears twice");
    }
  }
  for (SeqId id : ids) {
    auto it = st.seqs.find(id);
    for (PageIndex ix : it->second.pages) {
      if (--st.refcount[ix] == 0) {
        st.slot_state[ix] = SlotState::kFree;
        st.free_hint = std::min(st.free_hint, ix);
        ++st.n_free;
      }
    }
    st.seqs.erase(it);
    st.held.erase(id);
  }
  return Status();
}

namespace {

// NotFound naming the first id in ids that seqs does not hold.
template <typename Map>
Status all_live(const Map& seqs, std::span<const SeqId> ids,
                std::string_view what) {
  for (SeqId id : ids) {
    if (seqs.count(id) == 0) {
      return Status::not_found(std::string(what) + ": seq " +
                               std::to_string(id) + " is not live");
    }
  }
  return Status();
}

}  // namespace

Status SyntheticPager::hold_seqs(std::span<const SeqId> ids) {
  std::lock_guard lock(state_->mu);
  KVMIG_RETURN_IF_ERROR(all_live(state_->seqs, ids, "hold_seqs"));
  state_->held.insert(ids.begin(), ids.end());
  return Status();
}

Status SyntheticPager::try_hold_seqs(std::span<const SeqId> ids) {
  std::unique_lock lock(state_->mu, std::try_to_lock);
  if (!lock.owns_lock()) {
    return Status::unavailable("try_hold_seqs: a decode step is under way");
  }
  KVMIG_RETURN_IF_ERROR(all_live(state_->seqs, ids, "try_hold_seqs"));
  state_->held.insert(ids.begin(), ids.end());
  return Status();
}

Status SyntheticPager::unhold_seqs(std::span<const SeqId> ids) {
  std::lock_guard lock(state_->mu);
  KVMIG_RETURN_IF_ERROR(all_live(state_->seqs, ids, "unhold_seqs"));
  for (SeqId id : ids) state_->held.erase(id);
  return Status();
}

std::optional<PagerCapacity> SyntheticPager::capacity() const {
  std::lock_guard lock(state_->mu);
  return PagerCapacity{capacity_, state_->n_free};
}

Status SyntheticPager::populate(uint32_t n_seqs, uint64_t tokens, uint64_t seed,
                                uint64_t share_prefix_tokens) {
  if (n_seqs == 0) return Status();
  if (tokens == 0) {
    return Status::invalid_argument("populate: tokens must be > 0");
  }
  std::lock_guard lock(state_->mu);
  State& st = *state_;
  if (st.pause_depth > 0) {
    return Status::failed_precondition("populate: pager is paused");
  }
  const uint64_t ps = meta_.page_size_tokens;
  const uint64_t pages_per_seq = meta_.pages_for_tokens(tokens);
  const uint64_t shared = std::min(share_prefix_tokens / ps, tokens / ps);
  const uint64_t own_per_seq = pages_per_seq - shared;
  if (pages_per_seq > capacity_) {
    return Status::resource_exhausted(
        "populate: a request of " + std::to_string(tokens) + " tokens needs " +
        std::to_string(pages_per_seq) + " pages, capacity " +
        std::to_string(capacity_));
  }
  // own_per_seq <= capacity_ < 2^32 and n_seqs < 2^32: no overflow.
  const uint64_t need = shared + own_per_seq * n_seqs;
  if (need > st.n_free) {
    return Status::resource_exhausted("populate: need " + std::to_string(need) +
                                      " pages, " + std::to_string(st.n_free) +
                                      " free");
  }
  const SeqId first_id = st.seqs.empty() ? 1 : st.seqs.rbegin()->first + 1;
  if (first_id == 0 || first_id + n_seqs - 1 < first_id) {
    return Status::resource_exhausted("populate: sequence ids exhausted");
  }

  const Pool pool{meta_, st.memory, st.regions};
  std::vector<PageIndex> taken;  // given back if the pool fails
  auto take_slot = [&]() {
    PageIndex ix = st.free_hint;
    while (st.slot_state[ix] != SlotState::kFree) ++ix;
    st.slot_state[ix] = SlotState::kOwned;
    --st.n_free;
    st.free_hint = ix + 1;
    taken.push_back(ix);
    return ix;
  };
  auto fill = [&](PageIndex ix, uint64_t first, uint64_t end,
                  uint64_t owner) -> Status {
    KVMIG_RETURN_IF_ERROR(pool.zero_page(ix));
    for (uint64_t pos = first; pos < end; ++pos) {
      KVMIG_RETURN_IF_ERROR(pool.write_token(ix, pos, seed, owner));
    }
    return Status();
  };
  auto filled = [&]() -> Result<std::vector<LogicalSeq>> {
    std::vector<PageIndex> shared_pages;
    for (uint64_t p = 0; p < shared; ++p) {
      PageIndex ix = take_slot();
      KVMIG_RETURN_IF_ERROR(fill(ix, p * ps, (p + 1) * ps, /*owner=*/0));
      shared_pages.push_back(ix);
    }
    std::vector<LogicalSeq> out;
    for (uint32_t i = 0; i < n_seqs; ++i) {
      LogicalSeq seq{first_id + i, tokens, shared_pages};
      for (uint64_t p = shared; p < pages_per_seq; ++p) {
        PageIndex ix = take_slot();
        KVMIG_RETURN_IF_ERROR(
            fill(ix, p * ps, std::min((p + 1) * ps, tokens), seq.seq_id));
        seq.pages.push_back(ix);
      }
      out.push_back(std::move(seq));
    }
    return out;
  }();
  if (!filled.ok()) {
    for (PageIndex ix : taken) {
      st.slot_state[ix] = SlotState::kFree;
      ++st.n_free;
      st.free_hint = std::min(st.free_hint, ix);
    }
    return filled.status().with_context("populate");
  }
  for (LogicalSeq& seq : *filled) {
    for (size_t p = 0; p < seq.pages.size(); ++p) {
      st.refcount[seq.pages[p]] = p < shared ? n_seqs : 1;
    }
    st.seqs.emplace(seq.seq_id, std::move(seq));
  }
  return Status();
}

uint64_t SyntheticPager::decode_step() {
  std::lock_guard lock(state_->mu);
  State& st = *state_;
  if (st.pause_depth > 0) return 0;
  const Pool pool{meta_, st.memory, st.regions};
  const uint64_t ps = meta_.page_size_tokens;
  auto take_slot = [&]() -> std::optional<PageIndex> {
    if (st.n_free == 0) return std::nullopt;
    PageIndex ix = st.free_hint;
    while (st.slot_state[ix] != SlotState::kFree) ++ix;
    st.slot_state[ix] = SlotState::kOwned;
    st.refcount[ix] = 1;
    --st.n_free;
    st.free_hint = ix + 1;
    return ix;
  };
  auto give_back = [&](PageIndex ix) {
    st.slot_state[ix] = SlotState::kFree;
    st.refcount[ix] = 0;
    ++st.n_free;
    st.free_hint = std::min(st.free_hint, ix);
  };

  // A step the pool fails (a device error) leaves the request as it was
  // and ends the step: the next one tries again.
  uint64_t appended = 0;
  for (auto& [id, seq] : st.seqs) {
    if (st.held.count(id) != 0) continue;
    const uint64_t pos = seq.n_tokens;
    std::optional<PageIndex> fresh;  // a new tail page for this token
    if (pos % ps == 0) {
      fresh = take_slot();
      if (!fresh) continue;
      if (!pool.zero_page(*fresh).ok()) {
        give_back(*fresh);
        break;
      }
    } else if (st.refcount[seq.pages.back()] > 1) {
      // The tail page is shared: copy it before writing (copy on write).
      fresh = take_slot();
      if (!fresh) continue;
      if (!pool.copy_page(seq.pages.back(), *fresh).ok()) {
        give_back(*fresh);
        break;
      }
    }
    const PageIndex tail = fresh ? *fresh : seq.pages.back();
    if (!pool.write_token(tail, pos, kDecodeSeed, id).ok()) {
      if (fresh) give_back(*fresh);
      break;
    }
    if (fresh && pos % ps == 0) {
      seq.pages.push_back(*fresh);
    } else if (fresh) {
      --st.refcount[seq.pages.back()];
      seq.pages.back() = *fresh;
    }
    ++seq.n_tokens;
    ++appended;
  }
  return appended;
}

void SyntheticPager::start_decoding(double tokens_per_second) {
  std::lock_guard control(state_->control_mu);
  State& st = *state_;
  if (st.decoder.joinable()) {
    {
      std::lock_guard wake(st.wake_mu);
      st.stop = true;
    }
    st.wake_cv.notify_all();
    st.decoder.join();
  }
  if (!(tokens_per_second > 0)) return;
  {
    std::lock_guard wake(st.wake_mu);
    st.stop = false;
  }
  using Clock = std::chrono::steady_clock;
  const auto period = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(1.0 / tokens_per_second));
  st.decoder = std::thread([this, period] {
    State& s = *state_;
    auto next = Clock::now();
    std::unique_lock wake(s.wake_mu);
    while (!s.stop) {
      wake.unlock();
      decode_step();
      wake.lock();
      next += period;
      const auto now = Clock::now();
      // Behind by more than one period: skip the missed steps, no burst.
      if (next + period < now) next = now;
      s.wake_cv.wait_until(wake, next, [&] { return s.stop; });
    }
  });
}

void SyntheticPager::stop_decoding() { start_decoding(0); }

}  // namespace kvmig
