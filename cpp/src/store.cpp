// A handle's life: create or attach, claim a slot, close, destroy.
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "discomfort/errors.hpp"
#include "discomfort/memprobe.hpp"
#include "discomfort/pool.hpp"
#include "fork.hpp"
#include "guard.hpp"

namespace discomfort {

namespace {

// os.path.join for one name.
std::string join(const std::string& dir, const std::string& name) {
    if (dir.empty()) return name;
    return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string control_path(const std::string& shm_dir, const std::string& run_id) {
    return join(shm_dir, "dcf-" + run_id);
}

StoreError corrupted(const std::string& run_id, const std::string& why) {
    return StoreError(ErrorCode::Corrupted, "run " + quoted(run_id) + ": " + why);
}

void validate_header(const Header& h, uint64_t file_size, const std::string& run_id) {
    if (std::memcmp(h.magic, kMagic, sizeof kMagic) != 0) throw corrupted(run_id, "not a discomfort store (bad magic)");
    if (h.format_version != kFormatVersion)
        throw corrupted(run_id, "segment format version " + std::to_string(h.format_version) +
                                    ", this build reads version " + std::to_string(kFormatVersion));
    struct Field {
        const char* name;
        uint64_t got, want;
    };
    const Field fields[] = {
        {"header_size", h.header_size, kHeaderSize},         {"total_size", h.total_size, kTotalSize},
        {"max_chunks", h.max_chunks, kMaxChunks},            {"slot_capacity", h.slot_capacity, kSlotCapacity},
        {"table_capacity", h.table_capacity, kTableCapacity}, {"pin_capacity", h.pin_capacity, kPinCapacity},
        {"chunk_table_off", h.chunk_table_off, kChunkTableOff}, {"slot_table_off", h.slot_table_off, kSlotTableOff},
        {"obj_table_off", h.obj_table_off, kObjTableOff},     {"pin_table_off", h.pin_table_off, kPinTableOff},
    };
    for (const Field& f : fields)
        if (f.got != f.want)
            throw corrupted(run_id, std::string("header field ") + f.name + " is " + std::to_string(f.got) +
                                        ", expected " + std::to_string(f.want));
    if (file_size != kTotalSize)
        throw corrupted(run_id, "control segment is " + std::to_string(file_size) + " bytes, expected " +
                                    std::to_string(kTotalSize));
    if (h.disk_dir_len > kMaxDiskDirBytes) throw corrupted(run_id, "disk directory length out of range");
    if (h.disk_dir_len) {
        // Only a directory named for this run: a damaged header must not aim unlinks elsewhere.
        const std::string dir(h.disk_dir, h.disk_dir_len), tail = "/dcf-" + run_id;
        if (dir[0] != '/' || dir.find('\0') != std::string::npos || dir.size() < tail.size() ||
            dir.compare(dir.size() - tail.size(), tail.size(), tail) != 0)
            throw corrupted(run_id, "disk directory is not this run's");
    }
    size_t n = strnlen(h.run_id, sizeof h.run_id);
    if (std::string(h.run_id, n) != run_id) throw corrupted(run_id, "header names run " + quoted(std::string(h.run_id, n)));
}

// Names in the directory open at `fd` (read through a duplicate, from its start).
std::vector<std::string> list_dir_fd(int fd) {
    std::vector<std::string> names;
    int dup_fd = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dup_fd < 0) return names;
    DIR* dir = ::fdopendir(dup_fd);
    if (!dir) {
        ::close(dup_fd);
        return names;
    }
    ::rewinddir(dir);
    while (struct dirent* e = ::readdir(dir)) {
        std::string name = e->d_name;
        if (name != "." && name != "..") names.push_back(name);
    }
    ::closedir(dir);
    return names;
}

// Unlink the run's chunks, control segment and disk directory: only names of ours, and only
// files of ours (a name another user planted stays; it must not stop the removal of the rest).
void remove_run_files(const std::string& shm_dir, const std::string& run_id,
                      const std::optional<std::string>& disk_dir, int disk_fd) {
    const std::string prefix = "dcf-" + run_id + ".c";
    for (const std::string& name : list_dir(shm_dir)) {
        if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
        if (name.find_first_not_of("0123456789", prefix.size()) != std::string::npos) continue;
        unlink_own_leftover(join(shm_dir, name));
    }
    if (disk_dir && disk_dir->substr(disk_dir->find_last_of('/') + 1) == "dcf-" + run_id) {
        Fd opened;
        if (disk_fd < 0) {
            try {
                opened = open_private_dir(*disk_dir);  // never a directory someone else could change
            } catch (const StoreError&) {
            }
            disk_fd = opened.get();
        }
        if (disk_fd >= 0) {
            for (const std::string& name : list_dir_fd(disk_fd)) {
                if (name.size() > 4 && name.compare(name.size() - 4, 4, ".obj") == 0)
                    ::unlinkat(disk_fd, name.c_str(), 0);
            }
            ::rmdir(disk_dir->c_str());  // fails harmlessly when someone left other files there
        }
    }
    // The control segment last: a removal that dies half-way is finished by the next sweep.
    unlink_quiet(control_path(shm_dir, run_id));
}

}  // namespace

Store::Store(std::string run_id, std::string shm_dir, std::string mem_probe, std::optional<std::string> disk_dir,
             bool owner, bool pool, Fd fd, Mapping control, Fd disk_fd)
    : run_id_(std::move(run_id)),
      shm_dir_(std::move(shm_dir)),
      mem_probe_(std::move(mem_probe)),
      disk_dir_(std::move(disk_dir)),
      owner_(owner),
      pool_(pool),
      pid_(::getpid()),
      ctl_fd_(std::move(fd)),
      disk_fd_(std::move(disk_fd)),
      control_(std::move(control)),
      base_(control_.data()),
      chunks_(kMaxChunks) {
    track_store(this, true);
}

Store::~Store() {
    track_store(this, false);
    // Only reached with no view or reservation left (they hold the Store). Give the slot back
    // if the lock is free now; otherwise unmapping and closing drop our locks, the slot reads
    // as dead, and the next claimer or reclaim() frees what it held.
    if (!released_ && !forked()) {
        try {
            Guard guard(*this, Guard::kTry);
            if (guard.held()) release_locked();
        } catch (...) {
        }
    }
}

std::shared_ptr<Store> Store::create(const std::string& run_id, uint64_t ram_budget,
                                     const std::optional<std::string>& disk_root, const std::string& shm_dir,
                                     const std::string& mem_probe, bool pool) {
    check_run_id(run_id);
    std::optional<std::string> disk_dir;
    std::string root;
    Fd root_fd, disk_fd;
    if (disk_root) {
        root = absolute_path(*disk_root);
        disk_dir = join(root, "dcf-" + run_id);
        if (disk_dir->size() > kMaxDiskDirBytes)
            throw StoreError(ErrorCode::InvalidArgument, "disk root path is too long: " + quoted(*disk_root));
        root_fd = open_disk_root(root);  // refused before anything of the run exists
    }
    const std::string path = control_path(shm_dir, run_id);
    Fd fd(open_retry(path, O_RDWR | O_CREAT | O_EXCL, 0600));
    if (!fd.valid()) throw_system("cannot create run " + quoted(run_id) + " at " + path, errno);
    flock_shared(fd.get());  // before anything else, so a sweeper never takes a run being born
    bool made_dir = false;
    Mapping control;
    try {
        int rc = fallocate_file(fd.get(), kTotalSize);
        if (rc != 0)
            throw StoreError(ErrorCode::StoreFull,
                             "cannot create run " + quoted(run_id) + " in " + shm_dir + ": " + std::strerror(rc));
        if (disk_dir) {
            disk_fd = make_private_dir(root_fd.get(), root, "dcf-" + run_id);
            made_dir = true;
            root_fd.reset();
        }
        control = Mapping(fd.get(), kTotalSize, MAP_SHARED, 0);
        Header* h = reinterpret_cast<Header*>(control.data());
        h->format_version = kFormatVersion;
        h->header_size = kHeaderSize;
        h->total_size = kTotalSize;
        h->next_version = 1;
        h->ram_budget = ram_budget;
        h->creator_uid = ::geteuid();
        h->creator_pid = uint32_t(::getpid());
        h->max_chunks = kMaxChunks;
        h->slot_capacity = kSlotCapacity;
        h->table_capacity = kTableCapacity;
        h->pin_capacity = kPinCapacity;
        h->chunk_table_off = kChunkTableOff;
        h->slot_table_off = kSlotTableOff;
        h->obj_table_off = kObjTableOff;
        h->pin_table_off = kPinTableOff;
        std::memcpy(h->run_id, run_id.data(), run_id.size());
        h->created_ns = realtime_ns();
        if (disk_dir) {
            h->disk_dir_len = uint32_t(disk_dir->size());
            std::memcpy(h->disk_dir, disk_dir->data(), disk_dir->size());
        }
        // The magic last: an attacher that sees it sees a complete header.
        __atomic_thread_fence(__ATOMIC_RELEASE);
        std::memcpy(h->magic, kMagic, sizeof kMagic);
    } catch (...) {
        fd.reset();
        ::unlink(path.c_str());
        if (made_dir) ::rmdir(disk_dir->c_str());
        throw;
    }
    std::shared_ptr<Store> store(
        new Store(run_id, shm_dir, mem_probe, disk_dir, true, pool, std::move(fd), std::move(control), std::move(disk_fd)));
    if (pool) pool_note_budget(ram_budget);
    // The tables are all zeros: known without reading them (and faulting their pages in).
    store->cache_.valid = true;
    store->cache_.epoch = 0;
    try {
        store->claim_slot();
    } catch (...) {
        store->destroy();
        throw;
    }
    return store;
}

std::shared_ptr<Store> Store::attach(const std::string& run_id, const std::string& shm_dir) {
    check_run_id(run_id);
    const std::string path = control_path(shm_dir, run_id);
    Fd fd(open_retry(path, O_RDWR | O_NOFOLLOW));
    if (!fd.valid()) {
        if (errno == ENOENT)
            throw StoreError(ErrorCode::UnknownRun, "no discomfort run " + quoted(run_id) + " in " + shm_dir);
        if (errno == EACCES || errno == EPERM)
            throw StoreError(ErrorCode::Access,
                             "run " + quoted(run_id) + " in " + shm_dir + " is not accessible to this user");
        throw_system("open " + path, errno);
    }
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) throw_system("fstat " + path, errno);
    if (st.st_uid != ::geteuid())
        throw StoreError(ErrorCode::Access, "run " + quoted(run_id) + " belongs to uid " + std::to_string(st.st_uid) +
                                                ", not to this user (" + std::to_string(::geteuid()) +
                                                "); refusing to attach");
    if (uint64_t(st.st_size) < kHeaderSize)
        throw corrupted(run_id, "control segment truncated (" + std::to_string(st.st_size) + " bytes)");
    Header head;
    pread_all(fd.get(), &head, sizeof head, 0, "the header of run " + quoted(run_id));
    validate_header(head, uint64_t(st.st_size), run_id);
    if (head.flags & kFlagFinished)
        throw StoreError(ErrorCode::RunFinished, "run " + quoted(run_id) + " has finished");
    Mapping control(fd.get(), kTotalSize, MAP_SHARED, 0);
    std::optional<std::string> disk_dir;
    Fd disk_fd;
    if (head.disk_dir_len) {
        disk_dir = std::string(head.disk_dir, head.disk_dir_len);
        disk_fd = open_private_dir(*disk_dir);
        if (!disk_fd.valid()) {
            const int err = errno;
            const auto* live = reinterpret_cast<const Header*>(control.data());
            if (__atomic_load_n(&live->flags, __ATOMIC_ACQUIRE) & kFlagFinished)
                throw StoreError(ErrorCode::RunFinished, "run " + quoted(run_id) + " has finished");
            if (err == ENOENT) throw corrupted(run_id, "its disk directory " + *disk_dir + " is missing");
            throw_system("open " + *disk_dir, err);
        }
    }
    std::shared_ptr<Store> store(new Store(run_id, shm_dir, "/proc/meminfo", disk_dir, false, false, std::move(fd),
                                           std::move(control), std::move(disk_fd)));
    store->claim_slot();
    return store;
}

