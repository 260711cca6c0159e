// EtcdClient: the few calls of etcd's v3 API kvmig needs (put, range,
// delete, leases, a compare-and-swap transaction, a prefix watch), spoken to
// etcd 3.4's JSON gateway (grpc-gateway: POST /v3/kv/put etc., keys and
// values base64) over HTTP/1.1 with Boost.Beast.
//
// Why the gateway and not gRPC: Debian 12 ships gRPC and protobuf but not
// etcd's protos (which import gogoproto and Google's HTTP annotations); the
// gateway needs nothing beyond Boost, which kvmig already links, and every
// call kvmig makes is small and rare.
//
// Every call has a deadline (EtcdOptions::timeout) that covers connecting,
// sending and reading the answer. With several endpoints, a call that cannot
// reach one (connect refused, reset, deadline) tries the next, starting with
// the last that answered; an answer etcd gave (an HTTP error, a failed
// compare) is not retried. Connecting to one endpoint gets a share of the
// time left (an endpoint that drops packets leaves time for the others);
// the exchange itself may use all of it. A kept-alive connection that etcd
// closed meanwhile (a restart) is reconnected once, within the same
// deadline. So a request whose answer was lost in transit may be sent
// again: a put is applied twice, a compare-guarded txn that did succeed may
// report that its compare failed (read back to tell).
// Host names are resolved by the system resolver, which the deadline does
// not bound: give IP addresses where that matters.
//
// Errors: Unavailable when no endpoint answered, DeadlineExceeded when the
// deadline passed, Internal for a malformed answer, ResourceExhausted for an
// answer over 64 MiB, InvalidArgument for a bad endpoint or argument; an
// error etcd returned keeps its gRPC code (NotFound, InvalidArgument, ...).
// Every message starts with "etcd <endpoint> <call>: ", or with "etcd
// <call>: " when several endpoints failed (each one's error follows).
//
// Thread-safe: calls block their thread until answered or the deadline;
// calls from several threads are serialized on one kept-alive connection
// (etcd answers in order on it). A Watch runs on its own thread and
// connection, and may outlive the client that started it.
#ifndef KVMIG_SRC_CLUSTER_ETCD_CLIENT_H_
#define KVMIG_SRC_CLUSTER_ETCD_CLIENT_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvmig/status.h"

namespace kvmig {

struct EtcdOptions {
  // "http://HOST:PORT" or "HOST:PORT" each ("[v6addr]:PORT" too); at least
  // one. No TLS ("https://" is InvalidArgument).
  std::vector<std::string> endpoints;
  // Deadline of one call, over every endpoint it tries. A watch uses it for
  // each (re)connection up to etcd's "created" answer.
  std::chrono::milliseconds timeout{2'000};
};

struct EtcdKeyValue {
  std::string key;
  std::string value;
  int64_t create_revision = 0;
  int64_t mod_revision = 0;
  int64_t version = 0;
  int64_t lease = 0;
};

// One comparison of a transaction, on one key. Each compares the key's
// current state: kCreateRevision 0 means "the key does not exist".
struct EtcdCompare {
  enum class Target : uint8_t { kCreateRevision, kModRevision, kValue };
  std::string key;
  Target target = Target::kCreateRevision;
  int64_t revision = 0;  // kCreateRevision, kModRevision: EQUAL to this
  std::string value;     // kValue: EQUAL to this
};

// One operation of a transaction's branch.
struct EtcdOp {
  enum class Kind : uint8_t { kPut, kDelete, kGet };
  Kind kind = Kind::kPut;
  std::string key;
  std::string value;  // kPut
  int64_t lease = 0;  // kPut: 0 for none
};

struct EtcdTxnResult {
  bool succeeded = false;  // every compare held: the success ops ran
  // The kGet ops' answers, in order (of the branch that ran).
  std::vector<std::vector<EtcdKeyValue>> gets;
  int64_t revision = 0;  // the store's revision after the transaction
};

struct EtcdRangeResult {
  std::vector<EtcdKeyValue> kvs;
  int64_t revision = 0;  // the store's revision the read saw
};

struct EtcdWatchEvent {
  enum class Type : uint8_t { kPut, kDelete };
  Type type = Type::kPut;
  EtcdKeyValue kv;  // for kDelete: key and mod_revision only
};

// A running watch (see EtcdClient::watch_prefix). Destroying it stops the
// watch and joins its thread; no callback runs after the destructor returns.
class EtcdWatch {
 public:
  virtual ~EtcdWatch() = default;
};

class EtcdClient {
 public:
  // Checks the endpoints' syntax only: connects on the first call.
  static Result<std::unique_ptr<EtcdClient>> create(EtcdOptions options);
  ~EtcdClient();
  EtcdClient(const EtcdClient&) = delete;
  EtcdClient& operator=(const EtcdClient&) = delete;

  // Returns the store's revision after the put.
  Result<int64_t> put(const std::string& key, const std::string& value,
                      int64_t lease = 0);
  // One key, or nullopt when it does not exist.
  Result<std::optional<EtcdKeyValue>> get(const std::string& key);
  // Every key that starts with prefix, in key order.
  Result<EtcdRangeResult> get_prefix(const std::string& prefix);
  // Returns how many keys were deleted.
  Result<int64_t> del(const std::string& key);

  // A lease of ttl seconds (etcd may grant a longer one): its id.
  Result<int64_t> lease_grant(int64_t ttl_seconds);
  // One keepalive: the TTL left, or NotFound when the lease expired or was
  // revoked.
  Result<int64_t> lease_keepalive(int64_t lease);
  // Revokes the lease and deletes every key attached to it. NotFound when it
  // is already gone.
  Status lease_revoke(int64_t lease);

  // If every compare holds, runs success, else failure; atomically.
  Result<EtcdTxnResult> txn(const std::vector<EtcdCompare>& compares,
                            const std::vector<EtcdOp>& success,
                            const std::vector<EtcdOp>& failure = {});

  // Watches every key under prefix ("" for every key) from revision
  // start_revision (0: from now). on_events gets each batch, in revision
  // order, on the watch's thread. When the connection breaks, the watch
  // reconnects (next endpoint, backing off up to 1 s) and resumes after the
  // last revision it delivered, calling on_error with what broke (the watch
  // goes on; each failed reconnection is reported too). If that revision
  // was compacted meanwhile, on_error gets OutOfRange and the watch stops:
  // the caller re-reads and watches again. A watch message over 64 MiB
  // stops it too (ResourceExhausted).
  //
  // Returns once etcd has created the watch (so with start_revision 0 every
  // later change is seen), trying each endpoint once within the timeout;
  // otherwise the error (OutOfRange if start_revision is compacted: a
  // start_revision > 0 is first checked with a range call on the client's
  // connection). Events may arrive before it returns. on_events is
  // required, on_error may be empty. The callbacks must not throw and must
  // not destroy the watch. Thread-safe, like every call.
  using EventsFn = std::function<void(const std::vector<EtcdWatchEvent>&)>;
  using ErrorFn = std::function<void(const Status&)>;
  Result<std::unique_ptr<EtcdWatch>> watch_prefix(const std::string& prefix,
                                                  int64_t start_revision,
                                                  EventsFn on_events,
                                                  ErrorFn on_error);

  // HTTP requests this client sent (every attempt: reconnections and
  // failover included; the watches' own are not counted), for benchmarks
  // and tests.
  uint64_t requests_sent() const;

 private:
  struct Impl;
  explicit EtcdClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvmig

#endif  // KVMIG_SRC_CLUSTER_ETCD_CLIENT_H_
