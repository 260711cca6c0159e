// ScopeExit: runs a callable when the scope ends, however it ends, unless
// released first. The one scope guard of kvmig. Not thread-safe (a local).
#ifndef KVMIG_SRC_COMMON_SCOPE_EXIT_H_
#define KVMIG_SRC_COMMON_SCOPE_EXIT_H_

#include <utility>

namespace kvmig {

template <typename F>
class [[nodiscard]] ScopeExit {
 public:
  explicit ScopeExit(F f) : f_(std::move(f)) {}
  ScopeExit(const ScopeExit&) = delete;
  ScopeExit& operator=(const ScopeExit&) = delete;
  ~ScopeExit() {
    if (armed_) f_();
  }
  // The callable will not run.
  void release() { armed_ = false; }

 private:
  F f_;
  bool armed_ = true;
};

}  // namespace kvmig

#endif  // KVMIG_SRC_COMMON_SCOPE_EXIT_H_
