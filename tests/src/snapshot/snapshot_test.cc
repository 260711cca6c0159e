#include "kvmig/snapshot.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <xxhash.h>

#include <barrier>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "forwarding_pager.h"
#include "kvmig/digest.h"
#include "synthetic_pager.h"
#include "testutil.h"

namespace kvmig {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kHeaderBytes = 60;
constexpr uint64_t kTrailerBytes = 16;

CacheMeta tiny() { return *preset_meta("tiny"); }

std::unique_ptr<SyntheticPager> make(PoolLayout layout, uint32_t capacity,
                                     CacheMeta meta = tiny()) {
  auto r = SyntheticPager::create(meta, layout, capacity);
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return r.ok() ? std::move(r).value() : nullptr;
}

std::map<SeqId, Digest> digests(CachePager& pager) {
  std::map<SeqId, Digest> out;
  auto seqs = pager.logical_seqs();
  EXPECT_TRUE(seqs.ok());
  if (!seqs.ok()) return out;
  for (const LogicalSeq& seq : *seqs) {
    auto d = seq_digest(pager, seq);
    EXPECT_TRUE(d.ok()) << d.status().to_string();
    if (d.ok()) out[seq.seq_id] = *d;
  }
  return out;
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

void put_u64(std::vector<uint8_t>& bytes, size_t offset, uint64_t v) {
  for (int i = 0; i < 8; ++i)
    bytes[offset + i] = static_cast<uint8_t>(v >> (8 * i));
}

class SnapshotTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "/kvmig_snapshot_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  // A tiny page-layout pager with 3 requests of 53 tokens sharing 2 pages
  // (8 distinct pages), captured to path("base.snp").
  void capture_base() {
    source_ = make(PoolLayout::kPage, 32);
    ASSERT_OK(source_->populate(3, 50, 7, 32));
    for (int i = 0; i < 3; ++i) source_->decode_step();
    ASSERT_OK(capture(*source_, path("base.snp")));
    base_ = read_file(path("base.snp"));
    const uint64_t record = 2 * tiny().page_bytes() + 8;
    pages_offset_ = base_.size() - kTrailerBytes - 8 * record;
  }

  // Restoring `bytes` fails with code and a message containing `what`, and
  // leaves a fresh target untouched; inspect_snapshot fails the same way.
  void expect_rejected(const std::vector<uint8_t>& bytes, StatusCode code,
                       const std::string& what) {
    const std::string p = path("bad.snp");
    write_file(p, bytes);
    auto target = make(PoolLayout::kLayer, 32);
    Status s = restore(p, *target);
    EXPECT_EQ(s.code(), code) << s.to_string();
    EXPECT_NE(s.message().find(what), std::string::npos) << s.to_string();
    EXPECT_TRUE(target->logical_seqs()->empty());
    EXPECT_TRUE(target->occupied_pages()->empty());
    EXPECT_EQ(target->capacity()->free_pages, 32u);
    auto info = inspect_snapshot(p);
    EXPECT_EQ(info.status().code(), code) << info.status().to_string();
  }

  std::string dir_;
  std::unique_ptr<SyntheticPager> source_;
  std::vector<uint8_t> base_;
  uint64_t pages_offset_ = 0;
};

TEST_F(SnapshotTest, RoundTripAcrossLayoutsWithSharedPrefix) {
  for (PoolLayout from : {PoolLayout::kPage, PoolLayout::kLayer}) {
    auto src = make(from, 32);
    ASSERT_OK(src->populate(3, 50, 7, 32));  // 2 shared + 3 x 2 own pages
    for (int i = 0; i < 3; ++i) src->decode_step();  // 53 tokens, 4 pages
    const auto want = digests(*src);
    ASSERT_EQ(want.size(), 3u);
    const std::string p = path("rt.snp");
    ASSERT_OK(capture(*src, p));

    ASSERT_OK_AND_ASSIGN(SnapshotInfo info, inspect_snapshot(p));
    EXPECT_EQ(info.version, 1u);
    EXPECT_EQ(info.meta, tiny());
    EXPECT_EQ(info.n_pages, 8u);  // shared pages stored once
    EXPECT_EQ(info.file_bytes, fs::file_size(p));
    ASSERT_EQ(info.seqs.size(), 3u);
    for (const SnapshotSeqInfo& s : info.seqs) {
      EXPECT_EQ(s.n_tokens, 53u);
      EXPECT_EQ(s.n_pages, 4u);
      EXPECT_EQ(s.digest, want.at(s.seq_id)) << s.seq_id;
    }

    for (PoolLayout to : {PoolLayout::kPage, PoolLayout::kLayer}) {
      auto dst = make(to, 32);
      ASSERT_OK(restore(p, *dst));
      EXPECT_EQ(digests(*dst), want);
      EXPECT_EQ(dst->capacity()->free_pages, 32u - 8);
      ASSERT_OK_AND_ASSIGN(auto seqs, dst->logical_seqs());
      ASSERT_EQ(seqs.size(), 3u);
      EXPECT_EQ(seqs[0].pages[1], seqs[2].pages[1]);
      EXPECT_NE(seqs[0].pages[2], seqs[2].pages[2]);
      // The restored pager keeps decoding.
      EXPECT_EQ(dst->decode_step(), 3u);
    }
  }
}

TEST_F(SnapshotTest, EmptyPagerRoundTrip) {
  auto src = make(PoolLayout::kPage, 8);
  ASSERT_OK(capture(*src, path("empty.snp")));
  ASSERT_OK_AND_ASSIGN(SnapshotInfo info, inspect_snapshot(path("empty.snp")));
  EXPECT_EQ(info.n_pages, 0u);
  EXPECT_TRUE(info.seqs.empty());
  EXPECT_EQ(info.file_bytes, kHeaderBytes + 8 + kTrailerBytes);
  auto dst = make(PoolLayout::kLayer, 8);
  ASSERT_OK(restore(path("empty.snp"), *dst));
  EXPECT_EQ(dst->capacity()->free_pages, 8u);
}

TEST_F(SnapshotTest, CaptureOverwritesAtomicallyAndLeavesNoTempFile) {
  capture_base();
  for (int i = 0; i < 20; ++i) source_->decode_step();
  ASSERT_OK(capture(*source_, path("base.snp")));
  ASSERT_OK_AND_ASSIGN(SnapshotInfo info, inspect_snapshot(path("base.snp")));
  EXPECT_EQ(info.seqs[0].n_tokens, 73u);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir_)) {
    names.push_back(e.path().filename().string());
  }
  EXPECT_EQ(names, std::vector<std::string>{"base.snp"});
  // The pager was resumed.
  EXPECT_EQ(source_->resume().code(), StatusCode::kFailedPrecondition);
}

