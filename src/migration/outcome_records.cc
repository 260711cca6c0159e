#include "outcome_records.h"

namespace kvmig {

void OutcomeRecords::remember(const std::string& id, Outcome outcome) {
  auto [it, inserted] = records_.try_emplace(id);
  it->second.outcome = outcome;
  if (!inserted) return;
  order_.push_back(id);
  while (order_.size() > kMaxRecords) {
    const std::string& oldest = order_.front();
    auto old = records_.find(oldest);
    // Never forget a migration that is still under way.
    if (old != records_.end() && old->second.outcome == Outcome::kPending) {
      break;
    }
    records_.erase(oldest);
    order_.pop_front();
  }
}

OutcomeRespMsg OutcomeRecords::answer_query(
    const std::string& id, const std::shared_ptr<spdlog::logger>& log) {
  auto it = records_.find(id);
  if (it == records_.end()) return {Outcome::kUnknown};
  Record& rec = it->second;
  if (rec.outcome == Outcome::kPending && !rec.committing) {
    rec.fenced = true;
    log->warn("[{}] outcome query before COMMIT: fenced as aborted", id);
    return {Outcome::kAborted};
  }
  return {rec.outcome};
}

bool OutcomeRecords::begin_commit(const std::string& id) {
  Record& rec = records_[id];
  if (rec.fenced) return false;
  rec.committing = true;
  return true;
}

void SourceOutcomes::remember(const std::string& id, Entry entry) {
  auto [it, inserted] = records_.insert_or_assign(id, std::move(entry));
  (void)it;
  if (!inserted) return;
  order_.push_back(id);
  if (order_.size() > kMaxRecords) {
    records_.erase(order_.front());
    order_.pop_front();
  }
}

const SourceOutcomes::Entry* SourceOutcomes::find(const std::string& id) const {
  auto it = records_.find(id);
  return it == records_.end() ? nullptr : &it->second;
}

}  // namespace kvmig
