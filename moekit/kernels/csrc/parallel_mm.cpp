// Independent matrix products spread over torch's own OpenMP threads (see segment_mm.py).
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#include <exception>

#include "kernels.h"

// out[i] = a[i] @ b[i] for every i, then zero[j].zero_() for every j: each task on one thread (the products run
// single-threaded inside the parallel region), the largest first as the caller orders them. Each task owns its
// output, so results do not depend on which thread ran what.
void mm_tasks(std::vector<at::Tensor> a, std::vector<at::Tensor> b, std::vector<at::Tensor> out,
              std::vector<at::Tensor> zero, int64_t threads) {
  TORCH_CHECK(a.size() == b.size() && b.size() == out.size(), "mm_tasks: a, b and out differ in length");
  const int64_t n_mm = static_cast<int64_t>(a.size()), n = n_mm + static_cast<int64_t>(zero.size());
  std::exception_ptr error;
  // inference mode is per thread too: under the caller's, outputs made in it are inference tensors that only code
  // in inference mode may write
  const bool inference = c10::InferenceMode::is_enabled();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    try {
      c10::InferenceMode inference_mode(inference);
      c10::NoGradGuard no_grad;  // grad mode is per thread: these out= products are not for autograd to record
      if (i < n_mm)
        at::mm_out(out[i], a[i], b[i]);
      else
        zero[i - n_mm].zero_();
    } catch (...) {
#pragma omp critical
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}
