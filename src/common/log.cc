#include "log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdlib>
#include <mutex>
#include <string>

namespace kvmig {
namespace {

std::mutex& log_mutex() {
  static std::mutex mu;
  return mu;
}

spdlog::level::level_enum initial_level() {
  const char* env = std::getenv("KVMIG_LOG_LEVEL");
  return env ? spdlog::level::from_str(env) : spdlog::level::info;
}

spdlog::level::level_enum& current_level() {
  static spdlog::level::level_enum level = initial_level();
  return level;
}

}  // namespace

std::shared_ptr<spdlog::logger> logger(std::string_view name) {
  std::lock_guard lock(log_mutex());
  std::string key(name);
  if (auto existing = spdlog::get(key)) return existing;
  static auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  auto log = std::make_shared<spdlog::logger>(key, sink);
  log->set_level(current_level());
  log->set_pattern("[%H:%M:%S.%e] [%n] [%l] %v");
  spdlog::register_logger(log);
  return log;
}

std::string migration_tag(std::string_view migration_id, std::string_view arrow,
                          std::string_view peer) {
  return fmt::format("[{} {} {}]", migration_id.substr(0, 12), arrow, peer);
}

void set_log_level(std::string_view level) {
  std::lock_guard lock(log_mutex());
  current_level() = spdlog::level::from_str(std::string(level));
  spdlog::apply_all([](const std::shared_ptr<spdlog::logger>& log) {
    log->set_level(current_level());
  });
}

}  // namespace kvmig
