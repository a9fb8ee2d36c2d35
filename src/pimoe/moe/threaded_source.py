"""C++ source of the expert-parallel CPU kernel (:mod:`pimoe.moe.threaded`): one translation unit of
the includes, the gradient pool (:mod:`pimoe.moe.threaded_pool_source`), the combine's row ops
(:mod:`pimoe.moe.combine_source`), the activations (:mod:`pimoe.moe.activation_source`) and the
kernels below.

Entry points (the rows of ``x`` grouped by expert, ``splits`` rows per expert, a list):

- ``ffn_forward(x [N, D], w_in [E, F_in, D], w_out [E, D, F], splits, act, keep_hidden)``
  -> ``(y [N, D], h [N, F_in] or [0, F_in])``: per expert, in one thread, ``h = x_e @ w_in[e].T``,
  ``a = act(h)``, ``y_e = a @ w_out[e].T`` while the expert's rows are in cache;
- ``ffn_backward(grad_y [N, D], x, w_in, w_out, h, splits, act, need_x, need_w_in, need_w_out)``
  -> ``(grad_x, grad_w_in, grad_w_out)`` (``[0]`` where not needed; zero weight gradients for
  an expert without rows);
- ``expert_major_forward(x [T, D], token_rows [R], row_weights [R], w_in, w_out, splits, act,
  chunk_rows)`` -> ``[T, D]``: inference from gather to weighted sum, whole experts per thread;
- ``gather_sum(src [R, D], slot [T, k], w [T, k])`` -> ``[T, D]``: ``sum_j w[t, j] *
  src[slot[t, j]]`` in float32 (the combine's forward and the gather's backward);
- ``combine_grad_rows(grad_out, token [R], row_w [R], y [R, D] or empty)`` -> ``(grad_y,
  dots)``: the combine's backward in one pass over the rows (float32);
- ``gather_rows(x [T, D], index [R])`` -> ``x[index]`` ``[R, D]`` in a row buffer of the pool
  (training's gather);
- ``release_pool()`` / ``pool_kept_bytes()`` / ``set_row_pool(on)``: the buffer pool of weight
  gradients and training's row buffers;
- ``set_expert_matmul(name)``: which library runs the float32 matmuls on plain weights
  (``avx512``, ``onednn``, ``mkl``: :mod:`pimoe.moe.matmul_choice`); ``avx512_mm_out(out, a, b)``:
  the own AVX-512 matmul alone (tests, benchmarks);
- ``rows_mm`` and ``weights_mm``: single matmuls per expert, for activations given as Python
  functions (``ffn_*`` take one of ``swiglu``, ``gelu``, ``relu``, ``silu`` by name);
- ``packed_ffn_forward``, ``packed_expert_major_forward``, ``packed_rows_mm``: inference on
  expert weights prepacked by oneDNN (:mod:`pimoe.moe.prepack`; a list of packed weights per
  expert instead of ``w_in`` / ``w_out``).

The activations and their gradients are the ATen calls autograd makes for pimoe's Python
activations (``silu(gate) * up``; ``silu_backward``, ``gelu_backward``, ``threshold_backward``),
on the same per-expert tensors as the per-expert loop; with ``set_expert_matmul("mkl")`` the
matmuls are ``at::mm`` too and the results are the loop's bit for bit; with the own kernel or
oneDNN they agree to float rounding.
"""

from pimoe.moe.activation_source import ACTIVATION_SOURCE
from pimoe.moe.combine_source import COMBINE_SOURCE
from pimoe.moe.gemm_source import GEMM_SOURCE
from pimoe.moe.prepack_source import PREPACK_SOURCE
from pimoe.moe.threaded_pool_source import POOL_SOURCE

_INCLUDES = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <list>
#include <mutex>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

"""

SOURCE = (
    _INCLUDES
    + POOL_SOURCE
    + COMBINE_SOURCE
    + ACTIVATION_SOURCE
    + GEMM_SOURCE
    + r"""
