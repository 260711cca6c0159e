#include "etcd_client.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <charconv>
#include <future>
#include <mutex>
#include <string_view>
#include <thread>
#include <utility>

// clang-format off
#include "asio.h"  // before Beast: it includes <utility> ahead of Asio
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
// clang-format on
#include <nlohmann/json.hpp>

#include "log.h"

namespace kvmig {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
using boost::system::error_code;
using json = nlohmann::json;
using SteadyClock = std::chrono::steady_clock;
using TimePoint = SteadyClock::time_point;

// An answer of a unary call larger than this is refused (ResourceExhausted).
constexpr uint64_t kMaxResponseBytes = uint64_t{64} << 20;
// A watch message (one line of the stream) larger than this stops the watch.
constexpr size_t kMaxWatchMessageBytes = size_t{64} << 20;
// How much of an HTTP error's body a watch keeps for its message.
constexpr size_t kMaxWatchErrorBody = 64 << 10;
constexpr std::chrono::milliseconds kBackoffMin{50};
constexpr std::chrono::milliseconds kBackoffMax{1'000};

// --- base64 (RFC 4648, with padding), as the gateway encodes bytes ---------

constexpr std::string_view kBase64Alphabet =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string base64_encode(std::string_view in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= in.size(); i += 3) {
    const uint32_t v = (uint32_t{static_cast<uint8_t>(in[i])} << 16) |
                       (uint32_t{static_cast<uint8_t>(in[i + 1])} << 8) |
                       uint32_t{static_cast<uint8_t>(in[i + 2])};
    out += kBase64Alphabet[(v >> 18) & 63];
    out += kBase64Alphabet[(v >> 12) & 63];
    out += kBase64Alphabet[(v >> 6) & 63];
    out += kBase64Alphabet[v & 63];
  }
  const size_t rest = in.size() - i;
  if (rest > 0) {
    uint32_t v = uint32_t{static_cast<uint8_t>(in[i])} << 16;
    if (rest == 2) v |= uint32_t{static_cast<uint8_t>(in[i + 1])} << 8;
    out += kBase64Alphabet[(v >> 18) & 63];
    out += kBase64Alphabet[(v >> 12) & 63];
    out += rest == 2 ? kBase64Alphabet[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

// nullopt when `in` is not canonical padded base64.
std::optional<std::string> base64_decode(std::string_view in) {
  if (in.size() % 4 != 0) return std::nullopt;
  std::string out;
  out.reserve(in.size() / 4 * 3);
  for (size_t i = 0; i < in.size(); i += 4) {
    const bool last = i + 4 == in.size();
    int pad = 0;
    uint32_t v = 0;
    for (size_t j = 0; j < 4; ++j) {
      const char c = in[i + j];
      uint32_t d = 0;
      if (c == '=' && last && j >= 2) {
        ++pad;
      } else if (pad > 0) {
        return std::nullopt;  // data after padding
      } else if (c >= 'A' && c <= 'Z') {
        d = static_cast<uint32_t>(c - 'A');
      } else if (c >= 'a' && c <= 'z') {
        d = static_cast<uint32_t>(c - 'a') + 26;
      } else if (c >= '0' && c <= '9') {
        d = static_cast<uint32_t>(c - '0') + 52;
      } else if (c == '+') {
        d = 62;
      } else if (c == '/') {
        d = 63;
      } else {
        return std::nullopt;
      }
      v = (v << 6) | d;
    }
    out += static_cast<char>((v >> 16) & 0xff);
    if (pad < 2) out += static_cast<char>((v >> 8) & 0xff);
    if (pad < 1) out += static_cast<char>(v & 0xff);
  }
  return out;
}

// --- endpoints ------------------------------------------------------------

struct Endpoint {
  std::string host;  // a name or an address, without brackets
  uint16_t port = 0;
  std::string name;  // "HOST:PORT" as given (brackets kept), for messages
};

bool valid_host_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_';
}

Result<Endpoint> parse_endpoint(std::string_view text) {
  const std::string quoted = "etcd endpoint \"" + std::string(text) + "\"";
  std::string_view rest = text;
  if (rest.starts_with("https://")) {
    return Status::invalid_argument(quoted + ": TLS is not supported");
  }
  if (rest.starts_with("http://")) rest.remove_prefix(7);
  if (rest.find("://") != std::string_view::npos) {
    return Status::invalid_argument(quoted + ": only http:// is supported");
  }
  if (rest.ends_with('/')) rest.remove_suffix(1);
  Endpoint ep;
  std::string_view port;
  if (rest.starts_with('[')) {
    const size_t close = rest.find(']');
    if (close == std::string_view::npos || close + 1 >= rest.size() ||
        rest[close + 1] != ':') {
      return Status::invalid_argument(quoted + ": expected [ADDRESS]:PORT");
    }
    ep.host = std::string(rest.substr(1, close - 1));
    port = rest.substr(close + 2);
    error_code ec;
    auto addr = asio::ip::make_address(ep.host, ec);
    if (ec || !addr.is_v6()) {
      return Status::invalid_argument(quoted + ": bad IPv6 address");
    }
  } else {
    const size_t colon = rest.rfind(':');
    if (colon == std::string_view::npos) {
      return Status::invalid_argument(quoted + ": expected HOST:PORT");
    }
    ep.host = std::string(rest.substr(0, colon));
    port = rest.substr(colon + 1);
    if (ep.host.empty() ||
        !std::all_of(ep.host.begin(), ep.host.end(), valid_host_char)) {
      return Status::invalid_argument(quoted + ": bad host");
    }
  }
  unsigned value = 0;
  auto [end, ec] =
      std::from_chars(port.data(), port.data() + port.size(), value);
  if (port.empty() || ec != std::errc() || end != port.data() + port.size() ||
      value == 0 || value > 65535) {
    return Status::invalid_argument(quoted + ": bad port");
  }
  ep.port = static_cast<uint16_t>(value);
  ep.name = std::string(rest);
  return ep;
}

// Connects `stream` to `ep` by `deadline` (a host name is resolved first,
// unbounded). beast::error::timeout when the deadline passed.
asio::awaitable<error_code> connect_stream(beast::tcp_stream& stream,
                                           asio::ip::tcp::resolver& resolver,
                                           const Endpoint& ep,
                                           TimePoint deadline) {
  error_code ec;
  const asio::ip::address addr = asio::ip::make_address(ep.host, ec);
  if (!ec) {
    const asio::ip::tcp::endpoint target(addr, ep.port);
    stream.expires_at(deadline);
    co_await stream.async_connect(
        target, asio::redirect_error(asio::use_awaitable, ec));
    co_return ec;
  }
  ec = {};
  auto results = co_await resolver.async_resolve(
      ep.host, std::to_string(ep.port),
      asio::redirect_error(asio::use_awaitable, ec));
  if (ec) co_return ec;
  if (SteadyClock::now() >= deadline) {
    co_return beast::error_code(beast::error::timeout);
  }
  stream.expires_at(deadline);
  co_await stream.async_connect(results,
                                asio::redirect_error(asio::use_awaitable, ec));
  co_return ec;
}

bool is_http_parse_error(const error_code& ec) {
  static const error_code sample = http::error::end_of_stream;
  return ec.category() == sample.category() &&
         ec != http::error::end_of_stream &&
         ec != http::error::partial_message && ec != http::error::need_buffer;
}

// A socket-level failure of `step` ("connect", "sending the request", ...):
// DeadlineExceeded for the stream's expiry, Unavailable otherwise.
Status transport_status(const std::string& where, std::string_view step,
                        const error_code& ec) {
  std::string msg = where + ": " + std::string(step) + ": ";
  if (ec == beast::error::timeout) {
    return Status::deadline_exceeded(msg + "deadline passed");
  }
  if (ec == http::error::end_of_stream || ec == http::error::partial_message) {
    return Status::unavailable(msg + "etcd closed the connection");
  }
  return Status::unavailable(msg + ec.message());
}

// A gRPC status code (as the gateway reports it) in kvmig's error model.
Status from_grpc_code(int64_t code, std::string msg) {
  switch (code) {
    case 1:  // CANCELLED
    case 10:
      return Status::aborted(std::move(msg));
    case 3:
      return Status::invalid_argument(std::move(msg));
    case 4:
      return Status::deadline_exceeded(std::move(msg));
    case 5:
      return Status::not_found(std::move(msg));
    case 6:
      return Status::already_exists(std::move(msg));
    case 7:  // PERMISSION_DENIED
    case 9:
      return Status::failed_precondition(std::move(msg));
    case 8:
      return Status::resource_exhausted(std::move(msg));
    case 11:
      return Status::out_of_range(std::move(msg));
    case 12:
      return Status::unimplemented(std::move(msg));
    case 14:
      return Status::unavailable(std::move(msg));
    case 15:
      return Status::data_loss(std::move(msg));
    case 16:
      return Status::unauthenticated(std::move(msg));
    default:  // UNKNOWN, INTERNAL, anything else
      return Status::internal(std::move(msg));
  }
}

std::string snippet(std::string_view body) {
  constexpr size_t kMax = 200;
  std::string out(body.substr(0, kMax));
  if (body.size() > kMax) out += "...";
  return out;
}

// --- reading etcd's JSON --------------------------------------------------

// Reads fields of the gateway's JSON: int64 as decimal strings (numbers
// accepted), bytes as base64, a missing field is zero, false or empty.
// Remembers the first malformed field; status() reports it.
class Reader {
 public:
  explicit Reader(std::string where) : where_(std::move(where)) {}

  const json& object(const json& obj, const char* name) {
    static const json kEmpty = json::object();
    const json* v = field(obj, name);
    if (v == nullptr) return kEmpty;
    if (!v->is_object()) {
      fail(name, "not an object");
      return kEmpty;
    }
    return *v;
  }
  const json& array(const json& obj, const char* name) {
    static const json kEmpty = json::array();
    const json* v = field(obj, name);
    if (v == nullptr) return kEmpty;
    if (!v->is_array()) {
      fail(name, "not an array");
      return kEmpty;
    }
    return *v;
  }
  int64_t i64(const json& obj, const char* name) {
    const json* v = field(obj, name);
    if (v == nullptr) return 0;
    if (v->is_number_integer()) return v->get<int64_t>();
    if (v->is_string()) {
      const std::string& s = v->get_ref<const std::string&>();
      int64_t out = 0;
      auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
      if (!s.empty() && ec == std::errc() && end == s.data() + s.size()) {
        return out;
      }
    }
    fail(name, "not an int64");
    return 0;
  }
  bool boolean(const json& obj, const char* name) {
    const json* v = field(obj, name);
    if (v == nullptr) return false;
    if (!v->is_boolean()) {
      fail(name, "not a boolean");
      return false;
    }
    return v->get<bool>();
  }
  std::string text(const json& obj, const char* name) {
    const json* v = field(obj, name);
    if (v == nullptr) return {};
    if (!v->is_string()) {
      fail(name, "not a string");
      return {};
    }
    return v->get<std::string>();
  }
  std::string bytes(const json& obj, const char* name) {
    const json* v = field(obj, name);
    if (v == nullptr) return {};
    if (v->is_string()) {
      auto out = base64_decode(v->get_ref<const std::string&>());
      if (out) return std::move(*out);
    }
    fail(name, "not base64");
    return {};
  }
  EtcdKeyValue kv(const json& obj) {
    EtcdKeyValue out;
    out.key = bytes(obj, "key");
    out.value = bytes(obj, "value");
    out.create_revision = i64(obj, "create_revision");
    out.mod_revision = i64(obj, "mod_revision");
    out.version = i64(obj, "version");
    out.lease = i64(obj, "lease");
    return out;
  }
  std::vector<EtcdKeyValue> kvs(const json& obj) {
    std::vector<EtcdKeyValue> out;
    for (const json& item : array(obj, "kvs")) out.push_back(kv(item));
    return out;
  }
  // header.revision, which must be there.
  int64_t revision(const json& obj) {
    const int64_t rev = i64(object(obj, "header"), "revision");
    if (rev <= 0) fail("header.revision", "missing");
    return rev;
  }

  void fail(std::string_view name, std::string_view what) {
    if (error_.empty()) error_ = std::string(name) + ": " + std::string(what);
  }
  Status status() const {
    if (error_.empty()) return Status();
    return Status::internal(where_ + ": malformed answer: " + error_);
  }

 private:
  const json* field(const json& obj, const char* name) {
    if (!obj.is_object()) {
      fail(name, "in a non-object");
      return nullptr;
    }
    auto it = obj.find(name);
    if (it == obj.end() || it->is_null()) return nullptr;
    return &*it;
  }

  std::string where_;
  std::string error_;
};

// The error in an answer: a unary error ({"error": "...", "code": N,
// "message": "..."}), a streaming one ({"error": {"grpc_code": N,
// "message": "..."}}) or a LeaseGrantResponse's error string. Success if
// none.
Status answer_error(const std::string& where, const json& answer) {
  auto it = answer.find("error");
  if (it == answer.end() || it->is_null()) return Status();
  Reader r(where);
  if (it->is_object()) {
    const std::string message = r.text(*it, "message");
    return from_grpc_code(r.i64(*it, "grpc_code"), where + ": " + message);
  }
  if (it->is_string()) {
    if (it->get_ref<const std::string&>().empty()) return Status();
    std::string message = r.text(answer, "message");
    if (message.empty()) message = it->get<std::string>();
    if (answer.contains("code")) {
      return from_grpc_code(r.i64(answer, "code"), where + ": " + message);
    }
    return Status::internal(where + ": " + message);
  }
  return Status::internal(where +
                          ": malformed answer: error: " + snippet(it->dump()));
}

// A call's error when none of its n endpoints answered: the one failure
// as it is, or every endpoint's, DeadlineExceeded if `late`.
Status no_endpoint_answered(std::string_view what, std::vector<Status> failures,
                            size_t n, std::chrono::milliseconds timeout,
                            bool late) {
  if (failures.size() == 1 && n == 1) return std::move(failures[0]);
  std::string msg = "etcd " + std::string(what) + ": no endpoint answered";
  if (failures.size() < n) {
    msg += " within " + std::to_string(timeout.count()) + " ms";
  }
  for (size_t i = 0; i < failures.size(); ++i) {
    msg += (i == 0 ? " (" : "; ") + failures[i].message();
  }
  if (!failures.empty()) msg += ")";
  if (late) return Status::deadline_exceeded(std::move(msg));
  return Status::unavailable(std::move(msg));
}

// The end of the range of every key that starts with prefix.
std::string prefix_range_end(std::string prefix) {
  while (!prefix.empty() && static_cast<uint8_t>(prefix.back()) == 0xff) {
    prefix.pop_back();
  }
  if (prefix.empty()) return std::string(1, '\0');  // every key >= key
  prefix.back() = static_cast<char>(static_cast<uint8_t>(prefix.back()) + 1);
  return prefix;
}

// {"key", "range_end"} of a prefix ("" is every key).
json prefix_range(const std::string& prefix) {
  const std::string key = prefix.empty() ? std::string(1, '\0') : prefix;
  return json{{"key", base64_encode(key)},
              {"range_end", base64_encode(prefix_range_end(prefix))}};
}

json op_json(const EtcdOp& op) {
  json body = {{"key", base64_encode(op.key)}};
  switch (op.kind) {
    case EtcdOp::Kind::kPut:
      body["value"] = base64_encode(op.value);
      if (op.lease != 0) body["lease"] = std::to_string(op.lease);
      return json{{"request_put", std::move(body)}};
    case EtcdOp::Kind::kDelete:
      return json{{"request_delete_range", std::move(body)}};
    case EtcdOp::Kind::kGet:
      return json{{"request_range", std::move(body)}};
  }
  return json::object();
}

json compare_json(const EtcdCompare& c) {
  json body = {{"key", base64_encode(c.key)}, {"result", "EQUAL"}};
  switch (c.target) {
    case EtcdCompare::Target::kCreateRevision:
      body["target"] = "CREATE";
      body["create_revision"] = std::to_string(c.revision);
      break;
    case EtcdCompare::Target::kModRevision:
      body["target"] = "MOD";
      body["mod_revision"] = std::to_string(c.revision);
      break;
    case EtcdCompare::Target::kValue:
      body["target"] = "VALUE";
      body["value"] = base64_encode(c.value);
      break;
  }
  return body;
}

// --- the watch ------------------------------------------------------------

// One watch: a coroutine on its own io_context and thread, one connection
// at a time. Everything but the constructor, start() and the destructor
// runs on that thread.
class WatchImpl final : public EtcdWatch {
 public:
  WatchImpl(std::vector<Endpoint> endpoints, size_t first,
            std::chrono::milliseconds timeout, std::string prefix,
            int64_t start_revision, EtcdClient::EventsFn on_events,
            EtcdClient::ErrorFn on_error)
      : endpoints_(std::move(endpoints)),
        next_endpoint_(first),
        timeout_(timeout),
        prefix_(std::move(prefix)),
        next_revision_(start_revision),
        on_events_(std::move(on_events)),
        on_error_(std::move(on_error)) {}

  ~WatchImpl() override {
    assert(std::this_thread::get_id() != thread_.get_id() &&
           "an EtcdWatch destroyed from its own callback");
    // Closing the connection and the timer ends whatever the coroutine
    // awaits; it sees stopping_ and returns without another callback.
    asio::post(io_, [this] {
      stopping_ = true;
      if (stream_) stream_->close();
      resolver_.cancel();
      backoff_timer_.cancel();
    });
    if (thread_.joinable()) thread_.join();
  }

  // Starts the thread and waits until etcd created the watch (or every
  // endpoint failed once).
  Status start() {
    std::future<Status> established = established_.get_future();
    thread_ = std::thread([this] {
      asio::co_spawn(io_, run(),
                     log_exceptions(logger("cluster"), "etcd watch"));
      io_.run();
    });
    return established.get();
  }

 private:
  struct SessionEnd {
    Status status;       // why the connection ended
    bool fatal = false;  // the watch cannot go on (compacted, too large)
  };

  asio::awaitable<void> run() {
    const size_t n = endpoints_.size();
    // First connection, as a call: each endpoint once, within the timeout.
    const TimePoint deadline = SteadyClock::now() + timeout_;
    std::vector<Status> failures;
    for (size_t i = 0; !established_once_; ++i) {
      const TimePoint now = SteadyClock::now();
      const TimePoint connect_deadline =
          now >= deadline
              ? deadline
              : now + (deadline - now) / static_cast<int64_t>(n - i);
      SessionEnd end =
          co_await session(next_endpoint_, connect_deadline, deadline);
      if (established_once_) {
        if (!deliver_error(end)) co_return;
        break;
      }
      if (end.fatal) {
        established_.set_value(std::move(end.status));
        co_return;
      }
      failures.push_back(std::move(end.status));
      const bool late = SteadyClock::now() >= deadline;
      if (i + 1 == n || late) {
        established_.set_value(no_endpoint_answered(
            "watch", std::move(failures), n, timeout_, late));
        co_return;
      }
      next_endpoint_ = (next_endpoint_ + 1) % n;
    }
    std::chrono::milliseconds backoff = kBackoffMin;
    for (;;) {
      next_endpoint_ = (next_endpoint_ + 1) % n;
      if (reset_backoff_) backoff = kBackoffMin;
      reset_backoff_ = false;
      backoff_timer_.expires_after(backoff);
      error_code ec;
      co_await backoff_timer_.async_wait(
          asio::redirect_error(asio::use_awaitable, ec));
      if (stopping_) co_return;
      backoff = std::min(backoff * 2, kBackoffMax);
      const TimePoint until = SteadyClock::now() + timeout_;
      SessionEnd end = co_await session(next_endpoint_, until, until);
      if (!deliver_error(end)) co_return;
    }
  }

  // Reports how a session ended; false when the watch must stop.
  bool deliver_error(const SessionEnd& end) {
    if (stopping_) return false;
    if (on_error_) on_error_(end.status);
    return !end.fatal && !stopping_;
  }

  // One connection: connect, create the watch, deliver events until the
  // stream breaks. Returns why it ended (ignored once stopping_).
  asio::awaitable<SessionEnd> session(size_t idx, TimePoint connect_deadline,
                                      TimePoint deadline) {
    const Endpoint& ep = endpoints_[idx];
    const std::string where = "etcd " + ep.name + " watch";
    stream_.emplace(io_);
    error_code ec =
        co_await connect_stream(*stream_, resolver_, ep, connect_deadline);
    if (stopping_) co_return SessionEnd{};
    if (ec) {
      stream_.reset();
      co_return SessionEnd{transport_status(where, "connect", ec)};
    }
    set_keepalive(stream_->socket());

    json create = prefix_range(prefix_);
    if (next_revision_ > 0) {
      create["start_revision"] = std::to_string(next_revision_);
    }
    const json body = {{"create_request", std::move(create)}};
    http::request<http::string_body> req{http::verb::post, "/v3/watch", 11};
    req.set(http::field::host, ep.name);
    req.set(http::field::content_type, "application/json");
    req.body() = body.dump();
    req.prepare_payload();
    stream_->expires_at(deadline);
    co_await http::async_write(*stream_, req,
                               asio::redirect_error(asio::use_awaitable, ec));
    if (stopping_) co_return SessionEnd{};
    if (ec) {
      stream_.reset();
      co_return SessionEnd{transport_status(where, "sending the request", ec)};
    }

    beast::flat_buffer buffer;
    http::response_parser<http::buffer_body> parser;
    parser.body_limit(boost::none);  // a stream: each message is capped
    co_await http::async_read_header(
        *stream_, buffer, parser,
        asio::redirect_error(asio::use_awaitable, ec));
    if (stopping_) co_return SessionEnd{};
    if (ec) {
      stream_.reset();
      if (is_http_parse_error(ec)) {
        co_return SessionEnd{
            Status::internal(where + ": malformed answer: " + ec.message())};
      }
      co_return SessionEnd{transport_status(where, "reading the answer", ec)};
    }
    const unsigned http_status = parser.get().result_int();

    std::string pending;  // the stream's bytes not yet split into messages
    size_t scanned = 0;   // no newline in pending[0, scanned)
    std::optional<SessionEnd> end;
    while (!end && !parser.is_done()) {
      parser.get().body().data = chunk_.data();
      parser.get().body().size = chunk_.size();
      co_await http::async_read_some(
          *stream_, buffer, parser,
          asio::redirect_error(asio::use_awaitable, ec));
      if (stopping_) co_return SessionEnd{};
      if (ec == http::error::need_buffer) ec = {};
      pending.append(chunk_.data(), chunk_.size() - parser.get().body().size);
      if (ec) {
        end =
            is_http_parse_error(ec)
                ? SessionEnd{Status::internal(
                      where + ": malformed answer: " + ec.message())}
                : SessionEnd{transport_status(where, "reading the stream", ec)};
        break;
      }
      if (http_status != 200) {
        if (pending.size() > kMaxWatchErrorBody) break;
        continue;
      }
      for (;;) {
        const size_t nl = pending.find('\n', scanned);
        if (nl == std::string::npos) {
          scanned = pending.size();
          break;
        }
        end = handle_message(where, std::string_view(pending).substr(0, nl));
        pending.erase(0, nl + 1);
        scanned = 0;
        if (end || stopping_) break;
      }
      if (stopping_) co_return SessionEnd{};
      if (!end && pending.size() > kMaxWatchMessageBytes) {
        end = SessionEnd{Status::resource_exhausted(
                             where + ": a watch message is over " +
                             std::to_string(kMaxWatchMessageBytes) + " bytes"),
                         true};
      }
    }
    stream_.reset();
    if (http_status != 200) {
      co_return SessionEnd{http_error(where, http_status, pending)};
    }
    if (end) co_return std::move(*end);
    if (!pending.empty()) {
      end = handle_message(where, pending);
      if (stopping_) co_return SessionEnd{};
      if (end) co_return std::move(*end);
    }
    co_return SessionEnd{Status::unavailable(where + ": the stream ended")};
  }

  static Status http_error(const std::string& where, unsigned http_status,
                           const std::string& body) {
    const json answer = json::parse(body, nullptr, false);
    if (answer.is_object()) {
      Status s = answer_error(where, answer);
      if (!s.ok()) return s;
    }
    return Status::unavailable(where + ": HTTP " + std::to_string(http_status) +
                               ": " + snippet(body));
  }

  // One message of the stream; a SessionEnd when it ends the session.
  std::optional<SessionEnd> handle_message(const std::string& where,
                                           std::string_view line) {
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) {
      return std::nullopt;
    }
    const json msg = json::parse(line, nullptr, false);
    if (!msg.is_object()) {
      return SessionEnd{
          Status::internal(where + ": malformed message: " + snippet(line))};
    }
    Status error = answer_error(where, msg);
    if (!error.ok()) return SessionEnd{std::move(error)};
    Reader r(where);
    const json& result = r.object(msg, "result");
    const bool created = r.boolean(result, "created");
    const bool canceled = r.boolean(result, "canceled");
    const int64_t compact_revision = r.i64(result, "compact_revision");
    const std::string cancel_reason = r.text(result, "cancel_reason");
    const int64_t header_revision =
        r.i64(r.object(result, "header"), "revision");
    std::vector<EtcdWatchEvent> events;
    for (const json& item : r.array(result, "events")) {
      EtcdWatchEvent ev;
      const std::string type = r.text(item, "type");
      if (type == "DELETE") {
        ev.type = EtcdWatchEvent::Type::kDelete;
      } else if (!type.empty() && type != "PUT") {
        r.fail("type", type);
      }
      ev.kv = r.kv(r.object(item, "kv"));
      // Resuming never repeats a revision; drop one that would.
      if (ev.kv.mod_revision >= next_revision_) {
        events.push_back(std::move(ev));
      }
    }
    if (Status s = r.status(); !s.ok()) return SessionEnd{std::move(s)};

    if (canceled) {
      if (compact_revision > 0) {
        return SessionEnd{
            Status::out_of_range(
                where + ": revision " + std::to_string(next_revision_) +
                " was compacted (compact revision " +
                std::to_string(compact_revision) + "): read again and rewatch"),
            true};
      }
      return SessionEnd{Status::unavailable(
          where + ": etcd canceled the watch" +
          (cancel_reason.empty() ? std::string() : ": " + cancel_reason))};
    }
    if (created) {
      if (next_revision_ == 0) next_revision_ = header_revision + 1;
      stream_->expires_never();
      reset_backoff_ = true;
      if (!established_once_) {
        established_once_ = true;
        established_.set_value(Status());
      }
    }
    // Anything else without events is a progress notification.
    if (!events.empty()) {
      next_revision_ = events.back().kv.mod_revision + 1;
      if (!stopping_) on_events_(events);
    }
    return std::nullopt;
  }

  // Notices a peer that vanished without closing (a partition) in ~25 s.
  static void set_keepalive(asio::ip::tcp::socket& socket) {
    error_code ignored;
    socket.set_option(asio::socket_base::keep_alive(true), ignored);
    const int fd = socket.native_handle();
    const int idle = 10, interval = 5, count = 3;
    ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
    ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
  }

  const std::vector<Endpoint> endpoints_;
  size_t next_endpoint_;
  const std::chrono::milliseconds timeout_;
  const std::string prefix_;
  int64_t next_revision_;  // the first revision not delivered yet; 0: now
  EtcdClient::EventsFn on_events_;
  EtcdClient::ErrorFn on_error_;
  std::promise<Status> established_;
  bool established_once_ = false;
  bool reset_backoff_ = false;
  bool stopping_ = false;

  // Declared after the state above, so destroyed before it: the io_context
  // (and any coroutine frame it still holds) goes first.
  asio::io_context io_;
  asio::ip::tcp::resolver resolver_{io_};
  asio::steady_timer backoff_timer_{io_};
  std::optional<beast::tcp_stream> stream_;
  std::array<char, 16 << 10> chunk_{};
  std::thread thread_;
};

}  // namespace

// --- the client -----------------------------------------------------------

struct EtcdClient::Impl {
  // What one attempt on one endpoint came to.
  struct Outcome {
    enum class Kind : uint8_t { kAnswer, kBroken, kUnreachable };
    Kind kind = Kind::kUnreachable;
    Status error;  // kBroken: answered but unusable; kUnreachable: why
    unsigned http_status = 0;
    std::string body;
  };
  // A decoded answer and "etcd ENDPOINT CALL" for its messages.
  struct Answer {
    json body;
    std::string where;
  };

