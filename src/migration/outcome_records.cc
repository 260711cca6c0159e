#include "outcome_records.h"

namespace kvmig {

void OutcomeRecords::remember(const std::string& id, Outcome outcome) {
  auto [it, inserted] = records_.try_emplace(id);
  Record& rec = it->second;
  if (rec.queried_only) {
    // A query's fence (aborted: counted as neither) gives way to the
    // migration it let in.
    rec = Record{};
  } else if (!inserted) {
    unacknowledged_ -= kept_for_source(rec);
    pending_ -= rec.outcome == Outcome::kPending;
  }
  rec.outcome = outcome;
  unacknowledged_ += kept_for_source(rec);
  pending_ += rec.outcome == Outcome::kPending;
  if (inserted) order_.push_back(id);
  evict();
}

void OutcomeRecords::acknowledge(const std::string& id) {
  auto it = records_.find(id);
  if (it == records_.end()) return;
  unacknowledged_ -= kept_for_source(it->second);
  it->second.acknowledged = true;
}

void OutcomeRecords::evict() {
  // Oldest first; a record that must stay goes to the back of the line, so
  // each one is passed over at most once per kMaxRecords insertions.
  auto drop_front = [&](bool commits_too) {
    for (size_t n = order_.size(); n > 0; --n) {
      std::string id = std::move(order_.front());
      order_.pop_front();
      auto rec = records_.find(id);
      if (rec == records_.end()) continue;
      const Record& r = rec->second;
      const bool kept = r.outcome == Outcome::kPending ||
                        (kept_for_source(r) && !commits_too);
      if (kept || (commits_too && !kept_for_source(r))) {
        order_.push_back(std::move(id));
        continue;
      }
      if (kept_for_source(r)) {
        --unacknowledged_;
        forgot_committed_ = true;
        logger("control")->error(
            "[{}] forgetting a commit its source never acknowledged ({} "
            "kept): queries about forgotten migrations now answer "
            "\"forgotten\"",
            id, kMaxUnacknowledged);
      }
      records_.erase(rec);
      return;
    }
  };
  while (records_.size() - unacknowledged_ - pending_ > kMaxRecords) {
    drop_front(false);
  }
  while (unacknowledged_ > kMaxUnacknowledged) drop_front(true);
}

bool OutcomeRecords::admits(const std::string& id, bool resent) const {
  auto it = records_.find(id);
  return it == records_.end() || (resent && it->second.queried_only);
}

OutcomeRespMsg OutcomeRecords::answer_query(
    const std::string& id, const std::shared_ptr<spdlog::logger>& log) {
  OutcomeRespMsg resp;
  resp.remembers_all = !forgot_committed_;
  auto it = records_.find(id);
  if (it == records_.end() || it->second.queried_only) {
    // Never installed here, unless it could have been and was forgotten.
    const bool unsure = started_with_requests_ || forgot_committed_;
    resp.outcome = unsure ? Outcome::kForgotten : Outcome::kUnknown;
    if (it == records_.end()) {
      // Fenced: the source may now take it for never started.
      Record& rec = records_[id];
      rec.outcome = Outcome::kAborted;
      rec.queried_only = true;
      order_.push_back(id);
      evict();
    }
    return resp;
  }
  Record& rec = it->second;
  if (rec.outcome == Outcome::kPending && !rec.committing) {
    rec.fenced = true;
    log->warn("[{}] outcome query before COMMIT: fenced as aborted", id);
    resp.outcome = Outcome::kAborted;
    return resp;
  }
  resp.outcome = rec.outcome;
  return resp;
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
