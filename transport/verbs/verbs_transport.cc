#include "verbs_transport.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <infiniband/verbs.h>
#include <poll.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../transport_util.h"
#include "bytes.h"
#include "errors.h"
#include "log.h"
#include "verbs_error.h"

// Threading. A VerbsTransport may be used from any thread: the device and
// protection domain are immutable after creation and the registrations are
// guarded by one mutex. An initiator is driven by one thread at a time, which
// also polls its completion queue (no progress thread: an RC initiator only
// needs its own completions). A target polls its completion queue only for
// the memory-window binds it posts itself, inside allow() and address();
// its calls are guarded by a mutex.

namespace kvmig {
namespace {

// Address blobs: "KVVB", version, role. Version 2: the target's address and
// window updates carry memory windows.
constexpr uint32_t kMagic = 0x4256564B;
constexpr uint8_t kVersion = 2;
constexpr uint8_t kRoleInitiator = 1;
constexpr uint8_t kRoleTarget = 2;
constexpr uint8_t kRoleWindowUpdate = 3;
constexpr uint32_t kMaxQueuePairs = 16;
constexpr uint32_t kMaxRegions = 1u << 20;
// Work requests per ibv_post_send chain, and how often one is signalled
// (the last of every chain is signalled too).
constexpr uint32_t kPostBatch = 32;
constexpr uint32_t kSignalEvery = 16;
// Largest RDMA WRITE posted; bigger ops are split.
constexpr uint64_t kMaxWriteBytes = uint64_t{1} << 30;
// Local ACK timeout 4.096 us * 2^14 = 67 ms, 7 retries: a dead peer is
// noticed in about half a second; deadlines bound every wait anyway.
constexpr uint8_t kAckTimeout = 14;
constexpr uint8_t kRetryCount = 7;
// How long a waiter polls before sleeping on the completion channel.
constexpr auto kSpin = std::chrono::microseconds(50);
// Longest single sleep on the completion channel.
constexpr int kMaxSleepMs = 100;
// How long teardown waits for flushed completions after moving QPs to ERR.
constexpr auto kDrainGrace = std::chrono::seconds(1);
// Memory windows a target binds at most (windows x queue pairs): their keys
// must fit an OFFER or ROUND_OFFER (24 bytes each with one QP, within the
// 1 MiB wire limit on addresses).
constexpr uint32_t kMaxWindowKeys = 32768;
// A target's send queue: memory-window binds posted per chain (the last is
// signalled), and how long binding may take.
constexpr uint32_t kBindDepth = 64;
constexpr auto kBindTimeout = std::chrono::seconds(5);
// wr_id: queue pair index in the top 16 bits, the WR's sequence number below.
constexpr int kQpShift = 48;
constexpr uint64_t kSeqMask = (uint64_t{1} << kQpShift) - 1;

std::shared_ptr<spdlog::logger> verbs_log() {
  static const auto log = logger("verbs");
  return log;
}

std::string errno_text(int err) { return std::strerror(err); }

// --- RAII for ibv_* handles: each deleter checks and logs the return code.

struct DeviceListDeleter {
  void operator()(ibv_device** l) const { ibv_free_device_list(l); }
};
struct ContextDeleter {
  void operator()(ibv_context* c) const {
    if (int rc = ibv_close_device(c)) {
      verbs_log()->error("ibv_close_device: {}", errno_text(rc));
    }
  }
};
struct PdDeleter {
  void operator()(ibv_pd* p) const {
    if (int rc = ibv_dealloc_pd(p)) {
      verbs_log()->error("ibv_dealloc_pd: {}", errno_text(rc));
    }
  }
};
struct MrDeleter {
  void operator()(ibv_mr* m) const {
    if (int rc = ibv_dereg_mr(m)) {
      verbs_log()->error("ibv_dereg_mr: {}", errno_text(rc));
    }
  }
};
struct ChannelDeleter {
  void operator()(ibv_comp_channel* c) const {
    if (int rc = ibv_destroy_comp_channel(c)) {
      verbs_log()->error("ibv_destroy_comp_channel: {}", errno_text(rc));
    }
  }
};
struct CqDeleter {
  void operator()(ibv_cq* c) const {
    if (int rc = ibv_destroy_cq(c)) {
      verbs_log()->error("ibv_destroy_cq: {}", errno_text(rc));
    }
  }
};
struct MwDeleter {
  void operator()(ibv_mw* m) const {
    if (int rc = ibv_dealloc_mw(m)) {
      verbs_log()->error("ibv_dealloc_mw: {}", errno_text(rc));
    }
  }
};
struct QpDeleter {
  void operator()(ibv_qp* q) const {
    if (int rc = ibv_destroy_qp(q)) {
      verbs_log()->error("ibv_destroy_qp {}: {}", q->qp_num, errno_text(rc));
    }
  }
};
using DeviceListPtr = std::unique_ptr<ibv_device*, DeviceListDeleter>;
using ContextPtr = std::unique_ptr<ibv_context, ContextDeleter>;
using PdPtr = std::unique_ptr<ibv_pd, PdDeleter>;
using MrPtr = std::unique_ptr<ibv_mr, MrDeleter>;
using ChannelPtr = std::unique_ptr<ibv_comp_channel, ChannelDeleter>;
using CqPtr = std::unique_ptr<ibv_cq, CqDeleter>;
using QpPtr = std::unique_ptr<ibv_qp, QpDeleter>;
using MwPtr = std::unique_ptr<ibv_mw, MwDeleter>;

std::string gid_string(const ibv_gid& gid) {
  char buf[INET6_ADDRSTRLEN] = {};
  inet_ntop(AF_INET6, gid.raw, buf, sizeof(buf));
  return buf;
}

// A first packet sequence number: 24 random bits.
uint32_t random_psn() {
  return static_cast<uint32_t>(random_token() & 0xFFFFFF);
}

int mtu_bytes(ibv_mtu mtu) { return 128 << static_cast<int>(mtu); }

// One side's connection details, as exchanged in the addresses.
struct Endpoint {
  uint8_t link_layer = IBV_LINK_LAYER_ETHERNET;
  ibv_mtu mtu = IBV_MTU_1024;
  uint16_t lid = 0;
  ibv_gid gid{};
  std::vector<uint32_t> qpns;
  std::vector<uint32_t> psns;

