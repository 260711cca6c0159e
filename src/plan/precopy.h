// Pre-copy bookkeeping: which pages a round must send, given what earlier
// rounds copied. Pure logic over page tables; not thread-safe (one
// migration's coroutine owns it).
//
// KV pages are append-only: a page that is full never changes while the
// same request keeps it. So a round that runs while the engine decodes sends
// only pages that are full at its snapshot: pages no earlier round sent (new
// slots at the destination), and pages a request picked up anew (a freed
// page reused) into the slots they already have. A page that is not full is
// being written by the engine: it waits for the final round, which runs
// paused and sends everything still unsent. No page is read while the engine
// may write it.
#ifndef KVMIG_SRC_PRECOPY_H_
#define KVMIG_SRC_PRECOPY_H_

#include <cstdint>
#include <map>
#include <vector>

#include "kvmig/types.h"
#include "slot_positions.h"

namespace kvmig {

class PrecopyState {
 public:
  explicit PrecopyState(uint32_t page_size_tokens)
      : page_size_(page_size_tokens) {}

  // What the next round must do.
  struct Round {
    std::vector<PageIndex> new_pages;  // need new slots, in this order
    std::vector<uint32_t> resend;      // slot positions to copy again
    std::vector<SeqId> dropped;        // requests that no longer extend
                                       // what was copied (or are gone)
    size_t pages() const { return new_pages.size() + resend.size(); }
  };

  // Compares the current page tables (`current`, every live request) with
  // what was copied for `moving`. `paused`: the engine is paused, so pages
  // that are not full go too. Does not change the state.
  Round plan(const std::vector<LogicalSeq>& current,
             const std::vector<SeqId>& moving, bool paused) const;

  // Records that round `r`, planned from `current` for `moving`, was
  // copied: new pages got `new_slots` (same order as r.new_pages); dropped
  // requests leave the migration; remembers each page's fullness at this
  // snapshot.
  void commit_round(const Round& r, const std::vector<LogicalSeq>& current,
                    const std::vector<SeqId>& moving,
                    const std::vector<PageIndex>& new_slots);

  // Requests still moving, ascending, with their page tables as copied.
  const std::map<SeqId, LogicalSeq>& tables() const { return tables_; }
  uint32_t positions() const { return static_cast<uint32_t>(slots_.size()); }
  PageIndex slot_at(uint32_t pos) const { return slots_[pos]; }
  PageIndex source_page_at(uint32_t pos) const { return src_pages_[pos]; }
  // Position of a source page; -1 when never sent.
  int64_t position_of(PageIndex page) const;

 private:
  // Whether the page at index i of seq is full at this snapshot.
  bool page_full(const LogicalSeq& seq, size_t i) const {
    return (uint64_t{i} + 1) * page_size_ <= seq.n_tokens;
  }

  uint32_t page_size_;
  std::map<SeqId, LogicalSeq> tables_;
  // Position of each sent page, rebuilt each round over src_pages_: one
  // load a lookup where the pages are dense in the pool (a hash map took
  // 0.15-0.2 ms of a 4096-page migration's offer phase).
  SlotPositions pos_of_;
  std::vector<PageIndex> slots_;      // position -> destination slot
  std::vector<PageIndex> src_pages_;  // position -> source page
  std::vector<bool> full_;            // position -> full when last sent
};

}  // namespace kvmig

#endif  // KVMIG_SRC_PRECOPY_H_
