// The fastest read of memory this machine does the way moekit's kernels read weights: every thread sums its share of
// a large buffer as four sequential streams side by side (its quarters), with AVX2 loads. The benchmarks' floors take
// their bandwidth from this (benchmarks/common.py): a plain torch.sum reads one stream per thread and runs slower
// than moekit's own decode, which would understate the distance to the hardware.
#include "kernels.h"

double read_probe(at::Tensor x, int64_t threads) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(), "read_probe: fp32 contiguous CPU");
  const float* p = x.data_ptr<float>();
  const int64_t n = x.numel();
  double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    int64_t t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    const int64_t share = (n / nt) / 32 * 32;
    const int64_t begin = t * share, end = t == nt - 1 ? n : begin + share;
    const int64_t quarter = (end - begin) / 4 / 16 * 16;
    const float* s[4] = {p + begin, p + begin + quarter, p + begin + 2 * quarter, p + begin + 3 * quarter};
    float sum = 0.f;
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (; i < quarter; i += 16)
      for (int j = 0; j < 4; ++j) {
        acc[2 * j] = _mm256_add_ps(acc[2 * j], _mm256_loadu_ps(s[j] + i));
        acc[2 * j + 1] = _mm256_add_ps(acc[2 * j + 1], _mm256_loadu_ps(s[j] + i + 8));
      }
    float buf[8];
    for (int j = 1; j < 8; ++j) acc[0] = _mm256_add_ps(acc[0], acc[j]);
    _mm256_storeu_ps(buf, acc[0]);
    for (float v : buf) sum += v;
#endif
    for (; i < quarter; ++i)
      for (int j = 0; j < 4; ++j) sum += s[j][i];
    for (int64_t r = begin + 4 * quarter; r < end; ++r) sum += p[r];
    total += sum;
  }
  return total;
}
