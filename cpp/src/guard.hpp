// Internal to the store: the metadata lock and the metadata-update protocol.
#pragma once

#include "discomfort/store.hpp"

namespace discomfort {

// Holds the metadata lock: the handle's mutex, then the OFD write lock on kMetaLockByte.
// Taking it repairs the tables when a previous holder died inside an update. Letting it go
// first runs the deferred work (unpins, aborts) and, for a closing handle whose last view is
// gone, gives the slot back.
class Store::Guard {
public:
    enum Mode {
        kWait,  // block until held; StoreClosedError once the handle is released
        kTry,   // never block: held() tells whether it was taken
    };
    explicit Guard(Store& store, Mode mode = kWait);
    ~Guard();
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;
    bool held() const { return held_; }

private:
    bool acquire_mutex(Mode mode);
    void release_mutex();

    Store& s_;
    bool held_ = false;
};

// One metadata update: dirty = 1, the changes, epoch += 1, dirty = 0. Nested updates join the
// outer one. A holder that dies in between leaves dirty set, and the next locker repairs.
class Store::Update {
public:
    explicit Update(Store& store);
    ~Update();
    Update(const Update&) = delete;
    Update& operator=(const Update&) = delete;

private:
    Store& s_;
};

}  // namespace discomfort
