// Control connections a source keeps for its next migration to the same
// destination: a committed migration leaves its connection open (the
// destination waits on it for the next HELLO), so the next one to that
// peer skips the connect (and the handshake, with a secret).
//
// Threading: io thread only.
#ifndef KVMIG_SRC_MIGRATION_KEPT_CHANNELS_H_
#define KVMIG_SRC_MIGRATION_KEPT_CHANNELS_H_

#include <chrono>
#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "channel.h"
#include "kvmig/transport.h"

namespace kvmig {

class KeptChannels {
 public:
  // At most per_peer connections per destination, each kept at most idle
  // (0: nothing is ever kept).
  KeptChannels(size_t per_peer, std::chrono::milliseconds idle)
      : per_peer_(per_peer), idle_(idle) {}

  bool enabled() const { return per_peer_ > 0 && idle_.count() > 0; }

  // A kept connection to `peer` that is still open and not past its idle
  // time, or nothing. Connections found closed by the destination, or
  // stale, are closed and forgotten on the way.
  std::optional<FrameChannel> take(const std::string& peer);

  // Keeps `channel` (nothing pending on it: the migration on it ended
  // with DONE_ACK) for the next migration to `peer`; beyond per_peer, the
  // oldest goes. Also forgets every connection past its idle time, to any
  // peer, so that what is kept stays bounded by the peers still in use: by
  // the clock alone (no system call per kept connection on a migration's
  // path); one its peer closed sooner is found at take().
  void put(const std::string& peer, FrameChannel channel);

  // Closes every kept connection (the agent stops).
  void clear() { kept_.clear(); }

  size_t size() const;

 private:
  struct Kept {
    FrameChannel channel;
    Clock::time_point since;
  };
  bool fresh(const Kept& k, Clock::time_point now) const;

  size_t per_peer_;
  std::chrono::milliseconds idle_;
  std::map<std::string, std::vector<Kept>> kept_;  // newest last
};

}  // namespace kvmig

#endif  // KVMIG_SRC_MIGRATION_KEPT_CHANNELS_H_
