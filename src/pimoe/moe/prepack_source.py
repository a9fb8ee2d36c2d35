"""C++ source of the threaded kernel's inference on expert weights prepacked by oneDNN (part of
:data:`pimoe.moe.threaded_source.SOURCE`, after the kernels it reuses; :mod:`pimoe.moe.prepack`
calls it): ``packed_rows_mm``, ``packed_ffn_forward``, ``packed_expert_major_forward``."""

PREPACK_SOURCE = r"""
// out[rows of e] = a[rows of e] @ W_e^T for E weights W_e [M, K] prepacked by oneDNN -> [N, M]
at::Tensor packed_rows_mm(const at::Tensor& a, const std::vector<at::Tensor>& packed,
                          const std::vector<int64_t>& splits) {
  TORCH_CHECK(a.dim() == 2 && !packed.empty() && packed.size() == splits.size(),
              "packed_rows_mm: ", packed.size(), " packed weights for ", splits.size(), " experts");
  auto x = a.contiguous();
  auto out = at::empty({x.size(0), packed[0].size(0)}, x.options());
  std::vector<int64_t> start;
  auto order = order_of(splits, start);
  each_on_one_thread((int64_t)order.size(), [&](int64_t i) {
    const int64_t e = order[i];
    if (splits[e] == 0) return;
    out.narrow(0, start[e], splits[e]).copy_(onednn_linear(x.narrow(0, start[e], splits[e]), packed[e]));
  });
  return out;
}

// ffn_forward's y on weights prepacked by oneDNN (packed: w_in[e] for every e, then w_out[e])
at::Tensor packed_ffn_forward(const at::Tensor& x, const std::vector<at::Tensor>& packed,
                              const std::vector<int64_t>& splits, const std::string& act_name) {
  TORCH_CHECK(packed.size() == 2 * splits.size(), "packed_ffn_forward: ", packed.size(),
              " packed weights for ", splits.size(), " experts");
  return std::get<0>(forward_rows(x, Projections{{}, {}, packed}, splits, act_name, false));
}

// expert_major_forward on weights prepacked by oneDNN (as packed_ffn_forward's)
at::Tensor packed_expert_major_forward(
    const at::Tensor& x, const at::Tensor& token_rows, const at::Tensor& row_weights,
    const std::vector<at::Tensor>& packed, const std::vector<int64_t>& splits,
    const std::string& act_name, int64_t chunk_rows) {
  TORCH_CHECK(packed.size() == 2 * splits.size(), "packed_expert_major_forward: ",
              packed.size(), " packed weights for ", splits.size(), " experts");
  return expert_major_rows(x, token_rows, row_weights, Projections{{}, {}, packed}, splits,
                           act_name, chunk_rows);
}
"""
