#include "kept_channels.h"

#include <algorithm>
#include <utility>

namespace kvmig {

bool KeptChannels::fresh(const Kept& k, Clock::time_point now) const {
  return now - k.since < idle_;
}

std::optional<KeptChannels::Taken> KeptChannels::take(const std::string& peer) {
  auto it = kept_.find(peer);
  if (it == kept_.end()) return std::nullopt;
  std::vector<Kept>& list = it->second;
  const auto now = Clock::now();
  std::optional<Taken> found;
  while (!list.empty() && !found) {
    Kept k = std::move(list.back());  // the newest: the least likely stale
    list.pop_back();
    if (fresh(k, now) && !k.channel.peer_closed()) {
      found.emplace(Taken{std::move(k.channel), k.terms});
    }
    // else: k closes here
  }
  if (list.empty()) kept_.erase(it);
  return found;
}

void KeptChannels::put(const std::string& peer, FrameChannel channel,
                       KeptTerms terms) {
  if (!enabled()) return;
  forget(false);
  std::vector<Kept>& list = kept_[peer];
  if (list.size() >= per_peer_) list.erase(list.begin());
  list.push_back(Kept{std::move(channel), terms, Clock::now()});
  arm();
}

void KeptChannels::clear() {
  kept_.clear();
  if (timer_) timer_->cancel();
  armed_ = false;
}

void KeptChannels::arm() {
  if (armed_ || kept_.empty()) return;
  Clock::time_point oldest = Clock::time_point::max();
  for (const auto& [peer, list] : kept_) {
    oldest = std::min(oldest, list.front().since);
  }
  if (!timer_) timer_.emplace(io_);
  timer_->expires_at(oldest + idle_);
  armed_ = true;
  timer_->async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;  // cleared, or destroyed with the agent
    armed_ = false;
    sweep();
    arm();
  });
}

size_t KeptChannels::sweep() {
  forget(true);
  return size();
}

void KeptChannels::forget(bool closed_by_peer_too) {
  const auto now = Clock::now();
  for (auto it = kept_.begin(); it != kept_.end();) {
    std::erase_if(it->second, [&](Kept& k) {
      return !fresh(k, now) || (closed_by_peer_too && k.channel.peer_closed());
    });
    it = it->second.empty() ? kept_.erase(it) : std::next(it);
  }
}

size_t KeptChannels::size() const {
  size_t n = 0;
  for (const auto& [peer, list] : kept_) n += list.size();
  return n;
}

}  // namespace kvmig
