// Registration: one agent's key in etcd, on a lease of its own, kept alive
// and rewritten when the agent's state changes.
//
// The agent owns its value except for "draining", which a scheduler sets
// (Cluster::set_draining). Every write of the agent is a transaction on the
// mod_revision it wrote last: when it fails, someone else wrote, and the
// registration reads the value back, keeps its draining flag, and writes
// again.
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "cluster_keys.h"
#include "etcd_client.h"
#include "kvmig/cluster.h"
#include "log.h"

namespace kvmig {

struct Registration::Impl {
  Agent& agent;
  RegistrationOptions options;
  std::unique_ptr<EtcdClient> etcd;
  std::shared_ptr<spdlog::logger> log = logger("cluster");
  std::string key;
  std::string address;

  // The registration thread's (and start()'s, before it runs).
  int64_t lease = 0;
  int64_t mod_revision = 0;  // of the value last written; 0: none
  std::string written;       // that value
  bool draining = false;
  bool etcd_down_logged = false;
  Clock::time_point next_keepalive{};

  std::atomic<bool> is_registered{false};
  std::atomic<uint64_t> writes{0};

  std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;  // mu
  bool stopped = false;   // stop() ran
  std::thread thread;

  Impl(Agent& a, RegistrationOptions o) : agent(a), options(std::move(o)) {}

  // A third of the TTL, as etcd's own clients keep leases alive.
  std::chrono::milliseconds keepalive_every() const {
    return std::chrono::duration_cast<std::chrono::milliseconds>(options.ttl) /
           3;
  }

  Result<AgentRecord> current() {
    KVMIG_ASSIGN_OR_RETURN(AgentStatus st, agent.status({.digests = false}));
    AgentRecord r;
    r.name = options.name;
    r.address = address;
    r.meta = st.meta;
    r.capacity_pages = st.capacity_pages;
    r.free_pages = st.free_pages;
    r.requests = st.seqs.size();
    r.transports = st.transports;
    r.draining = draining;
    r.version = KVMIG_VERSION;
    return r;
  }

  // A new lease and the key created on it, if nobody holds the name.
  Status register_once() {
    KVMIG_ASSIGN_OR_RETURN(AgentRecord record, current());
    const std::string value = agent_record_json(record);
    KVMIG_ASSIGN_OR_RETURN(int64_t granted,
                           etcd->lease_grant(options.ttl.count()));
    writes++;
    auto txn = etcd->txn({{key, EtcdCompare::Target::kCreateRevision, 0, {}}},
                         {{EtcdOp::Kind::kPut, key, value, granted}},
                         {{EtcdOp::Kind::kGet, key, {}, 0}});
    writes++;
    if (!txn.ok() || !txn->succeeded) {
      (void)etcd->lease_revoke(granted);
      if (!txn.ok()) return txn.status();
      std::string holder = "another agent";
      if (!txn->gets.empty() && !txn->gets[0].empty()) {
        auto other = parse_agent_record(txn->gets[0][0].value);
        if (other.ok()) holder = "the agent at " + other->address;
      }
      return Status::already_exists(
          "agent name '" + options.name + "' is taken in etcd (" + key + "): " +
          holder + " holds it; if it is gone, its lease expires within " +
          std::to_string(options.ttl.count()) + " s");
    }
    lease = granted;
    mod_revision = txn->revision;
    written = value;
    next_keepalive = Clock::now() + keepalive_every();
    return Status();
  }

  // Writes the agent's state if it changed; on a conflict (a scheduler set
  // draining), reads it back and writes again.
  Status refresh() {
    for (int attempt = 0; attempt < 4; ++attempt) {
      auto record = current();
      if (!record.ok()) {  // the agent is stopping: nothing to write
        log->debug("{}: {}", key, record.status().to_string());
        return Status();
      }
      const std::string value = agent_record_json(*record);
      if (value == written) return Status();
      auto txn = etcd->txn(
          {{key, EtcdCompare::Target::kModRevision, mod_revision, {}}},
          {{EtcdOp::Kind::kPut, key, value, lease}},
          {{EtcdOp::Kind::kGet, key, {}, 0}});
      writes++;
      KVMIG_RETURN_IF_ERROR(txn.status());
      if (txn->succeeded) {
        mod_revision = txn->revision;
        written = value;
        return Status();
      }
      if (txn->gets.empty() || txn->gets[0].empty() ||
          txn->gets[0][0].lease != lease) {
        return Status::not_found("the key " + key + " is no longer ours");
      }
      const EtcdKeyValue& now = txn->gets[0][0];
      auto theirs = parse_agent_record(now.value);
      if (theirs.ok()) draining = theirs->draining;
      mod_revision = now.mod_revision;
      written = now.value;
    }
    return Status::aborted("the key " + key + " keeps changing under us");
  }

