// Why: a worksharing loop that gives every thread one long contiguous run of items (one unbroken stream of weight
// rows for the prefetchers) and still ends balanced: a thread that finishes its own run takes the remaining items
// of the others from their far end, one at a time. OpenMP's schedules give one or the other: static and guided
// commit half the items to one thread at once on two threads (a thread 6 % slower then ends 40-120 us behind at
// T=1), dynamic interleaves the threads item by item.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>

#if defined(LAZARUS_WITH_OPENMP)
#include <omp.h>
#endif

namespace lazarus {

class SharedRuns {
 public:
  // Items [0, n) in `runs` contiguous runs of (nearly) equal length; `runs` is the team size of the parallel
  // region that will call for_each (the extra runs of a smaller team are taken by its threads as others' items).
  SharedRuns(int64_t n, int runs) : runs_(runs < 1 ? 1 : runs), run_(new Run[static_cast<size_t>(runs_)]) {
    if (n < 0 || n >= (int64_t{1} << 32)) throw std::invalid_argument("SharedRuns: items must be in [0, 2^32)");
    for (int r = 0; r < runs_; ++r) {
      const uint64_t lo = static_cast<uint64_t>(n * r / runs_), hi = static_cast<uint64_t>(n * (r + 1) / runs_);
      run_[r].bounds.store(lo | (hi << 32), std::memory_order_relaxed);
    }
  }

  // The team size a parallel region without a num_threads clause gets (1 without OpenMP).
  static int team_size() {
#if defined(LAZARUS_WITH_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
  }

  // The team's threads each call for_each(fn) once (inside one parallel region, no implicit barrier): fn(item)
  // runs exactly once per item over the team. Thread t runs run t front to back, then the items left in the
  // other runs, back to front.
  template <typename Fn>
  void for_each(Fn fn) {
#if defined(LAZARUS_WITH_OPENMP)
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    int64_t it;
    if (tid < runs_)
      while (take(run_[tid].bounds, /*front=*/true, &it)) fn(it);
    for (int k = 1; k <= runs_; ++k) {
      const int r = (tid + k) % runs_;
      while (take(run_[r].bounds, /*front=*/false, &it)) fn(it);
    }
  }

  // The item run r would hand out next from its front, or -1 when it is empty (a snapshot: other threads may take
  // it meanwhile).
  int64_t front(int r) const {
    if (r < 0 || r >= runs_) return -1;
    const uint64_t v = run_[r].bounds.load(std::memory_order_relaxed), lo = v & 0xFFFFFFFFu, hi = v >> 32;
    return lo < hi ? static_cast<int64_t>(lo) : -1;
  }

 private:
  struct alignas(64) Run {
    std::atomic<uint64_t> bounds{0};  // lo in the low 32 bits, hi (exclusive) in the high 32 bits
  };

  // The next item of a run from its front (its owner) or its back (the others).
  static bool take(std::atomic<uint64_t>& bounds, bool front, int64_t* item) {
    uint64_t v = bounds.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = v & 0xFFFFFFFFu, hi = v >> 32;
      if (lo >= hi) return false;
      const uint64_t next = front ? ((lo + 1) | (hi << 32)) : (lo | ((hi - 1) << 32));
      if (bounds.compare_exchange_weak(v, next, std::memory_order_relaxed)) {
        *item = static_cast<int64_t>(front ? lo : hi - 1);
        return true;
      }
    }
  }

  int runs_;
  std::unique_ptr<Run[]> run_;
};

}  // namespace lazarus
