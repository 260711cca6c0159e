// SyntheticPager: an in-memory stand-in for an inference engine's paged KV
// cache, used by `kvmig serve`, the tests and the benchmarks.
#ifndef KVMIG_SRC_SYNTHETIC_PAGER_H_
#define KVMIG_SRC_SYNTHETIC_PAGER_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

#include "kvmig/pager.h"
#include "kvmig/status.h"
#include "kvmig/types.h"
#include "pool_memory.h"

namespace kvmig {

enum class PoolLayout : uint8_t {
  kPage,   // one region; page ix is 2 * page_bytes() contiguous bytes
  kLayer,  // 2 * n_layers tensors (K layers, then V layers), chunk each
};
Result<PoolLayout> parse_pool_layout(std::string_view name);  // page|layer
std::string_view pool_layout_name(PoolLayout layout);

// Which free slots allocate_pages() hands out.
enum class AllocationOrder : uint8_t {
  kContiguous,  // the lowest free indices, ascending: runs on a fresh pool
  kRandom,      // free slots drawn at random, in the order drawn
};
// contiguous|random
Result<AllocationOrder> parse_allocation_order(std::string_view name);
std::string_view allocation_order_name(AllocationOrder order);

// A page pool of fixed capacity with request bookkeeping, in host memory,
// on a simulated device or on a GPU (PoolMemory).
//
// Thread-safe: one mutex guards all state, so a decode step and a
// read_page() never interleave; pause() waits for a running decode step and
// blocks later ones until resume(). The engine's own accesses (decode,
// read_page, write_page) go through PoolMemory's copies; kvmig's go
// through the layout (host) or the device hooks (otherwise). Page memory
// stays at one address for the pager's lifetime (layout() is truthful).
// Host memory is page-aligned (mmap) and faulted in at creation (MAP_POPULATE),
// as an engine's pre-allocated KV pool is, so a migration measures the transfer
// and not first-touch faults (without it, a 560 MiB TCP migration ran at 0.33
// GB/s instead of 2.5).
//
// Slot states: free -> allocated (allocate_pages) -> owned by one or more
// sequences (install_logical_seqs, refcounted) -> free (drop_logical_seqs
// when the last owner goes, or release_pages for allocated slots).
// Allocation hands out the lowest free indices first, unless
// set_allocation_order() says otherwise.
class SyntheticPager final : public CachePager {
 public:
  // `memory`: where the pool lives (one allocation per layout region);
  // `device`: the GPU's ordinal for PoolMemoryKind::kCuda.
  static Result<std::unique_ptr<SyntheticPager>> create(
      const CacheMeta& meta, PoolLayout layout, uint32_t capacity_pages,
      PoolMemoryKind memory = PoolMemoryKind::kHost, int device = 0);
  ~SyntheticPager() override;

  // CachePager.
  CacheMeta meta() const override { return meta_; }
  Status pause() override;
  Status resume() override;
  Result<std::vector<PageIndex>> occupied_pages() override;
  Result<std::vector<LogicalSeq>> logical_seqs() override;
  Result<PageBytes> read_page(PageIndex ix) override;
  Result<std::vector<PageIndex>> allocate_pages(uint32_t n) override;
  Status write_page(PageIndex ix, const PageBytes& page) override;
  Status install_logical_seqs(const std::vector<LogicalSeq>& seqs) override;
  std::optional<PagerLayout> layout() const override;
  bool bookkeeping_never_waits() const override;
  Status release_pages(std::span<const PageIndex> ixs) override;
  Status drop_logical_seqs(std::span<const SeqId> ids) override;
  Status hold_seqs(std::span<const SeqId> ids) override;
  // Holds at once unless a decode step (or another call) has the state:
  // then Unavailable.
  Status try_hold_seqs(std::span<const SeqId> ids) override;
  Status unhold_seqs(std::span<const SeqId> ids) override;
  std::optional<PagerCapacity> capacity() const override;
  Status copy_from_device(uint32_t region, uint64_t offset,
                          std::span<std::byte> out) override;
  Status copy_to_device(uint32_t region, uint64_t offset,
                        std::span<const std::byte> in) override;
  Result<DmabufRegion> export_dmabuf(uint32_t region) override;

  // Creates n_seqs requests of `tokens` tokens each, with ids following the
  // largest live id (1, 2, ... on an empty pager), content drawn
  // deterministically from seed. The first floor(share_prefix_tokens /
  // page_size_tokens) pages are one set of pages shared by all of them (the
  // shared tokens have the same content in every request). All or nothing:
  // ResourceExhausted when the pages do not fit.
  Status populate(uint32_t n_seqs, uint64_t tokens, uint64_t seed,
                  uint64_t share_prefix_tokens = 0);

  // Appends one token to every live request that is not held (writes its K and
  // V into the tail page; allocates a new page when the tail is full; a request
  // that cannot get a page is skipped). Returns the number of tokens appended:
  // 0 while paused.
  uint64_t decode_step();

  // Runs decode_step() from a thread of its own at `tokens_per_second` steps
  // per second (each step appends one token to every request) until
  // stop_decoding() or destruction. 0 stops.
  void start_decoding(double tokens_per_second);
  void stop_decoding();

  // Sets the order in which allocate_pages() picks free slots from now on
  // (populate() and decode_step() keep taking the lowest). kRandom draws
  // from a generator seeded with seed: the same seed and the same sequence
  // of calls give the same slots. Allocation stays all or nothing.
  void set_allocation_order(AllocationOrder order, uint64_t seed = 0);

  PoolLayout pool_layout() const { return pool_layout_; }
  uint32_t capacity_pages() const { return capacity_; }

 private:
  SyntheticPager(const CacheMeta& meta, PoolLayout layout, uint32_t capacity);
  // ... implementation details are private to synthetic_pager.cc
  struct State;

  const CacheMeta meta_;
  const PoolLayout pool_layout_;
  const uint32_t capacity_;
  std::unique_ptr<State> state_;
};

}  // namespace kvmig

#endif  // KVMIG_SRC_SYNTHETIC_PAGER_H_
