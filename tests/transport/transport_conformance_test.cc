// One conformance suite for every built transport. Source and target are
// separate Transport instances in one process (two "agents"), talking over
// real sockets / real UCX / real verbs. The verbs cases need an RDMA device:
// without one they skip with the reason, except inside the Soft-RoCE guest
// (../shared/rxe-vm, which sets RXEVM_DEV and RXEVM_IP), where a missing
// device is a failure.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "bytes.h"
#include "kvmig/transport.h"
#include "scope_exit.h"
#include "testutil.h"
#include "transport_util.h"

#if KVMIG_TEST_UCX_LOG
#include <ucs/debug/log_def.h>

#include <cstdarg>
#include <cstdio>
#endif

namespace kvmig {
namespace {

using std::chrono::microseconds;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr size_t kMiB = size_t{1} << 20;

Deadline in(Clock::duration d) { return Clock::now() + d; }

#if KVMIG_TEST_UCX_LOG
// UCX's own report, when a worker is destroyed, of each request it never
// freed: "object ... was not returned to mpool ucp_requests". Counted by a
// handler in front of UCX's log, which still prints it.
std::atomic<int> ucx_unreturned{0};

ucs_log_func_rc_t count_unreturned(const char*, unsigned, const char*,
                                   ucs_log_level_t,
                                   const ucs_log_component_config_t*,
                                   const char* format, va_list ap) {
  char text[256];
  va_list copy;
  va_copy(copy, ap);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
  std::vsnprintf(text, sizeof text, format, copy);
#pragma GCC diagnostic pop
  va_end(copy);
  if (std::strstr(text, "was not returned to mpool") != nullptr) {
    ++ucx_unreturned;
  }
  return UCS_LOG_FUNC_RC_CONTINUE;
}
#endif

// Anonymous private memory, unmapped on destruction.
class Mapping {
 public:
  explicit Mapping(size_t size) : size_(size) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) data_ = static_cast<std::byte*>(p);
  }
  ~Mapping() {
    if (data_) munmap(data_, size_);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  bool ok() const { return data_ != nullptr; }
  std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  std::span<std::byte> span() const { return {data_, size_}; }
  std::span<std::byte> sub(size_t off, size_t len) const {
    return {data_ + off, len};
  }

 private:
  std::byte* data_ = nullptr;
  size_t size_;
};

void fill_random(std::span<std::byte> s, uint32_t seed) {
  std::mt19937_64 rng(seed);
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    const uint64_t v = rng();
    std::memcpy(s.data() + i, &v, 8);
  }
  for (; i < s.size(); ++i) s[i] = static_cast<std::byte>(rng());
}

void fill(std::span<std::byte> s, uint8_t v) {
  std::memset(s.data(), v, s.size());
}

// Inside the Soft-RoCE guest: verbs must run there, not skip.
bool in_rxe_guest() { return std::getenv("RXEVM_DEV") != nullptr; }

// Options for the transport called name: in the guest, verbs uses the rxe
// device's address (its RoCE v2 GID).
TransportOptions options_for(const std::string& name) {
  TransportOptions opts;
  const char* ip = std::getenv("RXEVM_IP");
  if (name == "verbs" && ip != nullptr) opts.bind_host = ip;
  return opts;
}

// True when make_transport(name) failed only because this machine has no
// RDMA device, which outside the guest is a reason to skip.
bool no_device_here(const std::string& name, const Status& s) {
  return name == "verbs" && s.code() == StatusCode::kUnavailable &&
         !in_rxe_guest();
}

// Two agents: `src` writes from its registered memory into `dst`'s.
class TransportConformanceTest : public ::testing::TestWithParam<std::string> {
 protected:
  static constexpr size_t kSrcBytes = 16 * kMiB;
  // The target's memory holds two regions with a gap between them.
  static constexpr size_t kDstBytes = 16 * kMiB;
  static constexpr size_t kRegion0Off = 4096;
  static constexpr size_t kRegion0Len = 9 * kMiB + 17;
  static constexpr size_t kRegion1Off = 10 * kMiB;
  static constexpr size_t kRegion1Len = 3 * kMiB + 5;

  void SetUp() override {
    ASSERT_TRUE(src_mem_.ok() && dst_mem_.ok());
    const TransportOptions opts = options_for(GetParam());
    auto made = make_transport(GetParam(), opts);
    if (no_device_here(GetParam(), made.status())) {
      GTEST_SKIP() << "no RDMA device: " << made.status().to_string();
    }
    ASSERT_OK_AND_ASSIGN(src_, std::move(made));
    ASSERT_OK_AND_ASSIGN(dst_, make_transport(GetParam(), opts));
    EXPECT_EQ(src_->name(), GetParam());
    ASSERT_OK(src_->register_memory(src_mem_.span()));
    ASSERT_OK(dst_->register_memory(dst_mem_.span()));
    fill_random(src_mem_.span(), 1);
    fill(dst_mem_.span(), 0xA5);  // the canary
    regions_ = {dst_mem_.sub(kRegion0Off, kRegion0Len),
                dst_mem_.sub(kRegion1Off, kRegion1Len)};
  }

  void TearDown() override {
    if (src_) EXPECT_OK(src_->deregister_memory(src_mem_.span()));
    if (dst_) EXPECT_OK(dst_->deregister_memory(dst_mem_.span()));
  }

  // Opens a target over regions_ and connects a fresh initiator to it.
  void connect_pair(std::unique_ptr<TransportTarget>& target,
                    std::unique_ptr<TransportInitiator>& init) {
    ASSERT_OK_AND_ASSIGN(init, src_->create_initiator());
    ASSERT_OK_AND_ASSIGN(
        target, dst_->open_target(regions_, init->address(), in(seconds(10))));
    ASSERT_OK(init->connect(target->address(), in(seconds(10))));
  }

  // A fresh pair moves 64 KiB byte-exact (after a failure: the transports
  // are still usable).
  void expect_a_new_pair_works() {
    std::unique_ptr<TransportTarget> target;
    std::unique_ptr<TransportInitiator> init;
    ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
    const std::vector<WriteOp> ops = {{src_at(4321), 0, 1000, 64 * 1024}};
    auto expected = dst_copy();
    apply(ops, expected);
    ASSERT_OK(init->write(ops, in(seconds(10))));
    ASSERT_OK(init->flush(in(seconds(10))));
    expect_dst_equals(expected);
  }

  // Applies ops to `expected` (a copy of the target memory) as the target
  // should.
  void apply(std::span<const WriteOp> ops, std::vector<std::byte>& expected) {
    const size_t offs[] = {kRegion0Off, kRegion1Off};
    for (const WriteOp& op : ops) {
      std::memcpy(expected.data() + offs[op.dst_region] + op.dst_offset, op.src,
                  op.length);
    }
  }

  std::vector<std::byte> dst_copy() const {
    return {dst_mem_.data(), dst_mem_.data() + dst_mem_.size()};
  }

  // After a revoke: writing `late` through init fails within 3 s and
  // changes no byte of the target. The initiator is destroyed before the
  // check (its destructor returns once nothing of it runs), so a write it
  // still had in flight would show.
  void expect_cut_off(std::unique_ptr<TransportInitiator>& init,
                      const std::vector<WriteOp>& late) {
    const auto before = dst_copy();
    const auto deadline = in(seconds(3));
    Status ws = init->write(late, deadline);
    Status fs = ws.ok() ? init->flush(deadline) : ws;
    EXPECT_FALSE(fs.ok());
    init.reset();
    expect_dst_equals(before);
  }

  // Compares the target memory with `expected`, naming the first difference.
  void expect_dst_equals(const std::vector<std::byte>& expected) {
    ASSERT_EQ(expected.size(), dst_mem_.size());
    if (std::memcmp(expected.data(), dst_mem_.data(), expected.size()) == 0) {
      return;
    }
    for (size_t i = 0; i < expected.size(); ++i) {
      if (expected[i] != dst_mem_.data()[i]) {
        ADD_FAILURE() << "target memory differs first at byte " << i;
        return;
      }
    }
  }

  const std::byte* src_at(size_t off) const { return src_mem_.data() + off; }

  // The first `bytes` of the source's memory get new bytes, as a source
  // refills its staging buffer the moment flush() returns: a write that had
  // not landed by then would carry these instead (or land after the check).
  void refill_source(uint32_t seed, size_t bytes = kSrcBytes) {
    fill_random(src_mem_.span().first(bytes), seed);
  }

  Mapping src_mem_{kSrcBytes};
  Mapping dst_mem_{kDstBytes};
  std::unique_ptr<Transport> src_;
  std::unique_ptr<Transport> dst_;
  std::vector<std::span<std::byte>> regions_;
};

TEST_P(TransportConformanceTest, WritesLandByteExactAfterFlush) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  EXPECT_TRUE(init->address().empty() || GetParam() == "verbs");

  // Destinations never overlap, so the expected image is well defined.
  std::vector<WriteOp> ops;
  // Single bytes at odd places, including both regions' last bytes.
  ops.push_back({src_at(7), 0, 0, 1});
  ops.push_back({src_at(9), 0, kRegion0Len - 1, 1});
  ops.push_back({src_at(11), 1, kRegion1Len - 1, 1});
  ops.push_back({src_at(13), 1, 0, 1});
  // Unaligned source and destination, odd lengths.
  ops.push_back({src_at(1001), 0, 3, 1001});
  ops.push_back({src_at(77777), 1, 12345, 4097});
  ops.push_back({src_at(5), 0, 5000, 0});  // empty op: valid, no effect
  // 64 chunks of 32 KiB, like per-layer chunks of llama3-8b pages, placed in
  // reverse order.
  for (size_t i = 0; i < 64; ++i) {
    ops.push_back(
        {src_at(kMiB + i * 32768), 1, 64 * 1024 + (63 - i) * 32768, 32768});
  }
  // One multi-MiB op.
  ops.push_back({src_at(4 * kMiB + 3), 0, 2 * kMiB + 1, 6 * kMiB + 11});

  auto expected = dst_copy();
  apply(ops, expected);
  // Posted as two batches to exercise several write() calls before a flush.
  const auto half = std::span<const WriteOp>(ops).subspan(0, ops.size() / 2);
  const auto rest = std::span<const WriteOp>(ops).subspan(ops.size() / 2);
  ASSERT_OK(init->write(half, in(seconds(20))));
  ASSERT_OK(init->write(rest, in(seconds(20))));
  ASSERT_OK(init->flush(in(seconds(20))));
  expect_dst_equals(expected);

  uint64_t bytes = 0;
  for (const auto& op : ops) bytes += op.length;
  EXPECT_EQ(init->bytes_written(), bytes);
  EXPECT_EQ(init->ops_posted(), ops.size());
  EXPECT_OK(target->health());

  // The same path keeps working: overwrite part of it and flush again.
  std::vector<WriteOp> again = {{src_at(123), 0, 2 * kMiB + 1, 777}};
  apply(again, expected);
  ASSERT_OK(init->write(again, in(seconds(10))));
  ASSERT_OK(init->flush(in(seconds(10))));
  expect_dst_equals(expected);
  // A flush with nothing posted succeeds too.
  ASSERT_OK(init->flush(in(seconds(10))));
}

