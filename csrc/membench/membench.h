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

// sum of src[0, n) (so the reads cannot be optimised away). Multi-threaded, 4 accumulators per thread.
double stream_read_cpu(const float* src, int64_t n);

// Writes back and evicts every cache line of [p, p + bytes) from every cache level (clflushopt where the CPU has
// it, else clflush; then a fence), so the next read of those bytes comes from DRAM; the rest of the caches keeps
// its contents. Returns false (nothing done) off x86-64. Multi-threaded.
bool flush_cache_cpu(const void* p, int64_t bytes);

}  // namespace lazarus
