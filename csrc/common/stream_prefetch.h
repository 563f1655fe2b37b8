// Why: the software prefetch of the CPU kernels that stream weights from DRAM, in one place: the distances
// along a streamed row (the GEMVs' prefetch_stream, and the read probe's policy that mirrors it), and the sweep
// of the T=1 factor kernels, which read a group of rows side by side (a few concurrent streams, each starting
// cold in the hardware prefetcher) while the next group's rows, one contiguous region, are swept into L2 at the
// loop's own pace, so that group starts from L2.
#pragma once

#include <cstdint>

namespace lazarus {

// Software prefetch distances along a streamed weight row: into L1, and the farther one into L2. On an AMD Zen 4
// host (the T=1 forward, cold, in-process A/B, two runs each) 6 KB / 16 KB ran 5.6-6.0 % faster than the 2 KB /
// 8 KB these were before; against it 4 KB / 8 KB took 1.011-1.034x as long, 6 KB / 8 KB 1.019-1.031x, 4 KB /
// 16 KB 1.004-1.025x, 8 KB / 16 KB 1.015-1.018x, and 6 KB / 24 KB about the same (0.992-0.997x). 2 KB / 8 KB had
// been chosen on an Intel AVX-512 host, where 1 or 3 KB and 6 or 12 KB ran within 1 % of it (16 KB into L2 did
// worse there); Zen 3, which runs no far prefetch, found the L1 one 4 KB ahead no better than 2 KB. Neither host
// has been measured at 6 KB / 16 KB.
constexpr int64_t kStreamAhead = 6144;
constexpr int64_t kStreamAheadL2 = 16384;

}  // namespace lazarus

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace lazarus {
namespace simd {

// Sweeps [next, end) into L2 (prefetcht1), `bytes` per call of step(): a loop that reads a group of rows in
// steps calls it once per step with the bytes it reads, and the sweep covers the next group, of the same size,
// as the loop ends (when the rows cover the full width). Nothing is fetched at or past `end`.
//
// Measured on AMD Zen 4 (2 vCPUs, the T=1 forward at the gpt-oss-20b layer shape, cold, in-process A/B): the
// expand passes of 2 rank rows with it, 4-5.5 % faster than 8-row passes without; the one-token shrink rows (4
// side by side) with it, 6-9 % faster on top of that. Per-stream prefetches 1 KB ahead into L1 or 4 KB ahead
// into L2 had not helped the expand (3 % slower, no change).
// Asks for [p, p + bytes) in L2 (prefetcht1 per 64-byte line), returning at once: a stage of
// the one-call forward fetches the bytes it will read first while the threads still work on the stage before it.
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t k = 0; k < bytes; k += 64) _mm_prefetch(c + k, _MM_HINT_T1);
}

class SweepAhead {
 public:
  SweepAhead(const void* next, const void* end)
      : next_(reinterpret_cast<uintptr_t>(next)), end_(reinterpret_cast<uintptr_t>(end)) {}

  void step(int64_t bytes) {
    if (next_ >= end_) return;
    for (int64_t k = 0; k < bytes; k += 64) _mm_prefetch(reinterpret_cast<const char*>(next_ + k), _MM_HINT_T1);
    next_ += static_cast<uintptr_t>(bytes);
  }

 private:
  uintptr_t next_, end_;
};

}  // namespace simd
}  // namespace lazarus

#endif