// Experts with rows, largest first (threads take them in this order), and each expert's first row.
static std::vector<int64_t> order_of(const std::vector<int64_t>& splits, std::vector<int64_t>& start) {
  const int64_t E = (int64_t)splits.size();
  start.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + splits[e];
  std::vector<int64_t> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return splits[a] > splits[b]; });
  return order;
}

// Run job(i) for i in [0, n), each i on one thread, threads taking the next i from a counter.
// Below autograd on every thread (worker threads do not share the caller's grad or inference
// mode; the Python caller is the autograd node).
template <typename F>
static void each_on_one_thread(int64_t n, const F& job) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = next++; i < n; i = next++) job(i);
  });
}

// out[rows of e] = a[rows of e] @ b[e] for a [N, K], b [E, K, M] (any strides) -> [N, M]
at::Tensor rows_mm(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& splits) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 3 && b.size(0) == (int64_t)splits.size(), "rows_mm shapes");
  auto out = at::empty({a.size(0), b.size(2)}, a.options());
  std::vector<int64_t> start;
  auto order = order_of(splits, start);
  each_on_one_thread((int64_t)order.size(), [&](int64_t i) {
    const int64_t e = order[i];
    if (splits[e] == 0) return;
    auto o = out.narrow(0, start[e], splits[e]);
    at::mm_out(o, a.narrow(0, start[e], splits[e]), b.select(0, e));
  });
  return out;
}

// out[e] = a[rows of e]^T @ b[rows of e] for a [N, M], b [N, K] -> [E, M, K] (0 for no rows)
at::Tensor weights_mm(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& splits) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), "weights_mm shapes");
  const int64_t E = (int64_t)splits.size();
  auto out = pooled_empty({E, a.size(1), b.size(1)}, a.options());
  std::vector<int64_t> start;
  auto order = order_of(splits, start);
  each_on_one_thread(E, [&](int64_t i) {
    const int64_t e = order[i];
    auto o = out.select(0, e);
    if (splits[e] == 0) {
      o.zero_();
      return;
    }
    at::mm_out(o, a.narrow(0, start[e], splits[e]).t(), b.narrow(0, start[e], splits[e]));
  });
  return out;
}

// x [n, K] @ W^T by oneDNN, for W [M, K] plain (contiguous rows) or prepacked
// (torch.ops.mkldnn._reorder_linear_weight)
static at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed) {
  static auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        c10::string_view, c10::List<std::optional<at::Scalar>>,
                        std::optional<c10::string_view>)>();
  return op.call(x, packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(),
                 std::nullopt);
}

// An expert bank's two projections: plain weights w_in [E, F_in, D], w_out [E, D, F] (at::mm,
// MKL) or, when packed holds 2E tensors (w_in[e] for every e, then w_out[e]), the same weights
// prepacked by oneDNN for inference.
struct Projections {
  at::Tensor w_in, w_out;
  std::vector<at::Tensor> packed;
  bool onednn = false;  // plain weights, multiplied by oneDNN (set_expert_matmul onednn, avx512)
  bool avx512 = false;  // plain weights, the own kernel (ffn_avx512)

