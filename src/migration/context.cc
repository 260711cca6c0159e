#include "context.h"

#include <algorithm>
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

asio::awaitable<bool> MigrationContext::wait_source_end(const std::string& id,
                                                        Deadline deadline) {
  auto timer = std::make_shared<asio::steady_timer>(io);
  timer->expires_at(deadline);
  auto it = end_waiters.emplace(id, timer);
  while (active.count({id, true}) && Clock::now() < deadline) {
    boost::system::error_code ec;
    co_await timer->async_wait(asio::redirect_error(asio::use_awaitable, ec));
  }
  end_waiters.erase(it);
  co_return !active.count({id, true});
}

void MigrationContext::source_ended(const std::string& id) {
  auto [first, last] = end_waiters.equal_range(id);
  for (auto it = first; it != last; ++it) it->second->cancel();
}

namespace {

// The memory to register for a layout: its regions' spans, with overlapping
// and touching ones merged. Regions interleave when K and V of a layer share
// a tensor (FlashInfer's (num_blocks, 2, ...), per-layer views of a
// page-major pool); a transport registers each byte once and finds a
// region's registration as the span containing it.
std::vector<std::span<std::byte>> registered_spans(
    std::vector<std::span<std::byte>> regions) {
  std::sort(regions.begin(), regions.end(),
            [](auto a, auto b) { return a.data() < b.data(); });
  std::vector<std::span<std::byte>> out;
  for (auto r : regions) {
    if (!out.empty() && r.data() <= out.back().data() + out.back().size()) {
      std::byte* begin = out.back().data();
      std::byte* end =
          std::max(out.back().data() + out.back().size(), r.data() + r.size());
      out.back() = {begin, static_cast<size_t>(end - begin)};
    } else {
      out.push_back(r);
    }
  }
  return out;
}

}  // namespace

Status MigrationContext::init() {
  // Over a pager that already holds requests, an outcome this agent does
  // not remember may still have been installed (by an earlier agent).
  auto held = pager.logical_seqs();
  dst_records.set_started_with_requests(!held.ok() || !held->empty());
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
    for (auto region : registered_spans(pager_regions)) {
      KVMIG_RETURN_IF_ERROR(transport->register_memory(region).with_context(
          "agent: registering pager memory with " + name));
    }
    transports.emplace(name, std::move(transport));
  }
  return Status();
}

Status MigrationContext::refuse_during_snapshot(
    std::string_view direction) const {
  if (snapshot.empty()) return Status();
  return Status::failed_precondition(
      "a snapshot of this agent is under way (" + snapshot + "): migrations " +
      std::string(direction) + " it are refused until it ends");
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