void Store::claim_slot() {
    flock_shared(ctl_fd_.get());
    // A sweeper holding LOCK_EX may have removed the run while we waited for the flock.
    struct stat st;
    if (::fstat(ctl_fd_.get(), &st) != 0) throw_system("fstat of the control segment", errno);
    if (st.st_nlink == 0) throw StoreError(ErrorCode::RunFinished, "run " + quoted(run_id_) + " has been removed");
    Guard guard(*this);
    for (uint32_t i = 0; i < kSlotCapacity; ++i) {
        if (!ofd_try_lock(ctl_fd_.get(), kSlotLockBase + i)) continue;
        Update update(*this);
        if (slot_at(i)->state == 1) reclaim_slot(i);  // its owner died
        SlotEntry* s = slot_at(i);
        s->pid = uint32_t(::getpid());
        s->epoch = header()->epoch;
        s->zero[0] = s->zero[1] = 0;
        __atomic_store_n(&s->state, 1u, __ATOMIC_RELEASE);
        slot_ = i;
        return;
    }
    throw StoreError(ErrorCode::StoreFull, "run " + quoted(run_id_) + ": all 128 process slots are in use");
}

bool Store::forked() const { return current_pid() != pid_; }

bool Store::run_ended() const {
    return !released_ && (__atomic_load_n(&header()->flags, __ATOMIC_ACQUIRE) & kFlagFinished);
}

