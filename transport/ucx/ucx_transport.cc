// The ucx Transport: ties the core (ucx_core.cc), the two sides
// (ucx_target.cc, ucx_initiator.cc) and the kept-endpoint cache
// (ucx_kept.cc) together. The design notes are at the top of ucx_core.h.
#include "ucx_transport.h"

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ucx_core.h"
#include "ucx_kept.h"

namespace kvmig {
namespace ucx {
namespace {

// Thread-safe: registrations are guarded by the core's region mutex and
// made on its progress thread.
class UcxTransport final : public Transport {
 public:
  UcxTransport(TransportOptions opts, std::shared_ptr<UcxCore> core)
      : opts_(std::move(opts)),
        core_(std::move(core)),
        parking_(std::make_shared<Parking>(core_.get())) {}

  ~UcxTransport() override {
    parking_->clear();
    core_->clear_regions();
  }

  std::string_view name() const override { return "ucx"; }

  Status register_memory(std::span<std::byte> region) override {
    return core_->register_region(region);
  }

  // CUDA memory is registered as such (UCX then moves it with its CUDA
  // transports); a UCX built without them says so.
  Status register_device_memory(
      std::span<std::byte> region,
      std::shared_ptr<const DeviceMemory> device) override {
    if (!device || device->kind != MemoryKind::kCuda) {
      return Status::invalid_argument("ucx: device memory of an unknown kind");
    }
    KVMIG_ASSIGN_OR_RETURN(uint64_t types, core_->memory_types());
    if ((types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) == 0) {
      std::string have;
      for (int t = 0; t < UCS_MEMORY_TYPE_LAST; ++t) {
        if (types & UCS_BIT(t)) {
          have +=
              std::string(have.empty() ? "" : ", ") + ucs_memory_type_names[t];
        }
      }
      return Status::failed_precondition(
          std::string("this UCX build (") + ucp_get_version_string() +
          ") has no CUDA memory support (its memory types: " + have +
          "); use a UCX built with CUDA support, or tcp");
    }
    return core_->register_region(region, UCS_MEMORY_TYPE_CUDA);
  }

  Status deregister_memory(std::span<std::byte> region) override {
    return core_->deregister_region(region);
  }

  Result<std::unique_ptr<TransportInitiator>> create_initiator() override {
    return create_initiator_for("");
  }

  Result<std::unique_ptr<TransportInitiator>> create_initiator_for(
      std::string_view peer) override {
    return make_ucx_initiator(core_, parking_, opts_.max_in_flight,
                              std::string(peer));
  }

  // A kept connection that is ready is adopted with no trip to the
  // progress thread; anything else (a listener, a kept connection that is
  // gone) waits for it.
  Result<std::unique_ptr<TransportTarget>> open_target_at_once(
      std::span<const std::span<std::byte>> regions,
      std::span<const uint8_t> initiator_address,
      Deadline /*deadline: nothing here waits*/) override {
    KVMIG_ASSIGN_OR_RETURN(uint64_t token,
                           decode_initiator_address(initiator_address));
    if (token == 0) return std::unique_ptr<TransportTarget>();
    std::vector<ExportedRegion> exported;
    KVMIG_RETURN_IF_ERROR(export_regions(regions, exported));
    return adopt_ucx_target(core_, parking_, opts_.bind_host, exported, token);
  }

  Result<std::unique_ptr<TransportTarget>> open_target(
      std::span<const std::span<std::byte>> regions,
      std::span<const uint8_t> initiator_address,
      Deadline /*deadline: nothing here waits on the peer*/) override {
    KVMIG_ASSIGN_OR_RETURN(uint64_t token,
                           decode_initiator_address(initiator_address));
    std::vector<ExportedRegion> exported;
    KVMIG_RETURN_IF_ERROR(export_regions(regions, exported));
    return open_ucx_target(core_, parking_, opts_.bind_host,
                           std::move(exported), token);
  }

 private:
  // Each target region's base, length and registration; InvalidArgument
  // for a non-empty one outside registered memory.
  Status export_regions(std::span<const std::span<std::byte>> regions,
                        std::vector<ExportedRegion>& exported) const {
    Status bad;
    core_->with_regions([&](const RegionTable<Registration>& table) {
      for (size_t i = 0; i < regions.size() && bad.ok(); ++i) {
        ExportedRegion r;
        r.base = reinterpret_cast<uintptr_t>(regions[i].data());
        r.length = regions[i].size();
        if (!regions[i].empty()) {
          const auto* e = table.find(regions[i].data(), regions[i].size());
          if (e == nullptr) {
            bad = Status::invalid_argument(
                "ucx: target region " + std::to_string(i) + " (" +
                std::to_string(regions[i].size()) +
                " bytes) is not inside registered memory");
          } else {
            r.rkey = e->value.rkey;
          }
        }
        exported.push_back(r);
      }
    });
    return bad;
  }

  const TransportOptions opts_;
  const std::shared_ptr<UcxCore> core_;
  const std::shared_ptr<Parking> parking_;
};

}  // namespace
}  // namespace ucx

Result<std::unique_ptr<Transport>> make_ucx_transport(
    const TransportOptions& opts) {
  KVMIG_ASSIGN_OR_RETURN(auto core, ucx::UcxCore::start());
  return std::unique_ptr<Transport>(
      new ucx::UcxTransport(opts, std::move(core)));
}

}  // namespace kvmig
