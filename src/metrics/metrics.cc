// AgentMetrics with prometheus-cpp: counters and histograms in a Registry
// fed by on_migration_end; gauges from a Collectable that reads the agent's
// status at scrape time; civetweb (prometheus::Exposer) serves both.
#include "metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/histogram.h>
#include <prometheus/metric_family.h>
#include <prometheus/registry.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "asio.h"
#include "host_port.h"
#include "log.h"

namespace kvmig {
namespace {

// Milliseconds to a minute.
const prometheus::Histogram::BucketBoundaries kSecondsBuckets = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25,   0.5,   1,      2.5,   5,    10,    30,   60};

const char* role_name(MigrationEvent::Role role) {
  return role == MigrationEvent::Role::kSource ? "source" : "destination";
}

// The migration counters and histograms. Thread-safe (prometheus-cpp's).
class MigrationMetrics {
 public:
  MigrationMetrics()
      : registry_(std::make_shared<prometheus::Registry>()),
        migrations_(prometheus::BuildCounter()
                        .Name("kvmig_migrations_total")
                        .Help("Migrations this agent took part in, by role, "
                              "data transport and outcome")
                        .Register(*registry_)),
        bytes_(prometheus::BuildCounter()
                   .Name("kvmig_migration_bytes_total")
                   .Help("Payload bytes of migrations, sent (source) or "
                         "received (destination)")
                   .Register(*registry_)),
        duration_(prometheus::BuildHistogram()
                      .Name("kvmig_migration_duration_seconds")
                      .Help("Migration time, from HELLO to the end, by role")
                      .Register(*registry_)),
        pause_(prometheus::BuildHistogram()
                   .Name("kvmig_migration_pause_seconds")
                   .Help("Time a source migration kept the engine (or the "
                         "moved requests) paused")
                   .Register(*registry_)) {}

  const std::shared_ptr<prometheus::Registry>& registry() const {
    return registry_;
  }

  // Every series a migration over one of transports can touch, at 0, so
  // that rates are defined from the first scrape.
  void start_series(const std::vector<std::string>& transports) {
    for (const std::string& t : transports) {
      for (const char* outcome : {"committed", "aborted", "in_doubt"}) {
        migrations_.Add(
            {{"role", "source"}, {"transport", t}, {"outcome", outcome}});
      }
      for (const char* outcome : {"committed", "aborted"}) {
        migrations_.Add(
            {{"role", "destination"}, {"transport", t}, {"outcome", outcome}});
      }
      for (const char* role : {"source", "destination"}) {
        bytes_.Add({{"role", role}, {"transport", t}});
      }
    }
    for (const char* role : {"source", "destination"}) {
      duration_.Add({{"role", role}}, kSecondsBuckets);
    }
    pause_.Add({}, kSecondsBuckets);
  }

  void record(const MigrationEvent& e) {
    const std::string role = role_name(e.role);
    const std::string transport = e.transport.empty() ? "none" : e.transport;
    migrations_
        .Add({{"role", role}, {"transport", transport}, {"outcome", e.outcome}})
        .Increment();
    bytes_.Add({{"role", role}, {"transport", transport}})
        .Increment(static_cast<double>(e.bytes));
    duration_.Add({{"role", role}}, kSecondsBuckets).Observe(e.seconds);
    if (e.role == MigrationEvent::Role::kSource && e.pause_seconds > 0) {
      pause_.Add({}, kSecondsBuckets).Observe(e.pause_seconds);
    }
  }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& migrations_;
  prometheus::Family<prometheus::Counter>& bytes_;
  prometheus::Family<prometheus::Histogram>& duration_;
  prometheus::Family<prometheus::Histogram>& pause_;
};

prometheus::MetricFamily gauge_family(std::string name, std::string help) {
  prometheus::MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = prometheus::MetricType::Gauge;
  return f;
}

prometheus::ClientMetric gauge_value(
    double value, std::vector<prometheus::ClientMetric::Label> labels = {}) {
  prometheus::ClientMetric m;
  m.label = std::move(labels);
  m.gauge.value = value;
  return m;
}

// The gauges, read at scrape time. Thread-safe: Collect() runs on the
// scrape threads.
class AgentGauges : public prometheus::Collectable {
 public:
  AgentGauges(Agent& agent, std::function<bool()> registered)
      : agent_(agent), registered_(std::move(registered)) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    auto st = agent_.status({.digests = false});
    if (st.ok()) {
      auto pages = gauge_family("kvmig_pages", "Page slots of the cache");
      const uint64_t free = st->free_pages;
      const uint64_t used =
          st->capacity_pages - std::min(free, st->capacity_pages);
      pages.metric.push_back(gauge_value(double(free), {{"state", "free"}}));
      pages.metric.push_back(gauge_value(double(used), {{"state", "used"}}));
      out.push_back(std::move(pages));
      auto requests = gauge_family("kvmig_requests", "Live requests held");
      requests.metric.push_back(gauge_value(double(st->seqs.size())));
      out.push_back(std::move(requests));
      size_t doubtful = 0;
      for (const auto& d : st->in_doubt) doubtful += d.seqs.size();
      auto in_doubt = gauge_family(
          "kvmig_in_doubt_requests",
          "Requests held by migrations whose outcome is not known yet");
      in_doubt.metric.push_back(gauge_value(double(doubtful)));
      out.push_back(std::move(in_doubt));
      auto connections = gauge_family("kvmig_control_connections",
                                      "Control connections open now");
      connections.metric.push_back(
          gauge_value(double(st->control_connections)));
      out.push_back(std::move(connections));
      auto kept = gauge_family(
          "kvmig_kept_connections",
          "Control connections kept open, as a source, for the next "
          "migration to a destination");
      kept.metric.push_back(gauge_value(double(st->kept_connections)));
      out.push_back(std::move(kept));
    } else {
      logger("metrics")->debug("scrape without status gauges: {}",
                               st.status().to_string());
    }
    auto etcd = gauge_family("kvmig_etcd_registered",
                             "1 while this agent is registered in etcd");
    etcd.metric.push_back(gauge_value(registered_ && registered_() ? 1 : 0));
    out.push_back(std::move(etcd));
    return out;
  }

