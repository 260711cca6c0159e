// Little-endian byte encoding: the one codec of kvmig, shared by the control
// protocol, the snapshot format and the tcp data plane. store_le/load_le
// for fixed positions; ByteWriter/ByteReader (with bounds checks) for
// streams. Not thread-safe (plain values).
#ifndef KVMIG_SRC_BYTES_H_
#define KVMIG_SRC_BYTES_H_

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kvmig/status.h"

namespace kvmig {

// Writes value at p, little-endian (sizeof(T) bytes).
template <typename T>
requires std::is_integral_v<T>
void store_le(uint8_t* p, T value) {
  using U = std::make_unsigned_t<T>;
  auto u = static_cast<U>(value);
  for (size_t i = 0; i < sizeof(T); ++i) {
    p[i] = static_cast<uint8_t>(u >> (8 * i));
  }
}

// Reads a little-endian T from p (sizeof(T) bytes).
template <typename T>
requires std::is_integral_v<T> T load_le(const uint8_t* p) {
  using U = std::make_unsigned_t<T>;
  U u = 0;
  for (size_t i = 0; i < sizeof(T); ++i) {
    u |= static_cast<U>(static_cast<U>(p[i]) << (8 * i));
  }
  return static_cast<T>(u);
}

// Appends integers (little-endian), raw bytes and length-prefixed strings.
class ByteWriter {
 public:
  template <typename T>
  requires std::is_integral_v<T>
  void put(T value) {
    // Byte by byte: GCC 12 at -O3 misreads a resize-then-store_le as out
    // of bounds (-Warray-bounds).
    using U = std::make_unsigned_t<T>;
    auto u = static_cast<U>(value);
    for (size_t i = 0; i < sizeof(T); ++i) {
      buf_.push_back(static_cast<uint8_t>(u >> (8 * i)));
    }
  }
  // Each value as put() writes it: one copy on a little-endian host (a
  // put() a value cost a capacity check a byte: 16 KiB of a 4096-page
  // OFFER took 50 us).
  template <typename T>
  requires std::is_integral_v<T>
  void put_array(std::span<const T> values) {
    if constexpr (std::endian::native == std::endian::little) {
      const auto* p = reinterpret_cast<const uint8_t*>(values.data());
      buf_.insert(buf_.end(), p, p + values.size_bytes());
    } else {
      for (T v : values) put(v);
    }
  }
  void put_bytes(std::span<const uint8_t> bytes) {
    buf_.insert(buf_.end(), bytes.begin(), bytes.end());
  }
  // u32 length, then the bytes.
  void put_blob(std::span<const uint8_t> bytes) {
    put(static_cast<uint32_t>(bytes.size()));
    put_bytes(bytes);
  }
  void put_string(std::string_view s) {
    put_blob({reinterpret_cast<const uint8_t*>(s.data()), s.size()});
  }

  size_t size() const { return buf_.size(); }
  std::vector<uint8_t>& buffer() { return buf_; }
  std::vector<uint8_t> take() { return std::move(buf_); }

 private:
  std::vector<uint8_t> buf_;
};

// Reads what ByteWriter wrote. Every read checks the remaining length and
// fails with DataLoss naming `what` and the offset; a failed reader stays
// failed.
class ByteReader {
 public:
  explicit ByteReader(std::span<const uint8_t> data) : data_(data) {}

  template <typename T>
  requires std::is_integral_v<T> Result<T> get(std::string_view what) {
    KVMIG_RETURN_IF_ERROR(need(sizeof(T), what));
    const T v = load_le<T>(data_.data() + pos_);
    pos_ += sizeof(T);
    return v;
  }
  // Fills `out` with values as put_array() wrote them: the length checked
  // once, one copy on a little-endian host.
  template <typename T>
  requires std::is_integral_v<T> Status get_array(std::span<T> out,
                                                  std::string_view what) {
    KVMIG_RETURN_IF_ERROR(need(out.size_bytes(), what));
    if constexpr (std::endian::native == std::endian::little) {
      if (!out.empty()) {
        std::memcpy(out.data(), data_.data() + pos_, out.size_bytes());
      }
    } else {
      for (size_t i = 0; i < out.size(); ++i) {
        out[i] = load_le<T>(data_.data() + pos_ + i * sizeof(T));
      }
    }
    pos_ += out.size_bytes();
    return Status();
  }
  Result<std::span<const uint8_t>> get_bytes(size_t n, std::string_view what) {
    KVMIG_RETURN_IF_ERROR(need(n, what));
    auto s = data_.subspan(pos_, n);
    pos_ += n;
    return s;
  }
  // A u32 length (at most max_len), then the bytes.
  Result<std::span<const uint8_t>> get_blob(size_t max_len,
                                            std::string_view what) {
    KVMIG_ASSIGN_OR_RETURN(uint32_t n, get<uint32_t>(what));
    if (n > max_len) {
      return Status::data_loss(std::string(what) + ": length " +
                               std::to_string(n) + " exceeds limit " +
                               std::to_string(max_len) + " at offset " +
                               std::to_string(pos_ - 4));
    }
    return get_bytes(n, what);
  }
  Result<std::string> get_string(size_t max_len, std::string_view what) {
    KVMIG_ASSIGN_OR_RETURN(auto b, get_blob(max_len, what));
    return std::string(reinterpret_cast<const char*>(b.data()), b.size());
  }

  size_t offset() const { return pos_; }
  size_t remaining() const { return data_.size() - pos_; }
  // DataLoss unless every byte was consumed.
  Status expect_end(std::string_view what) const {
    if (remaining() == 0) return Status();
    return Status::data_loss(
        std::string(what) + ": " + std::to_string(remaining()) +
        " trailing bytes at offset " + std::to_string(pos_));
  }

 private:
  Status need(size_t n, std::string_view what) const {
    if (n <= data_.size() - pos_) return Status();
    return Status::data_loss(std::string(what) + ": truncated at offset " +
                             std::to_string(pos_) + " (need " +
                             std::to_string(n) + " bytes, have " +
                             std::to_string(data_.size() - pos_) + ")");
  }

  std::span<const uint8_t> data_;
  size_t pos_ = 0;
};

}  // namespace kvmig

#endif  // KVMIG_SRC_BYTES_H_
