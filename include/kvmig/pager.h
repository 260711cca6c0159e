// CachePager: the only thing an inference engine implements to let kvmig
// move its requests. It mirrors the seed's interface (nine methods) and adds
// optional extensions with safe defaults.
#ifndef KVMIG_PAGER_H_
#define KVMIG_PAGER_H_

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "kvmig/status.h"
#include "kvmig/types.h"

namespace kvmig {

// Capacity figures a pager may report (for `status`).
struct PagerCapacity {
  uint64_t capacity_pages = 0;
  uint64_t free_pages = 0;
};

// A paged KV cache as kvmig sees it.
//
// Thread safety: implementations must be thread-safe. kvmig calls a pager
// from its data threads (two per agent), possibly concurrently, while the
// engine runs its own work (decode) on the same pager; never from the
// agent's control thread, so a method that blocks (waiting for the engine's
// step, say) delays only the migration or status call that made it, not
// the agent's other connections and timers. Exceptions: meta() and
// layout(), which must not block, are also called on the control thread
// and when the Agent is created, and so is the bookkeeping of a pager that
// says it never waits (bookkeeping_never_waits()). A pager method must not call
// back into its own Agent: such a call fails with FailedPrecondition.
//
// Between a successful pause() and the matching resume(), the bytes of every
// page that belongs to a sequence must not change: kvmig reads them directly
// through layout() while paused.
//
// Errors: every method returns a clear Status for bad use (an index out of
// range, a free page, a buffer of the wrong size, no room) and leaves the
// pager as it was.
class CachePager {
 public:
  virtual ~CachePager() = default;

  // The cache's shape. Constant for the pager's lifetime.
  virtual CacheMeta meta() const = 0;

  // Stops the engine from changing any page or sequence until resume(). When
  // pause() returns, no change is in progress. Pauses nest: each pause() is
  // undone by one resume().
  virtual Status pause() = 0;
  // Undoes one pause(). FailedPrecondition when not paused.
  virtual Status resume() = 0;

  // Every page slot that is not free (owned by a sequence or allocated and
  // not yet installed), ascending.
  virtual Result<std::vector<PageIndex>> occupied_pages() = 0;

  // Every live sequence's page table, ascending by seq_id.
  virtual Result<std::vector<LogicalSeq>> logical_seqs() = 0;

  // A copy of page ix in canonical byte order. OutOfRange for an index past
  // capacity, FailedPrecondition for a free slot.
  virtual Result<PageBytes> read_page(PageIndex ix) = 0;

  // Reserves n free slots for writing, all or nothing: ResourceExhausted
  // (nothing reserved) when fewer than n are free. Reserved slots belong to
  // no sequence until install_logical_seqs() names them.
  virtual Result<std::vector<PageIndex>> allocate_pages(uint32_t n) = 0;

  // Overwrites slot ix (allocated or owned) with page. InvalidArgument when
  // page.k or page.v is not page_bytes() long; FailedPrecondition for a free
  // slot; OutOfRange past capacity.
  virtual Status write_page(PageIndex ix, const PageBytes& page) = 0;

  // Adds sequences whose pages are allocated (or already owned, for shared
  // pages) slots. All or nothing: AlreadyExists for a seq_id that is live,
  // FailedPrecondition for a page that is free, InvalidArgument when
  // pages.size() does not match n_tokens.
  virtual Status install_logical_seqs(const std::vector<LogicalSeq>& seqs) = 0;

  // --- Optional extensions -------------------------------------------------

  // Where the pages live in memory, for zero-copy transfers. The regions stay
  // valid and at the same address for the pager's lifetime. nullopt: pages
  // go through read_page/write_page and a bounded staging buffer.
  virtual std::optional<PagerLayout> layout() const { return std::nullopt; }

  // Frees slots that allocate_pages() reserved and no sequence owns (a
  // migration that failed before install). All or nothing.
  virtual Status release_pages(std::span<const PageIndex> ixs) {
    (void)ixs;
    return Status::unimplemented("pager does not support release_pages");
  }

  // Forgets sequences (after they moved away); a page no remaining sequence
  // owns becomes free. All or nothing: NotFound for an id that is not live.
  virtual Status drop_logical_seqs(std::span<const SeqId> ids) {
    (void)ids;
    return Status::unimplemented("pager does not support drop_logical_seqs");
  }

