// AgentRecord's JSON form (the value of PREFIX/agents/NAME) and keys.
#include <nlohmann/json.hpp>

#include "cluster_json.h"
#include "cluster_keys.h"
#include "kvmig/cluster.h"
#include "report_json.h"

namespace kvmig {

using json = nlohmann::ordered_json;

double AgentRecord::load() const {
  if (capacity_pages == 0) return 1.0;
  const uint64_t used =
      capacity_pages > free_pages ? capacity_pages - free_pages : 0;
  return static_cast<double>(used) / static_cast<double>(capacity_pages);
}

std::string agent_record_json(const AgentRecord& r) {
  json j = agent_record_object(r);
  j.erase("load");  // derived: not stored
  return json_text(j);
}

namespace {

template <typename T>
Status get_field(const json& j, const char* name, T& out) {
  auto it = j.find(name);
  if (it == j.end()) {
    return Status::invalid_argument(std::string("no field '") + name + "'");
  }
  try {
    out = it->get<T>();
  } catch (const json::exception&) {
    return Status::invalid_argument(std::string("field '") + name +
                                    "' has the wrong type");
  }
  return Status();
}

Result<CacheMeta> parse_meta(const json& j) {
  if (!j.is_object()) return Status::invalid_argument("'meta' not an object");
  CacheMeta m;
  std::string dtype;
  KVMIG_RETURN_IF_ERROR(get_field(j, "page_size_tokens", m.page_size_tokens));
  KVMIG_RETURN_IF_ERROR(get_field(j, "n_layers", m.n_layers));
  KVMIG_RETURN_IF_ERROR(get_field(j, "n_heads", m.n_heads));
  KVMIG_RETURN_IF_ERROR(get_field(j, "head_dim", m.head_dim));
  KVMIG_RETURN_IF_ERROR(get_field(j, "dtype", dtype));
  KVMIG_ASSIGN_OR_RETURN(m.dtype, parse_dtype(dtype));
  KVMIG_RETURN_IF_ERROR(m.validate());
  return m;
}

}  // namespace

Result<AgentRecord> parse_agent_record(const std::string& text) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return Status::invalid_argument("agent record: not a JSON object");
  }
  AgentRecord r;
  Status s = [&]() -> Status {
    KVMIG_RETURN_IF_ERROR(get_field(j, "name", r.name));
    KVMIG_RETURN_IF_ERROR(get_field(j, "address", r.address));
    auto meta = j.find("meta");
    if (meta == j.end()) return Status::invalid_argument("no field 'meta'");
    KVMIG_ASSIGN_OR_RETURN(r.meta, parse_meta(*meta));
    KVMIG_RETURN_IF_ERROR(get_field(j, "capacity_pages", r.capacity_pages));
    KVMIG_RETURN_IF_ERROR(get_field(j, "free_pages", r.free_pages));
    KVMIG_RETURN_IF_ERROR(get_field(j, "requests", r.requests));
    KVMIG_RETURN_IF_ERROR(get_field(j, "transports", r.transports));
    KVMIG_RETURN_IF_ERROR(get_field(j, "draining", r.draining));
    KVMIG_RETURN_IF_ERROR(get_field(j, "version", r.version));
    return Status();
  }();
  if (!s.ok()) return s.with_context("agent record");
  return r;
}

Status check_agent_name(const std::string& name) {
  if (name.empty() || name.size() > 128) {
    return Status::invalid_argument("agent name '" + name +
                                    "': 1 to 128 characters");
  }
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!ok) {
      return Status::invalid_argument("agent name '" + name +
                                      "': only A-Z a-z 0-9 . _ -");
    }
  }
  return Status();
}

std::string agents_prefix(const std::string& prefix) {
  return prefix + "/agents/";
}
std::string agent_key(const std::string& prefix, const std::string& name) {
  return agents_prefix(prefix) + name;
}
std::string lock_key(const std::string& prefix, const std::string& name) {
  return prefix + "/locks/" + name;
}

}  // namespace kvmig