  Impl(std::vector<Endpoint> eps, std::chrono::milliseconds t)
      : endpoints(std::move(eps)), timeout(t) {}

  Result<Answer> call(std::string_view what, const std::string& target,
                      const json& body) {
    const std::string payload = body.dump();
    std::lock_guard<std::mutex> lock(mu);
    const TimePoint deadline = SteadyClock::now() + timeout;
    const size_t n = endpoints.size();
    const size_t first = current.load();
    std::vector<Status> failures;
    for (size_t i = 0; i < n; ++i) {
      const TimePoint now = SteadyClock::now();
      if (now >= deadline) break;
      const size_t idx = (first + i) % n;
      const TimePoint connect_deadline =
          now + (deadline - now) / static_cast<int64_t>(n - i);
      const std::string where =
          "etcd " + endpoints[idx].name + " " + std::string(what);
      Outcome out;
      io.restart();
      asio::co_spawn(io,
                     exchange(idx, where, target, payload, connect_deadline,
                              deadline, out),
                     [&out, &where](std::exception_ptr e) {
                       if (!e) return;
                       out.kind = Outcome::Kind::kBroken;
                       out.error =
                           Status::internal(where + ": " + exception_text(e));
                     });
      io.run();
      if (out.kind == Outcome::Kind::kBroken) return std::move(out.error);
      if (out.kind == Outcome::Kind::kAnswer) {
        current.store(idx);
        return decode(where, out);
      }
      failures.push_back(std::move(out.error));
    }
    return no_endpoint_answered(what, std::move(failures), n, timeout,
                                SteadyClock::now() >= deadline);
  }