// Meets the other captures of its group in logical_seqs(), which capture
// calls once its temporary file is open: every capture of the group has its
// temporary file open at once.
class MeetingPager final : public testing::ForwardingPager {
 public:
  MeetingPager(CachePager& inner, std::barrier<>& meeting)
      : ForwardingPager(inner), meeting_(meeting) {}
  Result<std::vector<LogicalSeq>> logical_seqs() override {
    if (!met_) {
      met_ = true;
      meeting_.arrive_and_wait();
    }
    return ForwardingPager::logical_seqs();
  }

 private:
  std::barrier<>& meeting_;
  bool met_ = false;
};

// Two captures to one path at once (a temporary name from the pid alone
// made them share one temporary file: one rename failed, or the file mixed
// both): both succeed, and the file is one of the two snapshots, whole.
TEST_F(SnapshotTest, TwoCapturesToOnePathAtOnceBothSucceed) {
  auto a = make(PoolLayout::kPage, 32);
  ASSERT_OK(a->populate(2, 40, 3));
  auto b = make(PoolLayout::kLayer, 64);
  ASSERT_OK(b->populate(3, 70, 9));
  const auto want_a = digests(*a);
  const auto want_b = digests(*b);
  const std::string p = path("same.snp");
  for (int round = 0; round < 5; ++round) {
    std::barrier<> meeting(2);
    MeetingPager meet_a(*a, meeting);
    MeetingPager meet_b(*b, meeting);
    Status saved_a;
    Status saved_b;
    std::thread ta([&] { saved_a = capture(meet_a, p); });
    std::thread tb([&] { saved_b = capture(meet_b, p); });
    ta.join();
    tb.join();
    ASSERT_OK(saved_a);
    ASSERT_OK(saved_b);
    ASSERT_OK_AND_ASSIGN(SnapshotInfo info, inspect_snapshot(p));
    std::map<SeqId, Digest> got;
    for (const SnapshotSeqInfo& s : info.seqs) got[s.seq_id] = s.digest;
    EXPECT_TRUE(got == want_a || got == want_b) << "round " << round;
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir_)) {
      names.push_back(e.path().filename().string());
    }
    EXPECT_EQ(names, std::vector<std::string>{"same.snp"});
  }
}