  static Projections plain(const at::Tensor& w_in, const at::Tensor& w_out) {
    const bool dnn = expert_matmul != Matmul::mkl && at::hasMKLDNN() && w_in.scalar_type() == at::kFloat &&
                     w_out.scalar_type() == at::kFloat && w_in.stride(2) == 1 &&
                     w_out.stride(2) == 1;
    return Projections{w_in, w_out, {}, dnn, own_gemm({w_in, w_out})};
  }
  int64_t experts() const { return packed.empty() ? w_in.size(0) : (int64_t)packed.size() / 2; }
  int64_t in_features() const { return packed.empty() ? w_in.size(1) : packed[0].size(0); }
  int64_t out_features() const { return packed.empty() ? w_out.size(1) : packed.back().size(0); }
  // x [n, D] @ w_in[e]^T -> [n, F_in]
  at::Tensor in(int64_t e, const at::Tensor& x) const {
    if (!packed.empty()) return onednn_linear(x, packed[e]);
    return onednn ? onednn_linear(x, w_in.select(0, e)) : at::mm(x, w_in.select(0, e).t());
  }
  // h = x [n, D] @ w_in[e]^T, written in place
  void in_into(int64_t e, const at::Tensor& x, at::Tensor& h) const {
    if (packed.empty() && !onednn) at::mm_out(h, x, w_in.select(0, e).t());
    else h.copy_(in(e, x));
  }
  // a [n, F] @ w_out[e]^T -> [n, D]
  at::Tensor out(int64_t e, const at::Tensor& a) const {
    if (!packed.empty()) return onednn_linear(a, packed[experts() + e]);
    return onednn ? onednn_linear(a, w_out.select(0, e)) : at::mm(a, w_out.select(0, e).t());
  }
  // y = a [n, F] @ w_out[e]^T, written in place
  void out_into(int64_t e, const at::Tensor& a, at::Tensor& y) const {
    if (packed.empty() && !onednn) at::mm_out(y, a, w_out.select(0, e).t());
    else y.copy_(out(e, a));
  }
};

// Whether an expert of `rows` rows runs its forward on the own kernel
static bool own_forward(const Projections& p, int64_t rows) {
  return p.avx512 && rows >= own_forward_min_rows && rows <= own_forward_rows;
}

// y_e = act(x_e @ w_in[e]^T) @ w_out[e]^T on the own kernel, computed transposed (h^T = W_in x^T,
// y^T = W_out a^T: the weights are the operand read once, in order); h_e, when defined, receives h
static void ffn_avx512(const Projections& p, int64_t e, const at::Tensor& x_e, Act act,
                       const at::Tensor& h_e, const at::Tensor& y_e) {
  const int64_t n = x_e.size(0);
  auto x_t = thread_scratch(0, {x_e.size(1), n});
  transpose_into(x_t, x_e);
  auto h_t = thread_scratch(1, {p.in_features(), n});
  gemm_out(h_t, p.w_in.select(0, e), x_t);
  if (h_e.defined()) transpose_into(h_e, h_t);
  auto a_t = act_forward(act, h_t, 0);
  auto y_t = thread_scratch(0, {p.out_features(), n});  // x_t is done with
  gemm_out(y_t, p.w_out.select(0, e), a_t);
  transpose_into(y_e, y_t);
}

static std::tuple<at::Tensor, at::Tensor> forward_rows(
    const at::Tensor& x, const Projections& p, const std::vector<int64_t>& splits,
    const std::string& act_name, bool keep_hidden) {
  TORCH_CHECK(x.dim() == 2 && p.experts() == (int64_t)splits.size(), "ffn_forward shapes");
  const Act act = act_of(act_name);
  // row buffers from the pool (keep_hidden: a training forward; else inference's)
  auto empty = [&](at::IntArrayRef sizes) { return rows_empty(sizes, x.options(), !keep_hidden); };
  auto y = empty({x.size(0), p.out_features()});
  auto hidden = empty({keep_hidden ? x.size(0) : 0, p.in_features()});
  std::vector<int64_t> start;
  auto order = order_of(splits, start);
  each_on_one_thread((int64_t)order.size(), [&](int64_t i) {
    const int64_t e = order[i], n = splits[e];
    if (n == 0) return;
    auto x_e = x.narrow(0, start[e], n);
    auto y_e = y.narrow(0, start[e], n);
    at::Tensor h = keep_hidden ? hidden.narrow(0, start[e], n) : at::Tensor();
    if (own_forward(p, n)) return ffn_avx512(p, e, x_e, act, h, y_e);
    if (keep_hidden) p.in_into(e, x_e, h);
    else h = p.in(e, x_e);
    p.out_into(e, act_forward(act, h), y_e);
  });
  return {y, hidden};
}

