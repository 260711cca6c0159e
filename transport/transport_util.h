// Helpers shared by the data planes: the table of registered regions and the
// bounds check every initiator runs before posting a batch of writes.
#ifndef KVMIG_TRANSPORT_TRANSPORT_UTIL_H_
#define KVMIG_TRANSPORT_TRANSPORT_UTIL_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvmig/status.h"
#include "kvmig/transport.h"
#include "random.h"  // random_token(), for the transports' tokens

namespace kvmig {

// Registered memory regions, each with a per-transport value (a memory
// handle, or nothing). Regions are non-empty and never overlap. Not
// thread-safe: the owning transport guards it with its mutex.
template <typename V>
class RegionTable {
 public:
  struct Entry {
    std::byte* base = nullptr;
    size_t size = 0;
    V value;
  };

  // InvalidArgument for an empty region or one that overlaps a registered
  // one.
  Status check_new(std::span<std::byte> region, std::string_view who) const {
    if (region.empty() || region.data() == nullptr) {
      return Status::invalid_argument(std::string(who) +
                                      ": cannot register an empty region");
    }
    const auto begin = reinterpret_cast<uintptr_t>(region.data());
    if (begin + region.size() < begin) {
      return Status::invalid_argument(std::string(who) +
                                      ": region wraps the address space");
    }
    auto next = entries_.lower_bound(begin);
    if (next != entries_.end() && next->first < begin + region.size()) {
      return overlap(who);
    }
    if (next != entries_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second.size > begin) return overlap(who);
    }
    return Status();
  }

  // Precondition: check_new(region) succeeded.
  void add(std::span<std::byte> region, V value) {
    entries_.emplace(reinterpret_cast<uintptr_t>(region.data()),
                     Entry{region.data(), region.size(), std::move(value)});
  }

  // Removes the region registered with exactly this base and size and
  // returns its value; NotFound otherwise.
  Result<V> remove(std::span<std::byte> region, std::string_view who) {
    auto it = entries_.find(reinterpret_cast<uintptr_t>(region.data()));
    if (it == entries_.end() || it->second.size != region.size()) {
      return Status::not_found(std::string(who) + ": region of " +
                               std::to_string(region.size()) +
                               " bytes is not registered");
    }
    V value = std::move(it->second.value);
    entries_.erase(it);
    return value;
  }

  // The registered region that contains [p, p + len), or nullptr.
  const Entry* find(const void* p, size_t len) const {
    const auto begin = reinterpret_cast<uintptr_t>(p);
    auto it = entries_.upper_bound(begin);
    if (it == entries_.begin()) return nullptr;
    --it;
    const Entry& e = it->second;
    const uintptr_t offset = begin - it->first;
    if (offset > e.size || len > e.size - offset) return nullptr;
    return &e;
  }

  bool empty() const { return entries_.empty(); }
  size_t size() const { return entries_.size(); }

  // Removes every entry, oldest address first, handing each to fn.
  template <typename Fn>
  void clear(Fn&& fn) {
    for (auto& [base, e] : entries_) fn(e);
    entries_.clear();
  }

 private:
  static Status overlap(std::string_view who) {
    return Status::invalid_argument(std::string(who) +
                                    ": region overlaps a registered region");
  }

  std::map<uintptr_t, Entry> entries_;
};

// Initiator connections kept after committed migrations, one per peer (the
// destination agent's control address), at most `max`: keeping a second
// one for a peer displaces the first, and past `max` the oldest goes. C is
// a nullable owning pointer (unique_ptr or shared_ptr). What is displaced
// is handed back for the caller to close, outside its lock. Not
// thread-safe: the owning transport's parking guards it.
template <typename C>
class KeptByPeer {
 public:
  explicit KeptByPeer(size_t max) : max_(max) {}

  [[nodiscard]] std::vector<C> put(const std::string& peer, C c) {
    std::vector<C> displaced;
    for (auto it = kept_.begin(); it != kept_.end();) {
      if (it->first == peer) {
        displaced.push_back(std::move(it->second));
        it = kept_.erase(it);
      } else {
        ++it;
      }
    }
    kept_.emplace_back(peer, std::move(c));
    if (kept_.size() > max_) {
      displaced.push_back(std::move(kept_.front().second));
      kept_.pop_front();
    }
    return displaced;
  }

  // The connection kept for peer, taken out; null if none. The caller
  // checks that it still works.
  C take(const std::string& peer) {
    for (auto it = kept_.begin(); it != kept_.end(); ++it) {
      if (it->first != peer) continue;
      C c = std::move(it->second);
      kept_.erase(it);
      return c;
    }
    return C();
  }

  [[nodiscard]] std::vector<C> take_all() {
    std::vector<C> all;
    for (auto& kept : kept_) all.push_back(std::move(kept.second));
    kept_.clear();
    return all;
  }

  size_t size() const { return kept_.size(); }

 private:
  const size_t max_;
  std::deque<std::pair<std::string, C>> kept_;  // oldest first
};

// InvalidArgument unless every op names an existing target region, stays
// inside it (without integer overflow) and has a source when non-empty.
// region_lengths[i] is the length of the target's region i.
inline Status check_write_ops(std::span<const WriteOp> ops,
                              std::span<const uint64_t> region_lengths,
                              std::string_view who) {
  for (size_t i = 0; i < ops.size(); ++i) {
    const WriteOp& op = ops[i];
    if (op.dst_region >= region_lengths.size()) {
      return Status::invalid_argument(
          std::string(who) + ": write op " + std::to_string(i) + ": region " +
          std::to_string(op.dst_region) + " but the target has " +
          std::to_string(region_lengths.size()));
    }
    const uint64_t len = region_lengths[op.dst_region];
    if (op.dst_offset > len || op.length > len - op.dst_offset) {
      return Status::invalid_argument(
          std::string(who) + ": write op " + std::to_string(i) + ": [" +
          std::to_string(op.dst_offset) + ", +" + std::to_string(op.length) +
          ") exceeds region " + std::to_string(op.dst_region) + " of " +
          std::to_string(len) + " bytes");
    }
    if (op.length > 0 && op.src == nullptr) {
      return Status::invalid_argument(std::string(who) + ": write op " +
                                      std::to_string(i) + ": null source");
    }
  }
  return Status();
}

// Ranges sorted by region and offset, with those that touch or overlap
// joined and empty ones dropped: what a target keeps of TransportTarget::
// allow(). A migration's slots come in the pager's order (random, for a
// fragmented pool), one range per slot and region; joined they are often a
// handful of ranges, kept and looked up at far less cost.
inline std::vector<WriteWindow> coalesce_windows(
    std::vector<WriteWindow> ranges) {
  std::erase_if(ranges, [](const WriteWindow& w) { return w.length == 0; });
  const auto before = [](const WriteWindow& a, const WriteWindow& b) {
    return a.region != b.region ? a.region < b.region : a.offset < b.offset;
  };
  if (!std::is_sorted(ranges.begin(), ranges.end(), before)) {
    std::sort(ranges.begin(), ranges.end(), before);
  }
  std::vector<WriteWindow> runs;
  for (const WriteWindow& w : ranges) {
    if (!runs.empty() && runs.back().region == w.region &&
        w.offset <= runs.back().offset + runs.back().length) {
      WriteWindow& last = runs.back();
      last.length = std::max(last.offset + last.length, w.offset + w.length) -
                    last.offset;
    } else {
      runs.push_back(w);
    }
  }
  return runs;
}

}  // namespace kvmig

#endif  // KVMIG_TRANSPORT_TRANSPORT_UTIL_H_