  std::string describe() const {
    return link_layer == IBV_LINK_LAYER_INFINIBAND
               ? "LID " + std::to_string(lid)
               : "GID " + gid_string(gid);
  }
};

// A target region as the initiator sees it. rkey is the region's memory
// registration's: it allows remote writes only on a device without memory
// windows (otherwise the windows' keys do).
struct RemoteRegion {
  uint64_t addr = 0;
  uint64_t length = 0;
  uint32_t rkey = 0;
};

// A memory window: bytes [offset, +length) of target region `region`, and
// its key on each of the target's queue pairs (a type 2 window is bound to
// one queue pair: the initiator's QP i uses rkeys[i]).
struct RemoteWindow {
  uint32_t region = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::vector<uint32_t> rkeys;
};

void put_windows(ByteWriter& w, std::span<const RemoteWindow> windows) {
  w.put<uint32_t>(static_cast<uint32_t>(windows.size()));
  for (const RemoteWindow& win : windows) {
    w.put<uint32_t>(win.region);
    w.put<uint64_t>(win.offset);
    w.put<uint64_t>(win.length);
    for (uint32_t k : win.rkeys) w.put<uint32_t>(k);
  }
}

// Parses what put_windows wrote for a target with n_qps queue pairs and
// regions of these lengths; DataLoss naming the first bad field.
Status get_windows(ByteReader& r, size_t n_qps,
                   std::span<const uint64_t> region_lengths,
                   std::vector<RemoteWindow>& out) {
  KVMIG_ASSIGN_OR_RETURN(uint32_t n, r.get<uint32_t>("window count"));
  const size_t each = 20 + 4 * n_qps;
  if (uint64_t{n} * n_qps > kMaxWindowKeys || n > r.remaining() / each) {
    return Status::data_loss("window count " + std::to_string(n) +
                             " does not fit the address");
  }
  for (uint32_t i = 0; i < n; ++i) {
    RemoteWindow win;
    KVMIG_ASSIGN_OR_RETURN(win.region, r.get<uint32_t>("window region"));
    KVMIG_ASSIGN_OR_RETURN(win.offset, r.get<uint64_t>("window offset"));
    KVMIG_ASSIGN_OR_RETURN(win.length, r.get<uint64_t>("window length"));
    if (win.region >= region_lengths.size() || win.length == 0 ||
        win.offset > region_lengths[win.region] ||
        win.length > region_lengths[win.region] - win.offset) {
      return Status::data_loss("window " + std::to_string(i) +
                               " is not inside its region");
    }
    win.rkeys.resize(n_qps);
    for (uint32_t& k : win.rkeys) {
      KVMIG_ASSIGN_OR_RETURN(k, r.get<uint32_t>("window rkey"));
    }
    out.push_back(std::move(win));
  }
  return Status();
}

// Every blob starts with the magic, the version and what it is (its role).
void put_header(ByteWriter& w, uint8_t role) {
  w.put<uint32_t>(kMagic);
  w.put<uint8_t>(kVersion);
  w.put<uint8_t>(role);
}

Status get_header(ByteReader& r, uint8_t role) {
  KVMIG_ASSIGN_OR_RETURN(uint32_t magic, r.get<uint32_t>("magic"));
  if (magic != kMagic) return Status::data_loss("not a verbs address");
  KVMIG_ASSIGN_OR_RETURN(uint8_t version, r.get<uint8_t>("version"));
  if (version != kVersion) {
    return Status::data_loss("address version " + std::to_string(version));
  }
  KVMIG_ASSIGN_OR_RETURN(uint8_t got_role, r.get<uint8_t>("role"));
  if (got_role != role) {
    return Status::data_loss(role == kRoleTarget ? "expected a target's address"
                             : role == kRoleInitiator
                                 ? "expected an initiator's address"
                                 : "expected a window update");
  }
  return Status();
}

void put_endpoint(ByteWriter& w, uint8_t role, const Endpoint& e) {
  put_header(w, role);
  w.put<uint8_t>(e.link_layer);
  w.put<uint8_t>(static_cast<uint8_t>(e.mtu));
  w.put<uint16_t>(e.lid);
  w.put_bytes({e.gid.raw, sizeof(e.gid.raw)});
  w.put<uint32_t>(static_cast<uint32_t>(e.qpns.size()));
  for (size_t i = 0; i < e.qpns.size(); ++i) {
    w.put<uint32_t>(e.qpns[i]);
    w.put<uint32_t>(e.psns[i]);
  }
}

// Parses what put_endpoint wrote; DataLoss naming the first bad field.
Status get_endpoint(ByteReader& r, uint8_t role, Endpoint& e) {
  KVMIG_RETURN_IF_ERROR(get_header(r, role));
  KVMIG_ASSIGN_OR_RETURN(e.link_layer, r.get<uint8_t>("link layer"));
  if (e.link_layer != IBV_LINK_LAYER_ETHERNET &&
      e.link_layer != IBV_LINK_LAYER_INFINIBAND) {
    return Status::data_loss("link layer " + std::to_string(e.link_layer));
  }
  KVMIG_ASSIGN_OR_RETURN(uint8_t mtu, r.get<uint8_t>("mtu"));
  if (mtu < IBV_MTU_256 || mtu > IBV_MTU_4096) {
    return Status::data_loss("path MTU code " + std::to_string(mtu));
  }
  e.mtu = static_cast<ibv_mtu>(mtu);
  KVMIG_ASSIGN_OR_RETURN(e.lid, r.get<uint16_t>("lid"));
  KVMIG_ASSIGN_OR_RETURN(auto gid, r.get_bytes(sizeof(e.gid.raw), "gid"));
  std::memcpy(e.gid.raw, gid.data(), gid.size());
  KVMIG_ASSIGN_OR_RETURN(uint32_t n, r.get<uint32_t>("queue pair count"));
  if (n == 0 || n > kMaxQueuePairs) {
    return Status::data_loss("queue pair count " + std::to_string(n));
  }
  for (uint32_t i = 0; i < n; ++i) {
    KVMIG_ASSIGN_OR_RETURN(uint32_t qpn, r.get<uint32_t>("qp number"));
    KVMIG_ASSIGN_OR_RETURN(uint32_t psn, r.get<uint32_t>("psn"));
    if (qpn == 0 || qpn > 0xFFFFFF || psn > 0xFFFFFF) {
      return Status::data_loss("qp number or psn out of range");
    }
    e.qpns.push_back(qpn);
    e.psns.push_back(psn);
  }
  return Status();
}

// --------------------------------------------------------------- device

// The opened device, its protection domain and the memory registered in it.
// Thread-safe: everything but the registrations is immutable after open();
// the registrations are guarded by mu_. Members are declared so that the
// memory regions are deregistered before the PD is freed before the device
// is closed.
class VerbsCore {
 public:
  static Result<std::shared_ptr<VerbsCore>> open(const TransportOptions& opts) {
    std::shared_ptr<VerbsCore> core(new VerbsCore());
    KVMIG_RETURN_IF_ERROR(core->open_device(opts.device));
    KVMIG_RETURN_IF_ERROR(core->find_gid(opts.bind_host));
    ibv_pd* pd = ibv_alloc_pd(core->context_.get());
    if (pd == nullptr) return status_from_errno(errno, "verbs: ibv_alloc_pd");
    core->pd_.reset(pd);
    verbs_log()->info(
        "device {} port {}: {}, active MTU {}, {} (GID index {}), max {} WRs "
        "per QP, {}",
        core->name_, core->port_,
        core->local_.link_layer == IBV_LINK_LAYER_INFINIBAND ? "InfiniBand"
                                                             : "RoCE",
        mtu_bytes(core->local_.mtu), core->local_.describe(), core->gid_index_,
        core->max_qp_wr_,
        core->max_window_keys_ > 0
            ? "type 2 memory windows (a target's keys cover its "
              "migration's slots, on its own queue pairs)"
            : "no type 2 memory windows (a target cannot restrict writes to "
              "its migration's slots; revoking it still cuts a source off)");
    return core;
  }

  ibv_context* context() const { return context_.get(); }
  ibv_pd* pd() const { return pd_.get(); }
  uint8_t port() const { return port_; }
  uint8_t gid_index() const { return gid_index_; }
  const std::string& name() const { return name_; }
  uint32_t max_qp_wr() const { return max_qp_wr_; }
  uint32_t max_cqe() const { return max_cqe_; }
  // Largest message the port sends in one work request.
  uint64_t max_msg() const {
    return std::min<uint64_t>(kMaxWriteBytes, port_attr_.max_msg_sz);
  }
  // This port's details, without QPs.
  const Endpoint& local() const { return local_; }
  // Memory windows a target may bind (windows x queue pairs); 0 when the
  // device has no type 2 windows, and remote writes then go through the
  // regions' own registrations.
  uint32_t max_window_keys() const { return max_window_keys_; }

  Status register_region(std::span<std::byte> region) {
    std::lock_guard lock(mu_);
    KVMIG_RETURN_IF_ERROR(regions_.check_new(region, "verbs"));
    ibv_mr* mr = ibv_reg_mr(pd_.get(), region.data(), region.size(), access());
    if (mr == nullptr) {
      return status_from_errno(
          errno,
          "verbs: ibv_reg_mr of " + std::to_string(region.size()) + " bytes");
    }
    regions_.add(region, MrPtr(mr));
    return Status();
  }

