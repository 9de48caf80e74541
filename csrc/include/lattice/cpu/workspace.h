// Grow-only scratch buffers reused across calls (the backward's sort keys, payloads, histograms,
// segment starts): after the first training step no allocation and no page fault is paid for them.
//
// A process-wide workspace is leased under a mutex; a call that finds it busy (another thread is in a
// backward at the same time) gets a private one for that call instead of waiting, so it is thread safe.
#pragma once

#include <c10/util/Exception.h>

#include "lattice/cpu/huge_pages.h"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

namespace lattice {
namespace cpu {

class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // A buffer of at least `bytes` bytes (64-byte aligned) for `slot`; contents are unspecified.
  void* get(size_t slot, size_t bytes) {
    if (slot >= buffers_.size()) buffers_.resize(slot + 1);
    Buffer& b = buffers_[slot];
    if (b.capacity < bytes || !b.data) {
      // Grow by 1.25x so slowly growing batches do not reallocate every step; large buffers start on a
      // huge-page boundary and ask for huge pages before their first touch.
      const size_t grown = bytes + bytes / 4 + 64;
      const size_t align = grown >= kHugeMinBytes ? kHugePageBytes : 64;
      const size_t want = (grown + align - 1) / align * align;
      void* p = std::aligned_alloc(align, want);
      TORCH_CHECK(p != nullptr, "lattice: out of memory allocating a ", want, "-byte kernel workspace");
      if (want >= kHugeMinBytes) advise_huge_pages(p, want);
      b.data.reset(p);
      b.capacity = want;
    }
    return b.data.get();
  }

  template <typename T>
  T* get(size_t slot, size_t count) {
    return static_cast<T*>(get(slot, count * sizeof(T) + 1));
  }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  struct Buffer {
    std::unique_ptr<void, Free> data;
    size_t capacity = 0;
  };
  std::vector<Buffer> buffers_;
};

// The shared workspace if free, else a private one for the lease's lifetime.
class WorkspaceLease {
 public:
  explicit WorkspaceLease(std::mutex& mu, Workspace& shared) : lock_(mu, std::try_to_lock) {
    if (lock_.owns_lock()) {
      ws_ = &shared;
    } else {
      local_ = std::make_unique<Workspace>();
      ws_ = local_.get();
    }
  }
  Workspace& operator*() { return *ws_; }
  Workspace* operator->() { return ws_; }

 private:
  std::unique_lock<std::mutex> lock_;
  std::unique_ptr<Workspace> local_;
  Workspace* ws_ = nullptr;
};

}  // namespace cpu
}  // namespace lattice
