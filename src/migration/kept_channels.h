// Control connections a source keeps for its next migration to the same
// destination: a committed migration leaves its connection open (the
// destination waits on it for the next HELLO), so the next one to that
// peer skips the connect (and the handshake, with a secret). A timer on
// the io thread closes each at the end of its idle time.
//
// Threading: io thread only.
#ifndef KVMIG_SRC_MIGRATION_KEPT_CHANNELS_H_
#define KVMIG_SRC_MIGRATION_KEPT_CHANNELS_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "asio.h"
#include "channel.h"
#include "kvmig/transport.h"

namespace kvmig {

// What the OFFER on a kept connection said of its destination: the same
// agent is at the other end for as long as the connection lasts.
struct KeptTerms {
  uint64_t inline_limit = 0;  // OfferMsg::inline_limit
  uint64_t incarnation = 0;   // OfferMsg::incarnation
};

class KeptChannels {
 public:
  struct Taken {
    FrameChannel channel;
    KeptTerms terms;
  };

  // At most per_peer connections per destination, each kept at most idle
  // (0: nothing is ever kept); the timer that closes them runs on io.
  KeptChannels(asio::io_context& io, size_t per_peer,
               std::chrono::milliseconds idle)
      : per_peer_(per_peer), idle_(idle), io_(io) {}

  bool enabled() const { return per_peer_ > 0 && idle_.count() > 0; }

  // A kept connection to `peer` that is still open and not past its idle
  // time, or nothing. Connections found closed by the destination, or
  // stale, are closed and forgotten on the way.
  std::optional<Taken> take(const std::string& peer);

  // Keeps `channel` (nothing pending on it: the migration on it ended
  // with DONE_ACK) for the next migration to `peer`; beyond per_peer, the
  // oldest goes. Also forgets every connection past its idle time, to any
  // peer, by the clock alone (no system call per kept connection on a
  // migration's path); one its peer closed sooner is found at take() or
  // sweep(). Arms the timer for the oldest one's idle end.
  void put(const std::string& peer, FrameChannel channel, KeptTerms terms = {});

  // Closes every kept connection and stops the timer (the agent stops).
  void clear();

  // Closes and forgets every connection past its idle time or closed by
  // its destination (a system call each: for status, not a migration's
  // path); returns how many stay kept.
  size_t sweep();

  size_t size() const;

 private:
  struct Kept {
    FrameChannel channel;
    KeptTerms terms;
    Clock::time_point since;
  };
  bool fresh(const Kept& k, Clock::time_point now) const;
  // Closes and forgets every connection past its idle time and, with
  // closed_by_peer_too, every one its destination closed (a system call
  // each).
  void forget(bool closed_by_peer_too);
  // Unless armed: the timer for the end of the oldest connection's idle
  // time, which sweeps and arms again while any is left.
  void arm();

  size_t per_peer_;
  std::chrono::milliseconds idle_;
  std::map<std::string, std::vector<Kept>> kept_;  // newest last
  asio::io_context& io_;
  std::optional<asio::steady_timer> timer_;  // made on the io thread
  bool armed_ = false;
};

}  // namespace kvmig

#endif  // KVMIG_SRC_MIGRATION_KEPT_CHANNELS_H_
