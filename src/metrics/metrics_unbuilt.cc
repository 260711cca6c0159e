// AgentMetrics in a build without prometheus-cpp: nothing is counted and
// serve() says how to get metrics.
#include <utility>

#include "metrics.h"

namespace kvmig {

struct AgentMetrics::Impl {};

bool metrics_built() { return false; }

Status check_metrics_listen(const std::string&) { return Status(); }

std::shared_ptr<AgentMetrics> AgentMetrics::create() {
  return std::shared_ptr<AgentMetrics>(
      new AgentMetrics(std::make_unique<Impl>()));
}

AgentMetrics::AgentMetrics(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}

AgentMetrics::~AgentMetrics() = default;

void AgentMetrics::observe(AgentOptions&) {}

Status AgentMetrics::serve(Agent&, const std::string&, bool,
                           std::function<bool()>) {
  return Status::unimplemented(
      "metrics: this kvmig was built without Prometheus metrics (needs "
      "prometheus-cpp-dev; meson setup -Dmetrics=enabled)");
}

std::string AgentMetrics::address() const { return ""; }

void AgentMetrics::stop() {}

}  // namespace kvmig