// The last writes before COMMIT may carry a mark (protocol 7): where the
// transport has marks (tcp), the target's wait_mark() returns once every
// write before the mark has landed, with no flush; elsewhere write_marked()
// only writes (mark 0) and the target has no marks.
TEST_P(TransportConformanceTest, MarkedWritesHaveLandedWhenTheMarkArrives) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  // Small writes (a batch record over tcp) and a large one.
  std::vector<WriteOp> ops;
  for (size_t i = 0; i < 16; ++i) {
    ops.push_back({src_at(i * 5000 + 3), 0, i * 9000, 4097});
  }
  ops.push_back({src_at(3 * kMiB), 1, 1000, kMiB + 5});
  auto expected = dst_copy();
  apply(ops, expected);
  ASSERT_OK_AND_ASSIGN(uint64_t mark, init->write_marked(ops, in(seconds(20))));
  if (mark == 0) {
    EXPECT_EQ(target->wait_mark(1, in(seconds(1))).code(),
              StatusCode::kUnimplemented);
    bool woken = false;  // at once: wait_mark() says why
    target->notify_mark(1, [&] { woken = true; });
    EXPECT_TRUE(woken);
    ASSERT_OK(init->flush(in(seconds(20))));
    expect_dst_equals(expected);
    return;
  }
  ASSERT_OK(target->wait_mark(mark, in(seconds(20))));
  expect_dst_equals(expected);
  // Once it arrived, a deadline already past only checks.
  EXPECT_OK(target->wait_mark(mark, Clock::now() - seconds(1)));
  // A mark not posted has not arrived: the wait ends at its deadline.
  EXPECT_EQ(target->wait_mark(mark + 1, in(milliseconds(50))).code(),
            StatusCode::kDeadlineExceeded);
  // Flushes and marks share one sequence; a mark behind no write is one too.
  ASSERT_OK(init->flush(in(seconds(10))));
  std::vector<WriteOp> again = {{src_at(123), 0, 2 * kMiB + 1, 777}};
  apply(again, expected);
  ASSERT_OK_AND_ASSIGN(uint64_t next,
                       init->write_marked(again, in(seconds(10))));
  EXPECT_GT(next, mark + 1);
  ASSERT_OK_AND_ASSIGN(uint64_t bare, init->write_marked({}, in(seconds(10))));
  EXPECT_EQ(bare, next + 1);
  ASSERT_OK(target->wait_mark(bare, in(seconds(10))));
  expect_dst_equals(expected);
  EXPECT_OK(target->health());
  // notify_mark(): at once for a mark that arrived; for one still to come,
  // when it does.
  bool at_once = false;
  target->notify_mark(bare, [&] { at_once = true; });
  EXPECT_TRUE(at_once);
  std::promise<void> arrived;
  target->notify_mark(bare + 1, [&] { arrived.set_value(); });
  ASSERT_OK_AND_ASSIGN(uint64_t later,
                       init->write_marked(again, in(seconds(10))));
  EXPECT_EQ(later, bare + 1);
  ASSERT_EQ(arrived.get_future().wait_for(seconds(10)),
            std::future_status::ready);
  EXPECT_OK(target->wait_mark(later, Clock::now()));
  // Revoked: a waiting caller is woken, and a wait for a mark that cannot
  // come any more says so at once.
  std::promise<void> cut_off;
  target->notify_mark(later + 1, [&] { cut_off.set_value(); });
  target->revoke();
  ASSERT_EQ(cut_off.get_future().wait_for(seconds(10)),
            std::future_status::ready);
  const auto t0 = Clock::now();
  EXPECT_EQ(target->wait_mark(later + 1, in(seconds(30))).code(),
            StatusCode::kAborted);
  EXPECT_LT(Clock::now() - t0, seconds(10));
}

TEST_P(TransportConformanceTest, ManySmallWritesAcrossBatches) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  auto expected = dst_copy();
  std::mt19937 rng(7);
  // 4096 writes of 1..300 bytes into distinct 512-byte slots.
  std::vector<WriteOp> ops;
  for (uint64_t i = 0; i < 4096; ++i) {
    const uint64_t len = 1 + rng() % 300;
    ops.push_back({src_at(rng() % kMiB), static_cast<uint32_t>(i % 2),
                   (i / 2) * 512 + rng() % 200, len});
  }
  apply(ops, expected);
  for (size_t i = 0; i < ops.size(); i += 500) {
    const size_t n = std::min<size_t>(500, ops.size() - i);
    ASSERT_OK(init->write(std::span<const WriteOp>(ops).subspan(i, n),
                          in(seconds(20))));
  }
  ASSERT_OK(init->flush(in(seconds(20))));
  expect_dst_equals(expected);
}

// Page-sized writes as a migration posts them (write() calls of 256 ops,
// then one flush), enough to fill the transport's queues, so that some
// still wait to go out when the last write() returns: flush() returns only
// once every one of them has landed. Forty rounds (the flush's start is
// where it went wrong), each checked the moment flush() returns. (Over ucx a
// flush started inside a put's completion returned before puts still queued in
// UCX had gone out.)
TEST_P(TransportConformanceTest, FlushCoversWritesStillQueued) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  constexpr uint64_t kPage = 4096;
  constexpr uint64_t kPages = 512;  // 2 MiB of region 0, two write() calls
  std::mt19937 rng(11);
  for (int round = 0; round < 40; ++round) {
    SCOPED_TRACE(round);
    std::vector<uint64_t> slots(kPages);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng);
    std::vector<WriteOp> ops;
    for (uint64_t i = 0; i < kPages; ++i) {
      ops.push_back(
          {src_at(rng() % (kSrcBytes - kPage)), 0, slots[i] * kPage, kPage});
    }
    auto expected = dst_copy();
    apply(ops, expected);
    for (size_t i = 0; i < ops.size(); i += 256) {
      ASSERT_OK(init->write(std::span<const WriteOp>(ops).subspan(i, 256),
                            in(seconds(20))));
    }
    ASSERT_OK(init->flush(in(seconds(20))));
    refill_source(100 + round);
    expect_dst_equals(expected);
  }
}

// The same with small writes, which a transport takes faster than pages,
// so more of them may still be on their way when flush() is called: a
// hundred rounds (over ucx) of 8192 writes of 16 to 300 bytes, in write()
// calls of 512 or (every fifth round) in one call, the source refilled and
// the target checked the moment flush() returns; no write() may take most
// of its deadline. A ucx initiator whose write() returned before its puts
// were posted (tried on 2026-12-08, docs/performance.md) failed it when its
// flush started at once (every run), when the flush started inside a put's
// completion (6 runs of 6; 2 of 6 with forty rounds) and when a write()
// waiting for room was never woken (it returned at its 20 s deadline).
TEST_P(TransportConformanceTest, FlushCoversManySmallWrites) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  std::mt19937 rng(13);
  // What went wrong was ucx's; ten rounds for the others (a hundred took
  // 17 s over verbs in the Soft-RoCE guest).
  const int rounds = GetParam() == "ucx" ? 100 : 10;
  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(round);
    auto expected = dst_copy();
    std::vector<WriteOp> ops;
    for (uint64_t i = 0; i < 8192; ++i) {
      ops.push_back({src_at(rng() % kMiB), static_cast<uint32_t>(i % 2),
                     (i / 2) * 512 + rng() % 200, 16 + rng() % 285});
    }
    apply(ops, expected);
    const size_t per_call = round % 5 == 4 ? ops.size() : 512;
    for (size_t i = 0; i < ops.size(); i += per_call) {
      const auto t0 = Clock::now();
      ASSERT_OK(init->write(std::span<const WriteOp>(ops).subspan(i, per_call),
                            in(seconds(20))));
      // A wait nobody woke ends at the deadline, and its condition then
      // holds: no error, only the time says so.
      ASSERT_LT(Clock::now() - t0, seconds(10));
    }
    ASSERT_OK(init->flush(in(seconds(20))));
    refill_source(200 + round, 2 * kMiB);
    expect_dst_equals(expected);
  }
}

TEST_P(TransportConformanceTest, SmallAndLargeWritesInterleaved) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  auto expected = dst_copy();
  std::mt19937 rng(11);
  // Lengths on both sides of the sizes a transport may treat differently
  // (tcp copies payloads under 16 KiB out of a receive buffer and reads
  // larger ones into place), shuffled, into distinct 170 KiB slots.
  const std::vector<uint64_t> lengths = {1,     100,   4096,  16383, 16384,
                                         16385, 32768, 65537, 150000};
  constexpr uint64_t kSlot = 170 * 1024;
  std::vector<WriteOp> ops;
  for (uint64_t i = 0; i < 36; ++i) {
    const uint64_t len = lengths[rng() % lengths.size()];
    ops.push_back({src_at(rng() % kMiB), static_cast<uint32_t>(i % 2),
                   (i / 2) * kSlot + rng() % 1000, len});
  }
  apply(ops, expected);
  // In calls of 1 to 7 ops, with a flush in the middle.
  for (size_t i = 0; i < ops.size();) {
    const size_t n = std::min<size_t>(1 + rng() % 7, ops.size() - i);
    ASSERT_OK(init->write(std::span<const WriteOp>(ops).subspan(i, n),
                          in(seconds(20))));
    i += n;
    if (i >= ops.size() / 2 && i - n < ops.size() / 2) {
      ASSERT_OK(init->flush(in(seconds(20))));
    }
  }
  ASSERT_OK(init->flush(in(seconds(20))));
  expect_dst_equals(expected);
  EXPECT_OK(target->health());
}

TEST_P(TransportConformanceTest, RejectsBadOpsBeforeSendingAny) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  const auto before = dst_copy();

  const WriteOp good{src_at(0), 0, 0, 4096};
  const std::vector<std::vector<WriteOp>> bad_batches = {
      {good, {src_at(0), 2, 0, 1}},                  // no region 2
      {good, {src_at(0), 0xFFFFFFFF, 0, 1}},         // flush marker
      {good, {src_at(0), 0, kRegion0Len - 10, 11}},  // one past the end
      {good, {src_at(0), 1, kRegion1Len + 1, 0}},    // offset past end
      {good, {src_at(0), 0, UINT64_MAX - 2, 8}},     // wraps around
      {good, {src_at(0), 0, 8, UINT64_MAX}},         // huge length
      {good, {nullptr, 0, 0, 16}},                   // no source
  };
  for (size_t i = 0; i < bad_batches.size(); ++i) {
    Status s = init->write(bad_batches[i], in(seconds(5)));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument)
        << "batch " << i << ": " << s.to_string();
  }
  // Nothing of the rejected batches was sent, and the path still works.
  ASSERT_OK(init->flush(in(seconds(10))));
  expect_dst_equals(before);
  std::vector<WriteOp> ok_ops = {good, {src_at(1), 1, kRegion1Len - 3, 3}};
  auto expected = before;
  apply(ok_ops, expected);
  ASSERT_OK(init->write(ok_ops, in(seconds(10))));
  ASSERT_OK(init->flush(in(seconds(10))));
  expect_dst_equals(expected);
}

TEST_P(TransportConformanceTest, GarbageAddressIsAClearError) {
  const std::vector<std::vector<uint8_t>> garbage = {
      {},
      {1, 2, 3},
      std::vector<uint8_t>(64, 0xFF),
      std::vector<uint8_t>(1000, 0)};
  for (const auto& g : garbage) {
    ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator());
    const auto t0 = Clock::now();
    Status s = init->connect(g, in(seconds(5)));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
    EXPECT_FALSE(s.message().empty());
    EXPECT_LT(Clock::now() - t0, seconds(2));
  }
  // A real address cut short, or with a byte too many.
  ASSERT_OK_AND_ASSIGN(auto probe, src_->create_initiator());
  ASSERT_OK_AND_ASSIGN(
      auto target,
      dst_->open_target(regions_, probe->address(), in(seconds(10))));
  auto addr = target->address();
  ASSERT_FALSE(addr.empty());
  for (size_t cut : {size_t{1}, addr.size() / 2, addr.size() - 1}) {
    ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator());
    Status s = init->connect(std::span(addr).first(cut), in(seconds(5)));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
  }
  addr.push_back(0);
  ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator());
  Status s = init->connect(addr, in(seconds(5)));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
}

TEST_P(TransportConformanceTest, UnconnectedInitiatorRefusesWork) {
  ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator());
  const WriteOp op{src_at(0), 0, 0, 1};
  EXPECT_EQ(init->write({&op, 1}, in(seconds(1))).code(),
            StatusCode::kFailedPrecondition);
  EXPECT_EQ(init->flush(in(seconds(1))).code(),
            StatusCode::kFailedPrecondition);
}

TEST_P(TransportConformanceTest, RevokeCutsTheInitiatorOff) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  std::vector<WriteOp> first = {{src_at(0), 0, 0, kMiB}};
  ASSERT_OK(init->write(first, in(seconds(10))));
  ASSERT_OK(init->flush(in(seconds(10))));

  target->revoke();
  target->revoke();  // idempotent
  const auto after_revoke = dst_copy();

  // Writes over the canary after revoke: the flush must fail in time and no
  // byte may change.
  std::vector<WriteOp> late;
  for (uint64_t i = 0; i < 32; ++i) {
    late.push_back({src_at(2 * kMiB + i * 32768), static_cast<uint32_t>(i % 2),
                    kMiB + i * 32768, 32768});
  }
  const auto t0 = Clock::now();
  const auto deadline = in(seconds(3));
  Status ws = init->write(late, deadline);
  Status fs = ws.ok() ? init->flush(deadline) : ws;
  const auto took = Clock::now() - t0;
  EXPECT_TRUE(fs.code() == StatusCode::kUnavailable ||
              fs.code() == StatusCode::kDeadlineExceeded)
      << fs.to_string();
  EXPECT_LT(took, seconds(3) + milliseconds(1500));
  // Calls after the failure keep failing, fast.
  EXPECT_FALSE(init->flush(in(seconds(1))).ok());
  expect_dst_equals(after_revoke);
  // Once the initiator and the target are gone nothing of either runs: a
  // write still in flight would show now.
  init.reset();
  target.reset();
  expect_dst_equals(after_revoke);
}