  // One request on endpoint idx, on the kept-alive connection if it goes
  // there (once more on a fresh one if etcd closed it meanwhile).
  asio::awaitable<void> exchange(size_t idx, const std::string& where,
                                 const std::string& target,
                                 const std::string& payload,
                                 TimePoint connect_deadline, TimePoint deadline,
                                 Outcome& out) {
    const Endpoint& ep = endpoints[idx];
    http::request<http::string_body> req{http::verb::post, target, 11};
    req.set(http::field::host, ep.name);
    req.set(http::field::content_type, "application/json");
    req.keep_alive(true);
    req.body() = payload;
    req.prepare_payload();
    for (bool again = false;; again = true) {
      const bool reused = stream.has_value() && stream_endpoint == idx;
      error_code ec;
      if (!reused) {
        stream.reset();
        stream.emplace(io);
        buffer.clear();
        ec = co_await connect_stream(*stream, resolver, ep, connect_deadline);
        if (ec) {
          stream.reset();
          out.error = transport_status(where, "connect", ec);
          co_return;
        }
        stream->socket().set_option(asio::ip::tcp::no_delay(true), ec);
        stream_endpoint = idx;
      }
      requests.fetch_add(1);
      stream->expires_at(deadline);
      co_await http::async_write(*stream, req,
                                 asio::redirect_error(asio::use_awaitable, ec));
      std::string_view step = "sending the request";
      if (!ec) {
        step = "reading the answer";
        http::response_parser<http::string_body> parser;
        parser.body_limit(kMaxResponseBytes);
        co_await http::async_read(
            *stream, buffer, parser,
            asio::redirect_error(asio::use_awaitable, ec));
        if (!ec) {
          out.kind = Outcome::Kind::kAnswer;
          out.http_status = parser.get().result_int();
          const bool keep = parser.get().keep_alive();
          out.body = std::move(parser.get().body());
          if (!keep) stream.reset();
          co_return;
        }
      }
      stream.reset();
      if (ec == http::error::body_limit) {
        out.kind = Outcome::Kind::kBroken;
        out.error = Status::resource_exhausted(
            where + ": the answer is over " +
            std::to_string(kMaxResponseBytes) + " bytes");
        co_return;
      }
      if (is_http_parse_error(ec)) {
        out.kind = Outcome::Kind::kBroken;
        out.error =
            Status::internal(where + ": malformed answer: " + ec.message());
        co_return;
      }
      if (reused && !again && ec != beast::error::timeout) continue;
      out.error = transport_status(where, step, ec);
      co_return;
    }
  }

