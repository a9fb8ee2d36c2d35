"""C++ source of the threaded kernel's activations (part of
:data:`pimoe.moe.threaded_source.SOURCE`): SwiGLU, GELU, ReLU and SiLU forward and backward on
one expert's rows, the ATen calls autograd makes for pimoe's Python activations."""

ACTIVATION_SOURCE = r"""
enum class Act { swiglu, gelu, relu, silu };

static Act act_of(const std::string& name) {
  if (name == "swiglu") return Act::swiglu;
  if (name == "gelu") return Act::gelu;
  if (name == "relu") return Act::relu;
  TORCH_CHECK(name == "silu", "unknown activation ", name);
  return Act::silu;
}

// a = act(h) for one expert's h [n, F_in] -> [n, F] (dim -1), or its transpose h^T [F_in, n] ->
// [F, n] (dim 0: SwiGLU's gate and up are the two halves along dim)
static at::Tensor act_forward(Act act, const at::Tensor& h, int64_t dim = -1) {
  switch (act) {
    case Act::swiglu: {
      auto parts = h.chunk(2, dim);
      return at::silu(parts[0]) * parts[1];
    }
    case Act::gelu: return at::gelu(h);
    case Act::relu: return at::relu(h);
    default: return at::silu(h);
  }
}

// (a, grad_h) from h [n, F_in] and grad_a [n, F], as autograd computes them; a is made only
// when want_a, grad_h only when want_grad_h.
static std::pair<at::Tensor, at::Tensor> act_backward(
    Act act, const at::Tensor& h, const at::Tensor& grad_a, bool want_a, bool want_grad_h) {
  at::Tensor a, grad_h;
  switch (act) {
    case Act::swiglu: {
      auto parts = h.chunk(2, -1);
      auto s = at::silu(parts[0]);
      if (want_a) a = s * parts[1];
      if (want_grad_h)
        grad_h = at::cat({at::silu_backward(grad_a * parts[1], parts[0]), grad_a * s}, -1);
      break;
    }
    case Act::gelu:
      if (want_a) a = at::gelu(h);
      if (want_grad_h) grad_h = at::gelu_backward(grad_a, h);
      break;
    case Act::relu:
      a = at::relu(h);
      if (want_grad_h) grad_h = at::threshold_backward(grad_a, a, 0);
      break;
    default:
      if (want_a) a = at::silu(h);
      if (want_grad_h) grad_h = at::silu_backward(grad_a, h);
  }
  return {a, grad_h};
}

"""