// A caller that learns by other means that the peer is gone cancels: a
// flush that would wait on a revoked target (verbs over an RC queue pair
// may retry until its deadline) ends soon, not at the deadline, and
// nothing lands.
TEST_P(TransportConformanceTest, CancelEndsAWaitLongBeforeItsDeadline) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  target->revoke();
  const auto after_revoke = dst_copy();
  std::vector<WriteOp> late;
  for (uint64_t i = 0; i < 32; ++i) {
    late.push_back({src_at(i * 32768), static_cast<uint32_t>(i % 2),
                    kMiB + i * 32768, 32768});
  }
  std::atomic<bool> waiting{false};
  std::thread canceller([&] {
    while (!waiting) std::this_thread::yield();
    std::this_thread::sleep_for(milliseconds(200));
    init->cancel();
  });
  const auto t0 = Clock::now();
  const auto deadline = in(seconds(60));
  Status ws = init->write(late, deadline);
  waiting = true;
  Status fs = ws.ok() ? init->flush(deadline) : ws;
  const auto took = Clock::now() - t0;
  canceller.join();
  EXPECT_FALSE(fs.ok());
  EXPECT_LT(took, seconds(5)) << fs.to_string();
  EXPECT_FALSE(init->flush(in(seconds(1))).ok());
  init.reset();
  target.reset();
  expect_dst_equals(after_revoke);
}

// The cases only tcp can run.
class TcpConformanceTest : public TransportConformanceTest {};

// The transports that check each write against a migration's slots: tcp
// (each write record) and verbs (memory windows; the rxe device has them).
class CheckingConformanceTest : public TransportConformanceTest {
 protected:
  // Restricts target to ranges and hands the initiator their keys, as a
  // destination does (its OFFER, or a live round's ROUND_OFFER).
  void restrict(TransportTarget& target, TransportInitiator& init,
                std::span<const WriteWindow> ranges) {
    ASSERT_OK_AND_ASSIGN(bool checked, target.allow(ranges));
    ASSERT_TRUE(checked);
    ASSERT_OK(init.add_windows(target.window_update()));
  }
  // Writes outside every allowed range fail (at the write or its flush),
  // and the target's memory is still `expected` once it is revoked.
  void expect_refused(TransportTarget& target,
                      std::unique_ptr<TransportInitiator>& init,
                      const std::vector<WriteOp>& outside,
                      const std::vector<std::byte>& expected) {
    const auto deadline = in(seconds(3));
    Status ws = init->write(outside, deadline);
    EXPECT_FALSE(ws.ok() ? init->flush(deadline).ok() : false);
    init.reset();
    target.revoke();
    expect_dst_equals(expected);
  }
};

std::vector<std::string> checking_transports() {
  std::vector<std::string> out;
  for (const std::string& t : built_transports()) {
    if (t == "tcp" || t == "verbs") out.push_back(t);
  }
  return out;
}

// allow() says whether the transport checks writes one by one: tcp and
// verbs do; ucx cannot (revoke() is its cut-off), and says so, also
// beforehand (restricts_writes()).
TEST_P(TransportConformanceTest, AllowSaysWhetherWritesAreChecked) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  const WriteWindow window[] = {{0, 0, 65536}};
  const bool restricts = target->restricts_writes();
  ASSERT_OK_AND_ASSIGN(bool checked, target->allow(window));
  EXPECT_EQ(checked, GetParam() != "ucx");
  EXPECT_EQ(restricts, checked);  // said before allow(), as it answers
  EXPECT_OK(init->add_windows(target->window_update()));
}

// A target restricted to a migration's slots: writes inside them land; a
// write outside them lands nowhere, and every byte outside the window
// (another request's pages) is unchanged. tcp's target refuses it and cuts
// the initiator off; verbs' initiator refuses it before posting anything
// (InvalidArgument: it knows the windows; the device's own check of a
// window's bounds is not something rxe has, see VerbsTarget).
TEST_P(CheckingConformanceTest, WritesOutsideTheWindowAreRefused) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  // Two "slots" of 64 KiB in region 0 and one in region 1.
  const WriteWindow window[] = {
      {0, 0, 65536}, {0, 65536, 65536}, {1, 2 * 65536, 65536}};
  ASSERT_NO_FATAL_FAILURE(restrict(*target, *init, window));
  auto expected = dst_copy();
  // Inside: a write spanning both adjacent slots of region 0, and one in
  // region 1.
  std::vector<WriteOp> inside = {{src_at(0), 0, 0, 2 * 65536},
                                 {src_at(2 * 65536), 1, 2 * 65536, 65536}};
  ASSERT_OK(init->write(inside, in(seconds(10))));
  ASSERT_OK(init->flush(in(seconds(10))));
  apply(inside, expected);
  expect_dst_equals(expected);
  ASSERT_OK(target->health());
  // One byte past the window of region 1 (allowed for region 0's offsets,
  // not region 1's): refused, and nothing after it lands either.
  std::vector<WriteOp> outside = {{src_at(0), 1, 3 * 65536 - 1, 2},
                                  {src_at(5 * 65536), 0, 0, 65536}};
  const auto deadline = in(seconds(3));
  Status ws = init->write(outside, deadline);
  Status fs = ws.ok() ? init->flush(deadline) : ws;
  EXPECT_FALSE(fs.ok());
  if (GetParam() == "tcp") {
    EXPECT_NE(target->health().message().find("outside the slots"),
              std::string::npos)
        << target->health().to_string();
  } else {
    EXPECT_EQ(ws.code(), StatusCode::kInvalidArgument) << ws.to_string();
    EXPECT_NE(ws.message().find("outside the slots"), std::string::npos)
        << ws.to_string();
    EXPECT_OK(target->health());
  }
  target->revoke();
  expect_dst_equals(expected);
}

// A live round allows more slots after the initiator connected: their keys
// reach it in an update, a write may span slots of two rounds, and a slot
// of neither stays closed.
TEST_P(CheckingConformanceTest, LaterRoundsAddWindows) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  const WriteWindow first[] = {{0, 0, 65536}, {0, 4 * 65536, 65536}};
  ASSERT_NO_FATAL_FAILURE(restrict(*target, *init, first));
  auto expected = dst_copy();
  std::vector<WriteOp> ops = {{src_at(0), 0, 0, 65536}};
  ASSERT_OK(init->write(ops, in(seconds(10))));
  ASSERT_OK(init->flush(in(seconds(10))));
  apply(ops, expected);
  // The next round: the slot right after the first, and one in region 1.
  const WriteWindow second[] = {{0, 65536, 65536}, {1, 0, 65536}};
  ASSERT_NO_FATAL_FAILURE(restrict(*target, *init, second));
  ops = {{src_at(65536), 0, 0, 2 * 65536},
         {src_at(3 * 65536), 0, 4 * 65536, 65536},
         {src_at(5 * 65536), 1, 0, 65536}};
  ASSERT_OK(init->write(ops, in(seconds(10))));
  ASSERT_OK(init->flush(in(seconds(10))));
  apply(ops, expected);
  expect_dst_equals(expected);
  // Slot 2 of region 0 was never allowed.
  ops = {{src_at(0), 0, 2 * 65536, 65536}};
  expect_refused(*target, init, ops, expected);
}

// A migration's slots come in the pager's order, random for a fragmented
// pool: 48 slots of 4 KiB, every other one of 96, and the neighbour of
// one, allowed in shuffled order in both regions. Writes into allowed
// slots land, one spanning the two neighbours too; one reaching into a
// slot left out is refused and nothing of it lands.
TEST_P(CheckingConformanceTest, ShuffledSlotsAreAllowedExactly) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  constexpr uint64_t kSlot = 4096;
  std::vector<WriteWindow> windows;
  for (uint32_t region : {0u, 1u}) {
    for (uint64_t slot = 0; slot < 96; slot += 2) {
      windows.push_back({region, slot * kSlot, kSlot});
    }
    // Slots 40 and 41 both: two neighbours one write may span.
    windows.push_back({region, 41 * kSlot, kSlot});
  }
  std::shuffle(windows.begin(), windows.end(), std::mt19937(7));
  ASSERT_NO_FATAL_FAILURE(restrict(*target, *init, windows));
  auto expected = dst_copy();
  std::vector<WriteOp> ops = {{src_at(0), 0, 0, kSlot},
                              {src_at(kSlot), 1, 94 * kSlot, kSlot},
                              {src_at(3 * kSlot), 0, 40 * kSlot, 2 * kSlot},
                              {src_at(7 * kSlot), 1, 40 * kSlot, 2 * kSlot}};
  ASSERT_OK(init->write(ops, in(seconds(10))));
  ASSERT_OK(init->flush(in(seconds(10))));
  apply(ops, expected);
  expect_dst_equals(expected);
  ASSERT_OK(target->health());
  // Slot 43 of region 1 was never allowed (42 and 44 were).
  ops = {{src_at(0), 1, 42 * kSlot, 2 * kSlot}};
  expect_refused(*target, init, ops, expected);
}

// Verbs only: a source that writes with keys it was not given, here those
// of another migration to the same target agent, is refused by the target's
// device (a type 2 window answers only on the queue pair it was bound to):
// nothing lands, and the other migration's path still works.
class VerbsConformanceTest : public CheckingConformanceTest {};
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(VerbsConformanceTest);

TEST_P(VerbsConformanceTest, AnotherMigrationsKeysAreRefused) {
  std::unique_ptr<TransportTarget> target_a, target_b;
  std::unique_ptr<TransportInitiator> init_a, init_b;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target_a, init_a));
  ASSERT_NO_FATAL_FAILURE(connect_pair(target_b, init_b));
  const WriteWindow slots_a[] = {{0, 0, 65536}};
  const WriteWindow slots_b[] = {{0, 65536, 65536}};
  ASSERT_NO_FATAL_FAILURE(restrict(*target_b, *init_b, slots_b));
  ASSERT_OK_AND_ASSIGN(bool checked, target_a->allow(slots_a));
  ASSERT_TRUE(checked);
  const std::vector<uint8_t> keys_a = target_a->window_update();
  ASSERT_FALSE(keys_a.empty());
  ASSERT_OK(init_a->add_windows(keys_a));
  ASSERT_OK(init_b->add_windows(keys_a));  // stolen
  auto expected = dst_copy();
  // B writes A's slot with A's key, over B's queue pair: refused.
  std::vector<WriteOp> steal = {{src_at(0), 0, 0, 65536}};
  const auto deadline = in(seconds(3));
  Status ws = init_b->write(steal, deadline);
  Status fs = ws.ok() ? init_b->flush(deadline) : ws;
  EXPECT_FALSE(fs.ok());
  EXPECT_NE(fs.message().find("remote access"), std::string::npos)
      << fs.to_string();
  EXPECT_FALSE(target_b->health().ok());
  init_b.reset();
  expect_dst_equals(expected);
  // A's own path is untouched.
  std::vector<WriteOp> own = {{src_at(65536), 0, 0, 65536}};
  ASSERT_OK(init_a->write(own, in(seconds(10))));
  ASSERT_OK(init_a->flush(in(seconds(10))));
  apply(own, expected);
  expect_dst_equals(expected);
  EXPECT_OK(target_a->health());
}

// More separate runs than a target may bind windows for: refused with a
// clear error before any window is allocated, and the target stays
// refused.
TEST_P(VerbsConformanceTest, TooManyRunsAreRefused) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  std::vector<WriteWindow> runs;
  for (uint64_t i = 0; i <= 32768; ++i) runs.push_back({0, 2 * i, 1});
  auto allowed = target->allow(runs);
  ASSERT_FALSE(allowed.ok());
  EXPECT_EQ(allowed.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(allowed.status().message().find("32769 separate ranges"),
            std::string::npos)
      << allowed.status().to_string();
  const WriteWindow one[] = {{0, 0, 65536}};
  EXPECT_FALSE(target->allow(one).ok());
}

