// The tcp data plane: Boost.Asio streams. The target runs one thread that
// applies write records from one authenticated connection into its
// registered memory: small records (payload under 16 KiB) many per system
// call through a receive buffer, their payloads copied out of it; larger
// payloads read straight into place, with the next header in the same
// call. The initiator sends records with gathered writes and flushes with
// a sequence-numbered record the target acknowledges once every earlier
// write has been applied.
//
// Wire format (little-endian), after the initiator sent the target's 64-bit
// token and the target echoed it:
//   write record: u32 region, u64 offset, u64 length, then `length` bytes
//   flush record: u32 0xFFFFFFFF, u64 sequence, u64 0; answered by the u64
//                 sequence once all earlier records were applied.
//
// Target address: host, u16 port, u64 token, u32 region count, u64 length
// of each region. A committed migration keeps its connection on both sides
// (keep()): the next initiator to that peer presents the 8-byte token as its
// address, and a target that still holds the connection adopts it for the
// new migration's regions and answers with port 0 (no listener, no
// handshake); otherwise it listens afresh and the initiator drops what it
// kept. While kept, the target applies no write: one cuts the connection.
#ifndef KVMIG_TRANSPORT_TCP_TCP_TRANSPORT_H_
#define KVMIG_TRANSPORT_TCP_TCP_TRANSPORT_H_

#include <memory>

#include "kvmig/status.h"
#include "kvmig/transport.h"

namespace kvmig {

// Builds a tcp transport; targets listen on opts.bind_host.
Result<std::unique_ptr<Transport>> make_tcp_transport(
    const TransportOptions& opts);

}  // namespace kvmig

#endif  // KVMIG_TRANSPORT_TCP_TCP_TRANSPORT_H_
