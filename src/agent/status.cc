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
  // Digests are computed with the engine paused, so no request is seen torn;
  // without them nothing is read and the engine is not paused.
  CachePager& pager = ctx.pager;
  auto seqs = co_await ctx.offload(
      [&pager, digests]() -> Result<std::vector<SeqStatus>> {
        if (digests) KVMIG_RETURN_IF_ERROR(pager.pause());
        std::vector<SeqStatus> out;
        Status status;
        auto all = pager.logical_seqs();
        if (!all.ok()) {
          status = all.status();
        } else {
          for (const LogicalSeq& seq : *all) {
            std::string hex;
            if (digests) {
              auto d = seq_digest(pager, seq);
              if (!d.ok()) {
                status = d.status();
                break;
              }
              hex = d->hex();
            }
            out.push_back({seq.seq_id, seq.n_tokens,
                           static_cast<uint32_t>(seq.pages.size()),
                           std::move(hex)});
          }
        }
        Status resumed = digests ? pager.resume() : Status();
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
