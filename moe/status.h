// Status values for run-time errors, and the exception used only at the library's edge.
//
// Every validation returns a Status that names the argument, the expectation and what was
// found; a failed validation happens before any output is written.
#pragma once

#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace moe {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,    // a shape, rank, dtype, value or combination the op does not accept
  kUnsupported,        // valid in principle, but not available in this build or on this device
  kWorkspaceTooSmall,  // the caller's workspace is smaller than workspace_bytes()
  kCudaError,          // a CUDA API call or launch failed
  kAborted,            // a collective was abandoned: another rank of the group left or failed
  kInternal,
};

constexpr std::string_view to_string(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "ok";
    case StatusCode::kInvalidArgument: return "invalid argument";
    case StatusCode::kUnsupported: return "unsupported";
    case StatusCode::kWorkspaceTooSmall: return "workspace too small";
    case StatusCode::kCudaError: return "CUDA error";
    case StatusCode::kAborted: return "aborted";
    case StatusCode::kInternal: return "internal error";
  }
  return "unknown";
}

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok() { return {}; }
  bool is_ok() const { return code_ == StatusCode::kOk; }
  explicit operator bool() const { return is_ok(); }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string to_string() const {
    return is_ok() ? std::string("ok") : std::string(moe::to_string(code_)) + ": " + message_;
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// Builds a message from streamable pieces: invalid_argument("w13: expected ", 3, " dims").
template <class... Parts>
Status make_status(StatusCode code, const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return Status(code, os.str());
}
template <class... Parts>
Status invalid_argument(const Parts&... parts) {
  return make_status(StatusCode::kInvalidArgument, parts...);
}
template <class... Parts>
Status aborted(const Parts&... parts) {
  return make_status(StatusCode::kAborted, parts...);
}
template <class... Parts>
Status unsupported(const Parts&... parts) {
  return make_status(StatusCode::kUnsupported, parts...);
}

class Error : public std::runtime_error {
 public:
  explicit Error(const Status& status) : std::runtime_error(status.to_string()), code_(status.code()) {}
  StatusCode code() const { return code_; }

 private:
  StatusCode code_;
};

// Throws moe::Error when `status` is not ok; for callers that prefer exceptions.
inline void check(const Status& status) {
  if (!status.is_ok()) throw Error(status);
}

// The workspace a caller gave against the bytes workspace_bytes() asked for.
inline Status check_workspace(std::size_t given, std::size_t needed) {
  if (given < needed) {
    return make_status(StatusCode::kWorkspaceTooSmall, "workspace: expected at least ", needed,
                       " bytes (workspace_bytes()), got ", given);
  }
  return Status::ok();
}

}  // namespace moe

#define MOE_RETURN_IF_ERROR(expr)                 \
  do {                                            \
    ::moe::Status moe_status_ = (expr);           \
    if (!moe_status_.is_ok()) return moe_status_; \
  } while (0)
