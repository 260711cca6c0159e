// How the command-line tools report a failure: exit status 1 for a failed
// operation, 2 for a usage error found after parsing (CLI11 reports its
// own), as JSON on stdout with --json and as text on stderr without.
#ifndef KVMIG_TOOLS_CLI_ERRORS_H_
#define KVMIG_TOOLS_CLI_ERRORS_H_

#include <iostream>

#include "kvmig/status.h"
#include "report_json.h"

namespace kvmig {

inline int fail(const Status& s, bool as_json) {
  if (as_json) {
    std::cout << json_text(error_json(s)) << "\n";
  } else {
    std::cerr << "kvmig: " << s.to_string() << "\n";
  }
  return 1;
}

inline int usage_error(const Status& s, bool as_json) {
  if (as_json) {
    std::cout << json_text(error_json(s)) << "\n";
  } else {
    std::cerr << "kvmig: " << s.to_string()
              << "\nRun with --help for more information.\n";
  }
  return 2;
}

}  // namespace kvmig

#endif  // KVMIG_TOOLS_CLI_ERRORS_H_
