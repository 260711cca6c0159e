#include "auth.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cctype>
#include <cerrno>

#include "errors.h"
#include "messages.h"
#include "scope_exit.h"

namespace kvmig {
namespace {

constexpr size_t kNonceBytes = 32;
constexpr size_t kMacBytes = 32;  // SHA-256
constexpr size_t kMinSecretBytes = 16;
constexpr size_t kMaxSecretFileBytes = 4096;
using Nonce = std::array<uint8_t, kNonceBytes>;
using Mac = std::array<uint8_t, kMacBytes>;

Result<Nonce> random_nonce() {
  Nonce n;
  if (RAND_bytes(n.data(), static_cast<int>(n.size())) != 1) {
    return Status::internal("auth: RAND_bytes failed");
  }
  return n;
}

Mac mac_of(const std::string& secret, std::string_view label, const Nonce& a,
           const Nonce& b) {
  std::vector<uint8_t> msg(label.begin(), label.end());
  msg.insert(msg.end(), a.begin(), a.end());
  msg.insert(msg.end(), b.begin(), b.end());
  Mac out{};
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()), msg.data(),
       msg.size(), out.data(), &len);
  return out;
}

bool same_mac(std::span<const uint8_t> a, const Mac& b) {
  return a.size() == b.size() &&
         CRYPTO_memcmp(a.data(), b.data(), b.size()) == 0;
}

// The payload of an AUTH_* frame: exactly `n` bytes.
Result<std::span<const uint8_t>> fixed(const Frame& f, MsgType type, size_t n) {
  if (f.type == MsgType::kError) {
    auto err = decode_error(f.payload, WireLimits{});
    return err.ok() ? err->status : err.status();
  }
  if (f.type != type) {
    return Status::unauthenticated("auth: expected " + msg_type_name(type) +
                                   ", got " + msg_type_name(f.type));
  }
  if (f.payload.size() != n) {
    return Status::unauthenticated("auth: " + msg_type_name(type) + " of " +
                                   std::to_string(f.payload.size()) +
                                   " bytes, expected " + std::to_string(n));
  }
  return std::span<const uint8_t>(f.payload);
}

}  // namespace

asio::awaitable<Status> authenticate_to_agent(FrameChannel& channel,
                                              const std::string& secret,
                                              Deadline deadline) {
  auto nonce_c = random_nonce();
  if (!nonce_c.ok()) co_return nonce_c.status();
  const std::vector<uint8_t> hello(nonce_c->begin(), nonce_c->end());
  Status sent = co_await channel.send(MsgType::kAuthHello, hello, deadline);
  if (!sent.ok()) co_return sent;
  auto reply = co_await channel.receive(deadline);
  if (!reply.ok()) co_return reply.status();
  auto challenge =
      fixed(*reply, MsgType::kAuthChallenge, kNonceBytes + kMacBytes);
  if (!challenge.ok()) co_return challenge.status();
  Nonce nonce_s;
  std::copy_n(challenge->begin(), kNonceBytes, nonce_s.begin());
  if (!same_mac(challenge->subspan(kNonceBytes),
                mac_of(secret, "kvmig agent", *nonce_c, nonce_s))) {
    co_return Status::unauthenticated("agent " + channel.peer() +
                                      " does not know our secret");
  }
  const Mac proof = mac_of(secret, "kvmig client", nonce_s, *nonce_c);
  const std::vector<uint8_t> proof_bytes(proof.begin(), proof.end());
  sent = co_await channel.send(MsgType::kAuthProof, proof_bytes, deadline);
  if (!sent.ok()) co_return sent;
  auto ok = co_await channel.receive(deadline);
  if (!ok.ok()) co_return ok.status();
  co_return fixed(*ok, MsgType::kAuthOk, 0).status();
}