  // One step of the loop: register if needed, keep alive when due, refresh.
  Status step() {
    if (lease == 0) {
      KVMIG_RETURN_IF_ERROR(register_once());
      log->info("registered as {} in etcd (lease {:x}, TTL {} s)", key, lease,
                options.ttl.count());
    }
    if (Clock::now() >= next_keepalive) {
      auto ttl = etcd->lease_keepalive(lease);
      writes++;
      if (!ttl.ok() && ttl.status().code() == StatusCode::kNotFound) {
        log->warn("etcd lease {:x} of {} expired: registering again", lease,
                  key);
        lease = 0;
        mod_revision = 0;
        written.clear();
        is_registered = false;
        return step();
      }
      KVMIG_RETURN_IF_ERROR(ttl.status());
      next_keepalive = Clock::now() + keepalive_every();
    }
    Status refreshed = refresh();
    if (refreshed.code() == StatusCode::kNotFound) {
      // Our key went (deleted by hand) or was taken: start again.
      log->warn("{}: registering again", refreshed.message());
      (void)etcd->lease_revoke(lease);
      lease = 0;
      mod_revision = 0;
      written.clear();
      is_registered = false;
      return refreshed;
    }
    return refreshed;
  }

  void loop() {
    std::chrono::milliseconds backoff = options.refresh;
    for (;;) {
      Status s = step();
      if (s.ok()) {
        if (etcd_down_logged) log->info("etcd is back: {} registered", key);
        etcd_down_logged = false;
        is_registered = lease != 0;
        backoff = options.refresh;
      } else {
        if (!etcd_down_logged) {
          log->warn(
              "etcd registration of {}: {} (retrying; the agent keeps "
              "serving)",
              key, s.to_string());
          etcd_down_logged = true;
        }
        if (s.code() == StatusCode::kUnavailable ||
            s.code() == StatusCode::kDeadlineExceeded) {
          is_registered = false;
        }
        backoff = std::min<std::chrono::milliseconds>(
            backoff * 2, std::chrono::milliseconds(1'000));
      }
      std::unique_lock lock(mu);
      if (cv.wait_for(lock, s.ok() ? options.refresh : backoff,
                      [this] { return stopping; })) {
        return;
      }
    }
  }
};

Registration::Registration(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}

Registration::~Registration() { stop(); }

Result<std::unique_ptr<Registration>> Registration::start(
    Agent& agent, RegistrationOptions options) {
  KVMIG_RETURN_IF_ERROR(check_agent_name(options.name));
  if (options.ttl.count() < 1 || options.ttl.count() > 3600) {
    return Status::invalid_argument("etcd TTL: 1 to 3600 s");
  }
  while (options.etcd.prefix.size() > 1 && options.etcd.prefix.back() == '/') {
    options.etcd.prefix.pop_back();
  }
  auto impl = std::make_unique<Impl>(agent, std::move(options));
  const RegistrationOptions& o = impl->options;
  KVMIG_ASSIGN_OR_RETURN(impl->etcd, EtcdClient::create(EtcdOptions{
                                         o.etcd.endpoints, o.etcd.timeout}));
  impl->key = agent_key(o.etcd.prefix, o.name);
  impl->address = o.address.empty() ? agent.address() : o.address;
  Status first = impl->register_once();
  if (first.code() == StatusCode::kAlreadyExists ||
      first.code() == StatusCode::kInvalidArgument) {
    return first;
  }
  if (first.ok()) {
    impl->is_registered = true;
    impl->log->info("registered as {} in etcd (lease {:x}, TTL {} s)",
                    impl->key, impl->lease, o.ttl.count());
  } else {
    impl->log->warn(
        "etcd registration of {}: {} (retrying; the agent keeps serving)",
        impl->key, first.to_string());
    impl->etcd_down_logged = true;
  }
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->loop(); });
  return std::unique_ptr<Registration>(new Registration(std::move(impl)));
}

bool Registration::registered() const { return impl_->is_registered; }

uint64_t Registration::etcd_writes() const { return impl_->writes; }

void Registration::stop() {
  {
    std::lock_guard lock(impl_->mu);
    if (impl_->stopped) return;
    impl_->stopped = true;
    impl_->stopping = true;
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
  if (impl_->lease != 0) {
    Status s = impl_->etcd->lease_revoke(impl_->lease);
    if (!s.ok() && s.code() != StatusCode::kNotFound) {
      impl_->log->warn("unregistering {}: {} (the key expires with its lease)",
                       impl_->key, s.to_string());
    } else {
      impl_->log->info("unregistered {}", impl_->key);
    }
    impl_->lease = 0;
  }
  impl_->is_registered = false;
}

}  // namespace kvmig