  // Device memory, from its dmabuf: the MR's iova is the region's address,
  // so work requests name it as they name host memory.
  Status register_dmabuf_region(std::span<std::byte> region,
                                const DmabufRegion& dmabuf) {
    std::lock_guard lock(mu_);
    KVMIG_RETURN_IF_ERROR(regions_.check_new(region, "verbs"));
    ibv_mr* mr = ibv_reg_dmabuf_mr(pd_.get(), dmabuf.offset, region.size(),
                                   reinterpret_cast<uint64_t>(region.data()),
                                   dmabuf.fd, access());
    if (mr == nullptr) {
      return status_from_errno(errno, "verbs: ibv_reg_dmabuf_mr of " +
                                          std::to_string(region.size()) +
                                          " bytes on " + name_);
    }
    regions_.add(region, MrPtr(mr));
    return Status();
  }

  Status deregister_region(std::span<std::byte> region) {
    std::lock_guard lock(mu_);
    return regions_.remove(region, "verbs").status();  // deregisters here
  }

  // Calls fn(const RegionTable<MrPtr>&) under the registrations' lock.
  template <typename Fn>
  auto with_regions(Fn&& fn) const {
    std::lock_guard lock(mu_);
    return fn(regions_);
  }

 private:
  VerbsCore() = default;

  // With memory windows the registrations grant no remote access of their
  // own: only a window bound for a migration does.
  int access() const {
    return IBV_ACCESS_LOCAL_WRITE |
           (max_window_keys_ > 0 ? IBV_ACCESS_MW_BIND
                                 : IBV_ACCESS_REMOTE_WRITE);
  }

  Status open_device(const std::string& wanted) {
    int n = 0;
    DeviceListPtr list(ibv_get_device_list(&n));
    if (!list || n == 0) {
      const int err = errno;
      return Status::unavailable(
          "verbs: no RDMA device found" +
          (list ? std::string()
                : " (ibv_get_device_list: " + errno_text(err) + ")"));
    }
    std::string seen;
    for (int i = 0; i < n; ++i) {
      const std::string name = ibv_get_device_name(list.get()[i]);
      if (!wanted.empty() && name != wanted) continue;
      ContextPtr ctx(ibv_open_device(list.get()[i]));
      if (!ctx) {
        seen += " " + name + " (open: " + errno_text(errno) + ")";
        continue;
      }
      ibv_device_attr dev{};
      if (int rc = ibv_query_device(ctx.get(), &dev)) {
        seen += " " + name + " (query: " + errno_text(rc) + ")";
        continue;
      }
      for (uint8_t port = 1; port <= dev.phys_port_cnt; ++port) {
        ibv_port_attr attr{};
        if (ibv_query_port(ctx.get(), port, &attr) != 0) continue;
        if (attr.state != IBV_PORT_ACTIVE) {
          seen += " " + name + ":" + std::to_string(port) + " (" +
                  ibv_port_state_str(attr.state) + ")";
          continue;
        }
        context_ = std::move(ctx);
        name_ = name;
        port_ = port;
        port_attr_ = attr;
        max_qp_wr_ = static_cast<uint32_t>(dev.max_qp_wr);
        max_cqe_ = static_cast<uint32_t>(dev.max_cqe);
        if ((dev.device_cap_flags & (IBV_DEVICE_MEM_WINDOW_TYPE_2A |
                                     IBV_DEVICE_MEM_WINDOW_TYPE_2B)) != 0 &&
            dev.max_mw > 0) {
          max_window_keys_ = std::min<uint32_t>(
              kMaxWindowKeys, static_cast<uint32_t>(dev.max_mw) / 2);
        }
        local_.link_layer = attr.link_layer == IBV_LINK_LAYER_INFINIBAND
                                ? IBV_LINK_LAYER_INFINIBAND
                                : IBV_LINK_LAYER_ETHERNET;
        local_.mtu = attr.active_mtu;
        local_.lid = attr.lid;
        return Status();
      }
    }
    if (!wanted.empty() && seen.empty()) {
      return Status::unavailable("verbs: no RDMA device named '" + wanted +
                                 "'");
    }
    return Status::unavailable("verbs: no RDMA device with an active port:" +
                               seen);
  }

