// The one table of data planes: which are compiled in and how to build them.
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "kvmig/transport.h"
#include "tcp/tcp_transport.h"
#ifdef KVMIG_WITH_UCX
#include "ucx/ucx_transport.h"
#endif
#ifdef KVMIG_WITH_VERBS
#include "verbs/verbs_transport.h"
#endif

namespace kvmig {
namespace {

using Factory =
    std::function<Result<std::unique_ptr<Transport>>(const TransportOptions&)>;

struct Entry {
  std::string_view name;
  // Empty when this build does not include the transport.
  Factory factory;
  // The meson option that builds it.
  std::string_view meson_option;
};

const std::vector<Entry>& table() {
  static const std::vector<Entry> entries = {
      {"tcp", make_tcp_transport, ""},
#ifdef KVMIG_WITH_UCX
      {"ucx", make_ucx_transport, "-Ducx=enabled"},
#else
      {"ucx", nullptr, "-Ducx=enabled"},
#endif
#ifdef KVMIG_WITH_VERBS
      {"verbs", make_verbs_transport, "-Dverbs=enabled"},
#else
      {"verbs", nullptr, "-Dverbs=enabled"},
#endif
  };
  return entries;
}

}  // namespace

std::vector<std::string> built_transports() {
  std::vector<std::string> names;
  for (const Entry& e : table()) {
    if (e.factory) names.emplace_back(e.name);
  }
  return names;
}

Result<std::unique_ptr<Transport>> make_transport(
    std::string_view name, const TransportOptions& opts) {
  std::string known;
  for (const Entry& e : table()) {
    if (!known.empty()) known += ", ";
    known += e.name;
    if (e.name != name) continue;
    if (!e.factory) {
      return Status::unimplemented(
          "transport '" + std::string(name) +
          "' is not built: reconfigure with meson option " +
          std::string(e.meson_option) + " and its dependency installed");
    }
    if (!opts.bind_host.empty()) return e.factory(opts);
    TransportOptions local = opts;
    local.bind_host = "127.0.0.1";
    return e.factory(local);
  }
  return Status::not_found("unknown transport '" + std::string(name) +
                           "' (known: " + known + ")");
}

}  // namespace kvmig
