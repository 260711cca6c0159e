// The ucx data plane: UCP RMA puts (ucp_put_nbx) into memory the target
// mapped with ucp_mem_map and exported as packed remote keys; flush is
// ucp_ep_flush_nbx, the only thing that says the bytes have landed.
// Connections go through a ucp_listener (sockaddr), which is also what works
// on Soft-RoCE.
#ifndef KVMIG_TRANSPORT_UCX_UCX_TRANSPORT_H_
#define KVMIG_TRANSPORT_UCX_UCX_TRANSPORT_H_

#include <memory>

#include "kvmig/status.h"
#include "kvmig/transport.h"

namespace kvmig {

// Builds a ucx transport: one ucp_context and one ucp_worker, progressed by
// one thread. Targets listen on opts.bind_host; opts.max_in_flight bounds
// the puts each initiator has outstanding.
Result<std::unique_ptr<Transport>> make_ucx_transport(
    const TransportOptions& opts);

}  // namespace kvmig

#endif  // KVMIG_TRANSPORT_UCX_UCX_TRANSPORT_H_