// x[index] for x [T, D], index [R] long -> [R, D]: the gather of the experts' rows, into a row
// buffer of the pool (of inference's budget when inference)
at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& index, bool inference) {
  TORCH_CHECK(x.dim() == 2 && index.dim() == 1, "gather_rows: x [T, D], index [R]");
  auto out = rows_empty({index.size(0), x.size(1)}, x.options(), inference);
  at::index_select_out(out, x, 0, index);
  return out;
}

// y[rows of e] = act(x[rows of e] @ w_in[e]^T) @ w_out[e]^T, h [N, F_in] kept when keep_hidden
std::tuple<at::Tensor, at::Tensor> ffn_forward(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out,
    const std::vector<int64_t>& splits, const std::string& act_name, bool keep_hidden) {
  TORCH_CHECK(w_in.dim() == 3 && w_out.dim() == 3 && w_out.size(0) == w_in.size(0),
              "ffn_forward shapes");
  return forward_rows(x, Projections::plain(w_in, w_out), splits, act_name, keep_hidden);
}

// Gradients of ffn_forward from grad_y [N, D] and the kept h [N, F_in]
std::tuple<at::Tensor, at::Tensor, at::Tensor> ffn_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out,
    const at::Tensor& hidden, const std::vector<int64_t>& splits, const std::string& act_name,
    bool need_x, bool need_w_in, bool need_w_out) {
  TORCH_CHECK(grad_y.dim() == 2 && hidden.dim() == 2 && hidden.size(0) == x.size(0) &&
              grad_y.size(0) == x.size(0) && w_in.size(0) == (int64_t)splits.size(),
              "ffn_backward shapes");
  const Act act = act_of(act_name);
  auto none = [&] { return at::empty({0}, x.options()); };  // one each: outputs may not alias
  auto grad_x = need_x ? rows_empty(x.sizes(), x.options()) : none();
  auto grad_w_in = need_w_in ? pooled_empty(w_in.sizes(), w_in.options()) : none();
  auto grad_w_out = need_w_out ? pooled_empty(w_out.sizes(), w_out.options()) : none();
  const bool own = own_gemm({grad_y, x, w_in, w_out, hidden});
  auto mm_out = [](bool own_e, at::Tensor& o, const at::Tensor& a, const at::Tensor& b) {
    if (own_e) gemm_out(o, a, b);
    else at::mm_out(o, a, b);
  };
  std::vector<int64_t> start;
  auto order = order_of(splits, start);
  each_on_one_thread((int64_t)order.size(), [&](int64_t i) {
    const int64_t e = order[i], n = splits[e];
    if (n == 0) {
      if (need_w_in) grad_w_in.select(0, e).zero_();
      if (need_w_out) grad_w_out.select(0, e).zero_();
      return;
    }
    auto g = grad_y.narrow(0, start[e], n);
    auto x_e = x.narrow(0, start[e], n);
    const bool own_e = own && n <= own_backward_rows;
    const bool want_grad_h = need_x || need_w_in;
    auto grad_a = !want_grad_h ? at::Tensor() : own_e ? gemm(g, w_out.select(0, e)) : at::mm(g, w_out.select(0, e));
    auto [a, grad_h] = act_backward(act, hidden.narrow(0, start[e], n), grad_a, need_w_out, want_grad_h);
    if (need_w_out) {
      auto o = grad_w_out.select(0, e);
      mm_out(own_e, o, g.t(), a);
    }
    if (need_w_in) {
      auto o = grad_w_in.select(0, e);
      mm_out(own_e, o, grad_h.t(), x_e);
    }
    if (need_x) {
      auto o = grad_x.narrow(0, start[e], n);
      mm_out(own_e, o, grad_h, w_in.select(0, e));
    }
  });
  return {grad_x, grad_w_in, grad_w_out};
}

