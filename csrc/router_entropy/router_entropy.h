// Why: the contract of the fused router-entropy kernels (CPU and CUDA share it): one pass over raw
// router logits gives each row's entropy and the column sums of the row distributions.
//
// `logits` is a dense row-major [rows, experts] array of `dtype` (fp32, fp16 bits or bf16 bits).
// Per row, with y = x (softmax scoring) or y = log sigmoid(x) (sigmoid scoring, DeepSeek-V3), the
// distribution is p = exp(y - max y) / Z, Z = sum exp(y - max y), and
//   entropy[r] = log Z - sum_j p_j (y_j - max y)   (nats, float32 [rows])
//   prob_sum[j] = sum_r p_rj                        (float64 [experts], OVERWRITTEN, summed in float64)
// -inf logits get probability 0. A row with no finite distribution (softmax: all -inf, or any +inf or
// NaN; sigmoid: all -inf, or a NaN) gives NaN, as softmax itself does, and its NaNs enter prob_sum.
// rows may be 0 (prob_sum is zeroed); experts must be >= 1. The CPU functions cannot fail for valid
// pointers and sizes; the caller (the binding) checks them. The CUDA launcher returns the error, if any.
#pragma once

#include <cstdint>

namespace lazarus {

enum class LogitDtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum class RouterScoring : int { kSoftmax = 0, kSigmoid = 1 };

void router_entropy_rows_cpu(const void* logits, LogitDtype dtype, int64_t rows, int64_t experts,
                             RouterScoring scoring, float* entropy, double* prob_sum);

#if defined(LAZARUS_WITH_CUDA)
// Device pointers; `stream` is a cudaStream_t passed as void*. prob_sum is zeroed on the stream, then
// accumulated with float64 atomics (so its last bits may differ between runs). Returns a cudaError_t
// as int (0 on success).
int router_entropy_rows_cuda(const void* logits, LogitDtype dtype, int64_t rows, int64_t experts,
                             RouterScoring scoring, float* entropy, double* prob_sum, void* stream);
#endif

namespace detail {
// The portable (non-SIMD) CPU path: the shared host/device arithmetic of router_entropy_math.h.
void router_entropy_rows_portable(const void* logits, LogitDtype dtype, int64_t rows, int64_t experts,
                                  RouterScoring scoring, float* entropy, double* prob_sum);
}  // namespace detail

}  // namespace lazarus
