// Internal to the store: the live handles of this process, for the fork handler.
#pragma once

namespace discomfort {

class Store;

// Add or remove a live handle; the first call installs the pthread_atfork handler.
void track_store(Store* store, bool live);

// The fork handler's work in the child: every live handle lets go of the parent's locks.
void forget_stores_after_fork() noexcept;

// getpid() without a system call: cached, and refreshed by the fork handler in the child (glibc
// no longer caches it, and every store call checks it). Valid once a Store has been made.
int current_pid() noexcept;

}  // namespace discomfort
