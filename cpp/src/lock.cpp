// The metadata lock (mutex + OFD lock) and the update protocol; see guard.hpp.
#include <stdexcept>

#include "discomfort/errors.hpp"
#include "guard.hpp"

namespace discomfort {

Store::Guard::Guard(Store& store, Mode mode) : s_(store) {
    if (!acquire_mutex(mode)) return;
    if (s_.released_) {
        release_mutex();
        if (mode == kWait) throw StoreError(ErrorCode::Closed, "store of run " + quoted(s_.run_id_) + " is closed");
        return;
    }
    const int fd = s_.ctl_fd_.get();
    bool locked = false;
    try {
        if (mode == kWait) {
            ofd_lock_wait(fd, kMetaLockByte);
            locked = true;
        } else {
            locked = ofd_try_lock(fd, kMetaLockByte);
        }
    } catch (...) {
        release_mutex();
        if (mode == kWait) throw;
        return;
    }
    if (!locked) {
        release_mutex();
        return;
    }
    held_ = true;
    if (__atomic_load_n(&s_.header()->dirty, __ATOMIC_ACQUIRE) == 0) return;
    try {
        s_.repair();
    } catch (...) {
        if (mode == kWait) {
            ofd_unlock(fd, kMetaLockByte);
            held_ = false;
            release_mutex();
            throw;
        }
        // kTry comes from a destructor: the next operation will meet the damage and report it.
    }
}

bool Store::Guard::acquire_mutex(Mode mode) {
    // A thread that already holds the mutex must never wait for it again. Only a destructor
    // (kTry) can get here that way: it leaves its work for the holder to drain.
    if (s_.mu_owner_.load() == std::this_thread::get_id()) {
        if (mode == kWait) throw std::logic_error("discomfort: store lock taken twice by one thread");
        return false;
    }
    if (mode == kWait) {
        s_.mu_.lock();
    } else if (!s_.mu_.try_lock()) {
        return false;
    }
    s_.mu_owner_.store(std::this_thread::get_id());
    return true;
}

void Store::Guard::release_mutex() {
    s_.mu_owner_.store(std::thread::id());
    s_.mu_.unlock();
}

Store::Guard::~Guard() {
    if (!held_) return;
    s_.drain_locked();
    if (s_.closing_ && !s_.released_ && !s_.live_pins()) s_.release_locked();
    if (!s_.released_) ofd_unlock(s_.ctl_fd_.get(), kMetaLockByte);
    release_mutex();
    // Work deferred by a destructor on another thread while we held the lock.
    if (s_.has_pending() && !s_.released_) Guard again(s_, kTry);
}

Store::Update::Update(Store& store) : s_(store) {
    if (s_.update_depth_++ == 0) __atomic_store_n(&s_.header()->dirty, 1u, __ATOMIC_SEQ_CST);
}

Store::Update::~Update() {
    if (--s_.update_depth_ != 0) return;
    Header* h = s_.header();
    // A cache that followed this update stays valid for the epoch it ends with.
    if (s_.cache_fresh()) {
        s_.cache_.epoch = h->epoch + 1;
    } else {
        s_.cache_.valid = false;
    }
    __atomic_store_n(&h->epoch, h->epoch + 1, __ATOMIC_RELEASE);
    __atomic_store_n(&h->dirty, 0u, __ATOMIC_SEQ_CST);
}

}  // namespace discomfort