  // The RoCE v2 GID of bind_host's address. A loopback, unspecified or
  // empty bind_host takes the first IPv4 RoCE v2 GID. InfiniBand uses GID 0
  // and the LID.
  Status find_gid(const std::string& bind_host) {
    if (local_.link_layer == IBV_LINK_LAYER_INFINIBAND) {
      gid_index_ = 0;
      if (int rc = ibv_query_gid(context_.get(), port_, 0, &local_.gid)) {
        return status_from_errno(rc, "verbs: ibv_query_gid");
      }
      return Status();
    }
    ibv_gid want{};
    bool any = bind_host.empty();
    in_addr v4{};
    if (inet_pton(AF_INET, bind_host.c_str(), &v4) == 1) {
      want.raw[10] = want.raw[11] = 0xFF;
      std::memcpy(&want.raw[12], &v4, 4);
      const uint32_t host = ntohl(v4.s_addr);
      any = any || host == 0 || (host >> 24) == 127;
    } else if (inet_pton(AF_INET6, bind_host.c_str(), want.raw) == 1) {
      static const uint8_t kZero[16] = {};
      static const uint8_t kLoop[16] = {0, 0, 0, 0, 0, 0, 0, 0,
                                        0, 0, 0, 0, 0, 0, 0, 1};
      any = any || std::memcmp(want.raw, kZero, 16) == 0 ||
            std::memcmp(want.raw, kLoop, 16) == 0;
    } else if (!any) {
      return Status::invalid_argument("verbs: bind host '" + bind_host +
                                      "' is not an IP address");
    }
    std::string seen;
    for (int i = 0; i < port_attr_.gid_tbl_len; ++i) {
      ibv_gid_entry e{};
      if (ibv_query_gid_ex(context_.get(), port_, static_cast<uint32_t>(i), &e,
                           0) != 0) {
        continue;  // an empty slot
      }
      if (e.gid_type != IBV_GID_TYPE_ROCE_V2) continue;
      const bool v4_mapped =
          std::memcmp(e.gid.raw, "\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0;
      seen += " " + std::to_string(i) + "=" + gid_string(e.gid);
      if ((any && v4_mapped) ||
          (!any && std::memcmp(e.gid.raw, want.raw, 16) == 0)) {
        gid_index_ = static_cast<uint8_t>(i);
        local_.gid = e.gid;
        if (any) {
          verbs_log()->info("bind host '{}' names no device address: using {}",
                            bind_host, gid_string(e.gid));
        }
        return Status();
      }
    }
    return Status::not_found(
        "verbs: " + name_ + " port " + std::to_string(port_) +
        " has no RoCE v2 GID for '" + bind_host +
        "' (RoCE v2 GIDs:" + (seen.empty() ? " none" : seen) + ")");
  }

  ContextPtr context_;
  PdPtr pd_;
  std::string name_;
  uint8_t port_ = 1;
  ibv_port_attr port_attr_{};
  uint8_t gid_index_ = 0;
  uint32_t max_qp_wr_ = 0;
  uint32_t max_cqe_ = 0;
  uint32_t max_window_keys_ = 0;
  Endpoint local_;

  mutable std::mutex mu_;
  RegionTable<MrPtr> regions_;  // guarded by mu_; destroyed before pd_
};

// ------------------------------------------------------- queue pair setup

Result<CqPtr> create_cq(VerbsCore& core, int entries, ibv_comp_channel* ch) {
  entries = std::min<int>(entries, static_cast<int>(core.max_cqe()));
  ibv_cq* cq = ibv_create_cq(core.context(), entries, nullptr, ch, 0);
  if (cq == nullptr) return status_from_errno(errno, "verbs: ibv_create_cq");
  return CqPtr(cq);
}

Result<QpPtr> create_qp(VerbsCore& core, ibv_cq* cq, uint32_t send_depth) {
  ibv_qp_init_attr init{};
  init.send_cq = cq;
  init.recv_cq = cq;
  init.qp_type = IBV_QPT_RC;
  init.sq_sig_all = 0;
  init.cap.max_send_wr = send_depth;
  init.cap.max_recv_wr = 1;
  init.cap.max_send_sge = 1;
  init.cap.max_recv_sge = 1;
  ibv_qp* qp = ibv_create_qp(core.pd(), &init);
  if (qp == nullptr) return status_from_errno(errno, "verbs: ibv_create_qp");
  return QpPtr(qp);
}

// RESET -> INIT -> RTR -> RTS against the peer's QP `peer_qpn`, whose first
// PSN is `peer_psn`; this QP starts sending at `psn`. Only a target's QPs
// accept remote writes. Each failure names the transition.
Status bring_up(const VerbsCore& core, ibv_qp* qp, uint32_t psn,
                const Endpoint& peer, uint32_t peer_qpn, uint32_t peer_psn,
                bool accept_remote_writes) {
  const std::string qp_name = "QP " + std::to_string(qp->qp_num);
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_INIT;
  a.pkey_index = 0;
  a.port_num = core.port();
  a.qp_access_flags = accept_remote_writes
                          ? IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE
                          : 0;
  if (int rc = ibv_modify_qp(qp, &a,
                             IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT |
                                 IBV_QP_ACCESS_FLAGS)) {
    return status_from_errno(rc, "verbs: modify " + qp_name + " to INIT");
  }

  a = {};
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = std::min(core.local().mtu, peer.mtu);
  a.dest_qp_num = peer_qpn;
  a.rq_psn = peer_psn;
  a.max_dest_rd_atomic = 1;
  a.min_rnr_timer = 12;
  a.ah_attr.port_num = core.port();
  a.ah_attr.dlid = peer.lid;
  if (core.local().link_layer == IBV_LINK_LAYER_ETHERNET) {
    a.ah_attr.is_global = 1;
    a.ah_attr.grh.dgid = peer.gid;
    a.ah_attr.grh.sgid_index = core.gid_index();
    a.ah_attr.grh.hop_limit = 64;
  }
  if (int rc =
          ibv_modify_qp(qp, &a,
                        IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU |
                            IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                            IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER)) {
    return status_from_errno(
        rc, "verbs: modify " + qp_name + " to RTR (peer QP " +
                std::to_string(peer_qpn) + " at " + peer.describe() + ")");
  }

  a = {};
  a.qp_state = IBV_QPS_RTS;
  a.timeout = kAckTimeout;
  a.retry_cnt = kRetryCount;
  a.rnr_retry = 7;
  a.sq_psn = psn;
  a.max_rd_atomic = 1;
  if (int rc = ibv_modify_qp(qp, &a,
                             IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                 IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                                 IBV_QP_MAX_QP_RD_ATOMIC)) {
    return status_from_errno(rc, "verbs: modify " + qp_name + " to RTS");
  }
  return Status();
}

// Moves qp to the error state: outstanding work requests complete with a
// flush error and incoming packets are dropped.
void to_error(ibv_qp* qp) {
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_ERR;
  if (int rc = ibv_modify_qp(qp, &a, IBV_QP_STATE)) {
    verbs_log()->warn("modify QP {} to ERR: {}", qp->qp_num, errno_text(rc));
  }
}

// ---------------------------------------------------------------- target

// A target region: where it is, and the registration that holds it.
struct TargetRegion {
  RemoteRegion remote;
  ibv_mr* mr = nullptr;  // the core's; outlives the target (see Transport)
};

// The receiving end. Thread-safe: every call takes mu_. Members are declared
// so that the windows are deallocated before the QPs they are bound to are
// destroyed before their CQ.
//
// On a device with memory windows remote writes go through type 2 windows
// only, each bound to one of this target's QPs: allow() binds one per
// contiguous range and QP; without any allow() call, address() binds one
// per region and QP. The device refuses a write with a key this QP was not
// given (another migration's, the registration's own, a revoked one): the
// initiator's work request fails with a remote access error and both QPs
// go to the error state. A write past a window's bounds is refused by a
// device that checks them as the spec says (rxe in Linux 6.1 checks only
// the registration's bounds); kvmig's initiator never posts one.
class VerbsTarget final : public TransportTarget {
 public:
  static Result<std::unique_ptr<TransportTarget>> open(
      std::shared_ptr<VerbsCore> core, std::vector<TargetRegion> regions,
      const Endpoint& peer) {
    std::unique_ptr<VerbsTarget> t(new VerbsTarget(std::move(core)));
    t->regions_ = std::move(regions);
    const bool windows = t->core_->max_window_keys() > 0;
    const uint32_t depth = windows ? kBindDepth : 1;
    KVMIG_ASSIGN_OR_RETURN(
        t->cq_,
        create_cq(*t->core_, static_cast<int>(peer.qpns.size() * depth) + 1,
                  nullptr));
    Endpoint self = t->core_->local();
    for (size_t i = 0; i < peer.qpns.size(); ++i) {
      KVMIG_ASSIGN_OR_RETURN(QpPtr qp,
                             create_qp(*t->core_, t->cq_.get(), depth));
      const uint32_t psn = random_psn();
      KVMIG_RETURN_IF_ERROR(bring_up(*t->core_, qp.get(), psn, peer,
                                     peer.qpns[i], peer.psns[i],
                                     /*accept_remote_writes=*/true));
      self.qpns.push_back(qp->qp_num);
      self.psns.push_back(psn);
      t->qps_.push_back(std::move(qp));
    }
    ByteWriter w;
    put_endpoint(w, kRoleTarget, self);
    w.put<uint32_t>(static_cast<uint32_t>(t->regions_.size()));
    for (const TargetRegion& r : t->regions_) {
      w.put<uint64_t>(r.remote.addr);
      w.put<uint64_t>(r.remote.length);
      w.put<uint32_t>(windows ? 0 : r.remote.rkey);
    }
    w.put<uint8_t>(windows ? 1 : 0);
    t->endpoint_ = w.take();
    t->peer_ = peer.describe();
    verbs_log()->debug("target: {} QPs connected to initiator at {}",
                       t->qps_.size(), t->peer_);
    return std::unique_ptr<TransportTarget>(std::move(t));
  }

  ~VerbsTarget() override { revoke(); }

  // The endpoint, the regions and every window bound so far. Binds a
  // window per region first when allow() was never called (every byte
  // allowed); a failed bind is logged, and the initiator's writes then
  // fail (their keys are not bound).
  std::vector<uint8_t> address() const override {
    std::lock_guard lock(mu_);
    if (core_->max_window_keys() > 0 && !restricted_ && !whole_ && !revoked_) {
      whole_ = true;
      std::vector<WriteWindow> all;
      for (uint32_t i = 0; i < regions_.size(); ++i) {
        if (regions_[i].remote.length > 0) {
          all.push_back({i, 0, regions_[i].remote.length});
        }
      }
      Status bound = bind(all);
      if (!bound.ok()) {
        verbs_log()->error("target for initiator at {}: {}", peer_,
                           bound.to_string());
      }
    }
    ByteWriter w;
    w.put_bytes(endpoint_);
    if (core_->max_window_keys() > 0) put_windows(w, windows_);
    sent_ = windows_.size();
    replace_ = false;  // the address carries the whole list
    return w.take();
  }

  // Without type 2 memory windows on the device, nothing.
  bool restricts_writes() const override {
    return core_->max_window_keys() > 0;
  }

  Result<bool> allow(std::span<const WriteWindow> ranges) override {
    if (!restricts_writes()) return false;
    std::lock_guard lock(mu_);
    if (revoked_) {
      return Status::failed_precondition("verbs: target already revoked");
    }
    if (!restricted_) {
      restricted_ = true;
      if (whole_) {
        // The whole regions were allowed and their keys sent: those windows
        // go, and the next update replaces the initiator's list.
        bound_.clear();
        windows_.clear();
        sent_ = 0;
        replace_ = true;
      }
    }
    KVMIG_RETURN_IF_ERROR(bind_error_);
    KVMIG_ASSIGN_OR_RETURN(std::vector<WriteWindow> runs, merge(ranges));
    KVMIG_RETURN_IF_ERROR(bind(runs));
    return true;
  }

