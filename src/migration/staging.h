// Staging buffers and page access helpers for the data path.
#ifndef KVMIG_SRC_STAGING_H_
#define KVMIG_SRC_STAGING_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "kvmig/pager.h"
#include "kvmig/transport.h"
#include "mapped_region.h"
#include "region_geometry.h"

namespace kvmig {

// A page-aligned host buffer of `slots` page slots (K then V, contiguous),
// registered with one transport for its whole lifetime. Not thread-safe.
class StagingBuffer {
 public:
  static Result<std::unique_ptr<StagingBuffer>> create(Transport& transport,
                                                       uint64_t slot_bytes,
                                                       uint32_t slots);
  ~StagingBuffer();
  StagingBuffer(const StagingBuffer&) = delete;
  StagingBuffer& operator=(const StagingBuffer&) = delete;

  std::byte* slot(uint32_t i) {
    return memory_.data() + uint64_t{i} * slot_bytes_;
  }
  std::span<std::byte> memory() { return memory_.span(); }
  RegionGeometry geometry() const { return {slot_bytes_, slot_bytes_, slots_}; }
  uint32_t slots() const { return slots_; }

  // Copies a page into slot i (K then V) and back out.
  void store(uint32_t i, const PageBytes& page);
  PageBytes load(uint32_t i, uint64_t page_bytes);

 private:
  StagingBuffer(Transport& t, MappedRegion memory, uint64_t slot_bytes,
                uint32_t slots)
      : transport_(t),
        memory_(std::move(memory)),
        slot_bytes_(slot_bytes),
        slots_(slots) {}

  Transport& transport_;
  MappedRegion memory_;  // deregistered before it is unmapped
  uint64_t slot_bytes_;
  uint32_t slots_;
};

// OK when page ix lies inside every region of the layout; otherwise
// OutOfRange naming the page (a pager that named it broke its layout).
Status page_in_layout(const PagerLayout& layout, PageIndex ix);

// Appends to `chunks` where page ix's bytes lie in a layout whose regions
// are all host memory (MigrationContext::host_layout), in canonical order
// (each region's chunk, in layout order), once ix is checked against the
// layout and page_bytes against its chunks: the page is sent from there,
// or read into place, without a copy.
Status host_page_chunks(const PagerLayout& layout, PageIndex ix,
                        uint64_t page_bytes,
                        std::vector<std::span<uint8_t>>& chunks);

// XXH3-64 of page ix in canonical order (== page_checksum(read_page(ix))),
// read through the layout when there is one, else through read_page().
Result<uint64_t> pager_page_checksum(CachePager& pager,
                                     const std::optional<PagerLayout>& layout,
                                     PageIndex ix);

}  // namespace kvmig

#endif  // KVMIG_SRC_STAGING_H_
