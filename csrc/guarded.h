// How the C ABI functions of csrc/ report errors: a C++ exception never crosses into Rust.
#pragma once

#include <exception>
#include <string>

namespace sp {
// Runs `f`: nullptr on success, else the exception's message (thread-local, valid until the next failure on this
// thread).
template <typename F>
const char* guarded(F&& f) {
  static thread_local std::string last_error;
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return last_error.c_str();
}
}  // namespace sp
