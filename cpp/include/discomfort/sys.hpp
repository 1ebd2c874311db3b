// Thin, exception-throwing wrappers around the system calls the store uses.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace discomfort {

// An owned file descriptor.
class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) : fd_(fd) {}
    Fd(Fd&& other) noexcept : fd_(other.release()) {}
    Fd& operator=(Fd&& other) noexcept;
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() { reset(); }

    int get() const { return fd_; }
    bool valid() const { return fd_ >= 0; }
    int release() {
        int fd = fd_;
        fd_ = -1;
        return fd;
    }
    void reset();

private:
    int fd_ = -1;
};

// An owned mmap'ed range.
class Mapping {
public:
    Mapping() = default;
    // Throws OSError when mmap fails.
    Mapping(int fd, size_t length, int flags, uint64_t offset);
    Mapping(Mapping&& other) noexcept;
    Mapping& operator=(Mapping&& other) noexcept;
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
    ~Mapping() { reset(); }

    uint8_t* data() const { return data_; }
    size_t size() const { return size_; }
    void reset();

private:
    uint8_t* data_ = nullptr;
    size_t size_ = 0;
};

// open(2) that retries on EINTR; returns -1 with errno set on failure.
int open_retry(const std::string& path, int flags, mode_t mode = 0);

// posix_fallocate; returns 0 or the error number.
int fallocate_file(int fd, uint64_t length);

// Full pread; throws OSError.
void pread_all(int fd, void* dst, size_t length, uint64_t offset, const std::string& what);
// Full pwrite; DiskFullError on ENOSPC/EDQUOT, OSError otherwise.
void pwrite_all(int fd, const void* src, size_t length, uint64_t offset, const std::string& what);

// OFD locks on one byte of `fd`.
void ofd_lock_wait(int fd, uint64_t byte);  // F_OFD_SETLKW, retried on EINTR
bool ofd_try_lock(int fd, uint64_t byte);   // F_OFD_SETLK; false when someone else holds it
void ofd_unlock(int fd, uint64_t byte);
bool ofd_locked_by_other(int fd, uint64_t byte);  // F_OFD_GETLK

// flock(LOCK_SH) held by every open handle.
void flock_shared(int fd);

// mkdir -p for the parents of a path; mode 0777 before the umask.
void make_dirs(const std::string& path);

// os.path.abspath: absolute, lexically normalised.
std::string absolute_path(const std::string& path);

// Names in a directory (empty when it does not exist).
std::vector<std::string> list_dir(const std::string& path);

// unlink that ignores ENOENT.
void unlink_quiet(const std::string& path);

// Rename without replacing an existing `to` (renameat2 RENAME_NOREPLACE, else link + unlink);
// false with errno set on failure (EEXIST when `to` exists).
bool rename_noreplace(const std::string& from, const std::string& to);

uint64_t realtime_ns();

// ---- the disk tier's directories and files (docs/FORMAT.md, "Disk tier"), checked like
// OpenSSH's StrictModes: nothing another local user could swap or plant is ever used.

// Open the disk root (made 0700 when missing) and check it: a real directory, owned by this
// user or root, not writable by group or others unless the sticky bit is set. UnsafeDirectory
// otherwise, with a one-line message that says what to change.
Fd open_disk_root(const std::string& root);

// Make `name` in `root_fd` exclusively (EEXIST: never reuse someone's directory), mode 0700,
// then open it O_DIRECTORY|O_NOFOLLOW and check it as check_private_dir does.
Fd make_private_dir(int root_fd, const std::string& root, const std::string& name);

// Open an existing run directory O_DIRECTORY|O_NOFOLLOW; an invalid Fd with errno set when
// open fails; UnsafeDirectory when it is not a 0700-style directory of this user.
Fd open_private_dir(const std::string& path);

// "" when `fd` is a regular file of this user with no group or other permission bits; else
// what is wrong with it ("owned by uid 65534, mode 0644").
std::string private_file_problem(int fd);

// Unlink `path` if it is a regular file of this user (a leftover of our own); false when it is
// someone else's (or gone, or not a file): the caller must then pick another name.
bool unlink_own_leftover(const std::string& path);

// openat(2) that retries on EINTR (O_CLOEXEC added); -1 with errno set on failure.
int openat_retry(int dir_fd, const std::string& name, int flags, mode_t mode = 0);

// Test-only: park the process at a named point when DISCOMFORT_TEST_KILLPOINT says so.
void killpoint(const char* name);
// Whether this process was started with a kill point (read once): operations then keep the
// lock-release points the kill points name.
bool killpoints_armed();

}  // namespace discomfort
