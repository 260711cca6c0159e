#include "context.h"

#include <utility>

namespace kvmig {

MigrationContext::MigrationContext(CachePager& pager_in,
                                   AgentOptions options_in)
    : pager(pager_in), options(std::move(options_in)), log(logger("control")) {
  limits.max_pages = options.max_pages_per_migration;
  limits.max_seqs = options.max_seqs_per_migration;
}

MigrationContext::~MigrationContext() {
  // Nobody will ask for these any more; their requests stay held (or the
  // engine paused) rather than risk running in two places.
  for (const auto& d : in_doubt.entries()) {
    log->error(
        "stopping with migration {} to {} in doubt: its requests stay "
        "held ({})",
        d.migration_id, d.to, d.hold);
  }
}

Status MigrationContext::init() {
  layout = pager.layout();
  if (layout) {
    KVMIG_RETURN_IF_ERROR(validate_layout(pager.meta(), *layout)
                              .with_context("agent: pager layout"));
    for (const StridedRegion& r : *layout) {
      pager_regions.emplace_back(r.base, r.span_bytes());
    }
  }
  TransportOptions topts = options.transport_options;
  if (topts.bind_host.empty()) topts.bind_host = options.listen_host;
  for (const std::string& name : options.transports) {
    if (transports.count(name)) continue;
    KVMIG_ASSIGN_OR_RETURN(auto transport, make_transport(name, topts));
    for (auto region : pager_regions) {
      KVMIG_RETURN_IF_ERROR(transport->register_memory(region).with_context(
          "agent: registering pager memory with " + name));
    }
    transports.emplace(name, std::move(transport));
  }
  return Status();
}

void MigrationContext::fault(std::string_view point) const {
  if (options.fault_hook) options.fault_hook(point);
}

std::string MigrationContext::transport_names(
    std::string_view separator) const {
  std::string out;
  for (const auto& [n, t] : transports) {
    if (!out.empty()) out += separator;
    out += n;
  }
  return out;
}

Result<Transport*> MigrationContext::transport_named(std::string_view name) {
  auto it = transports.find(name);
  if (it != transports.end()) return it->second.get();
  return Status::failed_precondition("transport '" + std::string(name) +
                                     "' is not enabled on this agent "
                                     "(enabled: " +
                                     transport_names(",") +
                                     "; see serve --transports)");
}

Transport* MigrationContext::first_transport_of(
    const std::vector<std::string>& names) {
  for (const std::string& name : names) {
    auto it = transports.find(name);
    if (it != transports.end()) return it->second.get();
  }
  return nullptr;
}

}  // namespace kvmig
