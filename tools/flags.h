// Checks on flag values shared by the command-line tools. CLI11 converts an
// unsigned option with strtoull, which takes "-1" for 2^64 - 1, and a
// floating-point one with strtold, which takes "nan" and "inf" (and a NaN
// passes every CLI::Range). These reject such values at parse time, so they
// are usage errors (exit status 2) like any other bad flag.
#ifndef KVMIG_TOOLS_FLAGS_H_
#define KVMIG_TOOLS_FLAGS_H_

#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdlib>
#include <string>

#include "text.h"

namespace kvmig {

// A decimal integer from 0 to 2^64 - 1: digits only (no sign, space, or
// base prefix). Add it with ->transform(), not ->check(): it rewrites the
// value in canonical form, so CLI11 (which reads a leading 0 as octal)
// converts what was written.
inline CLI::Validator unsigned_integer() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        auto value = parse_u64(text);
        if (!value) return "'" + text + "' is not a non-negative integer";
        text = std::to_string(*value);
        return std::string();
      },
      "", "unsigned integer");
}

// A finite number (not NaN or infinite); ranges are checked after it.
inline CLI::Validator finite_number() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        char* end = nullptr;
        const double value = std::strtod(text.c_str(), &end);
        if (text.empty() || end != text.c_str() + text.size() ||
            !std::isfinite(value)) {
          return "'" + text + "' is not a finite number";
        }
        return std::string();
      },
      "", "finite number");
}

// A value that is not empty (an empty path is never what was meant).
inline CLI::Validator non_empty() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        return text.empty() ? "must not be empty" : std::string();
      },
      "", "non-empty");
}

}  // namespace kvmig

#endif  // KVMIG_TOOLS_FLAGS_H_
