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

uint64_t realtime_ns() {
    struct timespec ts;
    ::clock_gettime(CLOCK_REALTIME, &ts);
    return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
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
