// The one exception type of the store. The Python binding translates each code into the
// class of the same name in discomfort.errors; C++ never defines Python exception classes.
#pragma once

#include <stdexcept>
#include <string>

namespace discomfort {

enum class ErrorCode {
    UnknownKey,       // UnknownKeyError
    UnknownRun,       // UnknownRunError
    RunFinished,      // RunFinishedError
    InvalidKey,       // InvalidKeyError
    InvalidRunId,     // InvalidRunIdError
    StoreFull,        // StoreFullError
    DiskFull,         // DiskFullError
    Corrupted,        // CorruptedStoreError
    Access,           // StoreAccessError
    UnsafeDirectory,  // UnsafeDirectoryError (a StoreAccessError)
    Closed,           // StoreClosedError
    Truncated,        // TruncatedStoreError (a CorruptedStoreError)
    InvalidArgument,  // ValueError
    System,           // OSError carrying errno
};

class StoreError : public std::runtime_error {
public:
    StoreError(ErrorCode code, const std::string& message, int err = 0)
        : std::runtime_error(message), code_(code), errno_(err) {}

    ErrorCode code() const noexcept { return code_; }
    int error_number() const noexcept { return errno_; }

private:
    ErrorCode code_;
    int errno_;
};

// An OSError for a failed system call: "what: strerror(err)".
[[noreturn]] void throw_system(const std::string& what, int err);

}  // namespace discomfort