  // The windows bound since the last address() or update: "replace" (the
  // whole-region windows are gone) and the list.
  std::vector<uint8_t> window_update() override {
    std::lock_guard lock(mu_);
    if (sent_ == windows_.size() && !replace_) return {};
    ByteWriter w;
    put_header(w, kRoleWindowUpdate);
    w.put<uint8_t>(replace_ ? 1 : 0);
    put_windows(w, std::span(windows_).subspan(sent_));
    sent_ = windows_.size();
    replace_ = false;
    return w.take();
  }

  void revoke() override {
    std::lock_guard lock(mu_);
    if (revoked_) return;
    revoked_ = true;
    // ERR first: the QPs drop every packet from here on; then the windows
    // go, then the QPs they were bound to.
    for (auto& qp : qps_) to_error(qp.get());
    bound_.clear();
    qps_.clear();
    cq_.reset();
    verbs_log()->debug("target revoked (initiator at {})", peer_);
  }

  Status health() const override {
    std::lock_guard lock(mu_);
    for (const auto& qp : qps_) {
      ibv_qp_attr a{};
      ibv_qp_init_attr init{};
      if (int rc = ibv_query_qp(qp.get(), &a, IBV_QP_STATE, &init)) {
        return status_from_errno(rc, "verbs: ibv_query_qp");
      }
      if (a.qp_state == IBV_QPS_ERR) {
        return Status::unavailable(
            "verbs: target QP " + std::to_string(qp->qp_num) +
            " from initiator at " + peer_ +
            " is in the error state (the initiator went away, or wrote "
            "with a key this path did not give it)");
      }
    }
    return Status();
  }

 private:
  explicit VerbsTarget(std::shared_ptr<VerbsCore> core)
      : core_(std::move(core)) {}

  // Sorted, with touching and overlapping ranges joined; InvalidArgument
  // for a range outside its region.
  Result<std::vector<WriteWindow>> merge(
      std::span<const WriteWindow> ranges) const {
    for (const WriteWindow& w : ranges) {
      if (w.length == 0) continue;
      if (w.region >= regions_.size() ||
          w.offset > regions_[w.region].remote.length ||
          w.length > regions_[w.region].remote.length - w.offset) {
        return Status::invalid_argument(
            "verbs: allowed range [" + std::to_string(w.offset) + ", +" +
            std::to_string(w.length) + ") is not inside target region " +
            std::to_string(w.region));
      }
    }
    return coalesce_windows({ranges.begin(), ranges.end()});
  }

  // Allocates a type 2 window per range and QP and binds it on that QP,
  // in chains of kBindDepth (the last signalled), waiting for each. Holds
  // mu_. A failure sticks (a failed bind moves its QP to the error state).
  Status bind(std::span<const WriteWindow> runs) const {
    if (!bind_error_.ok()) return bind_error_;
    Status s = bind_all(runs);
    if (!s.ok()) bind_error_ = s;
    return s;
  }

  Status bind_all(std::span<const WriteWindow> runs) const {
    const size_t n_qps = qps_.size();
    const uint64_t keys = (windows_.size() + runs.size()) * n_qps;
    if (keys > core_->max_window_keys()) {
      return Status::resource_exhausted(
          "verbs: the slots allowed form " +
          std::to_string(windows_.size() + runs.size()) +
          " separate ranges; a target binds at most " +
          std::to_string(core_->max_window_keys() /
                         std::max<size_t>(n_qps, 1)) +
          " memory windows (the destination's free slots are fragmented)");
    }
    const size_t first = windows_.size();
    for (const WriteWindow& run : runs) {
      RemoteWindow win{run.region, run.offset, run.length, {}};
      for (size_t q = 0; q < n_qps; ++q) {
        ibv_mw* mw = ibv_alloc_mw(core_->pd(), IBV_MW_TYPE_2);
        if (mw == nullptr) {
          return status_from_errno(errno, "verbs: ibv_alloc_mw");
        }
        bound_.emplace_back(mw);
        win.rkeys.push_back(ibv_inc_rkey(mw->rkey));
      }
      windows_.push_back(std::move(win));
    }
    // bound_ holds the windows' MWs in order: window i, QP q at i*n_qps+q.
    for (size_t q = 0; q < n_qps; ++q) {
      for (size_t i = first; i < windows_.size(); i += kBindDepth) {
        const size_t n = std::min<size_t>(kBindDepth, windows_.size() - i);
        std::vector<ibv_send_wr> chain(n);
        for (size_t k = 0; k < n; ++k) {
          const RemoteWindow& win = windows_[i + k];
          const TargetRegion& region = regions_[win.region];
          ibv_send_wr& wr = chain[k];
          wr.wr_id = i + k;
          wr.opcode = IBV_WR_BIND_MW;
          wr.send_flags = k + 1 == n ? IBV_SEND_SIGNALED : 0;
          wr.bind_mw.mw = bound_[(i + k) * n_qps + q].get();
          wr.bind_mw.rkey = win.rkeys[q];
          wr.bind_mw.bind_info.mr = region.mr;
          wr.bind_mw.bind_info.addr = region.remote.addr + win.offset;
          wr.bind_mw.bind_info.length = win.length;
          wr.bind_mw.bind_info.mw_access_flags = IBV_ACCESS_REMOTE_WRITE;
          wr.next = k + 1 < n ? &chain[k + 1] : nullptr;
        }
        ibv_send_wr* bad = nullptr;
        if (int rc = ibv_post_send(qps_[q].get(), chain.data(), &bad)) {
          return status_from_errno(rc, "verbs: posting memory-window binds");
        }
        KVMIG_RETURN_IF_ERROR(wait_bound());
      }
    }
    return Status();
  }

  // Waits for the signalled bind of the chain just posted (an error
  // completion of an earlier bind in it comes first).
  Status wait_bound() const {
    const auto until = Clock::now() + kBindTimeout;
    for (;;) {
      ibv_wc wc{};
      const int n = ibv_poll_cq(cq_.get(), 1, &wc);
      if (n < 0) return Status::internal("verbs: ibv_poll_cq failed");
      if (n == 1) {
        if (wc.status != IBV_WC_SUCCESS) {
          return status_from_wc(wc, "binding a memory window");
        }
        return Status();
      }
      if (Clock::now() >= until) {
        return Status::deadline_exceeded(
            "verbs: binding memory windows took over " +
            std::to_string(kBindTimeout.count()) + " s");
      }
      std::this_thread::yield();
    }
  }

