// Cluster: the scheduler's view of the agents in etcd, and drain and
// rebalance over it. Every move is request_migration() to the source agent;
// source and destination are locked in etcd while it runs.
#include "kvmig/cluster.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "cluster_keys.h"
#include "etcd_client.h"
#include "log.h"
#include "placement.h"

namespace kvmig {
namespace {

// A random 64-bit holder id for this scheduler's locks, in hex.
std::string holder_id() {
  std::random_device rd;
  const uint64_t v = (uint64_t{rd()} << 32) ^ rd();
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

double elapsed_ms(Clock::time_point since) {
  return std::chrono::duration<double, std::milli>(Clock::now() - since)
      .count();
}

}  // namespace

struct Cluster::Impl {
  ClusterOptions options;
  std::unique_ptr<EtcdClient> etcd;
  std::shared_ptr<spdlog::logger> log = logger("cluster");
  const std::string holder = holder_id();

  // The scheduler's lease for its locks: granted on first use, kept alive
  // by keeper while it exists.
  std::mutex lease_mu;
  int64_t lease = 0;  // lease_mu
  std::thread keeper;
  std::mutex keeper_mu;
  std::condition_variable keeper_cv;
  bool stopping = false;  // keeper_mu

  ~Impl() {
    {
      std::lock_guard lock(keeper_mu);
      stopping = true;
    }
    keeper_cv.notify_all();
    if (keeper.joinable()) keeper.join();
    if (lease != 0) (void)etcd->lease_revoke(lease);
  }

  Result<int64_t> lock_lease() {
    std::lock_guard lock(lease_mu);
    if (lease != 0) return lease;
    KVMIG_ASSIGN_OR_RETURN(lease, etcd->lease_grant(options.lock_ttl.count()));
    if (!keeper.joinable()) {
      keeper = std::thread([this] { keep_alive(); });
    }
    return lease;
  }

  void keep_alive() {
    const auto every = std::chrono::duration_cast<std::chrono::milliseconds>(
                           options.lock_ttl) /
                       3;
    std::unique_lock lock(keeper_mu);
    while (!keeper_cv.wait_for(lock, every, [this] { return stopping; })) {
      lock.unlock();
      int64_t id;
      {
        std::lock_guard l(lease_mu);
        id = lease;
      }
      auto ttl = etcd->lease_keepalive(id);
      if (!ttl.ok()) {
        log->warn("scheduler lease {:x}: {}", id, ttl.status().to_string());
        if (ttl.status().code() == StatusCode::kNotFound) {
          std::lock_guard l(lease_mu);
          if (lease == id) lease = 0;  // the next lock grants a new one
        }
      }
      lock.lock();
    }
  }

  // Locks every named agent at once (all or none), waiting up to
  // options.lock_wait. FailedPrecondition when they stay locked.
  Status lock(const std::vector<std::string>& names) {
    const Deadline until = Clock::now() + options.lock_wait;
    std::chrono::milliseconds backoff{20};
    for (;;) {
      KVMIG_ASSIGN_OR_RETURN(int64_t id, lock_lease());
      std::vector<EtcdCompare> cmp;
      std::vector<EtcdOp> put;
      for (const auto& n : names) {
        const std::string key = lock_key(options.etcd.prefix, n);
        cmp.push_back({key, EtcdCompare::Target::kCreateRevision, 0, {}});
        put.push_back({EtcdOp::Kind::kPut, key, holder, id});
      }
      auto txn = etcd->txn(cmp, put);
      KVMIG_RETURN_IF_ERROR(txn.status());
      if (txn->succeeded) return Status();
      if (Clock::now() + backoff >= until) {
        std::string list;
        for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
        return Status::failed_precondition(
            "agents " + list + ": locked by another scheduler for over " +
            std::to_string(options.lock_wait.count()) + " ms");
      }
      std::this_thread::sleep_for(backoff);
      backoff = std::min(backoff * 2, std::chrono::milliseconds(200));
    }
  }

  void unlock(const std::vector<std::string>& names) {
    for (const auto& n : names) {
      const std::string key = lock_key(options.etcd.prefix, n);
      auto txn = etcd->txn({{key, EtcdCompare::Target::kValue, 0, holder}},
                           {{EtcdOp::Kind::kDelete, key, {}, 0}});
      if (!txn.ok()) {
        log->warn("unlocking {}: {} (the lock expires with lease {:x})", n,
                  txn.status().to_string(), lease);
      }
    }
  }

  Result<std::vector<AgentRecord>> list() {
    KVMIG_ASSIGN_OR_RETURN(
        EtcdRangeResult range,
        etcd->get_prefix(agents_prefix(options.etcd.prefix)));
    std::vector<AgentRecord> out;
    for (const EtcdKeyValue& kv : range.kvs) {
      auto r = parse_agent_record(kv.value);
      if (!r.ok()) {
        log->warn("{}: {} (skipped)", kv.key, r.status().to_string());
        continue;
      }
      r->mod_revision = kv.mod_revision;
      out.push_back(std::move(*r));
    }
    return out;
  }

