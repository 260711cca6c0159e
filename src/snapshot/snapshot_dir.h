// The directory an agent keeps snapshots in (AgentOptions::snapshot_dir,
// `kvmig serve --snapshot-dir`): which file a client's snapshot path names
// there, and which paths are refused. Stateless; thread-safe (it reads the
// file system, which may change under it: the caller opens what it returns
// at once).
#ifndef KVMIG_SRC_SNAPSHOT_SNAPSHOT_DIR_H_
#define KVMIG_SRC_SNAPSHOT_SNAPSHOT_DIR_H_

#include <string>

#include "kvmig/status.h"

namespace kvmig {

// Checks that dir exists and is a directory; returns its real path
// (symlinks resolved). NotFound / InvalidArgument naming it otherwise.
Result<std::string> check_snapshot_dir(const std::string& dir);

// The file that a client's `requested` path names in dir, absolute, with
// every directory symlink resolved: a relative path is taken relative to
// dir, an absolute one must lie in it. The file must sit directly in dir or
// below it. Refused with InvalidArgument, naming the path and dir: an empty
// path, a ".." component, a path naming a directory ("", ".", a trailing
// "/"), a parent directory that resolves outside dir (an absolute path
// elsewhere, or a symlink pointing out), and a file that is itself a
// symlink resolving outside dir. NotFound when its directory does not exist.
Result<std::string> resolve_snapshot_path(const std::string& dir,
                                          const std::string& requested);

}  // namespace kvmig

#endif  // KVMIG_SRC_SNAPSHOT_SNAPSHOT_DIR_H_
