#include "staging.h"

#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#include <xxhash.h>

#include <cstring>
#include <string>
#include <vector>

#include "kvmig/digest.h"
#include "log.h"

namespace kvmig {

Result<std::unique_ptr<StagingBuffer>> StagingBuffer::create(
    Transport& transport, uint64_t slot_bytes, uint32_t slots) {
  if (slot_bytes == 0 || slots == 0) {
    return Status::invalid_argument("staging buffer: empty");
  }
  KVMIG_ASSIGN_OR_RETURN(
      MappedRegion memory,
      MappedRegion::create(slot_bytes * slots, false, "staging buffer"));
  Status reg = transport.register_memory(memory.span());
  if (!reg.ok()) return reg.with_context("staging buffer");
  return std::unique_ptr<StagingBuffer>(
      new StagingBuffer(transport, std::move(memory), slot_bytes, slots));
}

StagingBuffer::~StagingBuffer() {
  Status s = transport_.deregister_memory(memory_.span());
  if (!s.ok()) logger("engine")->error("staging buffer: {}", s.to_string());
}

void StagingBuffer::store(uint32_t i, const PageBytes& page) {
  std::byte* p = slot(i);
  std::memcpy(p, page.k.data(), page.k.size());
  std::memcpy(p + page.k.size(), page.v.data(), page.v.size());
}

PageBytes StagingBuffer::load(uint32_t i, uint64_t page_bytes) {
  const std::byte* p = slot(i);
  PageBytes page;
  page.k.assign(p, p + page_bytes);
  page.v.assign(p + page_bytes, p + 2 * page_bytes);
  return page;
}

Status page_in_layout(const PagerLayout& layout, PageIndex ix) {
  for (const StridedRegion& r : layout) {
    if (ix >= r.slots) {
      return Status::out_of_range("page " + std::to_string(ix) +
                                  " beyond the layout's " +
                                  std::to_string(r.slots) + " slots");
    }
  }
  return Status();
}

Status host_page_chunks(const PagerLayout& layout, PageIndex ix,
                        uint64_t page_bytes,
                        std::vector<std::span<uint8_t>>& chunks) {
  KVMIG_RETURN_IF_ERROR(page_in_layout(layout, ix));
  uint64_t total = 0;
  for (const StridedRegion& r : layout) total += r.chunk;
  if (page_bytes != total) {
    return Status::invalid_argument("a page through this layout is " +
                                    std::to_string(total) + " bytes, not " +
                                    std::to_string(page_bytes));
  }
  for (const StridedRegion& r : layout) {
    chunks.emplace_back(
        reinterpret_cast<uint8_t*>(r.base + uint64_t{ix} * r.stride), r.chunk);
  }
  return Status();
}

Result<uint64_t> pager_page_checksum(CachePager& pager,
                                     const std::optional<PagerLayout>& layout,
                                     PageIndex ix) {
  if (!layout) {
    KVMIG_ASSIGN_OR_RETURN(PageBytes page, pager.read_page(ix));
    return page_checksum(page);
  }
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  // Device memory is read through the pager into a buffer of this thread's,
  // one chunk at a time; kvmig never touches it.
  thread_local std::vector<std::byte> bounce;
  KVMIG_RETURN_IF_ERROR(page_in_layout(*layout, ix));
  for (uint32_t i = 0; i < layout->size(); ++i) {
    const StridedRegion& r = (*layout)[i];
    const uint64_t at = uint64_t{ix} * r.stride;
    if (r.kind == MemoryKind::kHost) {
      XXH3_64bits_update(&state, r.base + at, r.chunk);
      continue;
    }
    bounce.resize(r.chunk);
    KVMIG_RETURN_IF_ERROR(pager.copy_from_device(i, at, bounce));
    XXH3_64bits_update(&state, bounce.data(), r.chunk);
  }
  return XXH3_64bits_digest(&state);
}

}  // namespace kvmig