// Inference from gather to weighted sum, expert by expert: out[token_rows[r]] +=
// row_weights[r] * FFN_e(x[token_rows[r]]) for the rows r of each expert e, in chunks of
// chunk_rows rows. The experts are dealt to one task per thread in advance (largest first, to
// the least loaded task), so which task sums which expert does not depend on timing; task 0 adds
// into out, task i > 0 into a [T, D] buffer of its own, added to out in task order afterwards:
// the same result on every run with the same thread count.
static at::Tensor expert_major_rows(
    const at::Tensor& x, const at::Tensor& token_rows, const at::Tensor& row_weights,
    const Projections& p, const std::vector<int64_t>& splits, const std::string& act_name,
    int64_t chunk_rows) {
  TORCH_CHECK(x.dim() == 2 && token_rows.dim() == 1 && row_weights.dim() == 1 &&
              token_rows.size(0) == row_weights.size(0) &&
              p.experts() == (int64_t)splits.size() && chunk_rows > 0,
              "expert_major_forward shapes");
  const Act act = act_of(act_name);
  std::vector<int64_t> start;
  auto order = order_of(splits, start);
  TORCH_CHECK(start.back() == token_rows.size(0), "expert_major_forward: splits sum to ",
              start.back(), " rows, token_rows has ", token_rows.size(0));
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (int64_t)order.size()));
  std::vector<std::vector<int64_t>> experts_of(tasks);
  std::vector<int64_t> load(tasks, 0);
  for (int64_t e : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    experts_of[t].push_back(e);
    load[t] += splits[e];
  }
  auto out = at::zeros_like(x);
  std::vector<at::Tensor> sums(tasks);
  sums[0] = out;
  for (int64_t t = 1; t < tasks; ++t) sums[t] = at::zeros_like(x);
  auto scale = row_weights.to(x.scalar_type()).unsqueeze(1);  // [R, 1]
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t t = begin; t < end; ++t)
      for (int64_t e : experts_of[t])
        for (int64_t r = start[e]; r < start[e + 1]; r += chunk_rows) {
          const int64_t n = std::min(chunk_rows, start[e + 1] - r);
          auto tokens = token_rows.narrow(0, r, n);
          auto x_e = x.index_select(0, tokens);
          at::Tensor y;
          if (own_forward(p, n)) {
            y = at::empty({n, p.out_features()}, x.options());
            ffn_avx512(p, e, x_e, act, at::Tensor(), y);
          } else {
            y = p.out(e, act_forward(act, p.in(e, x_e)));
          }
          sums[t].index_add_(0, tokens, y.mul_(scale.narrow(0, r, n)));
        }
  });
  for (int64_t t = 1; t < tasks; ++t) out.add_(sums[t]);
  return out;
}

at::Tensor expert_major_forward(
    const at::Tensor& x, const at::Tensor& token_rows, const at::Tensor& row_weights,
    const at::Tensor& w_in, const at::Tensor& w_out, const std::vector<int64_t>& splits,
    const std::string& act_name, int64_t chunk_rows) {
  TORCH_CHECK(w_in.dim() == 3 && w_out.dim() == 3 && w_out.size(0) == w_in.size(0),
              "expert_major_forward shapes");
  return expert_major_rows(x, token_rows, row_weights, Projections::plain(w_in, w_out), splits,
                           act_name, chunk_rows);
}

"""
    + PREPACK_SOURCE
)
FUNCTIONS = [
    "gather_rows",
    "set_row_pool",
    "rows_mm",
    "weights_mm",
    "ffn_forward",
    "ffn_backward",
    "expert_major_forward",
    "packed_ffn_forward",
    "packed_rows_mm",
    "gather_sum",
    "combine_grad_rows",
    "set_expert_matmul",
    "avx512_mm_out",
    "packed_expert_major_forward",
    "release_pool",
    "pool_kept_bytes",
]