  const std::shared_ptr<VerbsCore> core_;
  std::vector<TargetRegion> regions_;
  std::vector<uint8_t> endpoint_;  // the address's fixed part
  std::string peer_;
  mutable std::mutex mu_;
  CqPtr cq_;                                   // guarded by mu_
  std::vector<QpPtr> qps_;                     // guarded by mu_
  mutable std::vector<MwPtr> bound_;           // guarded by mu_
  mutable std::vector<RemoteWindow> windows_;  // guarded by mu_
  mutable size_t sent_ = 0;       // windows_ sent in address() or an update
  mutable bool whole_ = false;    // address() bound a window per region
  bool restricted_ = false;       // allow() was called
  mutable bool replace_ = false;  // the next update replaces the list
  mutable Status bind_error_;     // the first failed bind, sticky
  bool revoked_ = false;          // guarded by mu_
};

// ------------------------------------------------------------- initiator

// One RDMA WRITE, resolved against both sides' registrations.
struct Wr {
  uint64_t local = 0;
  uint32_t length = 0;
  uint32_t lkey = 0;
  uint64_t remote = 0;
  uint32_t rkey = 0;
};

// The sending end. Not thread-safe: one thread drives it and polls its CQ.
// Members are declared so that the QPs are destroyed before the CQ before
// the completion channel.
class VerbsInitiator final : public TransportInitiator {
 public:
  static Result<std::unique_ptr<TransportInitiator>> create(
      std::shared_ptr<VerbsCore> core, const TransportOptions& opts) {
    std::unique_ptr<VerbsInitiator> t(new VerbsInitiator(std::move(core)));
    const uint32_t n_qps =
        std::clamp<uint32_t>(opts.queue_pairs, 1, kMaxQueuePairs);
    // Every work request may complete with an entry once the QP fails, so
    // the CQ must hold all of them.
    const uint32_t limit =
        std::min(t->core_->max_qp_wr(), (t->core_->max_cqe() - 1) / n_qps);
    t->depth_ =
        std::clamp<uint32_t>(opts.max_in_flight, 2 * kSignalEvery,
                             std::max<uint32_t>(limit, 2 * kSignalEvery));
    ibv_comp_channel* ch = ibv_create_comp_channel(t->core_->context());
    if (ch == nullptr) {
      return status_from_errno(errno, "verbs: ibv_create_comp_channel");
    }
    t->channel_.reset(ch);
    const int flags = fcntl(ch->fd, F_GETFL);
    if (flags < 0 || fcntl(ch->fd, F_SETFL, flags | O_NONBLOCK) < 0) {
      return status_from_errno(
          errno, "verbs: make the completion channel non-blocking");
    }
    KVMIG_ASSIGN_OR_RETURN(
        t->cq_,
        create_cq(*t->core_, static_cast<int>(n_qps * t->depth_ + 1), ch));
    Endpoint self = t->core_->local();
    for (uint32_t i = 0; i < n_qps; ++i) {
      KVMIG_ASSIGN_OR_RETURN(QpPtr qp,
                             create_qp(*t->core_, t->cq_.get(), t->depth_));
      Qp q;
      q.psn = random_psn();
      self.qpns.push_back(qp->qp_num);
      self.psns.push_back(q.psn);
      q.qp = std::move(qp);
      t->qps_.push_back(std::move(q));
    }
    ByteWriter w;
    put_endpoint(w, kRoleInitiator, self);
    t->address_ = w.take();
    return std::unique_ptr<TransportInitiator>(std::move(t));
  }

  ~VerbsInitiator() override {
    if (connected_ && error_.ok() && outstanding()) {
      (void)fail(
          Status::aborted("verbs: initiator closed with writes in flight"));
    }
    verbs_log()->debug("initiator to {} closed: {} ops, {} bytes, {} WRs",
                       peer_.empty() ? "nobody" : peer_, ops_posted_,
                       bytes_written_, wrs_posted_);
  }

  std::vector<uint8_t> address() const override { return address_; }

  Status connect(std::span<const uint8_t> target_address,
                 Deadline deadline) override {
    if (connect_called_) {
      return Status::failed_precondition("verbs: connect called twice");
    }
    Endpoint peer;
    std::vector<RemoteRegion> regions;
    std::vector<RemoteWindow> windows;
    bool windowed = false;
    Status parsed =
        parse_target(target_address, peer, regions, windowed, windows);
    if (!parsed.ok()) {
      return Status::invalid_argument("verbs: bad target address: " +
                                      parsed.message());
    }
    if (peer.qpns.size() != qps_.size()) {
      return Status::invalid_argument(
          "verbs: bad target address: " + std::to_string(peer.qpns.size()) +
          " queue pairs for an initiator with " + std::to_string(qps_.size()));
    }
    if (peer.link_layer != core_->local().link_layer) {
      return Status::invalid_argument(
          "verbs: bad target address: the target's link layer differs");
    }
    connect_called_ = true;
    peer_ = peer.describe();
    remote_ = std::move(regions);
    for (const RemoteRegion& r : remote_) region_lengths_.push_back(r.length);
    windowed_ = windowed;
    windows_.resize(remote_.size());
    add(std::move(windows));
    for (size_t i = 0; i < qps_.size(); ++i) {
      Status s = bring_up(*core_, qps_[i].qp.get(), qps_[i].psn, peer,
                          peer.qpns[i], peer.psns[i],
                          /*accept_remote_writes=*/false);
      if (!s.ok()) return fail(std::move(s));
    }
    connected_ = true;
    // The QPs are ready; a zero-length RDMA WRITE on each proves that the
    // target's QPs answer (a dead or revoked target never acknowledges).
    const RemoteRegion probe = remote_.empty() ? RemoteRegion{} : remote_[0];
    for (size_t q = 0; q < qps_.size(); ++q) {
      // Zero bytes: no key is checked (IB spec C9-88).
      const uint32_t rkey = remote_.empty() ? 0 : key_for(0, 0, q).rkey;
      std::vector<Wr> one = {Wr{0, 0, 0, probe.addr, rkey}};
      KVMIG_RETURN_IF_ERROR(post_chain(q, one, 0, 1));
    }
    KVMIG_RETURN_IF_ERROR(drain(deadline, "connect"));
    verbs_log()->debug("initiator: {} QPs connected to target at {}, MTU {}",
                       qps_.size(), peer_,
                       mtu_bytes(std::min(core_->local().mtu, peer.mtu)));
    return Status();
  }

  Status write(std::span<const WriteOp> ops, Deadline deadline) override {
    KVMIG_RETURN_IF_ERROR(usable());
    if (cancelled_.load(std::memory_order_relaxed)) return fail_cancelled();
    KVMIG_RETURN_IF_ERROR(check_write_ops(ops, region_lengths_, "verbs"));
    // Resolve every op (and split big ones) before posting any.
    std::vector<std::vector<Wr>> per_qp(qps_.size());
    uint64_t bytes = 0;
    size_t next_qp = 0;
    const uint64_t max_msg = core_->max_msg();
    Status bad = core_->with_regions([&](const RegionTable<MrPtr>& table) {
      for (size_t i = 0; i < ops.size(); ++i) {
        const WriteOp& op = ops[i];
        if (op.length == 0) continue;
        const auto* e = table.find(op.src, op.length);
        if (e == nullptr) {
          return Status::invalid_argument(
              "verbs: write op " + std::to_string(i) + ": source of " +
              std::to_string(op.length) + " bytes is not registered memory");
        }
        const RemoteRegion& r = remote_[op.dst_region];
        for (uint64_t done = 0; done < op.length;) {
          // Split at max_msg and where a window ends.
          const Key key = key_for(op.dst_region, op.dst_offset + done, next_qp);
          if (key.bytes_left == 0) {
            return Status::invalid_argument(
                "verbs: write op " + std::to_string(i) + ": byte " +
                std::to_string(op.dst_offset + done) + " of target region " +
                std::to_string(op.dst_region) +
                " is outside the slots the target allowed");
          }
          const uint64_t len =
              std::min({max_msg, op.length - done, key.bytes_left});
          per_qp[next_qp].push_back(
              Wr{reinterpret_cast<uint64_t>(op.src) + done,
                 static_cast<uint32_t>(len), e->value->lkey,
                 r.addr + op.dst_offset + done, key.rkey});
          next_qp = (next_qp + 1) % qps_.size();
          done += len;
        }
        bytes += op.length;
      }
      return Status();
    });
    KVMIG_RETURN_IF_ERROR(bad);
    size_t remaining = 0;
    for (const auto& v : per_qp) remaining += v.size();
    if (remaining > 0 && Clock::now() >= deadline) {
      return fail(
          Status::deadline_exceeded("verbs: write to target at " + peer_ +
                                    ": the deadline passed before posting"));
    }
    std::vector<size_t> next(qps_.size(), 0);
    while (remaining > 0) {
      bool posted = false;
      for (size_t q = 0; q < qps_.size(); ++q) {
        const size_t room = depth_ - in_flight(q);
        const size_t n =
            std::min({room, per_qp[q].size() - next[q], size_t{kPostBatch}});
        if (n == 0) continue;
        KVMIG_RETURN_IF_ERROR(post_chain(q, per_qp[q], next[q], n));
        next[q] += n;
        remaining -= n;
        posted = true;
      }
      if (!posted) KVMIG_RETURN_IF_ERROR(progress(deadline, "write"));
    }
    bytes_written_ += bytes;
    ops_posted_ += ops.size();
    return Status();
  }

