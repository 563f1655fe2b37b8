// Why: the pieces every CPU kernel shares: chunked OpenMP loops and the fp32 / bf16 output sinks.
#pragma once

#include <algorithm>
#include <cstdint>

#include "float_bits.h"

// LZ_OMP(directive): `#pragma omp directive` when built with OpenMP (LAZARUS_WITH_OPENMP), nothing otherwise.
#if defined(LAZARUS_WITH_OPENMP)
#define LZ_PRAGMA(x) _Pragma(#x)
#define LZ_OMP(directive) LZ_PRAGMA(omp directive)
#else
#define LZ_OMP(directive)
#endif

namespace lazarus {

// Calls fn(begin, end) over [0, n) in chunks of `chunk`, the chunks spread over OpenMP threads.
template <typename RangeFn>
void parallel_for_chunks(int64_t n, int64_t chunk, RangeFn fn) {
  const int64_t n_chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t c = 0; c < n_chunks; ++c) fn(c * chunk, std::min(n, (c + 1) * chunk));
}

struct F32Sink {
  float* out;
  void store(int64_t i, float v) const { out[i] = v; }
};

// bf16 bits, round to nearest even (NaN kept quiet).
struct Bf16Sink {
  uint16_t* out;
  void store(int64_t i, float v) const { out[i] = float_to_bf16_bits(v); }
};

}  // namespace lazarus
