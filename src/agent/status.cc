// An agent's status: its meta, capacity, requests (with digests) and the
// migrations in doubt.
#include <algorithm>
#include <numeric>
#include <set>
#include <unordered_map>

#include "agent_impl.h"
#include "kvmig/digest.h"

namespace kvmig {
namespace {

// Requests that share a page, transitively (union-find over page slots),
// with each group's distinct pages. O(total pages).
std::vector<AgentStatus::SharedGroup> shared_groups(
    const std::vector<LogicalSeq>& seqs) {
  std::vector<size_t> parent(seqs.size());
  std::iota(parent.begin(), parent.end(), size_t{0});
  auto root = [&parent](size_t i) {
    while (parent[i] != i) i = parent[i] = parent[parent[i]];
    return i;
  };
  std::unordered_map<PageIndex, size_t> owner;  // slot -> first request
  for (size_t i = 0; i < seqs.size(); ++i) {
    for (PageIndex slot : seqs[i].pages) {
      auto [it, fresh] = owner.try_emplace(slot, i);
      if (!fresh) parent[root(i)] = root(it->second);
    }
  }
  std::unordered_map<size_t, size_t> group_of_root;
  std::vector<AgentStatus::SharedGroup> groups;
  for (size_t i = 0; i < seqs.size(); ++i) {
    auto [it, fresh] = group_of_root.try_emplace(root(i), groups.size());
    if (fresh) groups.emplace_back();
    groups[it->second].seqs.push_back(seqs[i].seq_id);
  }
  for (const auto& [slot, first] : owner) {
    groups[group_of_root[root(first)]].pages += 1;
  }
  std::erase_if(groups, [](const auto& g) { return g.seqs.size() < 2; });
  for (auto& g : groups) std::sort(g.seqs.begin(), g.seqs.end());
  std::sort(groups.begin(), groups.end(),
            [](const auto& a, const auto& b) { return a.seqs[0] < b.seqs[0]; });
  return groups;
}

// Whether the pager no longer lists request `id`.
bool gone(CachePager& pager, SeqId id) {
  auto now = pager.logical_seqs();
  return now.ok() &&
         std::none_of(now->begin(), now->end(),
                      [id](const LogicalSeq& s) { return s.seq_id == id; });
}

struct SeqsAndGroups {
  std::vector<SeqStatus> seqs;
  std::vector<AgentStatus::SharedGroup> groups;
};

}  // namespace

asio::awaitable<Result<AgentStatus>> Agent::Impl::compute_status(bool digests) {
  AgentStatus st;
  st.meta = ctx.pager.meta();
  for (const auto& [name, t] : ctx.transports) st.transports.push_back(name);
  st.memory = ctx.memory;
  st.in_doubt = ctx.in_doubt.entries();
  // Digests are computed with the engine paused, so no request is seen torn;
  // without them nothing is read and the engine is not paused.
  CachePager& pager = ctx.pager;
  const MigrationContext& c = ctx;
  std::optional<PagerCapacity> capacity;
  auto seqs = co_await ctx.offload(
      [&pager, &c, &capacity, digests]() -> Result<SeqsAndGroups> {
        capacity = pager.capacity();
        if (digests) KVMIG_RETURN_IF_ERROR(pager.pause());
        SeqsAndGroups out;
        Status status;
        auto all = pager.logical_seqs();
        std::set<SeqId> left;  // requests that left while being read
        if (digests) c.fault("agent.status.listed");
        if (!all.ok()) {
          status = all.status();
        } else {
          for (const LogicalSeq& seq : *all) {
            std::string hex;
            if (digests) {
              auto d = seq_digest(pager, seq);
              if (!d.ok()) {
                // A migration may drop a request while this reads it (the
                // engine is paused, kvmig is not): a request gone by now
                // is left out; anything else is an error.
                if (gone(pager, seq.seq_id)) {
                  left.insert(seq.seq_id);
                  continue;
                }
                status = d.status();
                break;
              }
              hex = d->hex();
            }
            out.seqs.push_back({seq.seq_id, seq.n_tokens,
                                static_cast<uint32_t>(seq.pages.size()),
                                std::move(hex)});
          }
          if (status.ok()) {
            std::erase_if(*all, [&left](const LogicalSeq& seq) {
              return left.count(seq.seq_id) > 0;
            });
            out.groups = shared_groups(*all);
          }
        }
        Status resumed = digests ? pager.resume() : Status();
        KVMIG_RETURN_IF_ERROR(status);
        KVMIG_RETURN_IF_ERROR(resumed);
        return out;
      });
  if (!seqs.ok()) co_return seqs.status().with_context("status");
  st.seqs = std::move(seqs->seqs);
  st.shared_groups = std::move(seqs->groups);
  st.control_connections = open_connections;
  st.kept_connections = static_cast<uint32_t>(ctx.kept_channels.sweep());
  // When each request arrived (if it did by migration); forget the rest.
  std::unordered_map<SeqId, Clock::time_point> still_here;
  const auto now = Clock::now();
  for (SeqStatus& s : st.seqs) {
    auto it = ctx.arrivals.find(s.id);
    if (it == ctx.arrivals.end()) continue;
    s.arrived_ms_ago =
        std::chrono::duration_cast<std::chrono::milliseconds>(now - it->second)
            .count();
    still_here.insert(*it);
  }
  ctx.arrivals = std::move(still_here);
  for (const auto& [key, m] : ctx.active) {
    AgentStatus::Migration out;
    out.migration_id = m->id;
    out.role = m->source ? "source" : "destination";
    out.peer = m->peer;
    out.phase = m->phase;
    out.round = m->round;
    out.seqs = m->seqs;
    out.transport = m->transport;
    out.bytes = m->bytes.load(std::memory_order_relaxed);
    out.seconds = std::chrono::duration<double>(now - m->started).count();
    st.migrations.push_back(std::move(out));
  }
  if (capacity) {
    st.capacity_pages = capacity->capacity_pages;
    st.free_pages = capacity->free_pages;
  }
  co_return st;
}

}  // namespace kvmig