  // Keeps the engine from running the sequences ids (no decode step, no
  // change to their pages or tables) until unhold_seqs(), while the rest of
  // the engine runs; a held sequence can still be read, dropped and
  // released. Like pause(), it returns only once a step in progress that
  // touches ids has ended. kvmig holds the requests a migration moves
  // while it copies them (stop-and-copy, and a live migration's last
  // round), so that the rest of the engine keeps decoding, and the
  // requests of a move whose outcome it cannot learn yet (in doubt,
  // DESIGN.md): they may already live at the destination, so they must not
  // run here until the outcome is known. All or nothing: NotFound for an id
  // that is not live. Holding a held sequence is a no-op. Without it
  // (Unimplemented) kvmig pauses the whole engine instead.
  virtual Status hold_seqs(std::span<const SeqId> ids) {
    (void)ids;
    return Status::unimplemented("pager does not support hold_seqs");
  }
  // hold_seqs() that never waits: holds ids and returns OK when it can at
  // once (no step in progress touches them: a prefill engine's finished
  // request, handed to a decode engine), else returns Unavailable and holds
  // nothing. kvmig calls it on its control thread, before it sends the
  // hold_seqs() job to a data thread, and only when bookkeeping_never_waits():
  // held at once, a migration saves that trip's two thread hand-offs (a
  // quarter of a 1-page migration's fixed cost, docs/performance.md). So it
  // returns within microseconds, like that bookkeeping: a try-lock, never a
  // wait for a step. Any answer but OK (Unavailable, NotFound, an error) holds
  // nothing, and kvmig then calls hold_seqs(), whose answer decides. Default
  // Unimplemented: kvmig calls hold_seqs() on a data thread.
  virtual Status try_hold_seqs(std::span<const SeqId> ids) {
    (void)ids;
    return Status::unimplemented("pager does not support try_hold_seqs");
  }
  // Lets held sequences run again. All or nothing: NotFound for an id that
  // is not live; an id that is live and not held is a no-op.
  virtual Status unhold_seqs(std::span<const SeqId> ids) {
    (void)ids;
    return Status::unimplemented("pager does not support unhold_seqs");
  }

  // True when this pager's bookkeeping never waits: logical_seqs(),
  // allocate_pages(), release_pages(), install_logical_seqs(),
  // drop_logical_seqs(), unhold_seqs() and resume() return within
  // microseconds, never waiting for an engine step that runs a model, a
  // lock held across one, or an interpreter's lock (so not a Python pager).
  // kvmig may then make those calls on its control thread instead of a data
  // thread, which saves each of them a trip's two thread hand-offs (20-60 us
  // each on a VM: a quarter of a small migration's fixed cost,
  // docs/performance.md). The price: while such a call runs, the agent's
  // other connections and timers wait. pause(), hold_seqs() and every page
  // access (read_page, write_page, the device copies) stay on the data threads,
  // but for a try_hold_seqs() that holds at once. Default false. Constant for
  // the pager's lifetime; a pager that wraps another does not inherit it (the
  // wrapper may wait).
  virtual bool bookkeeping_never_waits() const { return false; }

  // --- Device memory --------------------------------------------------------
  // For layout regions whose kind is not MemoryKind::kHost (a GPU's memory).
  // kvmig never dereferences such a region: every byte it reads or writes
  // there (a tcp transfer, a checksum) goes through these copies, through
  // bounded host buffers of its own. Offsets count from the region's base,
  // the range stays inside its span_bytes(); `region` is the index in
  // layout(). They may be called from several kvmig threads at once, on
  // disjoint ranges, while the engine runs; like every page access they
  // touch only slots kvmig was lent (paused or held requests, allocated
  // slots). Defaults: Unimplemented, which makes a non-host region
  // unusable (kvmig refuses such a layout at agent start with that
  // reason): a pager whose layout is host memory needs none of them.

  // Copies out.size() bytes from byte `offset` of region `region` into out.
  virtual Status copy_from_device(uint32_t region, uint64_t offset,
                                  std::span<std::byte> out) {
    (void)region;
    (void)offset;
    (void)out;
    return Status::unimplemented("pager does not support copy_from_device");
  }
  // Copies in into region `region` from byte `offset` on.
  virtual Status copy_to_device(uint32_t region, uint64_t offset,
                                std::span<const std::byte> in) {
    (void)region;
    (void)offset;
    (void)in;
    return Status::unimplemented("pager does not support copy_to_device");
  }
  // Optional: a dmabuf behind region `region`, for RDMA straight into
  // device memory (verbs registers it with ibv_reg_dmabuf_mr). Without it,
  // verbs cannot reach that region and says so.
  virtual Result<DmabufRegion> export_dmabuf(uint32_t region) {
    (void)region;
    return Status::unimplemented("pager does not export dmabufs");
  }

  // Capacity and free slots, if the pager knows them.
  virtual std::optional<PagerCapacity> capacity() const { return std::nullopt; }
};

}  // namespace kvmig

#endif  // KVMIG_PAGER_H_