StoreError Store::finished_error() const {
    return StoreError(ErrorCode::RunFinished, "run " + quoted(run_id_) + " has finished: its owner ended it");
}

void Store::check_running() const {
    if (run_ended()) throw finished_error();
}

void Store::check_usable() const {
    if (forked())
        throw StoreError(ErrorCode::Closed, "store handle of run " + quoted(run_id_) + " belongs to process " +
                                                std::to_string(pid_) + "; attach again in this process");
    if (closed_) throw StoreError(ErrorCode::Closed, "store of run " + quoted(run_id_) + " is closed");
}

// In a forked child (one thread): our descriptor is a copy sharing the parent's open file
// description, hence its locks, and the control mapping keeps that description alive too.
// Let go of both, so that the parent's slot reads as dead once the parent dies.
void Store::forget_after_fork() noexcept {
    closed_ = true;
    if (released_) return;
    released_ = true;
    ctl_fd_.reset();
    disk_fd_.reset();
    // An anonymous mapping in place of the file's keeps base_ readable and drops the file.
    ::mmap(base_, kTotalSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    for (Chunk& c : chunks_) c.fd.reset();  // mappings stay: reservation buffers may point there
}

// A released handle reports finished: it can no longer tell, and must not be used either way.
bool Store::finished() const {
    return released_ || (__atomic_load_n(&header()->flags, __ATOMIC_ACQUIRE) & kFlagFinished);
}

std::string Store::chunk_path(uint64_t index) const { return join(shm_dir_, "dcf-" + run_id_ + ".c" + std::to_string(index)); }

// Under the lock, with no live pin left: give back what the slot holds, then every lock.
void Store::release_locked() noexcept {
    if (released_) return;
    if (slot_ != kNoSlot && !forked()) {
        try {
            Update update(*this);
            for (uint32_t p = 0; p < kPinCapacity; ++p) {
                PinEntry* pin = pin_at(p);
                if (pin->state == 1 && pin->slot == slot_) set_pin_state(p, 0);
            }
            for (uint32_t i = 0; i < kTableCapacity; ++i)
                if (entry_state(i) == kReserved && entry_at(i)->owner_slot == slot_) tombstone(i);
            __atomic_store_n(&slot_at(slot_)->state, 0u, __ATOMIC_RELEASE);
        } catch (...) {
        }
        ofd_unlock(ctl_fd_.get(), kSlotLockBase + slot_);
    }
    // Unlocked by hand: the control mapping holds the open file description, so closing the
    // descriptor alone would keep its OFD locks and flock until the Store is destroyed.
    ofd_unlock(ctl_fd_.get(), kMetaLockByte);
    ::flock(ctl_fd_.get(), LOCK_UN);
    released_ = true;
    ctl_fd_.reset();
    for (Chunk& c : chunks_) c = Chunk();
    std::lock_guard<std::mutex> lk(pins_mu_);
    pins_.clear();
    pending_aborts_.clear();
    pending_.store(false);
}

// At destroy, FINISHED set. Only chunks that nobody can see any more go: no other handle is
// alive (any of them may map any chunk at any time), and no pin or reservation is on the chunk.
void Store::give_chunks_to_pool() {
    Guard guard(*this);
    drain_locked();  // pins of views collected meanwhile go first
    reclaim_dead();
    for (uint32_t i = 0; i < kSlotCapacity; ++i)
        if (i != slot_ && slot_at(i)->state == 1) return;
    if (!memory_allows(mem_probe_, 0)) {
        release_pool();  // memory is short: give back what the pool keeps too
        return;
    }
    std::vector<bool> busy(kMaxChunks);
    for (uint32_t i = 0; i < kTableCapacity; ++i) {
        const ObjEntry* e = entry_at(i);
        if (entry_state(i) == kReserved && e->tier == kTierRam && e->chunk < kMaxChunks) busy[e->chunk] = true;
    }
    for (uint32_t p = 0; p < kPinCapacity; ++p) {
        const PinEntry* pin = pin_at(p);
        if (__atomic_load_n(&pin->state, __ATOMIC_ACQUIRE) == 1 && pin->chunk < kMaxChunks) busy[pin->chunk] = true;
    }
    for (uint32_t k = 0; k < kMaxChunks; ++k) {
        if (chunk_size(k) == 0 || busy[k]) continue;
        chunk_map(k);
        Chunk& c = chunks_[k];
        if (c.map.use_count() > 1) continue;  // a reservation's buffers still point into it
        if (pool_give(shm_dir_, chunk_path(k), {c.fd, c.map, c.size})) c = Chunk();
    }
}

void Store::close() {
    if (closed_.exchange(true) || forked()) return;  // a forked child owns nothing of the parent's handle
    finish_close();
}

void Store::finish_close() {
    Guard guard(*this);
    closing_ = true;  // the guard's release gives the slot back now, or the last view does
}

void Store::destroy() {
    if (!owner_)
        throw StoreError(ErrorCode::Access,
                         "run " + quoted(run_id_) + ": only the process that created it may destroy it");
    if (forked())
        throw StoreError(ErrorCode::Closed, "run " + quoted(run_id_) + " belongs to process " + std::to_string(pid_) +
                                                ", not to this forked child");
    if (!released_) __atomic_fetch_or(&header()->flags, kFlagFinished, __ATOMIC_SEQ_CST);
    const bool closing_now = !closed_.exchange(true);  // other threads' calls fail from here
    if (closing_now && pool_ && !released_) {
        try {
            give_chunks_to_pool();
        } catch (const std::exception&) {
            // An optimisation only: the chunks are removed below like any others.
        }
    }
    remove_run_files(shm_dir_, run_id_, disk_dir_, disk_fd_.get());
    if (!closing_now) return;
    try {
        finish_close();
    } catch (const StoreError& e) {
        if (e.code() != ErrorCode::Closed) throw;  // released already
    }
}

}  // namespace discomfort
