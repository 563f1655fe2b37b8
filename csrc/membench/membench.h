// Why: memory-bandwidth probes for the benchmark floors (not ops). A floor must bound what any kernel
// can reach, so the write and copy probes use non-temporal (streaming) stores, which skip the
// read-for-ownership a normal store pays and beat torch's copy_ by up to ~2x on the write side.
#pragma once

#include <cstdint>

namespace lazarus {

// dst[i] = value for i in [0, n), non-temporal stores (AVX2) where available. Multi-threaded (OpenMP).
void stream_fill_cpu(float* dst, int64_t n, float value);

// dst[i] = src[i], streaming loads, non-temporal stores. Multi-threaded.
void stream_copy_cpu(const float* src, float* dst, int64_t n);

// Software prefetch of stream_read_cpu: none, each line 2 KB ahead into L1, or that and 8 KB ahead into L2, or
// the GEMVs' own distances (kStreamAhead into L1 and kStreamAheadL2 into L2, common/stream_prefetch.h).
constexpr int kPrefetchNone = 0, kPrefetchL1 = 1, kPrefetchL1L2 = 2, kPrefetchKernels = 3;

// sum of src[0, n) (so the reads cannot be optimised away), for the read floor. Multi-threaded; each thread reads
// 2 streams of its 1 MiB items at once with the software prefetch `policy` (a kPrefetch* value; which is
// fastest depends on the CPU: L1 + L2 on the Intel host measured, none on the AMD Zen 3 one).
double stream_read_cpu(const float* src, int64_t n, int policy = kPrefetchL1L2);

// Writes back and evicts every cache line of [p, p + bytes) from every cache level (clflushopt where the CPU has
// it, else clflush; then a fence), so the next read of those bytes comes from DRAM; the rest of the caches keeps
// its contents. Returns false (nothing done) off x86-64. Multi-threaded.
bool flush_cache_cpu(const void* p, int64_t bytes);

// The integer kernels' compute floor: every thread runs `iters` steps of 12 independent u8 x s8 dot-product
// instructions (zmm vpdpbusd with AVX-512 VNNI, else ymm vpdpbusd with AVX-VNNI, else ymm vpmaddubsw with AVX2,
// the instruction of the AVX2 integer kernels). Returns the multiply-adds done over all threads (0, nothing run,
// where none is available), so the caller's timing gives the best u8 x s8 multiply-add rate the cores reach.
// Multi-threaded.
int64_t int8_dot_loop_cpu(int64_t iters);

}  // namespace lazarus
