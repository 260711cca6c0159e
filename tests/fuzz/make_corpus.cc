// Writes the fuzz targets' seed corpora: small valid frames (frame_fuzz) and
// small valid messages of every type, each behind its decoder's selector
// byte (messages_fuzz). Run once; the output is committed under
// tests/fuzz/corpus/. The snapshot seeds come from the CLI:
//   kvmig snapshot save --preset tiny --populate 1:16 --out
//   corpus/snapshot_fuzz/one kvmig snapshot save --preset tiny --populate 2:20
//   --share-prefix 16 --out ...
//
//   make_corpus OUT_DIR
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "control_messages.h"
#include "frame.h"
#include "messages.h"

namespace kvmig {
namespace {

namespace fs = std::filesystem;

void write(const fs::path& dir, const std::string& name,
           const std::vector<uint8_t>& bytes) {
  fs::create_directories(dir);
  std::ofstream out(dir / name, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

// One message: a frame seed (with its frame type) and a messages seed (with
// the decoder's selector byte, see messages_fuzz.cc).
struct Seeds {
  fs::path root;
  int n = 0;
  void add(uint8_t selector, MsgType type, const std::vector<uint8_t>& p) {
    const std::string name = std::to_string(n++) + "_" + msg_type_name(type);
    write(root / "frame_fuzz", name, encode_frame(type, p));
    std::vector<uint8_t> m{selector};
    m.insert(m.end(), p.begin(), p.end());
    write(root / "messages_fuzz", name, m);
  }
};

int run(const fs::path& root) {
  Seeds s{root};
  const CacheMeta tiny{16, 2, 2, 64, Dtype::kF16};
  s.add(0, MsgType::kSnapshotReq, encode(SnapshotReqMsg{true, "/tmp/a.snap"}));
  s.add(0, MsgType::kSnapshotReq, encode(SnapshotReqMsg{false, "x"}));
  HelloMsg hello;
  hello.migration_id = "0123456789abcdef0123456789abcdef";
  hello.meta = tiny;
  hello.n_pages = 7;
  hello.n_seqs = 2;
  hello.seqs = {1, 2};
  hello.transports = {"tcp"};
  hello.initiator_address = {127, 0, 0, 1, 0x1f, 0x90};
  s.add(1, MsgType::kHello, encode(hello));
  hello.inline_pages = true;
  s.add(1, MsgType::kHello, encode(hello));
  hello.pages_follow = true;
  s.add(1, MsgType::kHello, encode(hello));
  hello.resent = true;
  s.add(1, MsgType::kHello, encode(hello));
  hello.resent = false;
  hello.pages_follow = false;
  hello.inline_pages = false;
  hello.live = hello.verify = true;
  hello.meta = {16, 32, 8, 128, Dtype::kBf16};
  hello.transports = {"ucx", "tcp", "verbs"};
  s.add(1, MsgType::kHello, encode(hello));
  s.add(2, MsgType::kOffer,
        encode(OfferMsg{"tcp",
                        {0, 1, 2, 5},
                        {{32768, 32768, 64}},
                        0,
                        {1, 2},
                        "host",
                        false,
                        0,
                        0}));
  s.add(2, MsgType::kOffer,
        encode(OfferMsg{"tcp",
                        {3, 4},
                        {{32768, 32768, 64}},
                        0,
                        {},
                        "host",
                        true,
                        65536,
                        99}));
  s.add(2, MsgType::kOffer,
        encode(OfferMsg{"ucx",
                        {9, 8},
                        {{8192, 4096, 16}, {8192, 4096, 16}},
                        4,
                        std::vector<uint8_t>(40, 0xab),
                        "cuda",
                        false,
                        0,
                        0}));
  s.add(3, MsgType::kCommit, encode(CommitMsg{{{1, 20, {5, 6}}}, {}, 0}));
  s.add(3, MsgType::kCommit,
        encode(CommitMsg{{{1, 40, {0, 1, 2}}, {2, 33, {0, 1, 3}}},
                         {{0, 1, 2, 3}, {7, 8, 9, 10}},
                         9}));
  s.add(4, MsgType::kBatch, encode(BatchMsg{{0, 1, 2, 3}}));
  s.add(20, MsgType::kPages,
        encode(PagesMsg{{1, 0}, std::vector<uint8_t>(64, 0x5a)}));
  s.add(5, MsgType::kRound, encode(RoundMsg{3}));
  s.add(6, MsgType::kVerify, encode(VerifyMsg{{0, 1}, {0x1234, 0xfeed}}));
  s.add(7, MsgType::kRoundOffer,
        encode(RoundOfferMsg{{10, 11, 12}, {1, 2, 3, 4}}));
  s.add(8, MsgType::kAbort, encode(AbortMsg{"destination full"}));
  s.add(9, MsgType::kError, encode(ErrorMsg{Status::not_found("no such id")}));
  s.add(9, MsgType::kError, encode(ErrorMsg{Status::protocol("bad frame")}));
  s.add(10, MsgType::kOutcomeReq, encode(OutcomeReqMsg{hello.migration_id}));
  s.add(11, MsgType::kOutcomeResp,
        encode(OutcomeRespMsg{Outcome::kCommitted, 0x1234, true}));
  MigrateRequest req;
  req.to = "127.0.0.1:7470";
  req.seqs = {1, 2, 3};
  req.transport = "tcp";
  s.add(12, MsgType::kMigrateReq, encode(req));
  req.all = true;
  req.live = true;
  req.mode = MigrationMode::kCopy;
  req.record_digests = true;
  req.migration_id = "sched-42";
  req.timeout = std::chrono::milliseconds(2500);
  s.add(12, MsgType::kMigrateReq, encode(req));
  MigrationReport report;
  report.migration_id = hello.migration_id;
  report.seqs = {1, 2};
  report.pages = 7;
  report.bytes = 7 * 16384;
  report.seconds = 0.25;
  report.gbps = 1.5;
  report.pause_ms = 3.5;
  report.rounds = 2;
  report.round_pages = {5, 2};
  report.transport = "tcp";
  report.left_behind = {3};
  report.digests = {{1, "00112233445566778899aabbccddeeff"}};
  s.add(13, MsgType::kMigrateResp, encode(report));
  AgentStatus st;
  st.meta = tiny;
  st.capacity_pages = 64;
  st.free_pages = 57;
  st.seqs = {{1, 40, 3, "00112233445566778899aabbccddeeff", -1},
             {2, 33, 3, "ffeeddccbbaa99887766554433221100", 1500}};
  st.transports = {"tcp", "ucx"};
  st.in_doubt = {{hello.migration_id, {2}, "127.0.0.1:7471", "seqs"}};
  st.shared_groups = {{{1, 2}, 4}};
  st.control_connections = 2;
  st.kept_connections = 1;
  st.migrations = {{hello.migration_id,
                    "source",
                    "127.0.0.1:7471",
                    "data",
                    1,
                    {1},
                    "tcp",
                    65536,
                    0.5}};
  s.add(14, MsgType::kStatusResp, encode(st));
  s.add(16, MsgType::kProgress, encode(ProgressMsg{1u << 20}));
  s.add(17, MsgType::kCancelReq, encode(CancelReqMsg{hello.migration_id}));
  s.add(
      18, MsgType::kCancelResp,
      encode(CancelReport{hello.migration_id, "aborted", "destination full"}));
  s.add(19, MsgType::kSettleReq,
        encode(SettleReqMsg{hello.migration_id, true}));
  s.add(11, MsgType::kOutcomeResp,
        encode(OutcomeRespMsg{Outcome::kForgotten, 7, false}));
  s.add(0, MsgType::kStatusReq, {});
  s.add(0, MsgType::kDone, {});
  s.add(15, MsgType::kSnapshotResp,
        encode(SnapshotReport{"/var/kvmig/a.snap", 3, 8, 131276, true}));
  s.add(15, MsgType::kSnapshotResp, {});
  std::printf("wrote %d seeds per target under %s\n", s.n,
              root.string().c_str());
  return 0;
}

}  // namespace
}  // namespace kvmig

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_corpus OUT_DIR\n");
    return 2;
  }
  return kvmig::run(argv[1]);
}