// A window update the initiator cannot use is refused with a clear error.
TEST_P(TransportConformanceTest, GarbageWindowUpdateIsRefused) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  const uint8_t junk[] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  Status s = init->add_windows(junk);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
  // Still usable.
  std::vector<WriteOp> ops = {{src_at(0), 0, 0, 4096}};
  EXPECT_OK(init->write(ops, in(seconds(10))));
  EXPECT_OK(init->flush(in(seconds(10))));
}

// Two threads revoke at once while the initiator streams writes of
// changing content: both return with the initiator cut off, so no byte
// lands after either call has returned. A race test (run under the
// sanitizers too): it catches a revoke() that returns before the cut-off
// only when the scheduler interleaves badly (the early return fixed in tcp
// and ucx was not caught in 3 runs here: its window is the few
// instructions between marking the target revoked and stopping its thread).
//
// tcp only. Over ucx this test found a crash not fixed yet: UCX 1.13
// segfaults now and then (ucp_ep_close_nbx -> uct_mm_ep_pending_purge ->
// ucp_mem_rereg_mds, on the target's progress thread) when the target
// force-closes its endpoint while emulated puts stream in over shared
// memory. Over verbs it has not run in the Soft-RoCE guest yet.
TEST_P(TcpConformanceTest, EveryRevokeCallerWaitsForTheCutOff) {
  for (int round = 0; round < 12; ++round) {
    std::unique_ptr<TransportTarget> target;
    std::unique_ptr<TransportInitiator> init;
    ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
    std::atomic<bool> stop{false};
    std::atomic<int> batches{0};
    std::thread writer([&] {
      std::vector<WriteOp> ops;
      for (uint64_t i = 0; i < 8; ++i) {
        ops.push_back({src_at(i * kMiB), 0, i * kMiB, kMiB});
      }
      for (uint8_t value = 1; !stop; ++value) {
        std::memset(src_mem_.data(), value, 8 * kMiB);
        if (!init->write(ops, in(seconds(2))).ok()) return;
        if (!init->flush(in(seconds(2))).ok()) return;
        ++batches;
      }
    });
    while (batches < 2) std::this_thread::yield();
    std::vector<std::byte> seen[2];
    std::thread revokers[2];
    for (int k = 0; k < 2; ++k) {
      revokers[k] = std::thread([&, k] {
        target->revoke();
        seen[k] = dst_copy();
      });
    }
    for (auto& t : revokers) t.join();
    stop = true;
    writer.join();
    init.reset();
    // Nothing changed after either revoke() returned.
    expect_dst_equals(seen[0]);
    expect_dst_equals(seen[1]);
    if (::testing::Test::HasFailure()) return;
  }
}

// The target kept a committed path; its initiator did not and writes on:
// the kept connection refuses the write (nothing lands), and it is not
// reused: the next path to that peer is a fresh one.
TEST_P(TcpConformanceTest, WriteOnAKeptPathIsRefused) {
  ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator_for("peer-d"));
  ASSERT_OK_AND_ASSIGN(auto target, dst_->open_target(regions_, init->address(),
                                                      in(seconds(10))));
  ASSERT_OK(init->connect(target->address(), in(seconds(10))));
  ASSERT_OK(init->write({{{src_at(0), 0, 0, kMiB}}}, in(seconds(10))));
  ASSERT_OK(init->flush(in(seconds(10))));
  EXPECT_TRUE(target->keep());
  target.reset();  // kept: the parking holds the connection now
  expect_cut_off(init, {{src_at(3 * kMiB), 0, 4096, 2 * kMiB}});
  ASSERT_OK_AND_ASSIGN(auto next, src_->create_initiator_for("peer-d"));
  EXPECT_TRUE(next->address().empty());  // never kept by the initiator
  ASSERT_OK_AND_ASSIGN(auto fresh, dst_->open_target(regions_, next->address(),
                                                     in(seconds(10))));
  ASSERT_OK(next->connect(fresh->address(), in(seconds(10))));
  ASSERT_OK(next->write({{{src_at(0), 1, 0, kMiB}}}, in(seconds(10))));
  ASSERT_OK(next->flush(in(seconds(10))));
}

// A kept path is reused once: a second path presenting the same token (the
// first took the connection) gets a fresh listener, and the initiator that
// holds no kept connection connects to it.
TEST_P(TcpConformanceTest, KeptTokenServesOnePathAtATime) {
  {
    ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator_for("peer-e"));
    ASSERT_OK_AND_ASSIGN(
        auto target,
        dst_->open_target(regions_, init->address(), in(seconds(10))));
    ASSERT_OK(init->connect(target->address(), in(seconds(10))));
    ASSERT_OK(init->flush(in(seconds(10))));
    EXPECT_TRUE(target->keep());
    init->keep();
  }
  ASSERT_OK_AND_ASSIGN(auto first, src_->create_initiator_for("peer-e"));
  ASSERT_EQ(first->address().size(), 8u);
  ASSERT_OK_AND_ASSIGN(
      auto t1, dst_->open_target(regions_, first->address(), in(seconds(10))));
  ASSERT_OK_AND_ASSIGN(
      auto t2, dst_->open_target(regions_, first->address(), in(seconds(10))));
  EXPECT_NE(t1->address(), t2->address());
  ASSERT_OK(first->connect(t1->address(), in(seconds(10))));
  ASSERT_OK_AND_ASSIGN(auto second, src_->create_initiator_for("peer-e"));
  EXPECT_TRUE(second->address().empty());
  // An initiator that holds nothing cannot take over the reused path.
  EXPECT_EQ(second->connect(t1->address(), in(seconds(10))).code(),
            StatusCode::kProtocol);
  ASSERT_OK_AND_ASSIGN(auto third, src_->create_initiator_for("peer-e"));
  ASSERT_OK(third->connect(t2->address(), in(seconds(10))));
  std::vector<WriteOp> a = {{src_at(5), 0, 7, 70000}};
  std::vector<WriteOp> b = {{src_at(kMiB), 1, 9, 90000}};
  auto expected = dst_copy();
  apply(a, expected);
  apply(b, expected);
  ASSERT_OK(first->write(a, in(seconds(10))));
  ASSERT_OK(third->write(b, in(seconds(10))));
  ASSERT_OK(first->flush(in(seconds(10))));
  ASSERT_OK(third->flush(in(seconds(10))));
  expect_dst_equals(expected);
}

// A committed path kept by both sides serves the next path between the same
// peers (ucx reuses its endpoint; the others start afresh), and revoke()
// still cuts a path made from a kept connection off.
TEST_P(TransportConformanceTest, KeptPathServesTheNextAndStillRevokes) {
  const bool reuses = GetParam() != "verbs";
  for (uint64_t round = 0; round < 3; ++round) {
    ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator_for("peer-a"));
    if (reuses) {
      EXPECT_EQ(init->address().empty(), round == 0) << round;
    }
    ASSERT_OK_AND_ASSIGN(
        auto target,
        dst_->open_target(regions_, init->address(), in(seconds(10))));
    ASSERT_OK(init->connect(target->address(), in(seconds(10))));
    std::vector<WriteOp> ops = {
        {src_at(round * 4096 + 1), 0, 100 + round, 40000},
        {src_at(kMiB + round), 1, 7 * round, 2 * kMiB + 5}};
    auto expected = dst_copy();
    apply(ops, expected);
    ASSERT_OK(init->write(ops, in(seconds(10))));
    ASSERT_OK(init->flush(in(seconds(10))));
    expect_dst_equals(expected);
    if (round < 2) {
      EXPECT_EQ(target->keep(), reuses);
      init->keep();
      continue;
    }
    // The third path, made from a kept connection, is revoked: nothing
    // written after lands.
    target->revoke();
    expect_cut_off(init, {{src_at(2 * kMiB), 0, 0, kMiB}});
  }
  // After a revoke nothing is kept: the next path starts afresh.
  if (reuses) {
    ASSERT_OK_AND_ASSIGN(auto fresh, src_->create_initiator_for("peer-a"));
    EXPECT_TRUE(fresh->address().empty());
  }
}

// open_target_at_once(): a path that opens without a wait opens, one that
// would wait is left to open_target() with nothing changed. Over ucx a kept
// connection is adopted at once and a fresh initiator gets null (the
// listener waits on the progress thread); tcp's targets all open at once;
// verbs' none do.
TEST_P(TransportConformanceTest, OpenAtOnceOnlyWhatNeedsNoWait) {
  const std::string t = GetParam();
  for (uint64_t round = 0; round < 3; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator_for("peer-o"));
    ASSERT_OK_AND_ASSIGN(
        auto at_once,
        dst_->open_target_at_once(regions_, init->address(), in(seconds(10))));
    const bool kept = t == "ucx" && round > 0;
    EXPECT_EQ(at_once != nullptr, t == "tcp" || kept);
    std::unique_ptr<TransportTarget> target = std::move(at_once);
    if (!target) {
      // Nothing was taken: the slow way still finds the kept connection.
      ASSERT_OK_AND_ASSIGN(target, dst_->open_target(regions_, init->address(),
                                                     in(seconds(10))));
    }
    ASSERT_OK(init->connect(target->address(), in(seconds(10))));
    std::vector<WriteOp> ops = {
        {src_at(round * 8192 + 3), 1, 5 + round, 70000}};
    auto expected = dst_copy();
    apply(ops, expected);
    ASSERT_OK(init->write(ops, in(seconds(10))));
    ASSERT_OK(init->flush(in(seconds(10))));
    expect_dst_equals(expected);
    EXPECT_EQ(target->keep(), t != "verbs");
    init->keep();
  }
  if (t == "ucx") {
    // The kept connection revoked: the next initiator finds nothing kept
    // and gets null, as does an address from no initiator at all.
    {
      ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator_for("peer-o"));
      ASSERT_OK_AND_ASSIGN(auto target,
                           dst_->open_target_at_once(regions_, init->address(),
                                                     in(seconds(10))));
      ASSERT_NE(target, nullptr);
      target->revoke();
    }
    ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator_for("peer-o"));
    ASSERT_OK_AND_ASSIGN(
        auto none,
        dst_->open_target_at_once(regions_, init->address(), in(seconds(10))));
    EXPECT_EQ(none, nullptr);
    const uint8_t junk[] = {7, 1, 2};
    EXPECT_EQ(dst_->open_target_at_once(regions_, junk, in(seconds(1)))
                  .status()
                  .code(),
              StatusCode::kInvalidArgument);
  }
}

// A migration whose pages went inline (protocol 8) adopts the kept path,
// never connects and keeps it: the path is there for the next migration,
// which writes over it (ucx and tcp reuse; verbs starts afresh anyway).
TEST_P(TransportConformanceTest, KeptPathUnusedByOneMigrationServesTheNext) {
  const bool reuses = GetParam() != "verbs";
  {
    ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator_for("peer-u"));
    ASSERT_OK_AND_ASSIGN(
        auto target,
        dst_->open_target(regions_, init->address(), in(seconds(10))));
    ASSERT_OK(init->connect(target->address(), in(seconds(10))));
    ASSERT_OK(init->flush(in(seconds(10))));
    EXPECT_EQ(target->keep(), reuses);
    init->keep();
  }
  for (int unused = 0; unused < 2; ++unused) {
    ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator_for("peer-u"));
    if (reuses) {
      EXPECT_FALSE(init->address().empty()) << unused;
    }
    init->keep();  // committed without a write: nothing connected
  }
  ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator_for("peer-u"));
  if (reuses) {
    EXPECT_FALSE(init->address().empty());
  }
  ASSERT_OK_AND_ASSIGN(auto target, dst_->open_target(regions_, init->address(),
                                                      in(seconds(10))));
  ASSERT_OK(init->connect(target->address(), in(seconds(10))));
  std::vector<WriteOp> ops = {{src_at(3), 0, 11, 50000}};
  auto expected = dst_copy();
  apply(ops, expected);
  ASSERT_OK(init->write(ops, in(seconds(10))));
  ASSERT_OK(init->flush(in(seconds(10))));
  expect_dst_equals(expected);
}

