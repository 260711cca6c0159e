#include "messages.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "bytes.h"
#include "control_messages.h"
#include "testutil.h"

namespace kvmig {
namespace {

WireLimits limits() { return WireLimits{}; }

TEST(MessagesTest, HelloRoundTrip) {
  HelloMsg m;
  m.migration_id = "abc";
  m.meta = {16, 32, 8, 128, Dtype::kBf16};
  m.n_pages = 63;
  m.n_seqs = 2;
  m.transports = {"ucx", "tcp"};
  m.initiator_address = {1, 2, 3};
  m.seqs = {7, 9};
  ASSERT_OK_AND_ASSIGN(HelloMsg back, decode_hello(encode(m), limits()));
  EXPECT_EQ(back.migration_id, m.migration_id);
  EXPECT_EQ(back.meta, m.meta);
  EXPECT_EQ(back.n_pages, 63u);
  EXPECT_EQ(back.transports, m.transports);
  EXPECT_EQ(back.initiator_address, m.initiator_address);
  EXPECT_EQ(back.seqs, m.seqs);
  EXPECT_FALSE(back.inline_pages);
  m.inline_pages = true;
  ASSERT_OK_AND_ASSIGN(back, decode_hello(encode(m), limits()));
  EXPECT_TRUE(back.inline_pages);
  EXPECT_FALSE(back.live || back.verify || back.pages_follow);
  // Protocol 11: the pages follow HELLO unasked; only with inline pages,
  // never live.
  m.pages_follow = true;
  ASSERT_OK_AND_ASSIGN(back, decode_hello(encode(m), limits()));
  EXPECT_TRUE(back.pages_follow);
  m.inline_pages = false;
  EXPECT_EQ(decode_hello(encode(m), limits()).status().code(),
            StatusCode::kDataLoss);
  m.inline_pages = true;
  m.live = true;
  EXPECT_EQ(decode_hello(encode(m), limits()).status().code(),
            StatusCode::kDataLoss);
  m.live = false;
  // Protocol 12: a resent one exchange says so; only with pages follow.
  m.resent = true;
  ASSERT_OK_AND_ASSIGN(back, decode_hello(encode(m), limits()));
  EXPECT_TRUE(back.resent && back.pages_follow);
  m.pages_follow = false;
  EXPECT_EQ(decode_hello(encode(m), limits()).status().code(),
            StatusCode::kDataLoss);
  m.resent = false;
  // The ids must be as many as the count.
  m.seqs = {7};
  EXPECT_EQ(decode_hello(encode(m), limits()).status().code(),
            StatusCode::kDataLoss);
}

TEST(MessagesTest, OfferAndCommitRoundTrip) {
  OfferMsg o{"tcp", {5, 6, 9}, {{64, 32, 100}, {64, 32, 100}},
             0,     {7, 7},    "cuda",
             false, 0,         0};
  ASSERT_OK_AND_ASSIGN(OfferMsg ob, decode_offer(encode(o), limits()));
  EXPECT_EQ(ob.memory, "cuda");
  EXPECT_EQ(ob.slots, o.slots);
  EXPECT_EQ(ob.regions, o.regions);
  EXPECT_EQ(ob.target_address, o.target_address);
  EXPECT_FALSE(ob.inline_pages);
  // Protocol 8: the pages inline, no data path; an unknown flag is refused.
  o.inline_pages = true;
  o.target_address.clear();
  o.inline_limit = 64 << 10;
  ASSERT_OK_AND_ASSIGN(ob, decode_offer(encode(o), limits()));
  EXPECT_TRUE(ob.inline_pages);
  EXPECT_EQ(ob.inline_limit, 64u << 10);
  o.incarnation = 0xabcdef;
  ASSERT_OK_AND_ASSIGN(ob, decode_offer(encode(o), limits()));
  EXPECT_EQ(ob.incarnation, 0xabcdefu);
  std::vector<uint8_t> flagged = encode(o);
  flagged[flagged.size() - 17] = 2;  // the flags, before limit, incarnation
  EXPECT_EQ(decode_offer(flagged, limits()).status().code(),
            StatusCode::kDataLoss);
  CommitMsg c{{{1, 20, {5, 6}}, {2, 3, {5}}}, {}, 0};
  ASSERT_OK_AND_ASSIGN(CommitMsg cb, decode_commit(encode(c), limits()));
  EXPECT_EQ(cb.seqs, c.seqs);
  EXPECT_TRUE(cb.verify.positions.empty());
  EXPECT_EQ(cb.data_mark, 0u);
  // The data path's mark (protocol 7), all 64 bits of it; a COMMIT cut
  // inside it is refused.
  c.data_mark = 0x0123456789abcdefULL;
  ASSERT_OK_AND_ASSIGN(cb, decode_commit(encode(c), limits()));
  EXPECT_EQ(cb.data_mark, c.data_mark);
  std::vector<uint8_t> cut = encode(c);
  cut.pop_back();
  EXPECT_EQ(decode_commit(cut, limits()).status().code(),
            StatusCode::kDataLoss);
  c.data_mark = 0;
  // The paused round's checksums travel with COMMIT; as many checksums as
  // positions, or it is refused.
  c.verify = {{0, 1}, {11, 22}};
  ASSERT_OK_AND_ASSIGN(cb, decode_commit(encode(c), limits()));
  EXPECT_EQ(cb.verify.positions, c.verify.positions);
  EXPECT_EQ(cb.verify.checksums, c.verify.checksums);
  c.verify.checksums.pop_back();
  EXPECT_EQ(decode_commit(encode(c), limits()).status().code(),
            StatusCode::kDataLoss);
  VerifyMsg v{{0, 7}, {11, 22}};
  ASSERT_OK_AND_ASSIGN(VerifyMsg vb, decode_verify(encode(v), limits()));
  EXPECT_EQ(vb.positions, v.positions);
  EXPECT_EQ(vb.checksums, v.checksums);
  v.checksums.pop_back();
  EXPECT_EQ(decode_verify(encode(v), limits()).status().code(),
            StatusCode::kDataLoss);
}

// A live round's slots, and the target's window update (verbs keys) with
// them; an update over the blob limit is refused before it is copied.
TEST(MessagesTest, RoundOfferCarriesTheWindowUpdate) {
  RoundOfferMsg m{{4, 5, 9}, {1, 2, 3}};
  ASSERT_OK_AND_ASSIGN(RoundOfferMsg back,
                       decode_round_offer(encode(m), limits()));
  EXPECT_EQ(back.slots, m.slots);
  EXPECT_EQ(back.target_update, m.target_update);
  m.target_update.clear();
  ASSERT_OK_AND_ASSIGN(back, decode_round_offer(encode(m), limits()));
  EXPECT_TRUE(back.target_update.empty());
  WireLimits small;
  small.max_blob = 2;
  m.target_update = {1, 2, 3};
  EXPECT_FALSE(decode_round_offer(encode(m), small).ok());
}

TEST(MessagesTest, ReportStatusAndErrorRoundTrip) {
  MigrationReport r;
  r.migration_id = "id";
  r.seqs = {1, 2};
  r.pages = 9;
  r.bytes = 1 << 20;
  r.gbps = 1.5;
  r.transport = "tcp";
  r.phases_ms = {{"connect", 0.25}, {"data", 3.5}};
  r.src_memory = "cuda";
  r.dst_memory = "host";
  r.inline_pages = r.kept_connection = r.one_exchange = true;
  ASSERT_OK_AND_ASSIGN(MigrationReport rb,
                       decode_migration_report(encode(r), limits()));
  EXPECT_EQ(rb.seqs, r.seqs);
  EXPECT_TRUE(rb.inline_pages && rb.kept_connection && rb.one_exchange);
  EXPECT_FALSE(rb.staged);
  EXPECT_EQ(rb.src_memory, "cuda");
  EXPECT_EQ(rb.dst_memory, "host");
  EXPECT_DOUBLE_EQ(rb.gbps, 1.5);
  EXPECT_EQ(rb.phases_ms, r.phases_ms);
  // A phase name longer than a phase can be is refused.
  r.phases_ms = {{std::string(17, 'x'), 1.0}};
  EXPECT_EQ(decode_migration_report(encode(r), limits()).status().code(),
            StatusCode::kDataLoss);
  AgentStatus st;
  st.meta = {16, 2, 2, 64, Dtype::kF16};
  st.capacity_pages = 10;
  st.free_pages = 4;
  st.seqs = {{1, 17, 2, "ff"}};
  st.transports = {"tcp"};
  st.memory = "cuda+host";
  st.in_doubt = {{"m", {1}, "10.0.0.2:7000", "seqs"}};
  st.control_connections = 3;
  st.kept_connections = 2;
  ASSERT_OK_AND_ASSIGN(AgentStatus sb,
                       decode_agent_status(encode(st), limits()));
  EXPECT_EQ(sb.seqs[0].digest, "ff");
  EXPECT_EQ(sb.control_connections, 3u);
  EXPECT_EQ(sb.kept_connections, 2u);
  EXPECT_EQ(sb.memory, "cuda+host");
  EXPECT_EQ(sb.in_doubt[0].seqs, std::vector<SeqId>{1});
  EXPECT_EQ(sb.in_doubt[0].to, "10.0.0.2:7000");
  EXPECT_EQ(sb.in_doubt[0].hold, "seqs");
  ASSERT_OK_AND_ASSIGN(
      ErrorMsg e,
      decode_error(encode(ErrorMsg{Status::not_found("x")}), limits()));
  EXPECT_EQ(e.status, Status::not_found("x"));
}

TEST(MessagesTest, SnapshotRespCarriesTheSummary) {
  SnapshotReport r;
  r.path = "/var/kvmig/snaps/a.snap";
  r.requests = 3;
  r.pages = 8;
  r.bytes = 131276;
  ASSERT_OK_AND_ASSIGN(SnapshotReport rb,
                       decode_snapshot_resp(encode(r), limits()));
  EXPECT_TRUE(rb.summarized);
  EXPECT_EQ(rb.path, r.path);
  EXPECT_EQ(rb.requests, 3u);
  EXPECT_EQ(rb.pages, 8u);
  EXPECT_EQ(rb.bytes, 131276u);
  // An empty cache's snapshot: no request, no page.
  r.requests = r.pages = 0;
  r.bytes = 84;
  EXPECT_TRUE(decode_snapshot_resp(encode(r), limits()).ok());
  // An agent older than the summary answers with nothing: success, no
  // numbers. A report without a summary encodes to the same.
  ASSERT_OK_AND_ASSIGN(SnapshotReport older,
                       decode_snapshot_resp({}, limits()));
  EXPECT_FALSE(older.summarized);
  EXPECT_TRUE(older.path.empty());
  EXPECT_TRUE(encode(older).empty());
}

TEST(MessagesTest, SnapshotRespIsValidated) {
  auto bad = [](std::string path, uint64_t requests, uint64_t pages,
                uint64_t bytes) {
    SnapshotReport r;
    r.path = std::move(path);
    r.requests = requests;
    r.pages = pages;
    r.bytes = bytes;
    return decode_snapshot_resp(encode(r), limits()).status();
  };
  EXPECT_EQ(bad("a.snap", 1, 1, 1000).code(), StatusCode::kDataLoss);
  EXPECT_EQ(bad("", 1, 1, 1000).code(), StatusCode::kDataLoss);
  EXPECT_EQ(bad("/a.snap", 0, 5, 1000).code(), StatusCode::kDataLoss);
  EXPECT_EQ(bad("/a.snap", 1, 1000, 1000).code(), StatusCode::kDataLoss);
  Status s = bad("/a.snap", 0, 5, 1000);
  EXPECT_NE(s.message().find("SNAPSHOT_RESP"), std::string::npos)
      << s.to_string();
  SnapshotReport r{"/a.snap", 1, 1, 1000, true};
  std::vector<uint8_t> payload = encode(r);
  payload.push_back(0);
  EXPECT_EQ(decode_snapshot_resp(payload, limits()).status().code(),
            StatusCode::kDataLoss);
  payload.pop_back();
  for (size_t cut = 1; cut < payload.size(); ++cut) {
    std::span<const uint8_t> part(payload.data(), cut);
    EXPECT_FALSE(decode_snapshot_resp(part, limits()).ok()) << "cut " << cut;
  }
}

// PAGES: positions, then every remaining byte is page data (its size is the
// destination's to check); a truncated count is refused.
TEST(MessagesTest, PagesRoundTrip) {
  std::vector<uint8_t> bytes(96);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = uint8_t(i);
  PagesMsg m{{3, 0, 7}, bytes};
  const std::vector<uint8_t> frame = encode(m);
  ASSERT_OK_AND_ASSIGN(PagesMsg back, decode_pages(frame, limits()));
  EXPECT_EQ(back.positions, m.positions);
  EXPECT_TRUE(std::ranges::equal(back.bytes, bytes));
  // The pages are a view into the frame: decoding copies none of them.
  EXPECT_EQ(back.bytes.data(), frame.data() + frame.size() - bytes.size());
  // Without bytes: the positions alone, as a PAGES frame's payload before
  // its bulk (the pages) is.
  m.bytes = {};
  const std::vector<uint8_t> head = encode(m);
  EXPECT_TRUE(std::equal(head.begin(), head.end(), frame.begin()));
  ASSERT_OK_AND_ASSIGN(back, decode_pages(head, limits()));
  EXPECT_EQ(back.positions, m.positions);
  EXPECT_TRUE(back.bytes.empty());
  const std::vector<uint8_t> cut = {3, 0, 0};
  EXPECT_EQ(decode_pages(cut, limits()).status().code(), StatusCode::kDataLoss);
  // A count over the limit is refused before anything is allocated.
  const std::vector<uint8_t> too_many = {0xff, 0xff, 0xff, 0x7f};
  EXPECT_FALSE(decode_pages(too_many, limits()).ok());
}

TEST(MessagesTest, HostileCountsAreRefusedBeforeAllocating) {
  // A COMMIT claiming 2^32-1 requests in a 10-byte payload.
  ByteWriter w;
  w.put(uint32_t{0xffffffff});
  w.put(uint32_t{0});
  auto r = decode_commit(w.take(), limits());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted);
  // Within the limit but larger than the bytes present.
  ByteWriter w2;
  w2.put(uint32_t{1000});
  auto r2 = decode_commit(w2.take(), limits());
  ASSERT_FALSE(r2.ok());
  EXPECT_EQ(r2.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(r2.status().message().find("COMMIT"), std::string::npos);
}

// One request of a tiny cache, over tcp.
HelloMsg small_hello() {
  HelloMsg m;
  m.migration_id = "id";
  m.meta = {16, 2, 2, 64, Dtype::kF16};
  m.n_pages = 1;
  m.n_seqs = 1;
  m.transports = {"tcp"};
  m.seqs = {1};
  return m;
}

TEST(MessagesTest, TrailingBytesAndTruncationAreErrors) {
  auto payload = encode(BatchMsg{{1, 2}});
  payload.push_back(0);
  EXPECT_EQ(decode_batch(payload, limits()).status().code(),
            StatusCode::kDataLoss);
  auto hello = encode(small_hello());
  for (size_t cut = 0; cut < hello.size(); ++cut) {
    std::span<const uint8_t> part(hello.data(), cut);
    EXPECT_FALSE(decode_hello(part, limits()).ok()) << "cut at " << cut;
  }
}

// Arrays (page lists, ids, checksums) go in one copy: the same bytes as a
// put() a value, so the wire format is unchanged; read back whole, and a
// cut array is refused naming it, before anything is read into place.
TEST(MessagesTest, ArraysAreWrittenAsValueByValue) {
  const std::vector<uint32_t> pages = {0, 1, 0x01020304u, 0xfffffffeu};
  const std::vector<uint64_t> sums = {0x0102030405060708ull, 0, ~0ull};
  ByteWriter one_by_one;
  for (uint32_t p : pages) one_by_one.put(p);
  for (uint64_t c : sums) one_by_one.put(c);
  ByteWriter whole;
  whole.put_array(std::span<const uint32_t>(pages));
  whole.put_array(std::span<const uint64_t>(sums));
  whole.put_array(std::span<const uint64_t>());  // nothing
  ASSERT_EQ(whole.buffer(), one_by_one.buffer());
  EXPECT_EQ(whole.buffer()[8], 0x04);  // little-endian
  EXPECT_EQ(whole.buffer()[16], 0x08);

  const std::vector<uint8_t> bytes = whole.take();
  ByteReader r(bytes);
  std::vector<uint32_t> pages_back(pages.size());
  std::vector<uint64_t> sums_back(sums.size());
  ASSERT_OK(r.get_array(std::span(pages_back), "pages"));
  ASSERT_OK(r.get_array(std::span(sums_back), "sums"));
  EXPECT_EQ(pages_back, pages);
  EXPECT_EQ(sums_back, sums);
  EXPECT_OK(r.expect_end("arrays"));

  ByteReader cut(std::span(bytes.data(), bytes.size() - 1));
  ASSERT_OK(cut.get_array(std::span(pages_back), "pages"));
  std::vector<uint64_t> untouched(sums.size(), 7);
  Status s = cut.get_array(std::span(untouched), "checksums");
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_NE(s.message().find("checksums: truncated at offset 16 (need 24"),
            std::string::npos)
      << s.to_string();
  EXPECT_EQ(untouched, std::vector<uint64_t>(sums.size(), 7));
  EXPECT_EQ(cut.offset(), 16u);
}

TEST(MessagesTest, BadEnumsAreErrors) {
  auto hello = encode(small_hello());
  hello[4 + 2 + 16] = 77;  // dtype byte after "id" and four u32 dims
  EXPECT_EQ(decode_hello(hello, limits()).status().code(),
            StatusCode::kDataLoss);
  std::vector<uint8_t> outcome = {9};
  EXPECT_FALSE(decode_outcome_resp(outcome).ok());
}

TEST(MessagesTest, OutcomeRespCarriesTheIncarnation) {
  OutcomeRespMsg m{Outcome::kForgotten, 0x0102030405060708, true};
  ASSERT_OK_AND_ASSIGN(OutcomeRespMsg back, decode_outcome_resp(encode(m)));
  EXPECT_EQ(back.outcome, Outcome::kForgotten);
  EXPECT_EQ(back.incarnation, m.incarnation);
  EXPECT_TRUE(back.remembers_all);
  std::vector<uint8_t> flagged = encode(m);
  flagged.back() = 2;
  EXPECT_EQ(decode_outcome_resp(flagged).status().code(),
            StatusCode::kDataLoss);
  flagged.pop_back();
  EXPECT_FALSE(decode_outcome_resp(flagged).ok());
}

TEST(MessagesTest, RandomBytesNeverCrashDecoders) {
  std::mt19937 rng(42);
  for (int i = 0; i < 2000; ++i) {
    std::vector<uint8_t> junk(rng() % 64);
    for (auto& b : junk) b = static_cast<uint8_t>(rng());
    (void)decode_hello(junk, limits());
    (void)decode_offer(junk, limits());
    (void)decode_commit(junk, limits());
    (void)decode_pages(junk, limits());
    (void)decode_agent_status(junk, limits());
    (void)decode_migrate_request(junk, limits());
    (void)decode_migration_report(junk, limits());
    (void)decode_error(junk, limits());
    (void)decode_snapshot_resp(junk, limits());
  }
  SUCCEED() << "decoders survived 2000 random payloads (ASan/UBSan in CI)";
}

}  // namespace
}  // namespace kvmig