  Status flush(Deadline deadline) override {
    KVMIG_RETURN_IF_ERROR(usable());
    return drain(deadline, "flush");
  }

  void cancel() override { cancelled_.store(true, std::memory_order_relaxed); }

  Status add_windows(std::span<const uint8_t> update) override {
    if (update.empty()) return Status();
    if (!connect_called_) {
      return Status::failed_precondition("verbs: window update before connect");
    }
    ByteReader r(update);
    auto parse = [&](bool& replace, std::vector<RemoteWindow>& out) -> Status {
      KVMIG_RETURN_IF_ERROR(get_header(r, kRoleWindowUpdate));
      KVMIG_ASSIGN_OR_RETURN(uint8_t rep, r.get<uint8_t>("replace"));
      if (rep > 1) {
        return Status::data_loss("replace flag " + std::to_string(rep));
      }
      replace = rep == 1;
      KVMIG_RETURN_IF_ERROR(get_windows(r, qps_.size(), region_lengths_, out));
      return r.expect_end("window update");
    };
    bool replace = false;
    std::vector<RemoteWindow> windows;
    Status parsed = parse(replace, windows);
    if (!parsed.ok()) {
      return Status::invalid_argument("verbs: bad window update: " +
                                      parsed.message());
    }
    if (replace) {
      for (auto& w : windows_) w.clear();
    }
    add(std::move(windows));
    return Status();
  }

  uint64_t bytes_written() const override { return bytes_written_; }
  uint64_t ops_posted() const override { return ops_posted_; }

 private:
  struct Qp {
    QpPtr qp;
    uint32_t psn = 0;
    uint64_t posted = 0;  // work requests posted
    uint64_t done = 0;    // sequence number of the last one retired
  };

  explicit VerbsInitiator(std::shared_ptr<VerbsCore> core)
      : core_(std::move(core)) {}

  // Where a write to byte `offset` of region `region` over QP q goes: the
  // key of the window holding it and the bytes left in that window (a work
  // request carries one key, so a write spanning adjacent windows splits).
  // bytes_left is 0 when no window holds the byte: the initiator then
  // refuses the write itself (a device checks a window's bounds too, where
  // it follows the spec: rxe checks only the registration's).
  struct Key {
    uint32_t rkey = 0;
    uint64_t bytes_left = 0;
  };
  Key key_for(uint32_t region, uint64_t offset, size_t q) const {
    if (!windowed_) {
      return {remote_[region].rkey, region_lengths_[region] - offset};
    }
    const std::vector<RemoteWindow>& list = windows_[region];
    auto it = std::upper_bound(
        list.begin(), list.end(), offset,
        [](uint64_t off, const RemoteWindow& w) { return off < w.offset; });
    if (it == list.begin()) return {};
    const RemoteWindow& w = *std::prev(it);
    if (offset - w.offset >= w.length) return {};
    return {w.rkeys[q], w.length - (offset - w.offset)};
  }

  // Adds windows to the per-region lists, each kept sorted by offset.
  void add(std::vector<RemoteWindow> windows) {
    for (RemoteWindow& w : windows) {
      windows_[w.region].push_back(std::move(w));
    }
    for (auto& list : windows_) {
      std::sort(list.begin(), list.end(), [](const auto& a, const auto& b) {
        return a.offset < b.offset;
      });
    }
  }

  Status parse_target(std::span<const uint8_t> addr, Endpoint& peer,
                      std::vector<RemoteRegion>& regions, bool& windowed,
                      std::vector<RemoteWindow>& windows) {
    ByteReader r(addr);
    KVMIG_RETURN_IF_ERROR(get_endpoint(r, kRoleTarget, peer));
    KVMIG_ASSIGN_OR_RETURN(uint32_t n, r.get<uint32_t>("region count"));
    if (n > kMaxRegions || n > r.remaining() / 20) {
      return Status::data_loss("region count " + std::to_string(n) +
                               " does not fit the address");
    }
    regions.resize(n);
    for (RemoteRegion& region : regions) {
      KVMIG_ASSIGN_OR_RETURN(region.addr, r.get<uint64_t>("region address"));
      KVMIG_ASSIGN_OR_RETURN(region.length, r.get<uint64_t>("region length"));
      KVMIG_ASSIGN_OR_RETURN(region.rkey, r.get<uint32_t>("region rkey"));
      if (region.addr + region.length < region.addr) {
        return Status::data_loss("region wraps the address space");
      }
    }
    KVMIG_ASSIGN_OR_RETURN(uint8_t flag, r.get<uint8_t>("windowed"));
    if (flag > 1) {
      return Status::data_loss("windowed flag " + std::to_string(flag));
    }
    windowed = flag == 1;
    if (windowed) {
      std::vector<uint64_t> lengths;
      for (const RemoteRegion& region : regions)
        lengths.push_back(region.length);
      KVMIG_RETURN_IF_ERROR(get_windows(r, peer.qpns.size(), lengths, windows));
    }
    return r.expect_end("target address");
  }

  Status usable() const {
    if (!error_.ok()) return error_;
    if (!connected_) {
      return Status::failed_precondition("verbs: initiator is not connected");
    }
    return Status();
  }

  size_t in_flight(size_t q) const { return qps_[q].posted - qps_[q].done; }

  bool outstanding() const {
    for (size_t q = 0; q < qps_.size(); ++q) {
      if (in_flight(q) > 0) return true;
    }
    return false;
  }

  // Posts wrs[first, +n) on QP q as one chain; signals every kSignalEvery-th
  // work request and the last.
  Status post_chain(size_t q, const std::vector<Wr>& wrs, size_t first,
                    size_t n) {
    std::array<ibv_sge, kPostBatch> sges{};
    std::array<ibv_send_wr, kPostBatch> chain{};
    Qp& qp = qps_[q];
    for (size_t i = 0; i < n; ++i) {
      const Wr& w = wrs[first + i];
      const uint64_t seq = qp.posted + i + 1;
      sges[i] = {w.local, w.length, w.lkey};
      ibv_send_wr& wr = chain[i];
      wr.wr_id = (uint64_t{q} << kQpShift) | seq;
      wr.sg_list = w.length ? &sges[i] : nullptr;
      wr.num_sge = w.length ? 1 : 0;
      wr.opcode = IBV_WR_RDMA_WRITE;
      wr.send_flags =
          (seq % kSignalEvery == 0 || i + 1 == n) ? IBV_SEND_SIGNALED : 0;
      wr.wr.rdma.remote_addr = w.remote;
      wr.wr.rdma.rkey = w.rkey;
      wr.next = i + 1 < n ? &chain[i + 1] : nullptr;
    }
    ibv_send_wr* bad = nullptr;
    if (int rc = ibv_post_send(qp.qp.get(), chain.data(), &bad)) {
      // Work requests before `bad` were posted and count as in flight.
      qp.posted += static_cast<uint64_t>(bad ? bad - chain.data() : 0);
      return fail(status_from_errno(
          rc, "verbs: ibv_post_send on QP " + std::to_string(qp.qp->qp_num)));
    }
    qp.posted += n;
    wrs_posted_ += n;
    return Status();
  }