TEST_F(SnapshotTest, TotalsSayWhatTheFileHolds) {
  capture_base();
  ASSERT_OK_AND_ASSIGN(SnapshotTotals saved,
                       capture_with_totals(*source_, path("t.snp")));
  EXPECT_EQ(saved.seqs, 3u);
  EXPECT_EQ(saved.pages, 8u);
  EXPECT_EQ(saved.file_bytes, fs::file_size(path("t.snp")));
  auto dst = make(PoolLayout::kLayer, 32);
  ASSERT_OK_AND_ASSIGN(SnapshotTotals loaded,
                       restore_with_totals(path("t.snp"), *dst));
  EXPECT_EQ(loaded.seqs, saved.seqs);
  EXPECT_EQ(loaded.pages, saved.pages);
  EXPECT_EQ(loaded.file_bytes, saved.file_bytes);
}

TEST_F(SnapshotTest, CaptureWhileDecodingIsConsistent) {
  auto src = make(PoolLayout::kLayer, 256);
  ASSERT_OK(src->populate(4, 20, 1));
  src->start_decoding(5000);
  for (int round = 0; round < 3; ++round) {
    ASSERT_OK(capture(*src, path("live.snp")));
    ASSERT_OK_AND_ASSIGN(SnapshotInfo info, inspect_snapshot(path("live.snp")));
    auto dst = make(PoolLayout::kPage, 256);
    ASSERT_OK(restore(path("live.snp"), *dst));
    auto got = digests(*dst);
    for (const SnapshotSeqInfo& s : info.seqs)
      EXPECT_EQ(got[s.seq_id], s.digest);
  }
  src->stop_decoding();
}

TEST_F(SnapshotTest, CaptureFailureStillResumes) {
  auto src = make(PoolLayout::kPage, 16);
  ASSERT_OK(src->populate(2, 10, 1));
  Status s = capture(*src, path("no/such/dir/x.snp"));
  EXPECT_EQ(s.code(), StatusCode::kNotFound) << s.to_string();
  EXPECT_NE(s.message().find("x.snp"), std::string::npos) << s.to_string();
  EXPECT_EQ(src->decode_step(), 2u);
  EXPECT_EQ(src->resume().code(), StatusCode::kFailedPrecondition);
}

TEST_F(SnapshotTest, MissingFileIsNotFound) {
  auto dst = make(PoolLayout::kPage, 16);
  EXPECT_EQ(restore(path("nope.snp"), *dst).code(), StatusCode::kNotFound);
  EXPECT_EQ(inspect_snapshot(path("nope.snp")).status().code(),
            StatusCode::kNotFound);
}

