// Mutual authentication of a control connection: HMAC-SHA256
// challenge-response with a secret both sides hold, before anything else
// (no meta, address or remote key) is sent.
//
//   client -> agent  AUTH_HELLO      nonce_c (32 random bytes)
//   agent -> client  AUTH_CHALLENGE  nonce_s, HMAC(secret, "kvmig agent" |
//   nonce_c | nonce_s) client -> agent  AUTH_PROOF      HMAC(secret, "kvmig
//   client" | nonce_s | nonce_c) agent -> client  AUTH_OK         (or ERROR)
//
// The client checks the agent's MAC before proving itself, so neither side
// talks to a peer that does not know the secret. MACs are compared in
// constant time. Stateless functions; the coroutines run on the channel's
// io_context thread.
#ifndef KVMIG_SRC_AUTH_H_
#define KVMIG_SRC_AUTH_H_

#include <string>

#include "asio.h"
#include "channel.h"
#include "kvmig/status.h"
#include "kvmig/transport.h"

namespace kvmig {

// Client side: runs the handshake on a fresh connection. Unauthenticated
// when the agent's MAC is wrong, has no secret, or refuses ours.
asio::awaitable<Status> authenticate_to_agent(FrameChannel& channel,
                                              const std::string& secret,
                                              Deadline deadline);

// Agent side: `hello` is the connection's first frame (AUTH_HELLO). Sends
// AUTH_OK, or an ERROR saying why, and returns the outcome.
asio::awaitable<Status> authenticate_client(FrameChannel& channel,
                                            const Frame& hello,
                                            const std::string& secret,
                                            Deadline deadline);

// Connects to "HOST:PORT" and, with a non-empty secret, authenticates:
// the one way every client of an agent opens a control connection.
asio::awaitable<Result<FrameChannel>> connect_channel(std::string_view agent,
                                                      uint32_t max_payload,
                                                      const std::string& secret,
                                                      Deadline deadline);

// Reads a secret file: its content without trailing white space, at least
// 16 bytes. The path must name a regular file of at most 4096 bytes (so
// /dev/zero, a FIFO or a directory is refused, and a read never runs
// unbounded). InvalidArgument for an empty path, a file that is not regular,
// too large or too short; NotFound for a missing file; errno's mapping for
// any other failure to open or read.
Result<std::string> read_secret_file(const std::string& path);

}  // namespace kvmig

#endif  // KVMIG_SRC_AUTH_H_
