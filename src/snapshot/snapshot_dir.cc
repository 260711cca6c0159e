#include "snapshot_dir.h"

#include <sys/stat.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <filesystem>
#include <memory>

#include "errors.h"

namespace kvmig {
namespace {

namespace fs = std::filesystem;

// realpath(3): path with every symlink, "." and ".." resolved.
Result<std::string> real_path(const std::string& path,
                              const std::string& what) {
  std::unique_ptr<char, decltype(&std::free)> real(
      ::realpath(path.c_str(), nullptr), &std::free);
  if (!real) return status_from_errno(errno, what + " " + path);
  return std::string(real.get());
}

// Whether path (absolute, resolved) is root or below it.
bool is_within(const std::string& root, const std::string& path) {
  if (path.compare(0, root.size(), root) != 0) return false;
  return path.size() == root.size() || root.back() == '/' ||
         path[root.size()] == '/';
}

Status refused(const std::string& requested, const std::string& why,
               const std::string& root) {
  return Status::invalid_argument("snapshot path '" + requested + "' " + why +
                                  " (snapshot directory " + root + ")");
}

}  // namespace

Result<std::string> check_snapshot_dir(const std::string& dir) {
  if (dir.empty()) {
    return Status::invalid_argument("snapshot directory: empty path");
  }
  KVMIG_ASSIGN_OR_RETURN(std::string root,
                         real_path(dir, "snapshot directory"));
  struct stat st {};
  if (::stat(root.c_str(), &st) != 0) {
    return status_from_errno(errno, "snapshot directory " + dir);
  }
  if (!S_ISDIR(st.st_mode)) {
    return Status::invalid_argument("snapshot directory " + dir +
                                    ": not a directory");
  }
  return root;
}

Result<std::string> resolve_snapshot_path(const std::string& dir,
                                          const std::string& requested) {
  KVMIG_ASSIGN_OR_RETURN(std::string root, check_snapshot_dir(dir));
  if (requested.empty()) return refused(requested, "is empty", root);
  const fs::path asked(requested);
  for (const fs::path& part : asked) {
    if (part == "..") return refused(requested, "has a '..' component", root);
  }
  const fs::path candidate =
      asked.is_absolute() ? asked : fs::path(root) / asked;
  const fs::path name = candidate.filename();
  if (name.empty() || name == ".") {
    return refused(requested, "names a directory, not a file", root);
  }
  KVMIG_ASSIGN_OR_RETURN(
      std::string parent,
      real_path(candidate.parent_path().string(),
                "snapshot path '" + requested + "': directory"));
  if (!is_within(root, parent)) {
    return refused(requested, "is outside it (in " + parent + ")", root);
  }
  const std::string file =
      (parent.back() == '/' ? parent : parent + "/") + name.string();
  struct stat st {};
  if (::lstat(file.c_str(), &st) == 0 && S_ISLNK(st.st_mode)) {
    // The link must lead somewhere inside: a restore would read its target.
    auto target = real_path(file, "snapshot path '" + requested + "': link");
    if (!target.ok() || !is_within(root, *target)) {
      return refused(requested, "is a symlink that leads outside it or nowhere",
                     root);
    }
  }
  return file;
}

}  // namespace kvmig
