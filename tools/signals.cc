#include "signals.h"

#include <pthread.h>
#include <signal.h>

#include <cerrno>
#include <ctime>
#include <thread>

#include "log.h"

namespace kvmig {
namespace {

sigset_t stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

}  // namespace

void block_stop_signals() {
  sigset_t set = stop_signals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

Status run_until_signal(Agent& agent) {
  std::thread waiter([&agent] {
    sigset_t set = stop_signals();
    int sig = 0;
    sigwait(&set, &sig);
    logger("engine")->info("signal {}: stopping", sig);
    agent.stop();
  });
  Status ran = agent.run();
  // run() also ends when stop() is called by other means: wake the waiter.
  pthread_kill(waiter.native_handle(), SIGTERM);
  waiter.join();
  return ran;
}

bool wait_for_stop_signal(std::chrono::milliseconds timeout) {
  sigset_t set = stop_signals();
  const auto s = std::chrono::duration_cast<std::chrono::seconds>(timeout);
  timespec ts{static_cast<time_t>(s.count()),
              static_cast<long>((timeout - s).count() * 1'000'000)};
  for (;;) {
    const int sig = sigtimedwait(&set, nullptr, &ts);
    if (sig > 0) return true;
    if (errno != EINTR) return false;  // EAGAIN: the timeout passed
  }
}

}  // namespace kvmig
