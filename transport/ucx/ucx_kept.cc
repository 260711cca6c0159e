#include "ucx_kept.h"

#include <atomic>
#include <future>

namespace kvmig::ucx {

void Parking::close_async(std::shared_ptr<TargetState> st) {
  core_->post([st] { st->shut(nullptr); });
}

void Parking::close_async(std::shared_ptr<InitState> st) {
  core_->post([st] { st->close(nullptr); });
}

void Parking::park_target(std::shared_ptr<TargetState> st) {
  std::shared_ptr<TargetState> evicted;
  {
    std::lock_guard lock(mu_);
    targets_.push_back(std::move(st));
    if (targets_.size() > kMaxKept) {
      evicted = std::move(targets_.front());
      targets_.pop_front();
    }
  }
  if (evicted) close_async(std::move(evicted));
}

std::shared_ptr<TargetState> Parking::take_target(uint64_t token) {
  std::lock_guard lock(mu_);
  for (auto it = targets_.begin(); it != targets_.end(); ++it) {
    if ((*it)->token != token) continue;
    auto st = std::move(*it);
    targets_.erase(it);
    if (!st->healthy()) {
      close_async(st);
      return nullptr;
    }
    return st;
  }
  return nullptr;
}

std::shared_ptr<TargetState> Parking::take_ready_target(uint64_t token) {
  std::lock_guard lock(mu_);
  for (auto it = targets_.begin(); it != targets_.end(); ++it) {
    if ((*it)->token != token) continue;
    if (!(*it)->connected || !(*it)->healthy()) return nullptr;
    auto st = std::move(*it);
    targets_.erase(it);
    return st;
  }
  return nullptr;
}

bool Parking::unpark_target(const TargetState* st) {
  std::lock_guard lock(mu_);
  for (auto it = targets_.begin(); it != targets_.end(); ++it) {
    if (it->get() == st) {
      targets_.erase(it);
      return true;
    }
  }
  return false;
}

void Parking::park_init(const std::string& peer,
                        std::shared_ptr<InitState> st) {
  std::vector<std::shared_ptr<InitState>> displaced;
  {
    std::lock_guard lock(mu_);
    displaced = inits_.put(peer, std::move(st));
  }
  for (auto& e : displaced) close_async(std::move(e));
}

std::shared_ptr<InitState> Parking::take_init(const std::string& peer) {
  std::lock_guard lock(mu_);
  auto st = inits_.take(peer);
  if (st && !st->usable()) {
    close_async(st);
    return nullptr;
  }
  return st;
}

void Parking::clear() {
  std::deque<std::shared_ptr<TargetState>> targets;
  std::vector<std::shared_ptr<InitState>> inits;
  {
    std::lock_guard lock(mu_);
    targets.swap(targets_);
    inits = inits_.take_all();
  }
  if (targets.empty() && inits.empty()) return;
  core_->post_close_and_wait(
      [targets = std::move(targets),
       inits = std::move(inits)](std::function<void()> done) {
        auto left = std::make_shared<std::atomic<size_t>>(targets.size() +
                                                          inits.size());
        auto one_closed = [left, done = std::move(done)] {
          if (--*left == 0) done();
        };
        for (const auto& st : targets) st->shut(one_closed);
        for (const auto& st : inits) st->close(one_closed);
      },
      "the kept connections");
}

}  // namespace kvmig::ucx