  static Result<Answer> decode(const std::string& where, Outcome& out) {
    json body = json::parse(out.body, nullptr, false);
    if (body.is_object()) {
      Status error = answer_error(where, body);
      if (!error.ok()) return error;
    }
    if (out.http_status != 200) {
      return Status::internal(where + ": HTTP " +
                              std::to_string(out.http_status) + ": " +
                              snippet(out.body));
    }
    if (!body.is_object()) {
      return Status::internal(where +
                              ": malformed answer: " + snippet(out.body));
    }
    // A streaming call's one message: {"result": {...}}.
    if (auto it = body.find("result"); it != body.end() && it->is_object()) {
      json result = std::move(*it);
      body = std::move(result);
    }
    return Answer{std::move(body), where};
  }

  const std::vector<Endpoint> endpoints;
  const std::chrono::milliseconds timeout;
  std::atomic<uint64_t> requests{0};
  std::atomic<size_t> current{0};  // the endpoint that answered last

  std::mutex mu;  // one call at a time; guards everything below
  asio::io_context io;
  asio::ip::tcp::resolver resolver{io};
  std::optional<beast::tcp_stream> stream;  // the kept-alive connection
  size_t stream_endpoint = 0;
  beast::flat_buffer buffer;
};

Result<std::unique_ptr<EtcdClient>> EtcdClient::create(EtcdOptions options) {
  if (options.endpoints.empty()) {
    return Status::invalid_argument("etcd: no endpoints");
  }
  if (options.timeout <= std::chrono::milliseconds::zero()) {
    return Status::invalid_argument("etcd: the timeout must be positive");
  }
  std::vector<Endpoint> endpoints;
  for (const std::string& text : options.endpoints) {
    KVMIG_ASSIGN_OR_RETURN(Endpoint ep, parse_endpoint(text));
    endpoints.push_back(std::move(ep));
  }
  return std::unique_ptr<EtcdClient>(new EtcdClient(
      std::make_unique<Impl>(std::move(endpoints), options.timeout)));
}

EtcdClient::EtcdClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
EtcdClient::~EtcdClient() = default;

Result<int64_t> EtcdClient::put(const std::string& key,
                                const std::string& value, int64_t lease) {
  json body = {{"key", base64_encode(key)}, {"value", base64_encode(value)}};
  if (lease != 0) body["lease"] = std::to_string(lease);
  KVMIG_ASSIGN_OR_RETURN(Impl::Answer a,
                         impl_->call("put", "/v3/kv/put", body));
  Reader r(a.where);
  const int64_t revision = r.revision(a.body);
  KVMIG_RETURN_IF_ERROR(r.status());
  return revision;
}

Result<std::optional<EtcdKeyValue>> EtcdClient::get(const std::string& key) {
  const json body = {{"key", base64_encode(key)}};
  KVMIG_ASSIGN_OR_RETURN(Impl::Answer a,
                         impl_->call("get", "/v3/kv/range", body));
  Reader r(a.where);
  std::vector<EtcdKeyValue> kvs = r.kvs(a.body);
  KVMIG_RETURN_IF_ERROR(r.status());
  if (kvs.empty()) return std::optional<EtcdKeyValue>();
  return std::optional<EtcdKeyValue>(std::move(kvs.front()));
}

Result<EtcdRangeResult> EtcdClient::get_prefix(const std::string& prefix) {
  KVMIG_ASSIGN_OR_RETURN(
      Impl::Answer a,
      impl_->call("get_prefix", "/v3/kv/range", prefix_range(prefix)));
  Reader r(a.where);
  EtcdRangeResult out;
  out.kvs = r.kvs(a.body);
  out.revision = r.revision(a.body);
  KVMIG_RETURN_IF_ERROR(r.status());
  return out;
}

Result<int64_t> EtcdClient::del(const std::string& key) {
  const json body = {{"key", base64_encode(key)}};
  KVMIG_ASSIGN_OR_RETURN(Impl::Answer a,
                         impl_->call("del", "/v3/kv/deleterange", body));
  Reader r(a.where);
  const int64_t deleted = r.i64(a.body, "deleted");
  KVMIG_RETURN_IF_ERROR(r.status());
  return deleted;
}

Result<int64_t> EtcdClient::lease_grant(int64_t ttl_seconds) {
  if (ttl_seconds <= 0) {
    return Status::invalid_argument("etcd lease_grant: TTL " +
                                    std::to_string(ttl_seconds) +
                                    " is not positive");
  }
  const json body = {{"TTL", std::to_string(ttl_seconds)}};
  KVMIG_ASSIGN_OR_RETURN(Impl::Answer a,
                         impl_->call("lease_grant", "/v3/lease/grant", body));
  Reader r(a.where);
  const int64_t id = r.i64(a.body, "ID");
  if (id == 0) r.fail("ID", "missing");
  KVMIG_RETURN_IF_ERROR(r.status());
  return id;
}

Result<int64_t> EtcdClient::lease_keepalive(int64_t lease) {
  const json body = {{"ID", std::to_string(lease)}};
  KVMIG_ASSIGN_OR_RETURN(
      Impl::Answer a,
      impl_->call("lease_keepalive", "/v3/lease/keepalive", body));
  Reader r(a.where);
  const int64_t ttl = r.i64(a.body, "TTL");
  KVMIG_RETURN_IF_ERROR(r.status());
  // etcd answers an unknown lease with TTL 0 (absent), not an error.
  if (ttl <= 0) {
    return Status::not_found(a.where + ": lease " + std::to_string(lease) +
                             " expired or was revoked");
  }
  return ttl;
}

Status EtcdClient::lease_revoke(int64_t lease) {
  const json body = {{"ID", std::to_string(lease)}};
  KVMIG_ASSIGN_OR_RETURN(Impl::Answer a,
                         impl_->call("lease_revoke", "/v3/lease/revoke", body));
  Reader r(a.where);
  r.revision(a.body);
  return r.status();
}

Result<EtcdTxnResult> EtcdClient::txn(const std::vector<EtcdCompare>& compares,
                                      const std::vector<EtcdOp>& success,
                                      const std::vector<EtcdOp>& failure) {
  json body = {{"compare", json::array()},
               {"success", json::array()},
               {"failure", json::array()}};
  for (const EtcdCompare& c : compares) {
    body["compare"].push_back(compare_json(c));
  }
  for (const EtcdOp& op : success) body["success"].push_back(op_json(op));
  for (const EtcdOp& op : failure) body["failure"].push_back(op_json(op));
  KVMIG_ASSIGN_OR_RETURN(Impl::Answer a,
                         impl_->call("txn", "/v3/kv/txn", body));
  Reader r(a.where);
  EtcdTxnResult out;
  out.succeeded = r.boolean(a.body, "succeeded");
  out.revision = r.revision(a.body);
  const std::vector<EtcdOp>& ran = out.succeeded ? success : failure;
  const json& responses = r.array(a.body, "responses");
  if (responses.size() != ran.size()) r.fail("responses", "wrong count");
  for (const json& item : responses) {
    if (!item.is_object()) {
      r.fail("responses", "not an object");
      continue;
    }
    if (item.contains("response_range")) {
      out.gets.push_back(r.kvs(r.object(item, "response_range")));
    }
  }
  KVMIG_RETURN_IF_ERROR(r.status());
  return out;
}

Result<std::unique_ptr<EtcdWatch>> EtcdClient::watch_prefix(
    const std::string& prefix, int64_t start_revision, EventsFn on_events,
    ErrorFn on_error) {
  if (start_revision < 0) {
    return Status::invalid_argument("etcd watch: start revision " +
                                    std::to_string(start_revision) +
                                    " is negative");
  }
  if (!on_events) {
    return Status::invalid_argument("etcd watch: no on_events callback");
  }
  if (start_revision > 0) {
    // etcd creates a watch on a compacted revision and only cancels it
    // later: ask first, so the caller hears OutOfRange from this call. (A
    // compaction after this check reaches on_error.) A revision in the
    // future is fine for a watch.
    json body = prefix_range(prefix);
    body["revision"] = std::to_string(start_revision);
    body["count_only"] = true;
    auto check = impl_->call("watch", "/v3/kv/range", body);
    if (!check.ok()) {
      const Status& s = check.status();
      const bool future =
          s.code() == StatusCode::kOutOfRange &&
          s.message().find("future revision") != std::string::npos;
      if (!future) return s;
    }
  }
  auto watch = std::make_unique<WatchImpl>(
      impl_->endpoints, impl_->current.load(), impl_->timeout, prefix,
      start_revision, std::move(on_events), std::move(on_error));
  KVMIG_RETURN_IF_ERROR(watch->start());
  return std::unique_ptr<EtcdWatch>(std::move(watch));
}

uint64_t EtcdClient::requests_sent() const { return impl_->requests.load(); }

}  // namespace kvmig
