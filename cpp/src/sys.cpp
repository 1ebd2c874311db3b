#include "discomfort/sys.hpp"

#include <string>

#include <mutex>

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "discomfort/errors.hpp"

namespace discomfort {

void throw_system(const std::string& what, int err) {
    throw StoreError(ErrorCode::System, what + ": " + std::strerror(err), err);
}

Fd& Fd::operator=(Fd&& other) noexcept {
    if (this != &other) {
        reset();
        fd_ = other.release();
    }
    return *this;
}

void Fd::reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
}

Mapping::Mapping(int fd, size_t length, int flags, uint64_t offset) {
    void* p = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, flags, fd, static_cast<off_t>(offset));
    if (p == MAP_FAILED) throw_system("mmap of " + std::to_string(length) + " bytes", errno);
    data_ = static_cast<uint8_t*>(p);
    size_ = length;
}

Mapping::Mapping(Mapping&& other) noexcept : data_(other.data_), size_(other.size_) {
    other.data_ = nullptr;
    other.size_ = 0;
}

Mapping& Mapping::operator=(Mapping&& other) noexcept {
    if (this != &other) {
        reset();
        data_ = other.data_;
        size_ = other.size_;
        other.data_ = nullptr;
        other.size_ = 0;
    }
    return *this;
}

void Mapping::reset() {
    if (data_) ::munmap(data_, size_);
    data_ = nullptr;
    size_ = 0;
}

int open_retry(const std::string& path, int flags, mode_t mode) {
    int fd;
    do {
        fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
    } while (fd < 0 && errno == EINTR);
    return fd;
}

namespace {
// Test-only fault injection: DISCOMFORT_TEST_FAIL_NEXT_WRITE=ENOSPC|ENOMEM[#tag] makes the next
// space reservation of this process fail with that errno, once per distinct value.
int injected_failure() {
    const char* value = std::getenv("DISCOMFORT_TEST_FAIL_NEXT_WRITE");
    if (value == nullptr || *value == '\0') return 0;
    static std::mutex mu;
    static std::string consumed;
    std::lock_guard<std::mutex> lock(mu);
    if (consumed == value) return 0;
    consumed = value;
    std::string name(value, std::strcspn(value, "#"));
    if (name == "ENOSPC") return ENOSPC;
    if (name == "ENOMEM") return ENOMEM;
    return 0;
}
}  // namespace

int fallocate_file(int fd, uint64_t length) {
    if (int rc = injected_failure()) return rc;
    int rc;
    do {
        rc = ::posix_fallocate(fd, 0, static_cast<off_t>(length));
    } while (rc == EINTR);
    return rc;
}

void pread_all(int fd, void* dst, size_t length, uint64_t offset, const std::string& what) {
    auto* p = static_cast<uint8_t*>(dst);
    while (length > 0) {
        ssize_t n = ::pread(fd, p, length, static_cast<off_t>(offset));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw_system("read of " + what, errno);
        if (n == 0) throw StoreError(ErrorCode::Corrupted, what + ": file shorter than its object");
        p += n;
        length -= static_cast<size_t>(n);
        offset += static_cast<uint64_t>(n);
    }
}

void pwrite_all(int fd, const void* src, size_t length, uint64_t offset, const std::string& what) {
    const auto* p = static_cast<const uint8_t*>(src);
    while (length > 0) {
        ssize_t n = ::pwrite(fd, p, length, static_cast<off_t>(offset));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == ENOSPC || errno == EDQUOT))
            throw StoreError(ErrorCode::DiskFull, "write of " + what + ": " + std::strerror(errno), errno);
        if (n < 0) throw_system("write of " + what, errno);
        p += n;
        length -= static_cast<size_t>(n);
        offset += static_cast<uint64_t>(n);
    }
}

static struct flock one_byte(short type, uint64_t byte) {
    struct flock fl;
    std::memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = static_cast<off_t>(byte);
    fl.l_len = 1;
    return fl;
}

void ofd_lock_wait(int fd, uint64_t byte) {
    struct flock fl = one_byte(F_WRLCK, byte);
    while (::fcntl(fd, F_OFD_SETLKW, &fl) != 0) {
        if (errno != EINTR) throw_system("waiting for the store lock", errno);
    }
}

bool ofd_try_lock(int fd, uint64_t byte) {
    struct flock fl = one_byte(F_WRLCK, byte);
    if (::fcntl(fd, F_OFD_SETLK, &fl) == 0) return true;
    if (errno == EAGAIN || errno == EACCES || errno == EINTR) return false;
    throw_system("taking a store lock", errno);
}

