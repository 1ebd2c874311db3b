// After fork() the child holds copies of every handle's descriptors, which share the parent's
// OFD locks and flock. The child handler makes each handle let go of them (see
// Store::forget_after_fork); the child must attach again to use a run.
#include "fork.hpp"

#include <pthread.h>
#include <unistd.h>

#include <atomic>

#include <mutex>
#include <set>

#include "discomfort/store.hpp"

namespace discomfort {

namespace {

std::mutex& registry_mutex() {
    static std::mutex* mu = new std::mutex();  // never destroyed: handles may outlive statics
    return *mu;
}

std::set<Store*>& registry() {
    static std::set<Store*>* live = new std::set<Store*>();
    return *live;
}

std::atomic<int> g_pid{0};

// Held across fork() so that the child's copy of the registry is consistent.
void before_fork() { registry_mutex().lock(); }
void after_fork_in_parent() { registry_mutex().unlock(); }
void after_fork_in_child() {
    g_pid.store(int(::getpid()), std::memory_order_relaxed);
    forget_stores_after_fork();
    registry_mutex().unlock();
}

}  // namespace

void forget_stores_after_fork() noexcept {
    for (Store* store : registry()) store->forget_after_fork();
}

int current_pid() noexcept {
    int pid = g_pid.load(std::memory_order_relaxed);
    return pid ? pid : int(::getpid());
}

void track_store(Store* store, bool live) {
    static std::once_flag installed;
    std::call_once(installed, [] {
        g_pid.store(int(::getpid()), std::memory_order_relaxed);
        pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
    });
    std::lock_guard<std::mutex> lk(registry_mutex());
    if (live) {
        registry().insert(store);
    } else {
        registry().erase(store);
    }
}

}  // namespace discomfort
