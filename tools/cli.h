// The kvmig command line: serve, status, migrate, snapshot. Flags and JSON
// fields are the contract in DESIGN.md.
#ifndef KVMIG_TOOLS_CLI_H_
#define KVMIG_TOOLS_CLI_H_

namespace kvmig {

// Runs the command line; returns the process exit status (0 success, 1 a
// failed operation, 2 a usage error).
int run_cli(int argc, char** argv);

}  // namespace kvmig

#endif  // KVMIG_TOOLS_CLI_H_
