#include "perf_messages.h"

#include <string>

namespace kvmig {

std::vector<uint8_t> encode(const PerfSetupMsg& m) {
  ByteWriter w;
  put_meta(w, m.meta);
  w.put(static_cast<uint8_t>(m.layout));
  w.put(m.capacity_pages);
  w.put(static_cast<uint8_t>(m.order));
  w.put(m.seed);
  w.put(static_cast<uint8_t>(m.memory));
  return w.take();
}

Result<PerfSetupMsg> decode_perf_setup(std::span<const uint8_t> p,
                                       const WireLimits& l) {
  return decode_all<PerfSetupMsg>(
      p, "PERF_SETUP", [&](ByteReader& r) -> Result<PerfSetupMsg> {
        PerfSetupMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.meta, get_meta(r));
        KVMIG_ASSIGN_OR_RETURN(uint8_t layout, r.get<uint8_t>("perf layout"));
        if (layout > static_cast<uint8_t>(PoolLayout::kLayer)) {
          return Status::data_loss("perf layout out of range");
        }
        m.layout = static_cast<PoolLayout>(layout);
        KVMIG_ASSIGN_OR_RETURN(m.capacity_pages,
                               r.get<uint32_t>("perf capacity"));
        if (m.capacity_pages == 0 || m.capacity_pages > l.max_pages) {
          return Status::resource_exhausted(
              "perf capacity " + std::to_string(m.capacity_pages) +
              " pages: must be 1 to " + std::to_string(l.max_pages));
        }
        KVMIG_ASSIGN_OR_RETURN(uint8_t order, r.get<uint8_t>("perf order"));
        if (order > static_cast<uint8_t>(AllocationOrder::kRandom)) {
          return Status::data_loss("perf allocation order out of range");
        }
        m.order = static_cast<AllocationOrder>(order);
        KVMIG_ASSIGN_OR_RETURN(m.seed, r.get<uint64_t>("perf seed"));
        KVMIG_ASSIGN_OR_RETURN(uint8_t memory, r.get<uint8_t>("perf memory"));
        if (memory > static_cast<uint8_t>(PoolMemoryKind::kCuda)) {
          return Status::data_loss("perf memory kind out of range");
        }
        m.memory = static_cast<PoolMemoryKind>(memory);
        return m;
      });
}

std::vector<uint8_t> encode(const PerfReadyMsg& m) {
  ByteWriter w;
  w.put_string(m.address);
  w.put(m.free_pages);
  return w.take();
}

Result<PerfReadyMsg> decode_perf_ready(std::span<const uint8_t> p,
                                       const WireLimits& l) {
  return decode_all<PerfReadyMsg>(
      p, "PERF_READY", [&](ByteReader& r) -> Result<PerfReadyMsg> {
        PerfReadyMsg m;
        KVMIG_ASSIGN_OR_RETURN(m.address,
                               r.get_string(l.max_string, "perf address"));
        if (m.address.empty()) return Status::data_loss("empty perf address");
        KVMIG_ASSIGN_OR_RETURN(m.free_pages, r.get<uint32_t>("perf free"));
        return m;
      });
}

}  // namespace kvmig