 private:
  Agent& agent_;
  const std::function<bool()> registered_;
};

// The HOST of "HOST:PORT" as an IP address; InvalidArgument otherwise.
Result<std::pair<HostPort, asio::ip::address>> parse_listen(
    const std::string& listen) {
  auto hp = parse_host_port(listen);
  if (!hp.ok()) return hp.status().with_context("metrics");
  boost::system::error_code ec;
  auto address = asio::ip::make_address(hp->host, ec);
  if (ec) {
    return Status::invalid_argument("metrics: listen host '" + hp->host +
                                    "' is not an IP address");
  }
  return std::pair{std::move(*hp), address};
}

}  // namespace

struct AgentMetrics::Impl {
  const std::shared_ptr<MigrationMetrics> migrations =
      std::make_shared<MigrationMetrics>();
  mutable std::mutex mu;
  std::shared_ptr<AgentGauges> gauges;           // guarded by mu
  std::unique_ptr<prometheus::Exposer> exposer;  // guarded by mu
  std::string address;                           // guarded by mu
};

bool metrics_built() { return true; }

Status check_metrics_listen(const std::string& listen) {
  return parse_listen(listen).status();
}

std::shared_ptr<AgentMetrics> AgentMetrics::create() {
  return std::shared_ptr<AgentMetrics>(
      new AgentMetrics(std::make_unique<Impl>()));
}

AgentMetrics::AgentMetrics(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}

AgentMetrics::~AgentMetrics() { stop(); }

void AgentMetrics::observe(AgentOptions& options) {
  impl_->migrations->start_series(options.transports);
  options.on_migration_end =
      [metrics = impl_->migrations,
       before = std::move(options.on_migration_end)](const MigrationEvent& e) {
        if (before) before(e);
        metrics->record(e);
      };
}

Status AgentMetrics::serve(Agent& agent, const std::string& listen,
                           bool insecure, std::function<bool()> registered) {
  KVMIG_ASSIGN_OR_RETURN(auto parsed, parse_listen(listen));
  auto& [hp, ip] = parsed;
  if (!insecure && !ip.is_loopback()) {
    return Status::invalid_argument(
        "metrics: refusing to serve /metrics on " + hp.host +
        ", not a loopback address: it has no authentication; give --insecure "
        "to serve it there anyway");
  }
  std::lock_guard lock(impl_->mu);
  if (impl_->exposer) {
    return Status::failed_precondition("metrics: already serving on " +
                                       impl_->address);
  }
  const std::string host = ip.is_v6() ? "[" + hp.host + "]" : hp.host;
  std::unique_ptr<prometheus::Exposer> exposer;
  try {
    exposer = std::make_unique<prometheus::Exposer>(
        host + ":" + std::to_string(hp.port), 2);
  } catch (const std::exception& e) {
    return Status::unavailable("metrics: cannot listen on " + listen + ": " +
                               e.what());
  }
  const std::vector<int> ports = exposer->GetListeningPorts();
  impl_->gauges = std::make_shared<AgentGauges>(agent, std::move(registered));
  exposer->RegisterCollectable(impl_->migrations->registry());
  exposer->RegisterCollectable(impl_->gauges);
  impl_->exposer = std::move(exposer);
  impl_->address =
      host + ":" + std::to_string(ports.empty() ? hp.port : ports.front());
  logger("metrics")->info("serving /metrics on {}", impl_->address);
  return Status();
}

std::string AgentMetrics::address() const {
  std::lock_guard lock(impl_->mu);
  return impl_->address;
}

void AgentMetrics::stop() {
  std::unique_ptr<prometheus::Exposer> exposer;
  std::shared_ptr<AgentGauges> gauges;
  {
    std::lock_guard lock(impl_->mu);
    exposer = std::move(impl_->exposer);
    gauges = std::move(impl_->gauges);
  }
  exposer.reset();  // joins the scrape threads
}

}  // namespace kvmig
