"""C++ source of the combine's row ops in the threaded extension (part of
:data:`pimoe.moe.threaded_source.SOURCE`): ``gather_sum`` (the combine's forward and the gather's
backward) and ``combine_grad_rows`` (the combine's backward), float32, one pass over the rows."""

COMBINE_SOURCE = r"""
// out[t] = sum_j w[t, j] * src[slot[t, j]] for src [R, D], slot [T, k] long, w [T, k], all
// float32 -> [T, D]: a weighted sum of gathered rows without the [T * k, D] intermediate of
// index_select + bmm (the combine's forward, the gather's backward); tokens split between
// torch's threads, j summed in order.
at::Tensor gather_sum(const at::Tensor& src, const at::Tensor& slot, const at::Tensor& w) {
  TORCH_CHECK(src.dim() == 2 && slot.dim() == 2 && w.sizes() == slot.sizes() &&
              src.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
              slot.scalar_type() == at::kLong, "gather_sum: src [R, D] float32, slot [T, k] long, w [T, k] float32");
  auto rows = src.contiguous();
  auto index = slot.contiguous();
  auto weight = w.contiguous();
  const int64_t T = index.size(0), k = index.size(1), D = rows.size(1), R = rows.size(0);
  auto out = at::empty({T, D}, rows.options());
  std::atomic<bool> outside{false};
  const float* src_p = rows.data_ptr<float>();
  const int64_t* slot_p = index.data_ptr<int64_t>();
  const float* w_p = weight.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* __restrict__ o = out_p + t * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const float c = w_p[t * k + j];
        const int64_t r = slot_p[t * k + j];
        if (r < 0 || r >= R) {
          outside = true;
          continue;
        }
        const float* __restrict__ row = src_p + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += c * row[d];
      }
    }
  });
  TORCH_CHECK(!outside, "gather_sum: a slot is outside [0, ", R, ")");
  return out;
}

// The combine's backward for its rows, all float32: grad_y[r] = row_w[r] * grad_out[token[r]]
// and, when y is given ([R, D]), dots[r] = <y[r], grad_out[token[r]]> (the combine weights'
// gradient, before it is put back in [T, k] order); grad_out [T, D], token [R] long,
// row_w [R] -> (grad_y [R, D], dots [R] or [0]). One pass over the rows.
std::tuple<at::Tensor, at::Tensor> combine_grad_rows(
    const at::Tensor& grad_out, const at::Tensor& token, const at::Tensor& row_w,
    const at::Tensor& y) {
  TORCH_CHECK(grad_out.dim() == 2 && token.dim() == 1 && row_w.sizes() == token.sizes() &&
              grad_out.scalar_type() == at::kFloat && row_w.scalar_type() == at::kFloat &&
              token.scalar_type() == at::kLong,
              "combine_grad_rows: grad_out [T, D] float32, token [R] long, row_w [R] float32");
  const bool want_dots = y.numel() > 0;
  TORCH_CHECK(!want_dots || (y.dim() == 2 && y.size(0) == token.size(0) &&
                             y.size(1) == grad_out.size(1) && y.scalar_type() == at::kFloat),
              "combine_grad_rows: y must be [R, D] float32 (or empty)");
  auto g = grad_out.contiguous();
  auto rows = token.contiguous();
  auto w = row_w.contiguous();
  auto yc = y.contiguous();
  const int64_t T = g.size(0), D = g.size(1), R = rows.size(0);
  auto grad_y = rows_empty({R, D}, g.options());  // a training buffer
  auto dots = at::empty({want_dots ? R : 0}, g.options());
  const float* g_p = g.data_ptr<float>();
  const int64_t* t_p = rows.data_ptr<int64_t>();
  const float* w_p = w.data_ptr<float>();
  const float* y_p = want_dots ? yc.data_ptr<float>() : nullptr;
  float* gy_p = grad_y.data_ptr<float>();
  float* dot_p = want_dots ? dots.data_ptr<float>() : nullptr;
  std::atomic<bool> outside{false};
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = t_p[r];
      float* __restrict__ out = gy_p + r * D;
      if (t < 0 || t >= T) {
        outside = true;
        continue;
      }
      const float* __restrict__ src = g_p + t * D;
      const float c = w_p[r];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) out[d] = c * src[d];
      if (want_dots) {
        const float* __restrict__ yr = y_p + r * D;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += yr[d] * src[d];
        dot_p[r] = acc;
      }
    }
  });
  TORCH_CHECK(!outside, "combine_grad_rows: a token index is outside [0, ", T, ")");
  return {grad_y, dots};
}

"""
