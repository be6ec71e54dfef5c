// Few-row products over weight rows (see kernels.h).
#include "kernels.h"

// Few-row segments: rows [start, start + count) of x (sorted by expert) times expert e's matrix, into the same rows
// of y. w [E, N, K] contiguous; x [S, K] and y [S, N] contiguous.
void segment_gemm(at::Tensor w, at::Tensor x, at::Tensor experts, at::Tensor starts,
                  at::Tensor counts, at::Tensor y, int64_t threads) {
  check_fp32(w, "w"), check_fp32(x, "x"), check_fp32(y, "y");
  TORCH_CHECK(w.is_contiguous() && x.is_contiguous() && y.is_contiguous(), "segment_gemm: contiguous only");
  TORCH_CHECK(w.dim() == 3 && x.dim() == 2 && w.size(2) == x.size(1), "segment_gemm: shapes");
  const int64_t n_len = w.size(1), k_len = w.size(2);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == n_len, "segment_gemm: output shape");
  const int64_t* ep = experts.data_ptr<int64_t>();
  const int64_t* sp = starts.data_ptr<int64_t>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  std::vector<Task> tasks;
  for (int64_t i = 0; i < experts.size(0); ++i) {
    TORCH_CHECK(ep[i] >= 0 && ep[i] < w.size(0) && sp[i] >= 0 && cp[i] >= 0 && sp[i] + cp[i] <= x.size(0),
                "segment_gemm: ranges");
    tasks.push_back({w.data_ptr<float>() + ep[i] * n_len * k_len, n_len, x.data_ptr<float>() + sp[i] * k_len, k_len,
                     cp[i], y.data_ptr<float>() + sp[i] * n_len, n_len});
  }
  run_tasks(tasks, k_len, threads);
}

// One row per task: y[r] = w[ids[r]] @ x[r]. w [E, N, K] contiguous; x [R, K] with unit inner stride and any row
// stride (0: one row shared by all, as the k experts of one token share it); y [R, N] contiguous.
void gather_gemv(at::Tensor w, at::Tensor x, at::Tensor ids, at::Tensor y, int64_t threads) {
  check_fp32(w, "w"), check_fp32(x, "x"), check_fp32(y, "y");
  TORCH_CHECK(w.is_contiguous() && y.is_contiguous() && x.dim() == 2 && x.stride(1) == 1, "gather_gemv: layout");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == x.size(1) && ids.dim() == 1 && ids.size(0) == x.size(0), "gather_gemv: shapes");
  const int64_t n_len = w.size(1), k_len = w.size(2);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == n_len, "gather_gemv: output shape");
  TORCH_CHECK(ids.dtype() == at::kLong && ids.is_contiguous() && ids.device().is_cpu(), "gather_gemv: ids");
  const int64_t* ip = ids.data_ptr<int64_t>();
  std::vector<Task> tasks;
  for (int64_t r = 0; r < ids.size(0); ++r) {
    TORCH_CHECK(ip[r] >= 0 && ip[r] < w.size(0), "gather_gemv: expert id out of range");
    tasks.push_back({w.data_ptr<float>() + ip[r] * n_len * k_len, n_len, x.data_ptr<float>() + r * x.stride(0), 0, 1,
                     y.data_ptr<float>() + r * n_len, 0});
  }
  run_tasks(tasks, k_len, threads);
}

// Several linear layers on the same input row in one pass: ys[i] = ws[i] @ x. ws[i] [N_i, K] and ys[i] [N_i]
// contiguous, x [K] contiguous.
void linear_gemv(std::vector<at::Tensor> ws, at::Tensor x, std::vector<at::Tensor> ys, int64_t threads) {
  check_fp32(x, "x");
  TORCH_CHECK(x.is_contiguous() && x.dim() == 1 && ws.size() == ys.size(), "linear_gemv: shapes");
  std::vector<Task> tasks;
  for (size_t i = 0; i < ws.size(); ++i) {
    check_fp32(ws[i], "w"), check_fp32(ys[i], "y");
    TORCH_CHECK(ws[i].is_contiguous() && ws[i].dim() == 2 && ws[i].size(1) == x.size(0), "linear_gemv: weight");
    TORCH_CHECK(ys[i].is_contiguous() && ys[i].numel() == ws[i].size(0), "linear_gemv: output");
    tasks.push_back({ws[i].data_ptr<float>(), ws[i].size(0), x.data_ptr<float>(), 0, 1, ys[i].data_ptr<float>(), 0});
  }
  run_tasks(tasks, x.size(0), threads);
}

