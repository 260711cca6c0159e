#include "planner.h"

#include <algorithm>
#include <string>

namespace kvmig {
namespace {

Status check_geometry(std::span<const RegionGeometry> regions,
                      uint64_t page_total_bytes, const char* side) {
  if (regions.empty()) {
    return Status::invalid_argument(std::string(side) + " layout is empty");
  }
  uint64_t total = 0;
  for (size_t i = 0; i < regions.size(); ++i) {
    const RegionGeometry& g = regions[i];
    if (g.chunk == 0 || (g.slots > 1 && g.chunk > g.stride)) {
      return Status::invalid_argument(
          std::string(side) + " region " + std::to_string(i) + ": chunk " +
          std::to_string(g.chunk) + ", stride " + std::to_string(g.stride));
    }
    if (g.slots > 0 && g.stride > (UINT64_MAX - g.chunk) / g.slots) {
      return Status::invalid_argument(std::string(side) + " region " +
                                      std::to_string(i) + " overflows");
    }
    total += g.chunk;
    if (total > page_total_bytes) break;
  }
  if (total != page_total_bytes) {
    return Status::invalid_argument(
        std::string(side) + " layout chunks add up to " +
        std::to_string(total) + " bytes, a page is " +
        std::to_string(page_total_bytes));
  }
  return Status();
}

}  // namespace

std::vector<RegionGeometry> geometry_of(const PagerLayout& layout) {
  std::vector<RegionGeometry> out;
  out.reserve(layout.size());
  for (const StridedRegion& r : layout) {
    out.push_back({r.stride, r.chunk, r.slots});
  }
  return out;
}

Result<std::vector<PlannedWrite>> plan_writes(
    std::span<const RegionGeometry> src, std::span<const RegionGeometry> dst,
    std::span<const PagePair> pairs, uint64_t page_total_bytes,
    uint64_t max_write_bytes) {
  KVMIG_RETURN_IF_ERROR(check_geometry(src, page_total_bytes, "source"));
  KVMIG_RETURN_IF_ERROR(check_geometry(dst, page_total_bytes, "destination"));

  // Every page is cut the same way: walk one page's canonical bytes once,
  // cutting wherever either side's chunk ends (offsets within the slot).
  std::vector<PlannedWrite> cuts;
  {
    size_t i = 0, j = 0;
    uint64_t in_src = 0, in_dst = 0;
    while (i < src.size() && j < dst.size()) {
      uint64_t len = std::min(src[i].chunk - in_src, dst[j].chunk - in_dst);
      cuts.push_back({static_cast<uint32_t>(i), in_src,
                      static_cast<uint32_t>(j), in_dst, len});
      in_src += len;
      in_dst += len;
      if (in_src == src[i].chunk) ++i, in_src = 0;
      if (in_dst == dst[j].chunk) ++j, in_dst = 0;
    }
  }
  // In source order: region by region, and in each, the pairs by source
  // slot (a chunk fits its stride, so that is source-offset order), each
  // pair's cuts in that region in walk order. Sorting the pairs, not the
  // pieces (a few per page and region), is the cheaper sort. One walk over
  // the pairs copies, range-checks and notes whether they need the sort.
  std::vector<PagePair> by_src;
  by_src.reserve(pairs.size());
  bool sorted = true;
  for (const PagePair& pair : pairs) {
    if (pair.src >= src[0].slots || pair.dst >= dst[0].slots) {
      return Status::invalid_argument(
          "page pair " + std::to_string(pair.src) + " -> " +
          std::to_string(pair.dst) + " out of range (source has " +
          std::to_string(src[0].slots) + " slots, destination " +
          std::to_string(dst[0].slots) + ")");
    }
    sorted &= by_src.empty() || by_src.back().src <= pair.src;
    by_src.push_back(pair);
  }
  if (!sorted) {
    std::sort(
        by_src.begin(), by_src.end(),
        [](const PagePair& a, const PagePair& b) { return a.src < b.src; });
  }
  std::vector<PlannedWrite> pieces;
  pieces.reserve(pairs.size() * cuts.size());
  for (size_t c0 = 0; c0 < cuts.size();) {
    size_t c1 = c0;  // [c0, c1): the cuts of source region cuts[c0]
    while (c1 < cuts.size() && cuts[c1].src_region == cuts[c0].src_region) {
      ++c1;
    }
    for (const PagePair& pair : by_src) {
      for (size_t c = c0; c < c1; ++c) {
        const PlannedWrite& cut = cuts[c];
        pieces.push_back(
            {cut.src_region,
             uint64_t{pair.src} * src[cut.src_region].stride + cut.src_offset,
             cut.dst_region,
             uint64_t{pair.dst} * dst[cut.dst_region].stride + cut.dst_offset,
             cut.length});
      }
    }
    c0 = c1;
  }
  // Merged in place: pieces[0, n) are the writes so far.
  size_t n = 0;
  bool too_long = false;
  for (const PlannedWrite& p : pieces) {
    if (n > 0) {
      PlannedWrite& last = pieces[n - 1];
      bool contiguous = last.src_region == p.src_region &&
                        last.src_offset + last.length == p.src_offset &&
                        last.dst_region == p.dst_region &&
                        last.dst_offset + last.length == p.dst_offset;
      bool fits =
          max_write_bytes == 0 || last.length + p.length <= max_write_bytes;
      if (contiguous && fits) {
        last.length += p.length;
        continue;
      }
    }
    pieces[n++] = p;
    too_long |= max_write_bytes != 0 && p.length > max_write_bytes;
  }
  pieces.resize(n);
  if (!too_long) return pieces;
  // A chunk longer than max_write_bytes on both sides: split it.
  std::vector<PlannedWrite> bounded;
  bounded.reserve(pieces.size());
  for (PlannedWrite w : pieces) {
    while (w.length > max_write_bytes) {
      PlannedWrite head = w;
      head.length = max_write_bytes;
      bounded.push_back(head);
      w.src_offset += max_write_bytes;
      w.dst_offset += max_write_bytes;
      w.length -= max_write_bytes;
    }
    bounded.push_back(w);
  }
  return bounded;
}

}  // namespace kvmig