// keep() and then revoke() (the destination's install failed after it kept
// the path): the initiator is cut off all the same and nothing it writes
// after lands.
TEST_P(TransportConformanceTest, RevokeAfterKeepStillCutsTheInitiatorOff) {
  ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator_for("peer-c"));
  ASSERT_OK_AND_ASSIGN(auto target, dst_->open_target(regions_, init->address(),
                                                      in(seconds(10))));
  ASSERT_OK(init->connect(target->address(), in(seconds(10))));
  std::vector<WriteOp> first = {{src_at(0), 0, 0, kMiB}};
  ASSERT_OK(init->write(first, in(seconds(10))));
  ASSERT_OK(init->flush(in(seconds(10))));
  EXPECT_EQ(target->keep(), GetParam() != "verbs");
  target->revoke();
  const std::vector<WriteOp> late = {{src_at(2 * kMiB), 1, 0, kMiB}};
  expect_cut_off(init, late);
  // Nothing kept survives: the next path to that peer is a fresh one.
  ASSERT_OK_AND_ASSIGN(auto next, src_->create_initiator_for("peer-c"));
  ASSERT_OK_AND_ASSIGN(auto fresh, dst_->open_target(regions_, next->address(),
                                                     in(seconds(10))));
  ASSERT_OK(next->connect(fresh->address(), in(seconds(10))));
  ASSERT_OK(next->write(late, in(seconds(10))));
  ASSERT_OK(next->flush(in(seconds(10))));
}

// The target let its side of a kept connection go: whether the initiator
// has noticed (its side failed, nothing to present) or not (it presents a
// token the target no longer knows, and the target listens afresh), the
// next path works, over a fresh connection. (Transports that keep nothing
// start afresh anyway.)
TEST_P(TransportConformanceTest, ForgottenKeptConnectionFallsBackToAFreshPath) {
  {
    ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator_for("peer-b"));
    ASSERT_OK_AND_ASSIGN(
        auto target,
        dst_->open_target(regions_, init->address(), in(seconds(10))));
    ASSERT_OK(init->connect(target->address(), in(seconds(10))));
    init->keep();
    target->revoke();  // the target side is gone, the initiator kept its own
  }
  std::this_thread::sleep_for(milliseconds(300));
  ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator_for("peer-b"));
  ASSERT_OK_AND_ASSIGN(auto target, dst_->open_target(regions_, init->address(),
                                                      in(seconds(10))));
  ASSERT_OK(init->connect(target->address(), in(seconds(10))));
  std::vector<WriteOp> ops = {{src_at(9), 1, 11, 100000}};
  auto expected = dst_copy();
  apply(ops, expected);
  ASSERT_OK(init->write(ops, in(seconds(10))));
  ASSERT_OK(init->flush(in(seconds(10))));
  expect_dst_equals(expected);
  if (GetParam() != "verbs") {
    // A malformed initiator address is a clear error.
    const uint8_t junk[] = {7, 1, 2};
    EXPECT_EQ(dst_->open_target(regions_, junk, in(seconds(1))).status().code(),
              StatusCode::kInvalidArgument);
  }
}

TEST_P(TransportConformanceTest, TargetWithoutInitiatorRevokesCleanly) {
  ASSERT_OK_AND_ASSIGN(auto probe, src_->create_initiator());
  for (int i = 0; i < 3; ++i) {
    ASSERT_OK_AND_ASSIGN(
        auto target,
        dst_->open_target(regions_, probe->address(), in(seconds(10))));
    EXPECT_FALSE(target->address().empty());
    EXPECT_OK(target->health());
    const auto t0 = Clock::now();
    if (i == 0) target->revoke();  // then the destructor revokes again
    target.reset();
    EXPECT_LT(Clock::now() - t0, seconds(2));
  }
}

TEST_P(TransportConformanceTest, SecondInitiatorIsRefused) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  const auto before = dst_copy();

  ASSERT_OK_AND_ASSIGN(auto intruder, src_->create_initiator());
  const auto deadline = in(seconds(3));
  Status s = intruder->connect(target->address(), deadline);
  if (s.ok()) {
    std::vector<WriteOp> ops = {{src_at(0), 0, 0, 4096}};
    s = intruder->write(ops, deadline);
    if (s.ok()) s = intruder->flush(deadline);
  }
  EXPECT_FALSE(s.ok());
  // Gone, so nothing of it is still in flight.
  intruder.reset();
  expect_dst_equals(before);

  // The first initiator is unaffected.
  std::vector<WriteOp> ops = {{src_at(100), 1, 100, 1000}};
  auto expected = before;
  apply(ops, expected);
  ASSERT_OK(init->write(ops, in(seconds(10))));
  ASSERT_OK(init->flush(in(seconds(10))));
  expect_dst_equals(expected);
}

TEST_P(TransportConformanceTest, ConnectToDeadPortFailsWithinDeadline) {
  ASSERT_OK_AND_ASSIGN(auto probe, src_->create_initiator());
  std::vector<uint8_t> addr;
  {
    ASSERT_OK_AND_ASSIGN(
        auto target,
        dst_->open_target(regions_, probe->address(), in(seconds(10))));
    addr = target->address();
  }  // revoked: nothing listens on its port any more
  for (auto budget : {milliseconds(300), milliseconds(2000)}) {
    ASSERT_OK_AND_ASSIGN(auto init, src_->create_initiator());
    const auto t0 = Clock::now();
    Status s = init->connect(addr, t0 + budget);
    const auto took = Clock::now() - t0;
    EXPECT_TRUE(s.code() == StatusCode::kUnavailable ||
                s.code() == StatusCode::kDeadlineExceeded)
        << s.to_string();
    EXPECT_LT(took, budget + milliseconds(1000));
  }
}

// Also run with UCX_TLS=tcp (meson test transport-ucx-tcp): there UCX 1.13
// emulates puts over active messages, and a target whose initiator
// force-closed with puts unacknowledged aborted the whole process ("Fatal:
// unexpected error: Endpoint timeout" in ucp_put_handler) within 4 runs
// of these two cases; the initiator now flushes before it closes (see
// ucx_core.h, "Closing"): 1000 runs, no abort.
TEST_P(TransportConformanceTest, ExpiredDeadlineIsDeadlineExceeded) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  // A 12 MiB batch cannot be posted and flushed by a deadline in the past.
  std::vector<WriteOp> ops = {{src_at(0), 0, 0, 8 * kMiB},
                              {src_at(8 * kMiB), 1, 0, 3 * kMiB}};
  Status s = init->write(ops, Clock::now() - milliseconds(1));
  if (s.ok()) s = init->flush(Clock::now() - milliseconds(1));
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.to_string();
}

// A deadline that passes mid-transfer: the write or the flush ends with
// DeadlineExceeded (or in time), the initiator closes (ucx: flushing the
// puts it sent first, see ucx_core.h, "Closing"), and the target's side
// serves the next connection: its bytes land.
TEST_P(TransportConformanceTest, DeadlineMidTransferLeavesTheTargetUsable) {
  const std::vector<WriteOp> big = {{src_at(0), 0, 0, 8 * kMiB},
                                    {src_at(8 * kMiB), 1, 0, 3 * kMiB}};
  int expired = 0;
  for (const auto budget : {microseconds(200), microseconds(1000),
                            microseconds(3000), microseconds(10000)}) {
    SCOPED_TRACE("budget " + std::to_string(budget.count()) + " us");
    std::unique_ptr<TransportTarget> target;
    std::unique_ptr<TransportInitiator> init;
    ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
    const auto deadline = Clock::now() + budget;
    Status s = init->write(big, deadline);
    if (s.ok()) s = init->flush(deadline);
    if (!s.ok()) {
      EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.to_string();
      ++expired;
    }
    init.reset();  // returns once nothing of it runs
    target->revoke();
  }
  EXPECT_GT(expired, 0) << "no budget ended mid-transfer";
  expect_a_new_pair_works();
}

// The destination aborts while the source is still writing: revoke()
// returns once no write can land, and the transports serve the next pair.
// The source writes the pages at most twice, as a migration writes each
// page once a round, and stops posting once the abort begins (as on ABORT);
// what it has in flight ends either way. Over ucx, revoke() must also leave
// no acknowledgement owed (ucx_core.h, "Closing"): once both transports are
// gone, UCX has reported no request it never freed. Without the target's
// drain, 53 and 63 of 60 and 80 runs reported some. (Writing until the
// revoke began queued up to 33 rounds, 363 MiB, when the revoking thread
// started late under load: more than a drain can wait for.)
TEST_P(TransportConformanceTest, RevokeMidTransferCutsOffAndLeavesNothingOwed) {
#if KVMIG_TEST_UCX_LOG
  ucs_log_push_handler(count_unreturned);
  ScopeExit pop([] { ucs_log_pop_handler(); });
  const int unreturned_before = ucx_unreturned.load();
#endif
  const std::vector<WriteOp> big = {{src_at(0), 0, 0, 8 * kMiB},
                                    {src_at(8 * kMiB), 1, 0, 3 * kMiB}};
  std::vector<WriteOp> late;
  for (uint64_t i = 0; i < 32; ++i) {
    late.push_back({src_at(2 * kMiB + i * 32768), static_cast<uint32_t>(i % 2),
                    kMiB + i * 32768, 32768});
  }
  for (const auto delay :
       {microseconds(100), microseconds(300), microseconds(1000),
        microseconds(2000), microseconds(4000)}) {
    SCOPED_TRACE("revoked after " + std::to_string(delay.count()) + " us");
    std::unique_ptr<TransportTarget> target;
    std::unique_ptr<TransportInitiator> init;
    ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
    std::atomic<bool> aborting{false};
    std::vector<std::byte> at_revoke;
    std::thread revoker([&] {
      std::this_thread::sleep_for(delay);
      aborting = true;
      target->revoke();
      at_revoke = dst_copy();
    });
    const auto deadline = in(seconds(3));
    Status s;
    for (int round = 0; round < 2 && s.ok() && !aborting; ++round) {
      s = init->write(big, deadline);
    }
    if (s.ok()) s = init->flush(deadline);
    revoker.join();
    EXPECT_TRUE(s.ok() || s.code() == StatusCode::kUnavailable ||
                s.code() == StatusCode::kDeadlineExceeded)
        << s.to_string();
    expect_cut_off(init, late);  // destroys init
    expect_dst_equals(at_revoke);
    target.reset();
  }
  expect_a_new_pair_works();
#if KVMIG_TEST_UCX_LOG
  if (GetParam() == "ucx") {
    ASSERT_OK(src_->deregister_memory(src_mem_.span()));
    ASSERT_OK(dst_->deregister_memory(dst_mem_.span()));
    src_.reset();  // destroys its UCX worker, which reports what leaked
    dst_.reset();
    EXPECT_EQ(ucx_unreturned.load() - unreturned_before, 0)
        << "UCX reported requests never freed (acknowledgements left owed)";
  }
#endif
}

// A writer that never pauses (write after write, no flush) is cut off by a
// revoke mid-stream: a later write fails, and no byte lands after revoke()
// returned. The writer gives up after 20 s of successful writes: if it got
// that far, the revoke waited for it or never cut it off. (It does not pin
// kProgressBurst in ucx_core.cc: on this 2-vCPU machine the target's
// progress loop finds UCX idle between the writer's calls even without the
// bound, under UCX_TLS=tcp too.)
TEST_P(TransportConformanceTest, RevokeCutsOffAWriterThatNeverPauses) {
  std::unique_ptr<TransportTarget> target;
  std::unique_ptr<TransportInitiator> init;
  ASSERT_NO_FATAL_FAILURE(connect_pair(target, init));
  std::vector<WriteOp> ops;
  for (uint64_t i = 0; i < 64; ++i) {
    ops.push_back(
        {src_at(i * 32768), static_cast<uint32_t>(i % 2), i * 32768, 32768});
  }
  std::atomic<uint64_t> writes{0};
  std::atomic<bool> gave_up{false};
  Status s;
  std::thread writer([&] {
    const auto give_up = Clock::now() + seconds(20);
    while (s.ok()) {
      if (Clock::now() > give_up) {
        gave_up = true;
        return;
      }
      s = init->write(ops, in(seconds(5)));
      writes.fetch_add(1);
    }
  });
  // Revoked mid-stream: once the writer has written a few times.
  while (writes.load() < 4 && !gave_up.load()) std::this_thread::yield();
  target->revoke();
  const uint64_t writes_at_revoke = writes.load();
  const auto at_revoke = dst_copy();
  writer.join();
  EXPECT_FALSE(gave_up.load())
      << "revoke() returned only once the writer stopped on its own, after "
      << writes.load() << " writes (" << writes_at_revoke
      << " when it returned)";
  EXPECT_TRUE(s.code() == StatusCode::kUnavailable ||
              s.code() == StatusCode::kDeadlineExceeded)
      << s.to_string();
  init.reset();  // returns once nothing of it runs
  expect_dst_equals(at_revoke);
}

