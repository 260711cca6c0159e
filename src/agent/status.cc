// An agent's status: its meta, capacity, requests (with digests) and the
// migrations in doubt.
#include "agent_impl.h"
#include "kvmig/digest.h"

namespace kvmig {

asio::awaitable<Result<AgentStatus>> Agent::Impl::compute_status(bool digests) {
  AgentStatus st;
  st.meta = ctx.pager.meta();
  for (const auto& [name, t] : ctx.transports) st.transports.push_back(name);
  st.in_doubt = ctx.in_doubt.entries();
  // Digests are computed with the engine paused, so no request is seen torn.
  CachePager& pager = ctx.pager;
  auto seqs = co_await ctx.offload(
      [&pager, digests]() -> Result<std::vector<SeqStatus>> {
        if (!digests) {
          KVMIG_ASSIGN_OR_RETURN(auto all, pager.logical_seqs());
          std::vector<SeqStatus> out;
          for (const LogicalSeq& seq : all) {
            out.push_back({seq.seq_id, seq.n_tokens,
                           static_cast<uint32_t>(seq.pages.size()), ""});
          }
          return out;
        }
        KVMIG_RETURN_IF_ERROR(pager.pause());
        std::vector<SeqStatus> out;
        Status status;
        auto all = pager.logical_seqs();
        if (!all.ok()) {
          status = all.status();
        } else {
          for (const LogicalSeq& seq : *all) {
            auto d = seq_digest(pager, seq);
            if (!d.ok()) {
              status = d.status();
              break;
            }
            out.push_back({seq.seq_id, seq.n_tokens,
                           static_cast<uint32_t>(seq.pages.size()), d->hex()});
          }
        }
        Status resumed = pager.resume();
        KVMIG_RETURN_IF_ERROR(status);
        KVMIG_RETURN_IF_ERROR(resumed);
        return out;
      });
  if (!seqs.ok()) co_return seqs.status().with_context("status");
  st.seqs = std::move(*seqs);
  if (auto cap = ctx.pager.capacity()) {
    st.capacity_pages = cap->capacity_pages;
    st.free_pages = cap->free_pages;
  }
  co_return st;
}

}  // namespace kvmig
