// The verbs data plane: libibverbs RC queue pairs and RDMA WRITE.
//
// Memory is registered once per region (ibv_reg_mr with local and remote
// write access) and the target hands out each region's {address, length,
// rkey}. The queue pairs are connected out of band over the migration's
// control connection:
//   create_initiator()  makes the initiator's QPs; its address() (in HELLO)
//                       carries {GID, LID, MTU, QPNs, PSNs}
//   open_target()       makes as many target QPs, moves them INIT->RTR->RTS
//                       against the initiator's; its address() (in OFFER)
//                       carries its own {GID, LID, MTU, QPNs, PSNs} and the
//                       regions' {address, length, rkey}
//   connect()           moves the initiator's QPs INIT->RTR->RTS and checks
//                       the path with a zero-length RDMA WRITE on each QP
// Writes are chains of RDMA WRITE work requests spread over the QPs, posted
// in batches with selective signalling (every kSignalEvery-th and the last
// of each chain), at most opts.max_in_flight outstanding per QP; flush()
// waits for every one of them. A completion error makes the initiator
// unusable (its QPs go to the error state). revoke() moves the target's QPs
// to the error state and destroys them: after it no write lands.
//
// The GID is the RoCE v2 GID of opts.bind_host's address (::ffff:a.b.c.d for
// IPv4); on InfiniBand the LID is used. The path MTU is the smaller of both
// ports' active MTUs; PSNs are random.
#ifndef KVMIG_TRANSPORT_VERBS_VERBS_TRANSPORT_H_
#define KVMIG_TRANSPORT_VERBS_VERBS_TRANSPORT_H_

#include <memory>

#include "kvmig/status.h"
#include "kvmig/transport.h"

namespace kvmig {

// Opens opts.device (or the first device with an active port) and allocates
// a protection domain. Unavailable when there is no usable RDMA device;
// NotFound when no GID matches opts.bind_host.
Result<std::unique_ptr<Transport>> make_verbs_transport(
    const TransportOptions& opts);

}  // namespace kvmig

#endif  // KVMIG_TRANSPORT_VERBS_VERBS_TRANSPORT_H_