TEST_P(TransportConformanceTest, RegistrationRules) {
  Mapping m(kMiB);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(src_->register_memory({}).code(), StatusCode::kInvalidArgument);
  ASSERT_OK(src_->register_memory(m.sub(0, kMiB / 2)));
  EXPECT_EQ(src_->register_memory(m.sub(kMiB / 4, kMiB / 2)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(src_->register_memory(m.sub(0, kMiB / 2)).code(),
            StatusCode::kInvalidArgument);
  // Overlaps the fixture's registration from inside.
  EXPECT_EQ(src_->register_memory(src_mem_.sub(4096, 4096)).code(),
            StatusCode::kInvalidArgument);
  ASSERT_OK(src_->register_memory(m.sub(kMiB / 2, kMiB / 2)));  // adjacent
  EXPECT_EQ(src_->deregister_memory(m.sub(0, kMiB / 4)).code(),
            StatusCode::kNotFound);
  ASSERT_OK(src_->deregister_memory(m.sub(0, kMiB / 2)));
  ASSERT_OK(src_->deregister_memory(m.sub(kMiB / 2, kMiB / 2)));
  EXPECT_EQ(src_->deregister_memory(m.sub(0, kMiB / 2)).code(),
            StatusCode::kNotFound);

  // A target region must lie in registered memory.
  ASSERT_OK_AND_ASSIGN(auto probe, src_->create_initiator());
  std::vector<std::span<std::byte>> outside = {m.sub(0, 4096)};
  EXPECT_EQ(dst_->open_target(outside, probe->address(), in(seconds(5)))
                .status()
                .code(),
            StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Transports, TransportConformanceTest,
                         ::testing::ValuesIn(built_transports()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });
INSTANTIATE_TEST_SUITE_P(Transports, CheckingConformanceTest,
                         ::testing::ValuesIn(checking_transports()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });
INSTANTIATE_TEST_SUITE_P(Transports, VerbsConformanceTest,
                         ::testing::ValuesIn([] {
                           std::vector<std::string> out;
                           for (const std::string& t : built_transports()) {
                             if (t == "verbs") out.push_back(t);
                           }
                           return out;
                         }()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });
INSTANTIATE_TEST_SUITE_P(Transports, TcpConformanceTest,
                         ::testing::Values(std::string("tcp")),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

TEST(TransportRegistryTest, TcpIsAlwaysBuilt) {
  const auto names = built_transports();
  EXPECT_NE(std::find(names.begin(), names.end(), "tcp"), names.end());
  for (const auto& n : names) {
    auto t = make_transport(n, options_for(n));
    if (no_device_here(n, t.status())) continue;
    ASSERT_OK(t.status());
    EXPECT_EQ((*t)->name(), n);
  }
}

// Inside the Soft-RoCE guest the verbs transport must be built and find the
// device; elsewhere this says why the verbs cases skip.
TEST(TransportRegistryTest, VerbsDeviceInsideTheRxeGuest) {
  const auto names = built_transports();
  const bool built =
      std::find(names.begin(), names.end(), "verbs") != names.end();
  if (!in_rxe_guest()) {
    if (!built) GTEST_SKIP() << "verbs is not built (meson -Dverbs)";
    auto t = make_transport("verbs", options_for("verbs"));
    if (!t.ok()) GTEST_SKIP() << "no RDMA device: " << t.status().to_string();
    SUCCEED() << "an RDMA device is present outside the rxe guest";
    return;
  }
  ASSERT_TRUE(built) << "RXEVM_DEV is set but this build has no verbs";
  auto t = make_transport("verbs", options_for("verbs"));
  ASSERT_OK(t.status());
}

TEST(TransportRegistryTest, UnknownAndUnbuiltNames) {
  auto unknown = make_transport("carrier-pigeon", TransportOptions{});
  EXPECT_EQ(unknown.status().code(), StatusCode::kNotFound);
  EXPECT_NE(unknown.status().message().find("tcp"), std::string::npos)
      << unknown.status().to_string();
#ifndef KVMIG_WITH_VERBS
  auto verbs = make_transport("verbs", TransportOptions{});
  EXPECT_EQ(verbs.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(verbs.status().message().find("-Dverbs"), std::string::npos)
      << verbs.status().to_string();
#endif
#ifndef KVMIG_WITH_UCX
  EXPECT_EQ(make_transport("ucx", TransportOptions{}).status().code(),
            StatusCode::kUnimplemented);
#endif
}

// The tcp target's own defences, driven by a hand-made peer.
class TcpTargetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(mem_.ok());
    ASSERT_OK_AND_ASSIGN(t_, make_transport("tcp", TransportOptions{}));
    ASSERT_OK(t_->register_memory(mem_.span()));
    fill(mem_.span(), 0x5A);
    std::vector<std::span<std::byte>> regions = {mem_.sub(0, 4096)};
    ASSERT_OK_AND_ASSIGN(target_, t_->open_target(regions, {}, in(seconds(5))));
    const auto addr = target_->address();
    ByteReader r(addr);
    ASSERT_OK_AND_ASSIGN(std::string host, r.get_string(255, "host"));
    ASSERT_OK_AND_ASSIGN(port_, r.get<uint16_t>("port"));
    ASSERT_OK_AND_ASSIGN(token_, r.get<uint64_t>("token"));
  }
  void TearDown() override {
    target_.reset();
    EXPECT_OK(t_->deregister_memory(mem_.span()));
  }

  // A raw connection that sent `token` and got the echo (or not).
  boost::asio::ip::tcp::socket dial(uint64_t token, bool expect_echo) {
    namespace asio = boost::asio;
    asio::ip::tcp::socket s(io_);
    boost::system::error_code ec;
    s.connect({asio::ip::make_address("127.0.0.1"), port_}, ec);
    EXPECT_FALSE(ec) << ec.message();
    ByteWriter w;
    w.put<uint64_t>(token);
    asio::write(s, asio::buffer(w.buffer()), ec);
    EXPECT_FALSE(ec) << ec.message();
    std::array<uint8_t, 8> echo{};
    asio::read(s, asio::buffer(echo), ec);
    EXPECT_EQ(!ec, expect_echo) << ec.message();
    return s;
  }

  // Sends `bytes` on a fresh connection and closes it; returns `target`'s
  // health once it is not OK (or after 10 s).
  Status send_and_vanish(std::span<const uint8_t> bytes,
                         TransportTarget& target) {
    {
      auto s = dial(token_, true);
      boost::system::error_code ec;
      boost::asio::write(s, boost::asio::buffer(bytes.data(), bytes.size()),
                         ec);
      EXPECT_FALSE(ec) << ec.message();
    }  // closed
    const auto until = in(seconds(10));
    while (target.health().ok() && Clock::now() < until) {
      std::this_thread::sleep_for(milliseconds(1));
    }
    return target.health();
  }

  Mapping mem_{kMiB};
  std::unique_ptr<Transport> t_;
  std::unique_ptr<TransportTarget> target_;
  boost::asio::io_context io_;
  uint16_t port_ = 0;
  uint64_t token_ = 0;
};

TEST_F(TcpTargetTest, WrongTokenIsDroppedAndRightOneServed) {
  auto bad = dial(token_ + 1, /*expect_echo=*/false);
  auto good = dial(token_, /*expect_echo=*/true);
  EXPECT_OK(target_->health());
}

TEST_F(TcpTargetTest, MalformedRecordIsAProtocolError) {
  auto s = dial(token_, true);
  // A write record for [4000, +200) of a 4096-byte region, then its payload.
  ByteWriter w;
  w.put<uint32_t>(0);
  w.put<uint64_t>(4000);
  w.put<uint64_t>(200);
  w.put_bytes(std::vector<uint8_t>(200, 1));
  boost::system::error_code ec;
  boost::asio::write(s, boost::asio::buffer(w.buffer()), ec);
  // The target closes the connection without applying anything.
  std::array<uint8_t, 1> b{};
  boost::asio::read(s, boost::asio::buffer(b), ec);
  EXPECT_TRUE(ec);
  EXPECT_EQ(target_->health().code(), StatusCode::kProtocol)
      << target_->health().to_string();
  for (size_t i = 0; i < mem_.size(); ++i) {
    ASSERT_EQ(mem_.data()[i], std::byte{0x5A}) << "byte " << i;
  }
}

// A batch record (protocol 6): region 0xFFFFFFFE, offset = entries,
// length = their payload bytes; the entries, then the payloads.
std::vector<uint8_t> batch_record(
    const std::vector<std::tuple<uint32_t, uint64_t, uint64_t>>& entries,
    uint64_t header_bytes, uint8_t fill) {
  ByteWriter w;
  w.put<uint32_t>(0xFFFFFFFE);
  w.put<uint64_t>(entries.size());
  w.put<uint64_t>(header_bytes);
  for (const auto& e : entries) {
    w.put<uint32_t>(std::get<0>(e));
    w.put<uint64_t>(std::get<1>(e));
    w.put<uint64_t>(std::get<2>(e));
  }
  for (const auto& e : entries) {
    w.put_bytes(std::vector<uint8_t>(std::get<2>(e), fill++));
  }
  return w.take();
}

// A well-formed batch, its bytes sent in three pieces (a header alone,
// part of the entries, the rest): every payload lands in its place, a
// zero-length entry included, and the flush after it is answered.
TEST_F(TcpTargetTest, BatchLandsInPlace) {
  auto s = dial(token_, true);
  const std::vector<uint8_t> rec = batch_record(
      {{0, 100, 10}, {0, 3000, 1000}, {0, 50, 0}, {0, 0, 7}}, 1017, /*fill=*/1);
  boost::system::error_code ec;
  const size_t cuts[] = {0, 20, 50, rec.size()};
  for (int i = 0; i < 3; ++i) {
    boost::asio::write(
        s, boost::asio::buffer(rec.data() + cuts[i], cuts[i + 1] - cuts[i]),
        ec);
    ASSERT_FALSE(ec) << ec.message();
    std::this_thread::yield();
  }
  // A flush: the target answers once every record before it has landed.
  ByteWriter f;
  f.put<uint32_t>(0xFFFFFFFF);
  f.put<uint64_t>(9);
  f.put<uint64_t>(0);
  boost::asio::write(s, boost::asio::buffer(f.buffer()), ec);
  std::array<uint8_t, 8> ack{};
  boost::asio::read(s, boost::asio::buffer(ack), ec);
  ASSERT_FALSE(ec) << ec.message() << " " << target_->health().to_string();
  EXPECT_EQ(load_le<uint64_t>(ack.data()), 9u);
  std::vector<std::byte> want(4096, std::byte{0x5A});
  std::memset(want.data() + 100, 1, 10);
  std::memset(want.data() + 3000, 2, 1000);
  std::memset(want.data() + 0, 4, 7);
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(mem_.data()[i], want[i]) << "byte " << i;
  }
  EXPECT_OK(target_->health());
}

// Batches the target refuses: too many entries, entries that do not add
// up to the header's bytes, one entry outside the region. Nothing of a
// refused batch lands, not even its good entries before the bad one.
TEST_F(TcpTargetTest, MalformedBatchAppliesNothing) {
  std::vector<std::tuple<uint32_t, uint64_t, uint64_t>> many;
  for (uint64_t i = 0; i < 64; ++i) many.emplace_back(0, i * 8, 8);
  struct Case {
    const char* name;
    std::vector<uint8_t> record;
    const char* says;
  } cases[] = {
      {"64 entries", batch_record(many, 64 * 8, 1), "of 64 entries"},
      {"one entry", batch_record({{0, 0, 8}}, 8, 1), "of 1 entries"},
      {"sum", batch_record({{0, 0, 8}, {0, 8, 8}}, 24, 1), "add up to 16"},
      {"outside", batch_record({{0, 0, 8}, {0, 4090, 8}}, 16, 1),
       "outside region 0"},
      {"another region", batch_record({{0, 0, 8}, {1, 0, 8}}, 16, 1),
       "for region 1 of 1"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    // A fresh target for each: a refusal ends the connection.
    TearDown();
    SetUp();
    auto s = dial(token_, true);
    boost::system::error_code ec;
    boost::asio::write(s, boost::asio::buffer(c.record), ec);
    std::array<uint8_t, 1> b{};
    boost::asio::read(s, boost::asio::buffer(b), ec);
    EXPECT_TRUE(ec);
    const Status health = target_->health();
    EXPECT_EQ(health.code(), StatusCode::kProtocol) << health.to_string();
    EXPECT_NE(health.message().find(c.says), std::string::npos)
        << health.to_string();
    for (size_t i = 0; i < mem_.size(); ++i) {
      ASSERT_EQ(mem_.data()[i], std::byte{0x5A}) << "byte " << i;
    }
  }
}

// The peer vanishes in the middle of a batch's payloads, the cut at three
// places (right after the entries, inside the first payload, inside the
// second): the connection ends as Unavailable naming the batch, and no
// byte past the cut and none outside the batch's entries changes. (Bytes
// of the batch that arrived before the cut may have landed: the
// migration that sent them rolls back and releases those slots.)
TEST_F(TcpTargetTest, PeerVanishingMidBatchEndsTheConnection) {
  const std::vector<std::tuple<uint32_t, uint64_t, uint64_t>> entries = {
      {0, 100, 600}, {0, 3000, 1000}};
  const std::vector<uint8_t> rec = batch_record(entries, 1600, /*fill=*/1);
  const size_t payloads = rec.size() - 1600;  // where the payloads begin
  for (const size_t sent : {size_t{0}, size_t{300}, size_t{900}}) {
    SCOPED_TRACE("cut after " + std::to_string(sent) + " payload bytes");
    TearDown();
    SetUp();
    const Status health =
        send_and_vanish(std::span(rec).first(payloads + sent), *target_);
    EXPECT_EQ(health.code(), StatusCode::kUnavailable) << health.to_string();
    EXPECT_NE(health.message().find("batch"), std::string::npos)
        << health.to_string();
    // What may have landed: the first `sent` payload bytes, in entry order.
    std::vector<bool> may(4096, false);
    size_t left = sent;
    for (const auto& e : entries) {
      const size_t n = std::min<size_t>(left, std::get<2>(e));
      for (size_t i = 0; i < n; ++i) may[std::get<1>(e) + i] = true;
      left -= n;
    }
    for (size_t i = 0; i < mem_.size(); ++i) {
      if (i < may.size() && may[i]) continue;
      ASSERT_EQ(mem_.data()[i], std::byte{0x5A}) << "byte " << i;
    }
  }
}

// A mark record (protocol 7): region 0xFFFFFFFD, offset = its number, no
// payload.
std::vector<uint8_t> mark_record(uint64_t mark, uint64_t length = 0) {
  ByteWriter w;
  w.put<uint32_t>(0xFFFFFFFD);
  w.put<uint64_t>(mark);
  w.put<uint64_t>(length);
  return w.take();
}

// A peer that vanishes before its mark: the wait ends as soon as the
// connection does (Unavailable), long before its deadline; one waiting
// while the target is revoked ends then (Aborted); a mark with a payload
// is a protocol error.
TEST_F(TcpTargetTest, AMarkThatCannotComeEndsTheWait) {
  ByteWriter w;  // a write record whose payload never comes whole
  w.put<uint32_t>(0);
  w.put<uint64_t>(0);
  w.put<uint64_t>(1000);
  w.put_bytes(std::vector<uint8_t>(10, 1));
  auto waited = std::async(std::launch::async, [this] {
    const auto t0 = Clock::now();
    Status s = target_->wait_mark(1, in(seconds(30)));
    return std::make_pair(s, Clock::now() - t0);
  });
  const Status health = send_and_vanish(w.buffer(), *target_);
  EXPECT_EQ(health.code(), StatusCode::kUnavailable) << health.to_string();
  auto [status, took] = waited.get();
  EXPECT_EQ(status.code(), StatusCode::kUnavailable) << status.to_string();
  EXPECT_NE(status.message().find("mark 1"), std::string::npos)
      << status.to_string();
  EXPECT_LT(took, seconds(10));

  TearDown();
  SetUp();
  auto s = dial(token_, true);
  boost::system::error_code ec;
  const std::vector<uint8_t> m = mark_record(7);
  boost::asio::write(s, boost::asio::buffer(m), ec);
  ASSERT_OK(target_->wait_mark(7, in(seconds(10))));
  EXPECT_OK(target_->wait_mark(3, in(seconds(10))));  // an older one
  auto revoked = std::async(std::launch::async, [this] {
    return target_->wait_mark(8, in(seconds(30)));
  });
  target_->revoke();
  EXPECT_EQ(revoked.get().code(), StatusCode::kAborted);

  TearDown();
  SetUp();
  const Status bad = send_and_vanish(mark_record(9, 5), *target_);
  EXPECT_EQ(bad.code(), StatusCode::kProtocol) << bad.to_string();
  EXPECT_EQ(target_->wait_mark(9, in(seconds(10))).code(),
            StatusCode::kUnavailable);
}

// --- device memory ----------------------------------------------------------

// A simulated device: a memfd mapped twice. device() is PROT_NONE (a CPU
// access by a transport kills the test); the copies of memory() go
// through the readable mapping, counting their calls.
class SimDevice {
 public:
  explicit SimDevice(size_t size) : size_(size) {
    fd_ = memfd_create("kvmig-transport-test", 0);
    if (fd_ < 0 || ftruncate(fd_, static_cast<off_t>(size)) != 0) return;
    void* dev = mmap(nullptr, size, PROT_NONE, MAP_SHARED, fd_, 0);
    void* cpu = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    if (dev != MAP_FAILED) dev_ = static_cast<std::byte*>(dev);
    if (cpu != MAP_FAILED) cpu_ = static_cast<std::byte*>(cpu);
  }
  ~SimDevice() {
    if (dev_) munmap(dev_, size_);
    if (cpu_) munmap(cpu_, size_);
    if (fd_ >= 0) close(fd_);
  }
  SimDevice(const SimDevice&) = delete;
  SimDevice& operator=(const SimDevice&) = delete;

  bool ok() const { return dev_ && cpu_; }
  std::span<std::byte> device() const { return {dev_, size_}; }
  std::span<std::byte> cpu() const { return {cpu_, size_}; }

  // The copies a pager would give; `fail_writes` makes them fail.
  std::shared_ptr<const DeviceMemory> memory() {
    auto m = std::make_shared<DeviceMemory>();
    m->read = [this](const std::byte* src, std::span<std::byte> out) {
      ++reads;
      std::memcpy(out.data(), cpu_ + (src - dev_), out.size());
      return Status();
    };
    m->write = [this](std::byte* dst, std::span<const std::byte> in) {
      if (fail_writes) return Status::internal("simulated device error");
      ++writes;
      std::memcpy(cpu_ + (dst - dev_), in.data(), in.size());
      return Status();
    };
    m->dmabuf = [] {
      return Result<DmabufRegion>(
          Status::unimplemented("the test's device exports no dmabuf"));
    };
    return m;
  }

  std::atomic<uint64_t> reads{0}, writes{0};
  std::atomic<bool> fail_writes{false};

 private:
  size_t size_;
  int fd_ = -1;
  std::byte* dev_ = nullptr;
  std::byte* cpu_ = nullptr;
};

// Many small writes from host memory go as batch records: into a target
// whose regions are device memory and host memory, interleaved within a
// batch (the device's through the bounce buffer), with large writes
// between the runs; every byte lands, and only where it was written.
TEST(DeviceMemoryTransport, TcpBatchesOfSmallWritesLandInDeviceAndHost) {
  constexpr size_t kBytes = 2 * kMiB;
  SimDevice dst_dev(kBytes);
  Mapping src(2 * kBytes), dst_host(kBytes);
  ASSERT_TRUE(dst_dev.ok() && src.ok() && dst_host.ok());
  fill_random(src.span(), 9);
  auto tsrc = make_transport("tcp", {});
  auto tdst = make_transport("tcp", {});
  ASSERT_TRUE(tsrc.ok() && tdst.ok());
  ASSERT_OK((*tsrc)->register_memory(src.span()));
  ASSERT_OK(
      (*tdst)->register_device_memory(dst_dev.device(), dst_dev.memory()));
  ASSERT_OK((*tdst)->register_memory(dst_host.span()));
  std::memset(dst_dev.cpu().data(), 0, kBytes);
  std::memset(dst_host.data(), 0, kBytes);
  ASSERT_OK_AND_ASSIGN(auto init, (*tsrc)->create_initiator());
  std::vector<std::span<std::byte>> regions = {dst_dev.device(),
                                               dst_host.span()};
  ASSERT_OK_AND_ASSIGN(
      auto target,
      (*tdst)->open_target(regions, init->address(), in(seconds(10))));
  ASSERT_OK(init->connect(target->address(), in(seconds(10))));
  // 4 KiB pieces of both regions in a shuffled order (every 8th skipped:
  // it must stay zero), a 64 KiB write after every 100.
  std::vector<WriteOp> ops;
  std::vector<uint64_t> pieces;
  for (uint64_t off = 0; off < kBytes; off += 4096) {
    if ((off / 4096) % 8 != 7) pieces.push_back(off);
  }
  std::mt19937_64 rng(3);
  std::shuffle(pieces.begin(), pieces.end(), rng);
  uint64_t written = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    for (uint32_t r = 0; r < 2; ++r) {
      ops.push_back({src.data() + r * kBytes + pieces[i], r, pieces[i], 4096});
      written += 4096;
    }
    if (i % 100 == 99) ops.push_back({src.data(), 1, 0, 0});  // empty
  }
  ASSERT_OK(init->write(ops, in(seconds(20))));
  ASSERT_OK(init->flush(in(seconds(20))));
  EXPECT_EQ(init->bytes_written(), written);
  EXPECT_GT(dst_dev.writes, 0u);
  for (uint32_t r = 0; r < 2; ++r) {
    const std::byte* got = r == 0 ? dst_dev.cpu().data() : dst_host.data();
    for (uint64_t off = 0; off < kBytes; off += 4096) {
      SCOPED_TRACE("region " + std::to_string(r) + " offset " +
                   std::to_string(off));
      if ((off / 4096) % 8 == 7) {
        ASSERT_EQ(std::count(got + off, got + off + 4096, std::byte{0}), 4096);
      } else {
        ASSERT_EQ(std::memcmp(got + off, src.data() + r * kBytes + off, 4096),
                  0);
      }
    }
  }
  EXPECT_OK(target->health());
}

// A batch for device memory is read whole before any byte goes in: the
// peer vanishing in the middle of its payloads lands nothing on the device.
TEST_F(TcpTargetTest, PeerVanishingMidBatchLandsNothingOnADevice) {
  SimDevice dev(kMiB);
  ASSERT_TRUE(dev.ok());
  std::memset(dev.cpu().data(), 0x5A, kMiB);
  ASSERT_OK(t_->register_device_memory(dev.device(), dev.memory()));
  std::vector<std::span<std::byte>> regions = {dev.device().first(4096)};
  ASSERT_OK_AND_ASSIGN(auto target,
                       t_->open_target(regions, {}, in(seconds(5))));
  const auto addr = target->address();
  ByteReader r(addr);
  ASSERT_OK(r.get_string(255, "host").status());
  ASSERT_OK_AND_ASSIGN(port_, r.get<uint16_t>("port"));
  ASSERT_OK_AND_ASSIGN(token_, r.get<uint64_t>("token"));
  const std::vector<uint8_t> rec =
      batch_record({{0, 100, 600}, {0, 3000, 1000}}, 1600, /*fill=*/1);
  const Status health =
      send_and_vanish(std::span(rec).first(rec.size() - 100), *target);
  EXPECT_EQ(health.code(), StatusCode::kUnavailable) << health.to_string();
  EXPECT_EQ(dev.writes, 0u);
  EXPECT_EQ(std::count(dev.cpu().begin(), dev.cpu().end(), std::byte{0x5A}),
            static_cast<std::ptrdiff_t>(kMiB));
  target.reset();
  EXPECT_OK(t_->deregister_memory(dev.device()));
}

struct TcpPair {
  std::unique_ptr<Transport> src, dst;
};

TcpPair tcp_pair() {
  TcpPair p;
  p.src = std::move(make_transport("tcp", {})).value();
  p.dst = std::move(make_transport("tcp", {})).value();
  return p;
}

// Device to device, device to host and host to device: every byte lands,
// through the copies (the big write crosses several bounce buffers).
TEST(DeviceMemoryTransport, TcpMovesDeviceBytesThroughItsBounceBuffers) {
  constexpr size_t kBytes = 6 * kMiB + 4096;
  SimDevice src_dev(kBytes), dst_dev(kBytes);
  Mapping src_host(kBytes), dst_host(kBytes);
  ASSERT_TRUE(src_dev.ok() && dst_dev.ok() && src_host.ok() && dst_host.ok());
  fill_random(src_dev.cpu(), 7);
  fill_random(src_host.span(), 8);
  auto t = tcp_pair();
  ASSERT_OK(t.src->register_device_memory(src_dev.device(), src_dev.memory()));
  ASSERT_OK(t.src->register_memory(src_host.span()));
  ASSERT_OK(t.dst->register_device_memory(dst_dev.device(), dst_dev.memory()));
  ASSERT_OK(t.dst->register_memory(dst_host.span()));

  struct Case {
    const char* name;
    std::byte* src;         // the address the transport is given
    const std::byte* want;  // where the source's bytes really are
    std::span<std::byte> dst;
    std::span<std::byte> dst_cpu;
  };
  const Case cases[] = {
      {"device to device", src_dev.device().data(), src_dev.cpu().data(),
       dst_dev.device(), dst_dev.cpu()},
      {"device to host", src_dev.device().data(), src_dev.cpu().data(),
       dst_host.span(), dst_host.span()},
      {"host to device", src_host.data(), src_host.data(), dst_dev.device(),
       dst_dev.cpu()},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    std::memset(c.dst_cpu.data(), 0, c.dst_cpu.size());
    const uint64_t reads = src_dev.reads, writes = dst_dev.writes;
    ASSERT_OK_AND_ASSIGN(auto init, t.src->create_initiator());
    std::vector<std::span<std::byte>> regions = {c.dst};
    ASSERT_OK_AND_ASSIGN(
        auto target,
        t.dst->open_target(regions, init->address(), in(seconds(10))));
    ASSERT_OK(init->connect(target->address(), in(seconds(10))));
    // One write of 5 MiB + 1 (several bounce pieces), then small ones.
    std::vector<WriteOp> ops = {{c.src, 0, 0, 5 * kMiB + 1}};
    for (uint64_t off = 5 * kMiB + 1; off < kBytes; off += 100'000) {
      ops.push_back(
          {c.src + off, 0, off, std::min<uint64_t>(100'000, kBytes - off)});
    }
    ASSERT_OK(init->write(ops, in(seconds(20))));
    ASSERT_OK(init->flush(in(seconds(20))));
    EXPECT_EQ(std::memcmp(c.dst_cpu.data(), c.want, kBytes), 0);
    EXPECT_EQ(init->bytes_written(), kBytes);
    if (c.src == src_dev.device().data()) {
      EXPECT_GT(src_dev.reads, reads);
    }
    if (c.dst.data() == dst_dev.device().data()) {
      EXPECT_GT(dst_dev.writes, writes);
    }
  }
}

// A copy into the device that fails cuts the initiator off; the flush
// says so.
TEST(DeviceMemoryTransport, TcpDeviceErrorFailsTheConnection) {
  SimDevice dst_dev(kMiB);
  Mapping src(kMiB);
  ASSERT_TRUE(dst_dev.ok() && src.ok());
  auto t = tcp_pair();
  ASSERT_OK(t.src->register_memory(src.span()));
  ASSERT_OK(t.dst->register_device_memory(dst_dev.device(), dst_dev.memory()));
  dst_dev.fail_writes = true;
  ASSERT_OK_AND_ASSIGN(auto init, t.src->create_initiator());
  std::vector<std::span<std::byte>> regions = {dst_dev.device()};
  ASSERT_OK_AND_ASSIGN(auto target, t.dst->open_target(regions, init->address(),
                                                       in(seconds(10))));
  ASSERT_OK(init->connect(target->address(), in(seconds(10))));
  std::vector<WriteOp> ops = {{src.data(), 0, 0, 4096}};
  (void)init->write(ops, in(seconds(10)));
  Status flushed = init->flush(in(seconds(10)));
  EXPECT_FALSE(flushed.ok());
  EXPECT_NE(target->health().message().find("simulated device error"),
            std::string::npos)
      << target->health().to_string();
}

TEST(DeviceMemoryTransport, UcxWithoutCudaSupportRefusesNamingIt) {
  auto built = built_transports();
  if (std::find(built.begin(), built.end(), "ucx") == built.end()) {
    GTEST_SKIP() << "this build has no ucx";
  }
  SimDevice dev(kMiB);
  ASSERT_TRUE(dev.ok());
  ASSERT_OK_AND_ASSIGN(auto ucx, make_transport("ucx", {}));
  Status s = ucx->register_device_memory(dev.device(), dev.memory());
  if (s.ok()) GTEST_SKIP() << "this UCX supports CUDA memory";
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.to_string();
  EXPECT_NE(s.message().find("no CUDA memory support"), std::string::npos)
      << s.to_string();
}

TEST(DeviceMemoryTransport, VerbsWithoutADmabufRefusesNamingIt) {
  auto made = make_transport("verbs", options_for("verbs"));
  if (!made.ok()) {
    if (in_rxe_guest()) FAIL() << made.status().to_string();
    GTEST_SKIP() << "no RDMA device: " << made.status().to_string();
  }
  SimDevice dev(kMiB);
  ASSERT_TRUE(dev.ok());
  Status s = (*made)->register_device_memory(dev.device(), dev.memory());
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("dmabuf"), std::string::npos) << s.to_string();
}

// Voluntary context switches of every thread of this process so far.
uint64_t voluntary_switches() {
  uint64_t total = 0;
  for (const auto& task :
       std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream status(task.path() / "status");
    std::string line;
    while (std::getline(status, line)) {
      if (line.rfind("voluntary_ctxt_switches:", 0) == 0) {
        total += std::stoull(line.substr(line.find(':') + 1));
      }
    }
  }
  return total;
}

// Wake-ups of this process's threads in a 300 ms window in which the test
// itself sleeps once.
uint64_t wakeups_in_a_window() {
  const uint64_t before = voluntary_switches();
  std::this_thread::sleep_for(milliseconds(300));
  return voluntary_switches() - before;
}

// An idle ucx transport wakes no thread: its progress thread sleeps until
// work is posted while no endpoint or listener is open (it woke every
// millisecond before: ~900 wake-ups a second per idle agent). While one is
// open it sleeps on UCX's events, waking at most every kMaxEventWait (10
// ms) without one (it polled before: over 100 wake-ups in the window), and
// a write after the quiet window still lands. Once all are closed (and UCX
// has settled) it sleeps again.
TEST(UcxIdleTest, NoWakeUpsWithNothingOpen) {
  Mapping src(kMiB), dst(kMiB);
  ASSERT_TRUE(src.ok() && dst.ok());
  ASSERT_OK_AND_ASSIGN(auto a, make_transport("ucx", options_for("ucx")));
  ASSERT_OK_AND_ASSIGN(auto b, make_transport("ucx", options_for("ucx")));
  ASSERT_OK(a->register_memory(src.span()));
  ASSERT_OK(b->register_memory(dst.span()));
  constexpr uint64_t kQuiet = 20;
  // Registering kept UCX busy: the thread settles for 100 ms (ucx_core.cc).
  uint64_t idle = 0;
  for (int i = 0; i < 20 && (idle = wakeups_in_a_window()) >= kQuiet; ++i) {
  }
  EXPECT_LT(idle, kQuiet) << "wake-ups in 300 ms with nothing open";
  {
    ASSERT_OK_AND_ASSIGN(auto init, a->create_initiator());
    const std::vector<std::span<std::byte>> regions = {dst.span()};
    ASSERT_OK_AND_ASSIGN(
        auto target, b->open_target(regions, init->address(), in(seconds(10))));
    ASSERT_OK(init->connect(target->address(), in(seconds(10))));
    const std::vector<WriteOp> ops = {{src.data(), 0, 0, 4096}};
    ASSERT_OK(init->write(ops, in(seconds(10))));
    ASSERT_OK(init->flush(in(seconds(10))));
    const uint64_t open = wakeups_in_a_window();
    EXPECT_LT(open, 5 * kQuiet) << "wake-ups in 300 ms with a connection open";
    std::memset(src.data() + 4096, 0x5a, 4096);
    const std::vector<WriteOp> more = {{src.data() + 4096, 0, 4096, 4096}};
    ASSERT_OK(init->write(more, in(seconds(10))));
    ASSERT_OK(init->flush(in(seconds(10))));
    EXPECT_EQ(std::memcmp(dst.data() + 4096, src.data() + 4096, 4096), 0);
    target->revoke();
  }
  // The endpoints close asynchronously: poll for the quiet again.
  for (int i = 0; i < 20 && (idle = wakeups_in_a_window()) >= kQuiet; ++i) {
  }
  EXPECT_LT(idle, kQuiet) << "wake-ups in 300 ms after everything closed";
  EXPECT_OK(a->deregister_memory(src.span()));
  EXPECT_OK(b->deregister_memory(dst.span()));
}

// What a target keeps of allow(): sorted by region and offset, touching
// and overlapping ranges joined, empty ones dropped, regions never joined.
TEST(CoalesceWindowsTest, SortsJoinsAndDropsEmpty) {
  const std::vector<WriteWindow> in = {
      {1, 100, 50},  // region 1: 100-150
      {0, 30, 10},   // region 0: 30-40, touches 40-60
      {0, 0, 10},    // region 0: 0-10
      {0, 40, 20},   //
      {0, 50, 5},    // inside 40-60
      {0, 70, 0},    // empty
      {1, 0, 100},   // touches region 1's 100-150
      {0, 55, 20},   // overlaps: 30-75
  };
  const std::vector<WriteWindow> runs = coalesce_windows(in);
  ASSERT_EQ(runs.size(), 3u);
  auto same = [](const WriteWindow& w, uint32_t r, uint64_t off, uint64_t len) {
    return w.region == r && w.offset == off && w.length == len;
  };
  EXPECT_TRUE(same(runs[0], 0, 0, 10));
  EXPECT_TRUE(same(runs[1], 0, 30, 45));
  EXPECT_TRUE(same(runs[2], 1, 0, 150));
  EXPECT_TRUE(coalesce_windows({}).empty());
  EXPECT_TRUE(coalesce_windows({{0, 5, 0}}).empty());
}

// The kept-initiator cache both transports share: one per peer, the
// oldest past the bound handed back, nothing handed out twice.
TEST(KeptByPeerTest, OnePerPeerBoundedOldestGoesFirst) {
  KeptByPeer<std::unique_ptr<int>> kept(2);
  EXPECT_TRUE(kept.put("a", std::make_unique<int>(1)).empty());
  EXPECT_TRUE(kept.put("b", std::make_unique<int>(2)).empty());
  // A second connection to "a" displaces the first.
  auto displaced = kept.put("a", std::make_unique<int>(3));
  ASSERT_EQ(displaced.size(), 1u);
  EXPECT_EQ(*displaced[0], 1);
  // Past the bound the oldest ("b") goes.
  displaced = kept.put("c", std::make_unique<int>(4));
  ASSERT_EQ(displaced.size(), 1u);
  EXPECT_EQ(*displaced[0], 2);
  EXPECT_EQ(kept.size(), 2u);
  EXPECT_EQ(kept.take("b"), nullptr);
  auto a = kept.take("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(*a, 3);
  EXPECT_EQ(kept.take("a"), nullptr);
  auto rest = kept.take_all();
  ASSERT_EQ(rest.size(), 1u);
  EXPECT_EQ(*rest[0], 4);
  EXPECT_EQ(kept.size(), 0u);
}

}  // namespace
}  // namespace kvmig
