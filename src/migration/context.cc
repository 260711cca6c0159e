#include "context.h"

#include <algorithm>
#include <array>
#include <utility>

namespace kvmig {

MigrationContext::MigrationContext(CachePager& pager_in,
                                   AgentOptions options_in)
    : pager(pager_in),
      options(std::move(options_in)),
      log(logger("control")),
      kept_channels(io, options.max_migrations, options.kept_connection_idle) {
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

asio::awaitable<void> MigrationContext::run_after_reply() {
  while (!after_reply.empty()) {
    asio::awaitable<void> next = std::move(after_reply.front());
    after_reply.pop_front();
    co_await std::move(next);
  }
}

namespace {

// The memory to register for a layout: its regions' spans, merged where
// they overlap and, with merge_touching (host memory), where they touch.
// Regions interleave when K and V of a layer share a tensor (FlashInfer's
// (num_blocks, 2, ...), per-layer views of a page-major pool); a transport
// registers each byte once and finds a region's registration as the span
// containing it. Device allocations that happen to touch stay apart, each
// with its own dmabuf.
std::vector<std::span<std::byte>> registered_spans(
    std::vector<std::span<std::byte>> regions, bool merge_touching) {
  std::sort(regions.begin(), regions.end(),
            [](auto a, auto b) { return a.data() < b.data(); });
  std::vector<std::span<std::byte>> out;
  for (auto r : regions) {
    const std::byte* end =
        out.empty() ? nullptr : out.back().data() + out.back().size();
    if (!out.empty() &&
        (r.data() < end || (merge_touching && r.data() == end))) {
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

// The layout region that holds all of [p, p + n), or -1.
int region_holding(const PagerLayout& layout, const std::byte* p, size_t n) {
  for (size_t i = 0; i < layout.size(); ++i) {
    const StridedRegion& r = layout[i];
    if (p >= r.base && n <= r.span_bytes() &&
        static_cast<uint64_t>(p - r.base) <= r.span_bytes() - n) {
      return static_cast<int>(i);
    }
  }
  return -1;
}

// How transports reach one registered span of device memory: through the
// pager's copies, by region and offset.
std::shared_ptr<const DeviceMemory> device_memory_of(
    CachePager& pager, const PagerLayout& layout, std::span<std::byte> span) {
  const int first = region_holding(layout, span.data(), 0);
  auto dev = std::make_shared<DeviceMemory>();
  dev->kind = layout[first].kind;
  dev->device = layout[first].device;
  auto outside = [](const std::byte* p, size_t n) {
    return Status::invalid_argument(
        "device copy of " + std::to_string(n) + " bytes at " +
        std::to_string(reinterpret_cast<uintptr_t>(p)) +
        " lies in no layout region");
  };
  dev->read = [&pager, &layout, outside](const std::byte* src,
                                         std::span<std::byte> out) {
    const int r = region_holding(layout, src, out.size());
    if (r < 0) return outside(src, out.size());
    return pager.copy_from_device(static_cast<uint32_t>(r),
                                  src - layout[r].base, out);
  };
  dev->write = [&pager, &layout, outside](std::byte* dst,
                                          std::span<const std::byte> in) {
    const int r = region_holding(layout, dst, in.size());
    if (r < 0) return outside(dst, in.size());
    return pager.copy_to_device(static_cast<uint32_t>(r), dst - layout[r].base,
                                in);
  };
  dev->dmabuf = [&pager, first]() {
    return pager.export_dmabuf(static_cast<uint32_t>(first));
  };
  return dev;
}

}  // namespace

std::string memory_kinds_name(const std::optional<PagerLayout>& layout) {
  bool host = !layout, cuda = false;
  if (layout) {
    for (const StridedRegion& r : *layout) {
      (r.kind == MemoryKind::kHost ? host : cuda) = true;
    }
  }
  if (host && cuda) return "cuda+host";
  return cuda ? "cuda" : "host";
}

Status MigrationContext::init() {
  // Over a pager that already holds requests, an outcome this agent does
  // not remember may still have been installed (by an earlier agent).
  auto held = pager.logical_seqs();
  dst_records.set_started_with_requests(!held.ok() || !held->empty());
  layout = pager.layout();
  memory = memory_kinds_name(layout);
  host_layout = layout && memory == "host";
  pager_never_waits = pager.bookkeeping_never_waits();
  std::vector<std::span<std::byte>> host_spans, device_spans;
  if (layout) {
    KVMIG_RETURN_IF_ERROR(validate_layout(pager.meta(), *layout)
                              .with_context("agent: pager layout"));
    for (uint32_t i = 0; i < layout->size(); ++i) {
      const StridedRegion& r = (*layout)[i];
      pager_regions.emplace_back(r.base, r.span_bytes());
      if (r.kind == MemoryKind::kHost) {
        host_spans.push_back(pager_regions.back());
        continue;
      }
      // Device memory is reached only through the pager's copies: one
      // that cannot copy makes the layout unusable.
      std::array<std::byte, 1> probe{};
      Status can = pager.copy_from_device(i, 0, std::span(probe).first(0));
      if (!can.ok()) {
        return can.with_context("agent: pager layout region " +
                                std::to_string(i) + " is " +
                                std::string(memory_kind_name(r.kind)) +
                                " memory, which kvmig reaches only through "
                                "copy_from_device/copy_to_device");
      }
      device_spans.push_back(pager_regions.back());
    }
  }
  TransportOptions topts = options.transport_options;
  if (topts.bind_host.empty()) topts.bind_host = options.listen_host;
  for (const std::string& name : options.transports) {
    if (transports.count(name) || unusable.count(name)) continue;
    KVMIG_ASSIGN_OR_RETURN(auto transport, make_transport(name, topts));
    for (auto region : registered_spans(host_spans, true)) {
      KVMIG_RETURN_IF_ERROR(transport->register_memory(region).with_context(
          "agent: registering pager memory with " + name));
    }
    // A transport that cannot reach the device memory stays out: the
    // agent serves the others and says why when a migration asks for it.
    Status device_ok;
    for (auto region : registered_spans(device_spans, false)) {
      device_ok = transport->register_device_memory(
          region, device_memory_of(pager, *layout, region));
      if (!device_ok.ok()) break;
    }
    if (!device_ok.ok()) {
      Status why = device_ok.with_context(name + " cannot reach this agent's " +
                                          memory + " memory");
      log->warn("{}; migrations over {} are refused", why.message(), name);
      unusable.emplace(name, std::move(why));
      continue;
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
  if (auto u = unusable.find(name); u != unusable.end()) return u->second;
  return Status::failed_precondition("transport '" + std::string(name) +
                                     "' is not enabled on this agent "
                                     "(enabled: " +
                                     transport_names(",") +
                                     "; see serve --transports)");
}

Result<Transport*> MigrationContext::common_transport(
    const std::vector<std::string>& offered) {
  for (const std::string& name : offered) {
    auto it = transports.find(name);
    if (it != transports.end()) return it->second.get();
  }
  std::string names, why;
  for (const std::string& name : offered) {
    names += name + " ";
    if (auto u = unusable.find(name); u != unusable.end()) {
      why += "; " + u->second.message();
    }
  }
  return Status::failed_precondition("no common transport: source offers [ " +
                                     names + "], destination accepts [ " +
                                     transport_names(" ") + " ]" + why);
}

}  // namespace kvmig
