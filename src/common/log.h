// Named spdlog loggers, one per subsystem: engine, control, tcp, ucx, verbs.
// Every line on a migration path carries the migration id and the peer.
// Thread-safe (spdlog's multi-threaded sinks).
#ifndef KVMIG_SRC_LOG_H_
#define KVMIG_SRC_LOG_H_

#include <spdlog/spdlog.h>

#include <memory>
#include <string>
#include <string_view>

namespace kvmig {

// The logger called name, created on first use with the shared stderr sink.
std::shared_ptr<spdlog::logger> logger(std::string_view name);

// The tag every log line of one migration starts with:
// "[<first 12 digits of id> <arrow> <peer>]", arrow "->" at the source and
// "<-" at the destination.
std::string migration_tag(std::string_view migration_id, std::string_view arrow,
                          std::string_view peer);

// Sets the level of every kvmig logger ("trace" .. "off"); the default is
// "info", or KVMIG_LOG_LEVEL from the environment.
void set_log_level(std::string_view level);

}  // namespace kvmig

#endif  // KVMIG_SRC_LOG_H_
