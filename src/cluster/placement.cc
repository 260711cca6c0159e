#include "placement.h"

#include <algorithm>
#include <numeric>
#include <queue>
#include <unordered_set>

namespace kvmig {

std::vector<MoveUnit> move_units(const AgentStatus& st, int64_t settle_ms) {
  std::unordered_set<SeqId> held;
  for (const auto& d : st.in_doubt) held.insert(d.seqs.begin(), d.seqs.end());
  for (const SeqStatus& s : st.seqs) {
    if (s.arrived_ms_ago >= 0 && s.arrived_ms_ago < settle_ms)
      held.insert(s.id);
  }
  std::unordered_set<SeqId> grouped;
  std::vector<MoveUnit> units;
  for (const auto& g : st.shared_groups) {
    grouped.insert(g.seqs.begin(), g.seqs.end());
    const bool any_held = std::any_of(g.seqs.begin(), g.seqs.end(),
                                      [&](SeqId id) { return held.count(id); });
    if (!any_held) units.push_back({g.seqs, g.pages});
  }
  for (const SeqStatus& s : st.seqs) {
    if (grouped.count(s.id) || held.count(s.id)) continue;
    units.push_back({{s.id}, s.pages});
  }
  return units;
}

std::vector<std::optional<size_t>> plan_drain(
    const std::vector<MoveUnit>& units, std::vector<uint64_t> free_pages) {
  std::vector<std::optional<size_t>> placed(units.size());
  std::vector<size_t> order(units.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return units[a].pages > units[b].pages;
  });
  // Targets by free pages, most first. A unit that does not fit the target
  // with the most room fits none.
  auto less_free = [&](size_t a, size_t b) {
    return free_pages[a] < free_pages[b] ||
           (free_pages[a] == free_pages[b] && a > b);
  };
  std::priority_queue<size_t, std::vector<size_t>, decltype(less_free)> heap(
      less_free);
  for (size_t t = 0; t < free_pages.size(); ++t) heap.push(t);
  for (size_t u : order) {
    if (heap.empty()) break;
    const size_t t = heap.top();
    if (free_pages[t] < units[u].pages) continue;
    heap.pop();
    free_pages[t] -= units[u].pages;
    placed[u] = t;
    heap.push(t);
  }
  return placed;
}

double LoadSide::load() const {
  return capacity_pages == 0 ? 1.0
                             : static_cast<double>(used_pages) /
                                   static_cast<double>(capacity_pages);
}

std::vector<size_t> plan_rebalance(const std::vector<MoveUnit>& units,
                                   LoadSide from, LoadSide to, uint64_t to_free,
                                   double threshold) {
  std::vector<size_t> order(units.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return units[a].pages < units[b].pages;
  });
  std::vector<size_t> chosen;
  uint64_t moved = 0;
  for (size_t u : order) {
    if (from.load() - to.load() <= threshold) break;
    const uint64_t p = units[u].pages;
    if (p == 0 || moved + p > to_free || p > from.used_pages) break;
    const LoadSide f{from.used_pages - p, from.capacity_pages};
    const LoadSide t{to.used_pages + p, to.capacity_pages};
    if (f.load() < t.load()) break;  // would flip: never move back and forth
    chosen.push_back(u);
    moved += p;
    from = f;
    to = t;
  }
  return chosen;
}

}  // namespace kvmig
