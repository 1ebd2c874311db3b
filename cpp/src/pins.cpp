// Pins keep RAM extents allocated while private views of them are alive in this process.
// One pin entry per distinct extent, reference-counted here. Dropping the last reference
// happens in destructors (on any thread, maybe while this thread is inside an operation), so
// it never waits for the lock: the entry is freed now if the lock is free, else by the next
// holder when it lets go (Guard::~Guard drains).
#include <cstring>

#include "discomfort/errors.hpp"
#include "guard.hpp"

namespace discomfort {

PinRef& PinRef::operator=(PinRef&& other) noexcept {
    if (this != &other) {
        reset();
        store_ = std::move(other.store_);
        extent_ = other.extent_;
    }
    return *this;
}

void PinRef::reset() noexcept {
    if (!store_) return;
    std::shared_ptr<Store> store = std::move(store_);
    store_.reset();
    store->unpin(extent_);
}

PinRef Store::pin_locked(const Extent& extent, const std::string& key) {
    std::lock_guard<std::mutex> lk(pins_mu_);
    auto it = pins_.find(extent);
    if (it != pins_.end()) {
        ++it->second.count;  // revives one waiting to be freed, too
        return PinRef(shared_from_this(), extent);
    }
    uint32_t p = 0;
    while (p < kPinCapacity && __atomic_load_n(&pin_at(p)->state, __ATOMIC_ACQUIRE) != 0) ++p;
    if (p == kPinCapacity)
        throw StoreError(ErrorCode::StoreFull,
                         "run " + quoted(run_id_) + ": pin table full (4096 live views of distinct objects); cannot load " +
                             quoted(key) + " zero-copy: drop views of other loads, or load a copy");
    pins_[extent] = PinRec{p, 1};
    Update update(*this);
    PinEntry* pin = pin_at(p);
    pin->slot = slot_;
    pin->chunk = extent.chunk;
    pin->offset = extent.offset;
    pin->length = extent.length;
    set_pin_state(p, 1);
    // Made last: nothing after it may throw while pins_mu_ is held (its destructor takes it).
    return PinRef(shared_from_this(), extent);
}

bool Store::live_pins() const {
    std::lock_guard<std::mutex> lk(pins_mu_);
    for (const auto& kv : pins_)
        if (kv.second.count > 0) return true;
    return false;
}

void Store::unpin(const Extent& extent) noexcept {
    if (forked()) return;  // the parent's pins are the parent's; its mutexes may be held
    {
        std::lock_guard<std::mutex> lk(pins_mu_);
        auto it = pins_.find(extent);
        if (it == pins_.end() || it->second.count == 0) return;
        if (--it->second.count > 0) return;
        pending_.store(true);
    }
    if (released_) return;
    try {
        Guard guard(*this, Guard::kTry);  // drains when it got the lock
    } catch (...) {
    }
}

void Store::abort_later(uint32_t index, uint64_t file_id) noexcept {
    if (closed_ || released_ || forked()) return;  // a closing handle tombstones its reservations itself
    try {
        {
            std::lock_guard<std::mutex> lk(pins_mu_);
            pending_aborts_.emplace_back(index, file_id);
            pending_.store(true);
        }
        Guard guard(*this, Guard::kTry);
    } catch (...) {
    }
}

void Store::drain_locked() noexcept {
    if (!pending_.load() || released_) return;
    std::vector<std::pair<uint32_t, Extent>> unpins;
    std::vector<std::pair<uint32_t, uint64_t>> aborts;
    {
        std::lock_guard<std::mutex> lk(pins_mu_);
        pending_.store(false);
        for (auto it = pins_.begin(); it != pins_.end();) {
            if (it->second.count == 0) {
                unpins.emplace_back(it->second.index, it->first);
                it = pins_.erase(it);
            } else {
                ++it;
            }
        }
        aborts.swap(pending_aborts_);
    }
    if (unpins.empty() && aborts.empty()) return;
    try {
        Update update(*this);
        for (const auto& u : unpins) {
            PinEntry pin;
            std::memcpy(&pin, pin_at(u.first), sizeof pin);
            // Free it only while it is still ours: a repair may have reused it.
            if (pin.state == 1 && pin.slot == slot_ && Extent{pin.chunk, pin.offset, pin.length} == u.second)
                set_pin_state(u.first, 0);
        }
        for (const auto& a : aborts) {
            const ObjEntry* e = entry_at(a.first);
            if (entry_state(a.first) == kReserved && e->owner_slot == slot_ && e->file_id == a.second)
                tombstone(a.first);
        }
    } catch (...) {
        // Nothing here throws on a sane segment; on a damaged one the entries stay until repair.
    }
}

}  // namespace discomfort