void ofd_unlock(int fd, uint64_t byte) {
    struct flock fl = one_byte(F_UNLCK, byte);
    ::fcntl(fd, F_OFD_SETLK, &fl);  // cannot fail on a valid fd; the fd's close drops it anyway
}

bool ofd_locked_by_other(int fd, uint64_t byte) {
    struct flock fl = one_byte(F_WRLCK, byte);
    if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) throw_system("probing a slot lock", errno);
    return fl.l_type != F_UNLCK;
}

void flock_shared(int fd) {
    while (::flock(fd, LOCK_SH) != 0) {
        if (errno != EINTR) throw_system("flock of the control segment", errno);
    }
}

void make_dirs(const std::string& path) {
    if (path.empty() || path == "/") return;
    struct stat st;
    if (::stat(path.c_str(), &st) == 0) {
        if (!S_ISDIR(st.st_mode)) throw_system(path, ENOTDIR);
        return;
    }
    auto slash = path.find_last_of('/');
    if (slash != std::string::npos && slash > 0) make_dirs(path.substr(0, slash));
    if (::mkdir(path.c_str(), 0777) != 0 && errno != EEXIST) throw_system("mkdir " + path, errno);
}

std::string absolute_path(const std::string& path) {
    std::string full = path;
    if (full.empty() || full[0] != '/') {
        char buf[4096];
        if (!::getcwd(buf, sizeof buf)) throw_system("getcwd", errno);
        full = std::string(buf) + "/" + path;
    }
    std::vector<std::string> parts;
    size_t i = 0;
    while (i <= full.size()) {
        size_t j = full.find('/', i);
        if (j == std::string::npos) j = full.size();
        std::string part = full.substr(i, j - i);
        if (part == "..") {
            if (!parts.empty()) parts.pop_back();
        } else if (!part.empty() && part != ".") {
            parts.push_back(part);
        }
        i = j + 1;
    }
    std::string out;
    for (const auto& p : parts) out += "/" + p;
    return out.empty() ? "/" : out;
}

std::vector<std::string> list_dir(const std::string& path) {
    std::vector<std::string> names;
    DIR* dir = ::opendir(path.c_str());
    if (!dir) return names;
    while (struct dirent* e = ::readdir(dir)) {
        std::string name = e->d_name;
        if (name != "." && name != "..") names.push_back(name);
    }
    ::closedir(dir);
    return names;
}

void unlink_quiet(const std::string& path) {
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) throw_system("unlink " + path, errno);
}

bool rename_noreplace(const std::string& from, const std::string& to) {
#ifdef RENAME_NOREPLACE
    if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0) return true;
    if (errno != EINVAL && errno != ENOSYS) return false;  // else the filesystem lacks it
#endif
    if (::link(from.c_str(), to.c_str()) != 0) return false;
    ::unlink(from.c_str());
    return true;
}

int openat_retry(int dir_fd, const std::string& name, int flags, mode_t mode) {
    int fd;
    do {
        fd = ::openat(dir_fd, name.c_str(), flags | O_CLOEXEC, mode);
    } while (fd < 0 && errno == EINTR);
    return fd;
}

namespace {

std::string octal_mode(mode_t mode) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%04o", unsigned(mode & 07777));
    return buf;
}

[[noreturn]] void unsafe(const std::string& message) { throw StoreError(ErrorCode::UnsafeDirectory, message); }

const char* kUseAnother = "set disk_dir= or DISCOMFORT_DISK_DIR to a directory of your own (mode 0700)";

// Why a disk root other users could change is refused (StrictModes: owner is us or root, no
// group/other write unless sticky, which keeps others from renaming or removing our run dirs).
void check_root_stat(const std::string& root, const struct stat& st) {
    const uid_t me = ::geteuid();
    if (!S_ISDIR(st.st_mode)) unsafe("disk root " + root + " is not a directory; " + kUseAnother);
    if (st.st_uid != me && st.st_uid != 0)
        unsafe("disk root " + root + " belongs to uid " + std::to_string(st.st_uid) + ", not to this user (uid " +
               std::to_string(me) + ") or root; " + kUseAnother);
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX))
        unsafe("disk root " + root + " is writable by group or others without the sticky bit (mode " +
               octal_mode(st.st_mode) + "); chmod 700 " + root + " (or 1777 for a shared temp directory), or " +
               kUseAnother);
}

