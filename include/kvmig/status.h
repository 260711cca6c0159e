// Status and Result<T>: the one error model of kvmig.
//
// Every public and transport boundary returns a Status (success or a code
// with a message that says what failed and where) or a Result<T> (a value or
// a non-ok Status). No exceptions cross these boundaries.
//
// Both are plain values: copyable, movable, and safe to use from any thread
// as long as one object is not written concurrently.
#ifndef KVMIG_STATUS_H_
#define KVMIG_STATUS_H_

#include <cassert>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace kvmig {

enum class StatusCode : uint8_t {
  kOk = 0,
  kInvalidArgument,     // the caller passed something malformed
  kNotFound,            // a named thing does not exist
  kAlreadyExists,       // a thing to create exists already
  kOutOfRange,          // an index or size beyond its bound
  kResourceExhausted,   // no room: capacity, a limit, memory
  kFailedPrecondition,  // the state does not allow this call now
  kDataLoss,            // corrupted or truncated data
  kUnavailable,         // a peer is unreachable or went away
  kDeadlineExceeded,    // a peer did not answer in time
  kAborted,             // the operation was rolled back
  kProtocol,            // a peer sent a frame that breaks the protocol
  kUnimplemented,       // not supported by this build or this pager
  kInternal,            // a bug or an unexpected foreign error
  kUnauthenticated,     // the peer did not prove it holds the secret
};

// The code's name, e.g. "InvalidArgument".
std::string_view status_code_name(StatusCode code);

class [[nodiscard]] Status {
 public:
  // Success.
  Status() = default;

  static Status invalid_argument(std::string msg) {
    return {StatusCode::kInvalidArgument, std::move(msg)};
  }
  static Status not_found(std::string msg) {
    return {StatusCode::kNotFound, std::move(msg)};
  }
  static Status already_exists(std::string msg) {
    return {StatusCode::kAlreadyExists, std::move(msg)};
  }
  static Status out_of_range(std::string msg) {
    return {StatusCode::kOutOfRange, std::move(msg)};
  }
  static Status resource_exhausted(std::string msg) {
    return {StatusCode::kResourceExhausted, std::move(msg)};
  }
  static Status failed_precondition(std::string msg) {
    return {StatusCode::kFailedPrecondition, std::move(msg)};
  }
  static Status data_loss(std::string msg) {
    return {StatusCode::kDataLoss, std::move(msg)};
  }
  static Status unavailable(std::string msg) {
    return {StatusCode::kUnavailable, std::move(msg)};
  }
  static Status deadline_exceeded(std::string msg) {
    return {StatusCode::kDeadlineExceeded, std::move(msg)};
  }
  static Status aborted(std::string msg) {
    return {StatusCode::kAborted, std::move(msg)};
  }
  static Status protocol(std::string msg) {
    return {StatusCode::kProtocol, std::move(msg)};
  }
  static Status unimplemented(std::string msg) {
    return {StatusCode::kUnimplemented, std::move(msg)};
  }
  static Status internal(std::string msg) {
    return {StatusCode::kInternal, std::move(msg)};
  }
  static Status unauthenticated(std::string msg) {
    return {StatusCode::kUnauthenticated, std::move(msg)};
  }

  // A Status of any code with msg; kOk gives success (msg dropped). Codes
  // outside the enum become Internal, so a decoded value is always valid.
  static Status from_code(StatusCode code, std::string msg);

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // "OK" or "<CodeName>: <message>".
  std::string to_string() const;

  // The same code with "<context>: " put before the message; success stays
  // success.
  Status with_context(std::string_view context) const;

  friend bool operator==(const Status&, const Status&) = default;

 private:
  Status(StatusCode code, std::string msg)
      : code_(code), message_(std::move(msg)) {
    assert(code != StatusCode::kOk);
  }

  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// A value of T or a non-ok Status. Accessing the value of an error Result is
// a precondition violation (asserted in debug builds).
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT: implicit
    assert(!std::get<Status>(v_).ok());
  }

  bool ok() const { return std::holds_alternative<T>(v_); }

  // The error, or success when a value is held.
  Status status() const {
    if (ok()) return Status();
    return std::get<Status>(v_);
  }

  T& value() & { return checked(); }
  const T& value() const& { return checked(); }
  T&& value() && { return std::move(checked()); }

  T& operator*() & { return checked(); }
  const T& operator*() const& { return checked(); }
  T* operator->() { return &checked(); }
  const T* operator->() const { return &checked(); }

 private:
  T& checked() {
    assert(ok());
    return std::get<T>(v_);
  }
  const T& checked() const {
    assert(ok());
    return std::get<T>(v_);
  }

  std::variant<Status, T> v_;
};

}  // namespace kvmig

#define KVMIG_CONCAT_INNER_(a, b) a##b
#define KVMIG_CONCAT_(a, b) KVMIG_CONCAT_INNER_(a, b)

// Returns the Status of `expr` from the enclosing function if it is not ok.
#define KVMIG_RETURN_IF_ERROR(expr)                \
  do {                                             \
    ::kvmig::Status kvmig_status_ = (expr);        \
    if (!kvmig_status_.ok()) return kvmig_status_; \
  } while (0)

// Evaluates `expr` (a Result<T>); on error returns its Status, otherwise
// moves the value into `lhs` (a declaration or an lvalue).
#define KVMIG_ASSIGN_OR_RETURN(lhs, expr)                                   \
  KVMIG_ASSIGN_OR_RETURN_IMPL_(KVMIG_CONCAT_(kvmig_result_, __LINE__), lhs, \
                               expr)
#define KVMIG_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return tmp.status();                \
  lhs = std::move(tmp).value()

#endif  // KVMIG_STATUS_H_
