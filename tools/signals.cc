#include "signals.h"

#include <pthread.h>
#include <signal.h>

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

}  // namespace kvmig