void check_private_stat(const std::string& path, const struct stat& st) {
    if (!S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() || (st.st_mode & 077))
        unsafe("disk directory " + path + " is not a private directory of this user (uid " +
               std::to_string(st.st_uid) + ", mode " + octal_mode(st.st_mode) + "); refusing to use it");
}

}  // namespace

Fd open_disk_root(const std::string& root) {
    struct stat st;
    if (::lstat(root.c_str(), &st) != 0) {
        if (errno != ENOENT) throw_system("disk root " + root, errno);
        auto slash = root.find_last_of('/');
        if (slash != std::string::npos && slash > 0) make_dirs(root.substr(0, slash));
        if (::mkdir(root.c_str(), 0700) != 0 && errno != EEXIST) throw_system("mkdir " + root, errno);
        if (::lstat(root.c_str(), &st) != 0) throw_system("disk root " + root, errno);
    }
    if (S_ISLNK(st.st_mode))
        unsafe("disk root " + root + " is a symbolic link; give the directory it points to, or " + kUseAnother);
    check_root_stat(root, st);
    Fd fd(open_retry(root, O_RDONLY | O_DIRECTORY | O_NOFOLLOW));
    if (!fd.valid()) {
        if (errno == ELOOP || errno == ENOTDIR) unsafe("disk root " + root + " changed while it was checked; " + kUseAnother);
        throw_system("open disk root " + root, errno);
    }
    if (::fstat(fd.get(), &st) != 0) throw_system("fstat " + root, errno);
    check_root_stat(root, st);  // what was opened, not what the name pointed to a moment ago
    return fd;
}

Fd make_private_dir(int root_fd, const std::string& root, const std::string& name) {
    const std::string path = root + "/" + name;
    if (::mkdirat(root_fd, name.c_str(), 0700) != 0) {
        if (errno == EEXIST)
            throw StoreError(ErrorCode::System,
                             "disk directory " + path + " already exists (left by another run, or made by someone " +
                                 "else); refusing to reuse it",
                             EEXIST);
        throw_system("mkdir " + path, errno);
    }
    Fd fd(openat_retry(root_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW));
    if (!fd.valid()) unsafe("disk directory " + path + " was replaced right after it was made; refusing to use it");
    ::fchmod(fd.get(), 0700);  // the umask may have taken bits we need; never adds any for others
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) throw_system("fstat " + path, errno);
    check_private_stat(path, st);
    return fd;
}

Fd open_private_dir(const std::string& path) {
    Fd fd(open_retry(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW));
    if (!fd.valid()) {
        if (errno == ELOOP || errno == ENOTDIR) unsafe("disk directory " + path + " is not a directory; refusing to use it");
        return fd;
    }
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) throw_system("fstat " + path, errno);
    check_private_stat(path, st);
    return fd;
}

std::string private_file_problem(int fd) {
    struct stat st;
    if (::fstat(fd, &st) != 0) return std::string("fstat failed: ") + std::strerror(errno);
    if (S_ISREG(st.st_mode) && st.st_uid == ::geteuid() && !(st.st_mode & 077)) return "";
    return std::string(S_ISREG(st.st_mode) ? "" : "not a regular file, ") + "owned by uid " +
           std::to_string(st.st_uid) + ", mode " + octal_mode(st.st_mode);
}

bool unlink_own_leftover(const std::string& path) {
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0) return errno == ENOENT;  // gone: the name is free
    if (!S_ISREG(st.st_mode) || st.st_uid != ::geteuid()) return false;
    return ::unlink(path.c_str()) == 0;
}

uint64_t realtime_ns() {
    struct timespec ts;
    ::clock_gettime(CLOCK_REALTIME, &ts);
    return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

bool killpoints_armed() {
    static const bool armed = std::getenv("DISCOMFORT_TEST_KILLPOINT") != nullptr;
    return armed;
}

void killpoint(const char* name) {
    const char* want = std::getenv("DISCOMFORT_TEST_KILLPOINT");
    if (!want || std::strcmp(want, name) != 0) return;
    if (const char* fd = std::getenv("DISCOMFORT_TEST_KILLPOINT_FD")) {
        if (*fd) {
            char k = 'K';
            ssize_t rc = ::write(std::atoi(fd), &k, 1);
            (void)rc;
        }
    }
    for (;;) ::pause();  // parked until the test kills us
}

}  // namespace discomfort
