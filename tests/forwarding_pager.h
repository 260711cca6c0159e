// A CachePager that forwards every call to another one. Tests derive from it
// and override only the calls they change (hide the layout, corrupt a
// write, fail an install), the way leveldb's fault-injection Env wraps an
// Env. Thread-safe as the pager it wraps.
// bookkeeping_never_waits() is not forwarded (false): a wrapper may wait.
#ifndef KVMIG_TESTS_FORWARDING_PAGER_H_
#define KVMIG_TESTS_FORWARDING_PAGER_H_

#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "kvmig/pager.h"
#include "kvmig/status.h"

namespace kvmig::testing {

class ForwardingPager : public CachePager {
 public:
  // `inner` must outlive this pager.
  explicit ForwardingPager(CachePager& inner) : inner_(inner) {}

  CacheMeta meta() const override { return inner_.meta(); }
  Status pause() override { return inner_.pause(); }
  Status resume() override { return inner_.resume(); }
  Result<std::vector<PageIndex>> occupied_pages() override {
    return inner_.occupied_pages();
  }
  Result<std::vector<LogicalSeq>> logical_seqs() override {
    return inner_.logical_seqs();
  }
  Result<PageBytes> read_page(PageIndex ix) override {
    return inner_.read_page(ix);
  }
  Result<std::vector<PageIndex>> allocate_pages(uint32_t n) override {
    return inner_.allocate_pages(n);
  }
  Status write_page(PageIndex ix, const PageBytes& page) override {
    return inner_.write_page(ix, page);
  }
  Status install_logical_seqs(const std::vector<LogicalSeq>& seqs) override {
    return inner_.install_logical_seqs(seqs);
  }
  std::optional<PagerLayout> layout() const override { return inner_.layout(); }
  Status release_pages(std::span<const PageIndex> ixs) override {
    return inner_.release_pages(ixs);
  }
  Status drop_logical_seqs(std::span<const SeqId> ids) override {
    return inner_.drop_logical_seqs(ids);
  }
  Status hold_seqs(std::span<const SeqId> ids) override {
    return inner_.hold_seqs(ids);
  }
  Status try_hold_seqs(std::span<const SeqId> ids) override {
    return inner_.try_hold_seqs(ids);
  }
  Status unhold_seqs(std::span<const SeqId> ids) override {
    return inner_.unhold_seqs(ids);
  }
  std::optional<PagerCapacity> capacity() const override {
    return inner_.capacity();
  }

 private:
  CachePager& inner_;
};

// Reports the inner pager's requests plus `extra`, whatever its table (its
// pages need not fit its tokens): what a snapshot captured through it, or a
// migration from it, carries.
class ExtraSeqPager final : public ForwardingPager {
 public:
  ExtraSeqPager(CachePager& inner, LogicalSeq extra)
      : ForwardingPager(inner), extra_(std::move(extra)) {}
  Result<std::vector<LogicalSeq>> logical_seqs() override {
    KVMIG_ASSIGN_OR_RETURN(std::vector<LogicalSeq> seqs,
                           ForwardingPager::logical_seqs());
    seqs.push_back(extra_);
    return seqs;
  }

 private:
  const LogicalSeq extra_;
};

}  // namespace kvmig::testing

#endif  // KVMIG_TESTS_FORWARDING_PAGER_H_