TEST_F(SnapshotTest, FlippedBytesAreDataLoss) {
  capture_base();
  const uint64_t record = 2 * tiny().page_bytes() + 8;
  struct Case {
    uint64_t offset;
    std::string what;
  };
  const std::vector<Case> cases = {
      {0, "bad magic"},
      {20, "header checksum mismatch at offset 52"},
      {kHeaderBytes + 9, "seq table checksum mismatch"},
      {pages_offset_ - 1, "seq table checksum mismatch"},
      {pages_offset_ + 100,
       "page 0 checksum mismatch at offset " + std::to_string(pages_offset_)},
      {pages_offset_ + 3 * record + 9000, "page 3 checksum mismatch"},
      {pages_offset_ + 2 * record - 1, "page 1 checksum mismatch"},
      {base_.size() - kTrailerBytes, "bad trailer magic"},
      {base_.size() - 1, "file checksum mismatch"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE("offset " + std::to_string(c.offset));
    std::vector<uint8_t> bad = base_;
    bad[c.offset] ^= 0x10;
    expect_rejected(bad, StatusCode::kDataLoss, c.what);
  }
}

TEST_F(SnapshotTest, TruncatedFilesAreDataLoss) {
  capture_base();
  for (uint64_t cut : {uint64_t{0}, uint64_t{10}, kHeaderBytes - 1,
                       kHeaderBytes + 5, pages_offset_ - 3, pages_offset_,
                       pages_offset_ + 1000, uint64_t{base_.size() - 1}}) {
    SCOPED_TRACE("cut at " + std::to_string(cut));
    std::vector<uint8_t> bad(base_.begin(), base_.begin() + cut);
    expect_rejected(bad, StatusCode::kDataLoss, "truncated");
  }
  std::vector<uint8_t> ten(base_.begin(), base_.begin() + 10);
  const std::string p = path("ten.snp");
  write_file(p, ten);
  EXPECT_EQ(inspect_snapshot(p).status().message(),
            "snapshot: truncated: header needs 60 bytes, file has 10");
}

TEST_F(SnapshotTest, TrailingBytesAreDataLoss) {
  capture_base();
  std::vector<uint8_t> bad = base_;
  bad.push_back(0);
  expect_rejected(bad, StatusCode::kDataLoss, "size mismatch");
}

TEST_F(SnapshotTest, ImpossibleCountsAreCaughtBeforeAllocating) {
  capture_base();
  // Counts rewritten with a valid header checksum: only the size check can
  // catch them.
  for (size_t field : {size_t{36}, size_t{44}}) {
    std::vector<uint8_t> bad = base_;
    put_u64(bad, field, uint64_t{1} << 60);
    put_u64(bad, 52, XXH3_64bits(bad.data(), 52));
    expect_rejected(bad, StatusCode::kDataLoss, "holds at most");
  }
}

TEST_F(SnapshotTest, WrongMetaIsInvalidArgument) {
  capture_base();
  auto llama = make(PoolLayout::kPage, 4, *preset_meta("llama3-8b"));
  Status s = restore(path("base.snp"), *llama);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
  EXPECT_NE(s.message().find("16x2x2x64 f16"), std::string::npos);
  EXPECT_NE(s.message().find("16x32x8x128 bf16"), std::string::npos);
  EXPECT_TRUE(llama->logical_seqs()->empty());
  EXPECT_EQ(llama->capacity()->free_pages, 4u);
}

TEST_F(SnapshotTest, NonEmptyTargetIsRefused) {
  capture_base();
  auto populated = make(PoolLayout::kPage, 32);
  ASSERT_OK(populated->populate(1, 20, 99));
  const auto before = digests(*populated);
  Status s = restore(path("base.snp"), *populated);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.to_string();
  EXPECT_EQ(digests(*populated), before);
  EXPECT_EQ(populated->capacity()->free_pages, 30u);

  auto allocated = make(PoolLayout::kPage, 32);
  ASSERT_OK(allocated->allocate_pages(1));
  s = restore(path("base.snp"), *allocated);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.to_string();
  EXPECT_EQ(allocated->capacity()->free_pages, 31u);
}

TEST_F(SnapshotTest, TooSmallTargetAllocatesNothing) {
  capture_base();
  auto small = make(PoolLayout::kPage, 7);
  Status s = restore(path("base.snp"), *small);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.to_string();
  EXPECT_EQ(small->capacity()->free_pages, 7u);
}

TEST_F(SnapshotTest, TokensThatDoNotFitThePagesAreDataLoss) {
  auto source = make(PoolLayout::kPage, 32);
  ASSERT_OK(source->populate(2, 40, 5));  // 3 pages each
  ASSERT_OK_AND_ASSIGN(std::vector<LogicalSeq> live, source->logical_seqs());
  // 2^64 - 1 (and 2^64 - 15) tokens in no pages: a naive ceil(n / 16) wraps
  // to zero. 49 tokens in request 1's 3 pages: one page short.
  const std::vector<LogicalSeq> extras = {
      {777, UINT64_MAX, {}},
      {777, UINT64_MAX - 14, {}},
      {777, 49, live[0].pages},
  };
  for (const LogicalSeq& extra : extras) {
    const std::string tokens = std::to_string(extra.n_tokens);
    SCOPED_TRACE(tokens + " tokens in " + std::to_string(extra.pages.size()) +
                 " pages");
    testing::ExtraSeqPager crafting(*source, extra);
    ASSERT_OK(capture(crafting, path("crafted.snp")));
    // Restore (snapshot load) and inspect (snapshot verify) both refuse it,
    // naming the request, its pages and its tokens.
    expect_rejected(read_file(path("crafted.snp")), StatusCode::kDataLoss,
                    "seq 777");
    auto info = inspect_snapshot(path("crafted.snp"));
    ASSERT_FALSE(info.ok());
    EXPECT_NE(info.status().message().find(std::to_string(extra.pages.size()) +
                                           " pages for " + tokens + " tokens"),
              std::string::npos)
        << info.status().to_string();
  }
}

// Delegates to a SyntheticPager but fails install_logical_seqs.
class FailingInstallPager final : public testing::ForwardingPager {
 public:
  using ForwardingPager::ForwardingPager;
  Status install_logical_seqs(const std::vector<LogicalSeq>&) override {
    return Status::unavailable("injected install failure");
  }
};

TEST_F(SnapshotTest, FailureAfterAllocatingReleasesTheSlots) {
  capture_base();
  auto inner = make(PoolLayout::kLayer, 32);
  FailingInstallPager failing(*inner);
  Status s = restore(path("base.snp"), failing);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.to_string();
  EXPECT_EQ(inner->capacity()->free_pages, 32u);
  EXPECT_TRUE(inner->occupied_pages()->empty());
}

}  // namespace
}  // namespace kvmig
