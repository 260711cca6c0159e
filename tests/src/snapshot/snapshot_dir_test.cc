#include "snapshot_dir.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "testutil.h"

namespace kvmig {
namespace {

namespace fs = std::filesystem;

// A snapshot directory `snaps` (with a subdirectory `sub`) beside a
// directory `outside` it must not reach, in a fresh temporary directory.
class SnapshotDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = ::testing::TempDir() + "/kvmig_snapdir_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    root_ = fs::canonical(tmpl).string();
    dir_ = root_ + "/snaps";
    outside_ = root_ + "/outside";
    fs::create_directories(dir_ + "/sub");
    fs::create_directories(outside_);
    std::ofstream(outside_ + "/secret.snap") << "not yours";
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  // The path resolve_snapshot_path refuses with InvalidArgument, naming
  // requested.
  void expect_refused(const std::string& requested, const std::string& why) {
    auto r = resolve_snapshot_path(dir_, requested);
    ASSERT_FALSE(r.ok()) << requested << " -> " << *r;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument)
        << r.status().to_string();
    EXPECT_NE(r.status().message().find("'" + requested + "'"),
              std::string::npos)
        << r.status().to_string();
    EXPECT_NE(r.status().message().find(why), std::string::npos)
        << r.status().to_string();
  }

  std::string root_;
  std::string dir_;
  std::string outside_;
};

TEST_F(SnapshotDirTest, RelativeAndAbsolutePathsInsideAreAccepted) {
  EXPECT_EQ(*resolve_snapshot_path(dir_, "a.snap"), dir_ + "/a.snap");
  EXPECT_EQ(*resolve_snapshot_path(dir_, "sub/a.snap"), dir_ + "/sub/a.snap");
  EXPECT_EQ(*resolve_snapshot_path(dir_, "./sub/./a.snap"),
            dir_ + "/sub/a.snap");
  EXPECT_EQ(*resolve_snapshot_path(dir_, dir_ + "/a.snap"), dir_ + "/a.snap");
  EXPECT_EQ(*resolve_snapshot_path(dir_, dir_ + "/sub/a.snap"),
            dir_ + "/sub/a.snap");
  // The directory given through a symlink: resolved on both sides.
  fs::create_directory_symlink(dir_, root_ + "/link-to-snaps");
  EXPECT_EQ(*resolve_snapshot_path(root_ + "/link-to-snaps", "a.snap"),
            dir_ + "/a.snap");
  EXPECT_EQ(*resolve_snapshot_path(dir_, root_ + "/link-to-snaps/a.snap"),
            dir_ + "/a.snap");
  // A symlink inside that stays inside.
  fs::create_directory_symlink(dir_ + "/sub", dir_ + "/alias");
  EXPECT_EQ(*resolve_snapshot_path(dir_, "alias/a.snap"), dir_ + "/sub/a.snap");
  std::ofstream(dir_ + "/sub/real.snap") << "x";
  fs::create_symlink(dir_ + "/sub/real.snap", dir_ + "/file-link.snap");
  EXPECT_EQ(*resolve_snapshot_path(dir_, "file-link.snap"),
            dir_ + "/file-link.snap");
}

TEST_F(SnapshotDirTest, PathsThatLeaveTheDirectoryAreRefused) {
  expect_refused("../outside/x.snap", "'..'");
  expect_refused("sub/../../outside/x.snap", "'..'");
  expect_refused("sub/../a.snap", "'..'");  // inside, but ".." all the same
  expect_refused(outside_ + "/x.snap", "outside");
  expect_refused("/etc/passwd", "outside");
  expect_refused(root_ + "/x.snap", "outside");
  // A directory symlink inside that points out.
  fs::create_directory_symlink(outside_, dir_ + "/escape");
  expect_refused("escape/x.snap", "outside");
  expect_refused(dir_ + "/escape/x.snap", "outside");
  // A file symlink inside that points out (a load would read its target),
  // and one that points nowhere.
  fs::create_symlink(outside_ + "/secret.snap", dir_ + "/secret.snap");
  expect_refused("secret.snap", "symlink");
  fs::create_symlink(outside_ + "/missing.snap", dir_ + "/dangling.snap");
  expect_refused("dangling.snap", "symlink");
}

TEST_F(SnapshotDirTest, PathsThatNameNoFileAreRefused) {
  expect_refused("", "empty");
  expect_refused(".", "directory");
  expect_refused("sub/", "directory");
  expect_refused(dir_ + "/", "directory");
  // The directory itself, absolute: its parent is outside.
  expect_refused(dir_, "outside");
  auto missing = resolve_snapshot_path(dir_, "no/such/dir/a.snap");
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound)
      << missing.status().to_string();
}

TEST_F(SnapshotDirTest, TheDirectoryMustExist) {
  EXPECT_EQ(check_snapshot_dir(root_ + "/nope").status().code(),
            StatusCode::kNotFound);
  EXPECT_EQ(check_snapshot_dir(outside_ + "/secret.snap").status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(check_snapshot_dir("").status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(*check_snapshot_dir(dir_ + "/sub/.."), dir_);
}

}  // namespace
}  // namespace kvmig