asio::awaitable<Status> authenticate_client(FrameChannel& channel,
                                            const Frame& hello,
                                            const std::string& secret,
                                            Deadline deadline) {
  Status result;
  auto nonce_c_bytes = fixed(hello, MsgType::kAuthHello, kNonceBytes);
  auto nonce_s = random_nonce();
  if (!nonce_c_bytes.ok()) {
    result = nonce_c_bytes.status();
  } else if (!nonce_s.ok()) {
    result = nonce_s.status();
  } else {
    Nonce nonce_c;
    std::copy_n(nonce_c_bytes->begin(), kNonceBytes, nonce_c.begin());
    const Mac ours = mac_of(secret, "kvmig agent", nonce_c, *nonce_s);
    std::vector<uint8_t> challenge(nonce_s->begin(), nonce_s->end());
    challenge.insert(challenge.end(), ours.begin(), ours.end());
    Status sent =
        co_await channel.send(MsgType::kAuthChallenge, challenge, deadline);
    if (!sent.ok()) co_return sent;
    auto proof = co_await channel.receive(deadline);
    if (!proof.ok()) co_return proof.status();
    auto proof_bytes = fixed(*proof, MsgType::kAuthProof, kMacBytes);
    if (!proof_bytes.ok()) {
      result = proof_bytes.status();
    } else if (!same_mac(*proof_bytes,
                         mac_of(secret, "kvmig client", *nonce_s, nonce_c))) {
      result = Status::unauthenticated("wrong secret");
    }
  }
  if (result.ok()) {
    co_return co_await channel.send(MsgType::kAuthOk, {}, deadline);
  }
  const std::vector<uint8_t> payload = encode(ErrorMsg{
      Status::unauthenticated("authentication failed: " + result.message())});
  Status sent = co_await channel.send(MsgType::kError, payload, deadline);
  (void)sent;
  co_return result;
}

asio::awaitable<Result<FrameChannel>> connect_channel(std::string_view agent,
                                                      uint32_t max_payload,
                                                      const std::string& secret,
                                                      Deadline deadline) {
  auto socket = co_await connect_to(agent, deadline);
  if (!socket.ok()) co_return socket.status();
  FrameChannel channel(std::move(*socket), max_payload);
  if (!secret.empty()) {
    Status authed = co_await authenticate_to_agent(channel, secret, deadline);
    if (!authed.ok()) {
      channel.close();
      co_return authed.with_context("authenticating to " + std::string(agent));
    }
  }
  co_return std::move(channel);
}

Result<std::string> read_secret_file(const std::string& path) {
  if (path.empty()) {
    return Status::invalid_argument("secret file: the path is empty");
  }
  const std::string what = "secret file " + path;
  // O_NONBLOCK: opening a FIFO with no writer returns at once (it is refused
  // below with everything else that is not a regular file).
  const int fd =
      ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) return status_from_errno(errno, what);
  ScopeExit close_fd([fd] { ::close(fd); });
  struct stat st {};
  if (::fstat(fd, &st) != 0) return status_from_errno(errno, what);
  if (!S_ISREG(st.st_mode)) {
    const char* kind = S_ISDIR(st.st_mode)    ? "a directory"
                       : S_ISCHR(st.st_mode)  ? "a character device"
                       : S_ISBLK(st.st_mode)  ? "a block device"
                       : S_ISFIFO(st.st_mode) ? "a FIFO"
                                              : "a special file";
    return Status::invalid_argument(what + ": not a regular file (" + kind +
                                    ")");
  }
  // One byte past the bound tells a file that is too large.
  std::string secret(kMaxSecretFileBytes + 1, '\0');
  size_t got = 0;
  while (got < secret.size()) {
    const ssize_t n = ::read(fd, secret.data() + got, secret.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return status_from_errno(errno, what);
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  if (got > kMaxSecretFileBytes) {
    return Status::invalid_argument(what + ": larger than the limit of " +
                                    std::to_string(kMaxSecretFileBytes) +
                                    " bytes");
  }
  secret.resize(got);
  while (!secret.empty() &&
         std::isspace(static_cast<unsigned char>(secret.back()))) {
    secret.pop_back();
  }
  if (secret.size() < kMinSecretBytes) {
    return Status::invalid_argument(
        "secret file " + path + ": " + std::to_string(secret.size()) +
        " bytes; a secret needs at least " + std::to_string(kMinSecretBytes));
  }
  return secret;
}

}  // namespace kvmig