  Result<AgentRecord> find(const std::string& name) {
    KVMIG_RETURN_IF_ERROR(check_agent_name(name));
    const std::string key = agent_key(options.etcd.prefix, name);
    KVMIG_ASSIGN_OR_RETURN(auto kv, etcd->get(key));
    if (!kv) {
      return Status::not_found("agent '" + name + "' is not registered (no " +
                               key + " in etcd)");
    }
    KVMIG_ASSIGN_OR_RETURN(AgentRecord r, parse_agent_record(kv->value));
    r.mod_revision = kv->mod_revision;
    return r;
  }

  Result<AgentStatus> status_of(const AgentRecord& r) {
    auto st = query_status(r.address, options.agent_client, {.digests = false});
    if (!st.ok()) return st.status().with_context("agent " + r.name);
    return st;
  }

  Status set_draining(const std::string& name, bool draining) {
    KVMIG_RETURN_IF_ERROR(check_agent_name(name));
    const std::string key = agent_key(options.etcd.prefix, name);
    for (int attempt = 0; attempt < 16; ++attempt) {
      KVMIG_ASSIGN_OR_RETURN(auto kv, etcd->get(key));
      if (!kv) return Status::not_found("agent '" + name + "' not registered");
      KVMIG_ASSIGN_OR_RETURN(AgentRecord r, parse_agent_record(kv->value));
      if (r.draining == draining) return Status();
      r.draining = draining;
      auto txn = etcd->txn(
          {{key, EtcdCompare::Target::kModRevision, kv->mod_revision, {}}},
          {{EtcdOp::Kind::kPut, key, agent_record_json(r), kv->lease}});
      KVMIG_RETURN_IF_ERROR(txn.status());
      if (txn->succeeded) return Status();
    }
    return Status::aborted("agent '" + name +
                           "': its record kept changing; draining not set");
  }

  // One move: locks both agents, runs the migration, unlocks. The report's
  // seqs are what moved; left_behind finished at the source.
  Result<MigrationReport> move(const AgentRecord& from, const AgentRecord& to,
                               std::vector<SeqId> seqs, bool live,
                               const std::string& transport) {
    KVMIG_RETURN_IF_ERROR(lock({from.name, to.name}));
    MigrateRequest req;
    req.to = to.address;
    req.seqs = std::move(seqs);
    req.live = live;
    req.transport = transport;
    auto report = request_migration(from.address, req, options.agent_client);
    unlock({from.name, to.name});
    return report;
  }

