// The destination's outcome records: what a source that lost contact is
// told, as records come, are acknowledged and are forgotten.
#include "outcome_records.h"

#include <gtest/gtest.h>

#include <string>

namespace kvmig {
namespace {

Outcome ask(OutcomeRecords& records, const std::string& id) {
  return records.answer_query(id, logger("control")).outcome;
}

TEST(OutcomeRecords, AnUnknownIdWasNeverInstalledOverAFreshPager) {
  OutcomeRecords records;
  EXPECT_EQ(ask(records, "never"), Outcome::kUnknown);
  OutcomeRecords recreated;  // an agent recreated over a pager with requests
  recreated.set_started_with_requests(true);
  EXPECT_EQ(ask(recreated, "never"), Outcome::kForgotten);
  // Forgotten for what an earlier agent may have done; this one forgot
  // nothing of its own.
  EXPECT_TRUE(recreated.answer_query("never", logger("control")).remembers_all);
  EXPECT_TRUE(records.answer_query("never", logger("control")).remembers_all);
}

TEST(OutcomeRecords, AQueryBeforeCommitFencesTheMigration) {
  OutcomeRecords records;
  records.remember("m", Outcome::kPending);
  EXPECT_EQ(ask(records, "m"), Outcome::kAborted);
  EXPECT_FALSE(records.begin_commit("m"));
  records.remember("n", Outcome::kPending);
  EXPECT_TRUE(records.begin_commit("n"));
  EXPECT_EQ(ask(records, "n"), Outcome::kPending);
  records.remember("n", Outcome::kCommitted);
  EXPECT_EQ(ask(records, "n"), Outcome::kCommitted);
}

// Protocol 12: a query about an id never seen here answers "no record"
// and fences the id: a HELLO with it that comes later (a one exchange held
// on the way) is refused, unless it is the source's resend, which then
// runs as any migration. Fences are bounded like other records.
TEST(OutcomeRecords, AQueryAboutAnUnknownIdFencesAllButTheResend) {
  OutcomeRecords records;
  EXPECT_TRUE(records.admits("x", false));
  EXPECT_EQ(ask(records, "x"), Outcome::kUnknown);
  EXPECT_FALSE(records.admits("x", false));
  EXPECT_TRUE(records.admits("x", true));
  EXPECT_EQ(ask(records, "x"), Outcome::kUnknown);  // still no record
  records.remember("x", Outcome::kPending);         // the resend registers
  EXPECT_FALSE(records.admits("x", true));
  EXPECT_EQ(ask(records, "x"), Outcome::kAborted);  // fenced as any pending
  records.remember("y", Outcome::kPending);
  EXPECT_FALSE(records.admits("y", true));  // a real record is never resent
  EXPECT_EQ(ask(records, "z"), Outcome::kUnknown);
  records.remember("z", Outcome::kPending);
  EXPECT_TRUE(records.begin_commit("z"));  // the fence went with it
  records.remember("z", Outcome::kCommitted);
  EXPECT_EQ(ask(records, "z"), Outcome::kCommitted);
  for (size_t i = 0; i < OutcomeRecords::kMaxRecords + 10; ++i) {
    ask(records, "q-" + std::to_string(i));
  }
  EXPECT_FALSE(records.contains("q-0"));
  EXPECT_TRUE(records.contains("z"));  // committed, not acknowledged
}

TEST(OutcomeRecords, UnacknowledgedCommitsOutliveTheBound) {
  OutcomeRecords records;
  records.remember("committed-unacked", Outcome::kCommitted);
  records.remember("committed-acked", Outcome::kCommitted);
  records.acknowledge("committed-acked");
  records.remember("aborted", Outcome::kAborted);
  for (size_t i = 0; i < OutcomeRecords::kMaxRecords + 10; ++i) {
    records.remember("filler-" + std::to_string(i), Outcome::kAborted);
  }
  // The source never learned this one: still answered.
  EXPECT_EQ(ask(records, "committed-unacked"), Outcome::kCommitted);
  // These went: an aborted migration was never installed, and nobody asks
  // about an acknowledged one.
  EXPECT_FALSE(records.contains("aborted"));
  EXPECT_FALSE(records.contains("committed-acked"));
  EXPECT_EQ(ask(records, "aborted"), Outcome::kUnknown);
}

TEST(OutcomeRecords, ForgettingAnUnacknowledgedCommitMakesUnknownIdsForgotten) {
  OutcomeRecords records;
  const size_t n = OutcomeRecords::kMaxUnacknowledged + 1;
  for (size_t i = 0; i < n; ++i) {
    records.remember("c-" + std::to_string(i), Outcome::kCommitted);
  }
  for (size_t i = 0; i < OutcomeRecords::kMaxRecords; ++i) {
    records.remember("a-" + std::to_string(i), Outcome::kAborted);
  }
  // The oldest commit went: asked about, it is "forgotten", never
  // "never installed", and so is every id the agent does not hold now.
  EXPECT_FALSE(records.contains("c-0"));
  EXPECT_EQ(ask(records, "c-0"), Outcome::kForgotten);
  EXPECT_EQ(ask(records, "never"), Outcome::kForgotten);
  EXPECT_EQ(ask(records, "c-1"), Outcome::kCommitted);
  // And it says so: its "no record" no longer means "never read".
  EXPECT_FALSE(records.answer_query("never", logger("control")).remembers_all);
}

}  // namespace
}  // namespace kvmig
