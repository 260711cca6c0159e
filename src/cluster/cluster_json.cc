#include "cluster_json.h"

#include "report_json.h"

namespace kvmig {

using json = nlohmann::ordered_json;

json agent_record_object(const AgentRecord& r) {
  return {{"name", r.name},
          {"address", r.address},
          {"meta", meta_json(r.meta)},
          {"capacity_pages", r.capacity_pages},
          {"free_pages", r.free_pages},
          {"requests", r.requests},
          {"transports", r.transports},
          {"draining", r.draining},
          {"version", r.version},
          {"load", r.load()}};
}

json agents_json(const std::vector<AgentRecord>& agents) {
  json list = json::array();
  for (const AgentRecord& r : agents) list.push_back(agent_record_object(r));
  return {{"ok", true}, {"agents", list}};
}

json drain_json(const DrainReport& r) {
  json moved = json::array();
  for (const RequestPlacement& p : r.moved) {
    moved.push_back(
        {{"seq", p.seq}, {"to", p.to}, {"migration_id", p.migration_id}});
  }
  json unplaced = json::array();
  for (const RequestPlacement& p : r.unplaced) {
    unplaced.push_back({{"seq", p.seq}, {"error", p.error}});
  }
  return {{"ok", r.ok()},           {"agent", r.agent},
          {"moved", moved},         {"unplaced", unplaced},
          {"finished", r.finished}, {"migrations", r.migrations},
          {"plan_ms", r.plan_ms}};
}

json rebalance_json(const RebalanceReport& r) {
  json moves = json::array();
  bool ok = true;
  for (const RebalanceMove& m : r.moves) {
    ok = ok && m.error.empty();
    moves.push_back({{"from", m.from},
                     {"to", m.to},
                     {"seqs", m.seqs},
                     {"pages", m.pages},
                     {"migration_id", m.migration_id},
                     {"error", m.error},
                     {"load_from", m.load_from_before},
                     {"load_to", m.load_to_before}});
  }
  return {{"ok", ok}, {"moves", moves}, {"skipped", r.skipped}};
}

}  // namespace kvmig
