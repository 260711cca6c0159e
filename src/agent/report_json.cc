#include "report_json.h"

#include <string>

namespace kvmig {

using json = nlohmann::ordered_json;

json meta_json(const CacheMeta& m) {
  return {{"page_size_tokens", m.page_size_tokens},
          {"n_layers", m.n_layers},
          {"n_heads", m.n_heads},
          {"head_dim", m.head_dim},
          {"dtype", std::string(dtype_name(m.dtype))},
          {"page_bytes", m.page_bytes()}};
}

json status_json(const AgentStatus& st) {
  json seqs = json::array();
  for (const SeqStatus& s : st.seqs) {
    json seq = {{"id", s.id}, {"tokens", s.tokens}, {"pages", s.pages}};
    if (!s.digest.empty()) seq["digest"] = s.digest;
    if (s.arrived_ms_ago >= 0) seq["arrived_ms_ago"] = s.arrived_ms_ago;
    seqs.push_back(std::move(seq));
  }
  json in_doubt = json::array();
  for (const auto& d : st.in_doubt) {
    in_doubt.push_back({{"migration_id", d.migration_id},
                        {"seqs", d.seqs},
                        {"to", d.to},
                        {"hold", d.hold}});
  }
  json groups = json::array();
  for (const auto& g : st.shared_groups) {
    groups.push_back({{"seqs", g.seqs}, {"pages", g.pages}});
  }
  json migrations = json::array();
  for (const auto& m : st.migrations) {
    migrations.push_back({{"migration_id", m.migration_id},
                          {"role", m.role},
                          {"peer", m.peer},
                          {"phase", m.phase},
                          {"round", m.round},
                          {"seqs", m.seqs},
                          {"transport", m.transport},
                          {"bytes", m.bytes},
                          {"seconds", m.seconds}});
  }
  return {{"meta", meta_json(st.meta)},
          {"capacity_pages", st.capacity_pages},
          {"free_pages", st.free_pages},
          {"seqs", seqs},
          {"migrations", migrations},
          {"transports", st.transports},
          {"memory", st.memory},
          {"in_doubt", in_doubt},
          {"shared_groups", groups},
          {"control_connections", st.control_connections},
          {"kept_connections", st.kept_connections}};
}

json migration_json(const MigrationReport& r) {
  json out = {
      {"ok", true},
      {"migration_id", r.migration_id},
      {"seqs", r.seqs},
      {"pages", r.pages},
      {"bytes", r.bytes},
      {"writes", r.writes},
      {"seconds", r.seconds},
      {"gbps", r.gbps},
      {"pause_ms", r.pause_ms},
      {"hold", r.hold},
      {"rounds", r.rounds},
      {"round_pages", r.round_pages},
      {"transport", r.transport},
      {"staged", r.staged},
      {"inline_pages", r.inline_pages},
      {"kept_connection", r.kept_connection},
      {"one_exchange", r.one_exchange},
      {"memory", {{"source", r.src_memory}, {"destination", r.dst_memory}}},
      {"left_behind", r.left_behind}};
  json phases = json::object();
  for (const auto& [name, ms] : r.phases_ms) phases[name] = ms;
  out["phases_ms"] = phases;
  if (!r.digests.empty()) {
    json digests = json::object();
    for (const auto& [id, hex] : r.digests) digests[std::to_string(id)] = hex;
    out["digests"] = digests;
  }
  return out;
}

json cancel_json(const CancelReport& r) {
  return {{"ok", true},
          {"migration_id", r.migration_id},
          {"outcome", r.outcome},
          {"detail", r.detail}};
}

json error_json(const Status& s) {
  return {{"ok", false}, {"error", s.to_string()}};
}

std::string json_text(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace kvmig
