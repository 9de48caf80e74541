// Helpers for the C entry points that the Python tests call through ctypes (tests/cuda_emu/emu_harness.py).
// An entry point takes host pointers, copies inputs into guarded "device" buffers, calls the same launcher
// code the GPU build uses, and copies results back. Errors come back as a message, never as a crash.
#pragma once

#include "cuda_emu.h"

#include <cstdio>
#include <exception>
#include <string>

#define LATTICE_EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace lattice_emu {

// Runs f(); returns 0, or 1 with the exception's message in err[0:err_len].
template <typename F>
int guarded_call(char* err, size_t err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    if (err && err_len) std::snprintf(err, err_len, "%s", e.what());
  } catch (...) {
    if (err && err_len) std::snprintf(err, err_len, "unknown C++ exception");
  }
  return 1;
}

// A guarded device allocation (RAII). `label` names it in out-of-bounds reports.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t bytes, const char* label) : bytes_(bytes) { ptr_ = device_malloc(bytes, label); }
  // A device copy of host memory.
  DeviceBuffer(const void* host, size_t bytes, const char* label) : DeviceBuffer(bytes, label) {
    if (bytes) std::memcpy(ptr_, host, bytes);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~DeviceBuffer() { device_free(ptr_); }

  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }
  void to_host(void* host, size_t bytes) const {
    if (bytes > bytes_) throw std::runtime_error("DeviceBuffer::to_host: more bytes than the buffer holds");
    if (bytes) std::memcpy(host, ptr_, bytes);
  }
  void to_host(void* host) const { to_host(host, bytes_); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace lattice_emu