  Result<DrainReport> drain(const std::string& name, const DrainOptions& o);
  Result<RebalanceReport> rebalance_once(const RebalanceOptions& o);
};

Result<DrainReport> Cluster::Impl::drain(const std::string& name,
                                         const DrainOptions& o) {
  KVMIG_RETURN_IF_ERROR(set_draining(name, true));
  KVMIG_ASSIGN_OR_RETURN(AgentRecord source, find(name));
  KVMIG_ASSIGN_OR_RETURN(std::vector<AgentRecord> all, list());
  // Candidates, with their free pages as they answer now (the records may
  // lag by a refresh).
  std::vector<AgentRecord> targets;
  std::vector<uint64_t> free;
  std::vector<std::string> unreachable;
  for (const AgentRecord& r : all) {
    if (r.name == name || r.draining || !(r.meta == source.meta)) continue;
    auto st = status_of(r);
    if (!st.ok()) {
      unreachable.push_back(st.status().to_string());
      continue;
    }
    targets.push_back(r);
    free.push_back(st->free_pages);
  }
  DrainReport report;
  report.agent = name;
  std::vector<bool> failed(targets.size(), false);
  std::map<SeqId, std::string> last_error;
  // Rounds: plan what is still at the source over the targets that have not
  // failed, run one migration per target, and plan again with what a
  // failure left behind.
  for (;;) {
    KVMIG_ASSIGN_OR_RETURN(AgentStatus st, status_of(source));
    const std::vector<MoveUnit> units = move_units(st);
    for (const auto& d : st.in_doubt) {
      for (SeqId id : d.seqs) {
        last_error[id] = "held by migration " + d.migration_id +
                         ", whose outcome is in doubt";
      }
    }
    if (units.empty()) break;
    std::vector<size_t> live_targets;
    std::vector<uint64_t> live_free;
    for (size_t t = 0; t < targets.size(); ++t) {
      if (failed[t]) continue;
      live_targets.push_back(t);
      live_free.push_back(free[t]);
    }
    const auto planned_at = Clock::now();
    const auto placed = plan_drain(units, live_free);
    report.plan_ms += elapsed_ms(planned_at);
    std::map<size_t, std::vector<SeqId>> per_target;
    for (size_t u = 0; u < units.size(); ++u) {
      if (!placed[u]) continue;
      auto& list = per_target[live_targets[*placed[u]]];
      list.insert(list.end(), units[u].seqs.begin(), units[u].seqs.end());
    }
    if (per_target.empty()) break;
    for (auto& [t, seqs] : per_target) {
      report.migrations++;
      auto moved = move(source, targets[t], seqs, o.live, o.transport);
      if (!moved.ok()) {
        log->warn("drain {}: moving {} requests to {} failed: {}", name,
                  seqs.size(), targets[t].name, moved.status().to_string());
        failed[t] = true;
        for (SeqId id : seqs) {
          last_error[id] = targets[t].name + ": " + moved.status().to_string();
        }
        continue;
      }
      for (SeqId id : moved->seqs) {
        report.moved.push_back(
            {id, name, targets[t].name, moved->migration_id, {}});
        last_error.erase(id);
      }
      report.finished.insert(report.finished.end(), moved->left_behind.begin(),
                             moved->left_behind.end());
      const uint64_t used = std::min<uint64_t>(free[t], moved->pages);
      free[t] -= used;
    }
  }
  // What is still here, and why.
  KVMIG_ASSIGN_OR_RETURN(AgentStatus left, status_of(source));
  std::string no_room = "no agent with an equal meta, not draining, has room";
  if (targets.empty()) {
    no_room = "no other agent with meta " + source.meta.to_string() +
              " that is not draining";
    if (!unreachable.empty()) no_room += " answered (" + unreachable[0] + ")";
  }
  for (const SeqStatus& s : left.seqs) {
    auto it = last_error.find(s.id);
    report.unplaced.push_back(
        {s.id, name, {}, {}, it != last_error.end() ? it->second : no_room});
  }
  return report;
}

Result<RebalanceReport> Cluster::Impl::rebalance_once(
    const RebalanceOptions& o) {
  RebalanceReport report;
  KVMIG_ASSIGN_OR_RETURN(std::vector<AgentRecord> all, list());
  // Loads as the agents answered under a lock, which beat the records (they
  // lag by a refresh, and another scheduler may have moved since).
  std::map<std::string, LoadSide> fresh;
  auto load = [&fresh](const AgentRecord& r) {
    auto it = fresh.find(r.name);
    return it != fresh.end() ? it->second.load() : r.load();
  };
  std::set<std::string> busy;  // moved from or to in this pass
  std::set<std::pair<std::string, std::string>> tried;
  uint32_t moves = 0;
  while (moves < o.max_moves) {
    // The pair of one meta, neither draining nor busy, not tried yet, with
    // the largest gap in load.
    const AgentRecord* from = nullptr;
    const AgentRecord* to = nullptr;
    double gap = 0;
    for (const AgentRecord& a : all) {
      if (a.draining || busy.count(a.name)) continue;
      for (const AgentRecord& b : all) {
        if (&a == &b || b.draining || busy.count(b.name)) continue;
        if (!(a.meta == b.meta) || tried.count({a.name, b.name})) continue;
        const double g = load(a) - load(b);
        if (g > gap) {
          gap = g;
          from = &a;
          to = &b;
        }
      }
    }
    if (!from || gap <= o.threshold) break;
    tried.insert({from->name, to->name});
    const std::string pair = from->name + " -> " + to->name;
    Status locked = lock({from->name, to->name});
    if (!locked.ok()) {
      report.skipped.push_back(pair + ": " + locked.to_string());
      continue;
    }
    auto src = status_of(*from);
    auto dst = status_of(*to);
    if (!src.ok() || !dst.ok()) {
      unlock({from->name, to->name});
      report.skipped.push_back(
          pair + ": " + (!src.ok() ? src.status() : dst.status()).to_string());
      continue;
    }
    const LoadSide a{src->capacity_pages - src->free_pages,
                     src->capacity_pages};
    const LoadSide b{dst->capacity_pages - dst->free_pages,
                     dst->capacity_pages};
    fresh[from->name] = a;
    fresh[to->name] = b;
    const auto units = move_units(*src, o.settle.count());
    const auto chosen =
        plan_rebalance(units, a, b, dst->free_pages, o.threshold);
    if (chosen.empty()) {
      unlock({from->name, to->name});
      if (a.load() - b.load() > o.threshold) {
        report.skipped.push_back(
            pair + (units.empty()
                        ? ": every request there arrived less than " +
                              std::to_string(o.settle.count()) +
                              " ms ago (--settle-ms) or is in doubt"
                        : ": nothing moves without flipping their loads"));
      }
      continue;  // otherwise the gap had closed: choose again
    }
    RebalanceMove m;
    m.from = from->name;
    m.to = to->name;
    m.load_from_before = a.load();
    m.load_to_before = b.load();
    for (size_t u : chosen) {
      m.seqs.insert(m.seqs.end(), units[u].seqs.begin(), units[u].seqs.end());
      m.pages += units[u].pages;
    }
    MigrateRequest req;
    req.to = to->address;
    req.seqs = m.seqs;
    req.live = o.live;
    req.transport = o.transport;
    auto moved = request_migration(from->address, req, options.agent_client);
    unlock({from->name, to->name});
    busy.insert(from->name);
    busy.insert(to->name);
    moves++;
    if (moved.ok()) {
      m.migration_id = moved->migration_id;
      m.seqs = moved->seqs;
    } else {
      m.error = moved.status().to_string();
    }
    report.moves.push_back(std::move(m));
  }
  return report;
}

Cluster::Cluster(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Cluster::~Cluster() = default;

Result<std::unique_ptr<Cluster>> Cluster::connect(ClusterOptions options) {
  if (options.lock_ttl.count() < 2 || options.lock_ttl.count() > 3600) {
    return Status::invalid_argument("lock TTL: 2 to 3600 s");
  }
  while (options.etcd.prefix.size() > 1 && options.etcd.prefix.back() == '/') {
    options.etcd.prefix.pop_back();
  }
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  KVMIG_ASSIGN_OR_RETURN(
      impl->etcd, EtcdClient::create(EtcdOptions{impl->options.etcd.endpoints,
                                                 impl->options.etcd.timeout}));
  return std::unique_ptr<Cluster>(new Cluster(std::move(impl)));
}

Result<std::vector<AgentRecord>> Cluster::agents() { return impl_->list(); }

Status Cluster::set_draining(const std::string& name, bool draining) {
  return impl_->set_draining(name, draining);
}

Result<DrainReport> Cluster::drain(const std::string& name,
                                   const DrainOptions& options) {
  return impl_->drain(name, options);
}

Result<RebalanceReport> Cluster::rebalance_once(
    const RebalanceOptions& options) {
  return impl_->rebalance_once(options);
}

namespace {

class AgentsWatch : public ClusterWatch {
 public:
  std::mutex mu;
  std::map<std::string, AgentRecord> agents;  // by key; mu
  std::unique_ptr<EtcdWatch> watch;           // destroyed first
  ~AgentsWatch() override { watch.reset(); }
};

}  // namespace

Result<std::unique_ptr<ClusterWatch>> Cluster::watch(
    std::function<void(const std::vector<AgentRecord>&)> on_change,
    std::function<void(const Status&)> on_error) {
  const std::string prefix = agents_prefix(impl_->options.etcd.prefix);
  KVMIG_ASSIGN_OR_RETURN(EtcdRangeResult range,
                         impl_->etcd->get_prefix(prefix));
  auto w = std::make_unique<AgentsWatch>();
  for (const EtcdKeyValue& kv : range.kvs) {
    auto r = parse_agent_record(kv.value);
    if (!r.ok()) continue;
    r->mod_revision = kv.mod_revision;
    w->agents[kv.key] = std::move(*r);
  }
  auto snapshot = [](const std::map<std::string, AgentRecord>& m) {
    std::vector<AgentRecord> out;
    out.reserve(m.size());
    for (const auto& [k, r] : m) out.push_back(r);
    return out;
  };
  on_change(snapshot(w->agents));
  AgentsWatch* raw = w.get();
  auto log = impl_->log;
  KVMIG_ASSIGN_OR_RETURN(
      w->watch, impl_->etcd->watch_prefix(
                    prefix, range.revision + 1,
                    [raw, on_change, snapshot,
                     log](const std::vector<EtcdWatchEvent>& events) {
                      std::vector<AgentRecord> now;
                      {
                        std::lock_guard lock(raw->mu);
                        for (const EtcdWatchEvent& e : events) {
                          if (e.type == EtcdWatchEvent::Type::kDelete) {
                            raw->agents.erase(e.kv.key);
                            continue;
                          }
                          auto r = parse_agent_record(e.kv.value);
                          if (!r.ok()) {
                            log->warn("{}: {} (skipped)", e.kv.key,
                                      r.status().to_string());
                            continue;
                          }
                          r->mod_revision = e.kv.mod_revision;
                          raw->agents[e.kv.key] = std::move(*r);
                        }
                        now = snapshot(raw->agents);
                      }
                      on_change(now);
                    },
                    [on_error](const Status& s) {
                      if (on_error) on_error(s);
                    }));
  return std::unique_ptr<ClusterWatch>(std::move(w));
}

}  // namespace kvmig
