#include "precopy.h"

#include <algorithm>
#include <set>
#include <unordered_map>
#include <unordered_set>

namespace kvmig {

int64_t PrecopyState::position_of(PageIndex page) const {
  const uint32_t pos = pos_of_.find(page);
  return pos == SlotPositions::kNone ? -1 : int64_t{pos};
}

PrecopyState::Round PrecopyState::plan(const std::vector<LogicalSeq>& current,
                                       const std::vector<SeqId>& moving,
                                       bool paused) const {
  Round r;
  std::unordered_map<SeqId, const LogicalSeq*> by_id;
  for (const LogicalSeq& s : current) by_id[s.seq_id] = &s;
  std::set<uint32_t> resend;
  for (SeqId id : moving) {
    auto it = by_id.find(id);
    if (it == by_id.end()) {
      r.dropped.push_back(id);
      continue;
    }
    const LogicalSeq& cur = *it->second;
    auto prev_it = tables_.find(id);
    const LogicalSeq* prev =
        prev_it == tables_.end() ? nullptr : &prev_it->second;
    if (prev && (cur.n_tokens < prev->n_tokens ||
                 cur.pages.size() < prev->pages.size() ||
                 !std::equal(prev->pages.begin(), prev->pages.end(),
                             cur.pages.begin()))) {
      r.dropped.push_back(id);
      continue;
    }
    for (size_t i = 0; i < cur.pages.size(); ++i) {
      PageIndex page = cur.pages[i];
      if (!paused && !page_full(cur, i)) continue;  // still being written
      const uint32_t pos = pos_of_.find(page);
      if (pos == SlotPositions::kNone) {
        r.new_pages.push_back(page);  // duplicates go below
        continue;
      }
      bool picked_up_anew = prev && i >= prev->pages.size();
      if (!full_[pos] || picked_up_anew) resend.insert(pos);
    }
  }
  r.resend.assign(resend.begin(), resend.end());
  // A page several requests share is new once, where first seen. Found in
  // a sorted copy: a hash set took a node allocation per page, for
  // duplicates most migrations do not have.
  std::vector<PageIndex> sorted = r.new_pages;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    std::unordered_set<PageIndex> seen;
    std::erase_if(r.new_pages,
                  [&](PageIndex page) { return !seen.insert(page).second; });
  }
  return r;
}

void PrecopyState::commit_round(const Round& r,
                                const std::vector<LogicalSeq>& current,
                                const std::vector<SeqId>& moving,
                                const std::vector<PageIndex>& new_slots) {
  for (size_t k = 0; k < r.new_pages.size(); ++k) {
    slots_.push_back(new_slots[k]);
    src_pages_.push_back(r.new_pages[k]);
    full_.push_back(true);
  }
  // Each page once: plan() left out pages sent before and duplicates.
  if (!r.new_pages.empty()) pos_of_ = SlotPositions(src_pages_);
  std::unordered_set<SeqId> keep(moving.begin(), moving.end());
  for (SeqId id : r.dropped) keep.erase(id);
  tables_.clear();
  for (const LogicalSeq& s : current) {
    if (keep.count(s.seq_id)) tables_[s.seq_id] = s;
  }
  // Fullness at this snapshot: a page counts as full only if every moving
  // request that holds it has it full.
  std::vector<bool> seen(full_.size(), false);
  for (const auto& [id, seq] : tables_) {
    for (size_t i = 0; i < seq.pages.size(); ++i) {
      const uint32_t pos = pos_of_.find(seq.pages[i]);
      if (pos == SlotPositions::kNone) continue;  // not sent yet (not full)
      bool full = page_full(seq, i);
      full_[pos] = seen[pos] ? (full_[pos] && full) : full;
      seen[pos] = true;
    }
  }
}

}  // namespace kvmig