  // Retires what the CQ holds; returns how many completions it handled. A
  // failed completion is recorded in error_.
  int poll_once() {
    std::array<ibv_wc, 32> wcs;
    const int n =
        ibv_poll_cq(cq_.get(), static_cast<int>(wcs.size()), wcs.data());
    if (n < 0) {
      if (error_.ok()) {
        error_ = Status::internal("verbs: ibv_poll_cq failed");
      }
      return 0;
    }
    for (int i = 0; i < n; ++i) {
      const ibv_wc& wc = wcs[i];
      const size_t q = wc.wr_id >> kQpShift;
      const uint64_t seq = wc.wr_id & kSeqMask;
      if (q < qps_.size()) qps_[q].done = std::max(qps_[q].done, seq);
      if (wc.status != IBV_WC_SUCCESS && error_.ok()) {
        error_ = status_from_wc(wc, "RDMA WRITE to target at " + peer_);
      }
    }
    return n;
  }

  // Waits until at least one completion was retired. Polls for kSpin, then
  // sleeps on the completion channel; returns the first completion error or
  // DeadlineExceeded (the initiator is then unusable).
  Status progress(Deadline deadline, std::string_view what) {
    if (cancelled_.load(std::memory_order_relaxed)) return fail_cancelled();
    const auto spin_until = std::min(Clock::now() + kSpin, deadline);
    do {
      const int n = poll_once();
      if (!error_.ok()) return fail(error_);
      if (n > 0) return Status();
    } while (Clock::now() < spin_until);
    for (;;) {
      const auto now = Clock::now();
      if (now >= deadline) {
        return fail(Status::deadline_exceeded(
            "verbs: " + std::string(what) + " to target at " + peer_ +
            " did not complete before the deadline"));
      }
      // Checked at least every kMaxSleepMs.
      if (cancelled_.load(std::memory_order_relaxed)) return fail_cancelled();
      if (int rc = ibv_req_notify_cq(cq_.get(), 0)) {
        return fail(status_from_errno(rc, "verbs: ibv_req_notify_cq"));
      }
      // A completion that arrived before arming raises no event.
      const int n = poll_once();
      if (!error_.ok()) return fail(error_);
      if (n > 0) return Status();
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now)
              .count();
      pollfd pfd{channel_->fd, POLLIN, 0};
      const int ready = ::poll(
          &pfd, 1,
          static_cast<int>(std::clamp<int64_t>(left + 1, 1, kMaxSleepMs)));
      if (ready > 0) {
        ibv_cq* ev_cq = nullptr;
        void* ev_ctx = nullptr;
        if (ibv_get_cq_event(channel_.get(), &ev_cq, &ev_ctx) == 0) {
          ibv_ack_cq_events(ev_cq, 1);
        }
      }
    }
  }

  Status fail_cancelled() {
    return fail(Status::aborted("verbs: initiator to target at " + peer_ +
                                " cancelled by its caller"));
  }

  // Waits until every posted work request has completed.
  Status drain(Deadline deadline, std::string_view what) {
    while (outstanding()) KVMIG_RETURN_IF_ERROR(progress(deadline, what));
    return error_;
  }

  // Records s (the first error sticks), moves every QP to the error state
  // and waits (bounded) for the flushed work requests, so the device no
  // longer reads the caller's memory when this returns. Returns the first
  // error.
  Status fail(Status s) {
    if (error_.ok()) error_ = std::move(s);
    if (broken_) return error_;
    broken_ = true;
    verbs_log()->info("initiator to {}: {}", peer_.empty() ? "?" : peer_,
                      error_.to_string());
    for (Qp& q : qps_) to_error(q.qp.get());
    const auto until = Clock::now() + kDrainGrace;
    while (outstanding() && Clock::now() < until) {
      if (poll_once() == 0) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    }
    if (outstanding()) {
      verbs_log()->warn(
          "initiator to {}: work requests still outstanding {}s "
          "after moving the QPs to the error state",
          peer_, kDrainGrace.count());
    }
    return error_;
  }

  const std::shared_ptr<VerbsCore> core_;
  std::vector<uint8_t> address_;
  uint32_t depth_ = 0;  // work requests in flight per QP, at most
  ChannelPtr channel_;
  CqPtr cq_;
  std::vector<Qp> qps_;  // destroyed first

  std::atomic<bool> cancelled_{false};  // cancel(), from any thread
  bool connect_called_ = false;
  bool connected_ = false;
  bool broken_ = false;
  Status error_;  // the first failure, sticky
  std::string peer_;
  std::vector<RemoteRegion> remote_;
  std::vector<uint64_t> region_lengths_;
  // With memory windows (windowed_): each region's, sorted by offset.
  bool windowed_ = false;
  std::vector<std::vector<RemoteWindow>> windows_;
  uint64_t bytes_written_ = 0;
  uint64_t ops_posted_ = 0;
  uint64_t wrs_posted_ = 0;
};

// ------------------------------------------------------------- transport

// Thread-safe: the core guards the registrations.
class VerbsTransport final : public Transport {
 public:
  VerbsTransport(TransportOptions opts, std::shared_ptr<VerbsCore> core)
      : opts_(std::move(opts)), core_(std::move(core)) {}

  std::string_view name() const override { return "verbs"; }

  Status register_memory(std::span<std::byte> region) override {
    return core_->register_region(region);
  }

  // RDMA straight into device memory needs the device's dmabuf.
  Status register_device_memory(
      std::span<std::byte> region,
      std::shared_ptr<const DeviceMemory> device) override {
    if (!device || !device->dmabuf) {
      return Status::unimplemented("verbs needs a dmabuf of device memory");
    }
    auto dmabuf = device->dmabuf();
    if (!dmabuf.ok()) {
      return dmabuf.status().with_context(
          "verbs registers device memory only as a dmabuf");
    }
    return core_->register_dmabuf_region(region, *dmabuf);
  }

  Status deregister_memory(std::span<std::byte> region) override {
    return core_->deregister_region(region);
  }

  Result<std::unique_ptr<TransportInitiator>> create_initiator() override {
    return VerbsInitiator::create(core_, opts_);
  }

  Result<std::unique_ptr<TransportTarget>> open_target(
      std::span<const std::span<std::byte>> regions,
      std::span<const uint8_t> initiator_address,
      Deadline /*deadline: nothing here waits on the peer*/) override {
    Endpoint peer;
    ByteReader r(initiator_address);
    Status parsed = get_endpoint(r, kRoleInitiator, peer);
    if (parsed.ok()) parsed = r.expect_end("initiator address");
    if (!parsed.ok()) {
      return Status::invalid_argument("verbs: bad initiator address: " +
                                      parsed.message());
    }
    if (peer.link_layer != core_->local().link_layer) {
      return Status::invalid_argument(
          "verbs: bad initiator address: the initiator's link layer differs");
    }
    std::vector<TargetRegion> exported;
    Status bad = core_->with_regions([&](const RegionTable<MrPtr>& table) {
      for (size_t i = 0; i < regions.size(); ++i) {
        TargetRegion tr;
        RemoteRegion& rr = tr.remote;
        rr.addr = reinterpret_cast<uint64_t>(regions[i].data());
        rr.length = regions[i].size();
        if (!regions[i].empty()) {
          const auto* e = table.find(regions[i].data(), regions[i].size());
          if (e == nullptr) {
            return Status::invalid_argument(
                "verbs: target region " + std::to_string(i) + " (" +
                std::to_string(regions[i].size()) +
                " bytes) is not inside registered memory");
          }
          rr.rkey = e->value->rkey;
          tr.mr = e->value.get();
        }
        exported.push_back(tr);
      }
      return Status();
    });
    KVMIG_RETURN_IF_ERROR(bad);
    return VerbsTarget::open(core_, std::move(exported), peer);
  }

 private:
  const TransportOptions opts_;
  const std::shared_ptr<VerbsCore> core_;
};

}  // namespace

Result<std::unique_ptr<Transport>> make_verbs_transport(
    const TransportOptions& opts) {
  KVMIG_ASSIGN_OR_RETURN(auto core, VerbsCore::open(opts));
  return std::unique_ptr<Transport>(new VerbsTransport(opts, std::move(core)));
}

}  // namespace kvmig
