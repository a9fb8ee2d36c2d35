"""C++ source of the threaded kernel's own float32 matmul (part of
:data:`pimoe.moe.threaded_source.SOURCE`): ``C [N, M] = A [N, K] @ B [K, M]`` for the small
per-expert matmuls, in AVX-512 (compiled for that target only, used where the CPU has it), and
which experts run on it (``set_expert_matmul``, from :mod:`pimoe.moe.matmul_choice`).

Why: a matmul library packs its operands into its kernel's blocked layout on every call. With
tens of rows per expert the packed operand is the expert's weight, read cold from memory
(64 experts of width 256 on d_model 512 are 100 MB, more than the L3), and the packing reads it
before any arithmetic can start. This kernel packs nothing: an ``MR x 64`` tile of ``C`` stays in
24 registers while ``k`` runs over ``K``; each step loads one 64-float row of ``B`` and
broadcasts one element of each of ``A``'s ``MR`` (6) rows. In the forward ``A`` is the weight
(``h^T = W_in x^T``), read once, in order, as the arithmetic goes; ``B`` (the rows, transposed,
``[D, rows]``) stays in the L2. ``python benchmarks/moe_cold_weights.py`` (one thread, 64
experts of 64 rows): the six products of a forward and backward at 81-100 GFLOP/s on cold
weights vs 55-76 for ``torch.mm`` (MKL).

Sums run over ``k`` in order, one fused multiply-add per step, so results agree with a library's
matmul to float rounding, not bit for bit.
"""

GEMM_SOURCE = r"""
#include <immintrin.h>

// One tile: C[i, j] = sum_k A[i * sa_n + k * sa_k] * B[k * ldb + j] for i < MR, j < 16 * NV
// (the last 16 columns masked by `last`), in registers.
template <int MR, int NV>
__attribute__((target("avx512f"))) static void gemm_tile(
    const float* A, int64_t sa_n, int64_t sa_k, const float* B, int64_t ldb, float* C,
    int64_t ldc, int64_t K, __mmask16 last) {
  __m512 acc[MR][NV];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* b_row = B + k * ldb;
    __m512 b[NV];
    _Pragma("GCC unroll 4") for (int v = 0; v < NV - 1; ++v) b[v] = _mm512_loadu_ps(b_row + 16 * v);
    b[NV - 1] = _mm512_maskz_loadu_ps(last, b_row + 16 * (NV - 1));
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(A[i * sa_n + k * sa_k]);
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v)
        acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
    }
  }
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
    _Pragma("GCC unroll 4") for (int v = 0; v < NV - 1; ++v)
      _mm512_storeu_ps(C + i * ldc + 16 * v, acc[i][v]);
    _mm512_mask_storeu_ps(C + i * ldc + 16 * (NV - 1), last, acc[i][NV - 1]);
  }
}

// MR rows of C over the columns [j, j + width), width <= 64
template <int MR>
__attribute__((target("avx512f"))) static void gemm_rows(
    const float* A, int64_t sa_n, int64_t sa_k, const float* B, int64_t ldb, float* C,
    int64_t ldc, int64_t K, int64_t width) {
  const int nv = (int)((width + 15) / 16);
  const int tail = (int)(width - 16 * (nv - 1));
  const __mmask16 last = (__mmask16)(tail == 16 ? 0xFFFF : (1u << tail) - 1);
  switch (nv) {
    case 4: gemm_tile<MR, 4>(A, sa_n, sa_k, B, ldb, C, ldc, K, last); break;
    case 3: gemm_tile<MR, 3>(A, sa_n, sa_k, B, ldb, C, ldc, K, last); break;
    case 2: gemm_tile<MR, 2>(A, sa_n, sa_k, B, ldb, C, ldc, K, last); break;
    default: gemm_tile<MR, 1>(A, sa_n, sa_k, B, ldb, C, ldc, K, last);
  }
}

// Rows [i, i + rows) of C (rows <= 6) over the columns [j, j + width), width <= 64
__attribute__((target("avx512f"))) static void gemm_block(
    const float* A, int64_t sa_n, int64_t sa_k, const float* B, int64_t ldb, float* C,
    int64_t ldc, int64_t K, int64_t i, int64_t rows, int64_t j, int64_t width) {
  const float* a = A + i * sa_n;
  const float* b = B + j;
  float* c = C + i * ldc + j;
  switch (rows) {
    case 6: gemm_rows<6>(a, sa_n, sa_k, b, ldb, c, ldc, K, width); break;
    case 5: gemm_rows<5>(a, sa_n, sa_k, b, ldb, c, ldc, K, width); break;
    case 4: gemm_rows<4>(a, sa_n, sa_k, b, ldb, c, ldc, K, width); break;
    case 3: gemm_rows<3>(a, sa_n, sa_k, b, ldb, c, ldc, K, width); break;
    case 2: gemm_rows<2>(a, sa_n, sa_k, b, ldb, c, ldc, K, width); break;
    default: gemm_rows<1>(a, sa_n, sa_k, b, ldb, c, ldc, K, width);
  }
}

// C [N, M] = A [N, K] @ B [K, M], A any strides, B and C with contiguous rows: blocks of A of at
// most 256 KiB (kept in the L2) pass over B 64 columns at a time, 6 rows of A at a time. In the
// forward (A the weight, B the expert's rows transposed) each block of the weight is read from
// memory once.
__attribute__((target("avx512f"))) static void gemm_avx512(
    const float* A, int64_t sa_n, int64_t sa_k, const float* B, int64_t ldb, float* C,
    int64_t ldc, int64_t N, int64_t K, int64_t M) {
  const int64_t block = std::max<int64_t>(6, (256 << 10) / (4 * std::max<int64_t>(K, 1)) / 6 * 6);
  for (int64_t i0 = 0; i0 < N; i0 += block)
    for (int64_t j = 0; j < M; j += 64)
      for (int64_t i = i0; i < std::min(N, i0 + block); i += 6)
        gemm_block(A, sa_n, sa_k, B, ldb, C, ldc, K, i, std::min<int64_t>(6, N - i), j,
                   std::min<int64_t>(64, M - j));
}

// One 16 x 16 block: d[c * ldd + r] = s[r * lds + c], in registers
__attribute__((target("avx512f"))) static void transpose16(const float* s, int64_t lds, float* d, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(s + i * lds);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    __m512d c = _mm512_castps_pd(t[4 * i + 1]), e = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, e));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, e));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(d + i * ldd, r[i]);
}
// d[c * ldd + r] = s[r * lds + c] for r < rows, c < cols: 16 x 16 blocks, scalar edges
__attribute__((target("avx512f"))) static void transpose(const float* s, int64_t lds, int64_t rows, int64_t cols, float* d, int64_t ldd) {
  int64_t r0 = 0;
  for (; r0 + 16 <= rows; r0 += 16) {
    int64_t c0 = 0;
    for (; c0 + 16 <= cols; c0 += 16) transpose16(s + r0 * lds + c0, lds, d + c0 * ldd + r0, ldd);
    for (int64_t c = c0; c < cols; ++c) for (int64_t r = r0; r < r0 + 16; ++r) d[c * ldd + r] = s[r * lds + c];
  }
  for (int64_t r = r0; r < rows; ++r) for (int64_t c = 0; c < cols; ++c) d[c * ldd + r] = s[r * lds + c];
}
static bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// out [N, M] = a [N, K] @ b [K, M] for float32 CPU tensors on an AVX-512 CPU: a any strides,
// b and out with contiguous rows (b is made so if it is not)
static void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) &&
              out.size(0) == a.size(0) && out.size(1) == b.size(1) && out.stride(1) == 1 &&
              a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
              out.scalar_type() == at::kFloat && cpu_has_avx512(), "gemm_out operands");
  const auto rhs = b.stride(1) == 1 ? b : b.contiguous();
  gemm_avx512(a.data_ptr<float>(), a.stride(0), a.stride(1), rhs.data_ptr<float>(),
              rhs.stride(0), out.data_ptr<float>(), out.stride(0), a.size(0), a.size(1),
              rhs.size(1));
}

// dst [C, R] = src [R, C]^T for float32 tensors (the AVX-512 blocks where both have contiguous
// rows, else ATen's copy)
static void transpose_into(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(src.dim() == 2 && dst.dim() == 2 && dst.size(0) == src.size(1) &&
              dst.size(1) == src.size(0), "transpose_into shapes");
  if (src.stride(1) == 1 && dst.stride(1) == 1 && src.scalar_type() == at::kFloat &&
      dst.scalar_type() == at::kFloat && cpu_has_avx512())
    transpose(src.data_ptr<float>(), src.stride(0), src.size(0), src.size(1),
              dst.data_ptr<float>(), dst.stride(0));
  else
    dst.copy_(src.t());
}

// a @ b as gemm_out, into a new tensor
static at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  gemm_out(out, a, b);
  return out;
}

// out [N, M] = a [N, K] @ b [K, M] on the own kernel, float32 (for tests and benchmarks; the CPU
// must have AVX-512)
void avx512_mm_out(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(cpu_has_avx512(), "avx512_mm_out: this CPU has no AVX-512");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) &&
              out.size(0) == a.size(0) && out.size(1) == b.size(1) && out.stride(1) == 1,
              "avx512_mm_out: out [N, M] (contiguous rows) = a [N, K] @ b [K, M], got ",
              out.sizes(), ", ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
              out.scalar_type() == at::kFloat, "avx512_mm_out: float32 only");
  gemm_out(out, a, b);
}

// A float32 scratch tensor of `sizes` kept by the calling thread (slot 0 or 1) and reused by its
// next expert, so that the per-expert transposes map no fresh pages; beyond 16 MiB it is a
// plain allocation.
static at::Tensor thread_scratch(int slot, at::IntArrayRef sizes) {
  thread_local std::vector<float> kept[2];
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  if (numel * 4 > (16 << 20)) return at::empty(sizes, at::TensorOptions().dtype(at::kFloat));
  auto& buf = kept[slot];
  if ((int64_t)buf.size() < numel) buf.resize(numel);
  return at::from_blob(buf.data(), sizes, at::TensorOptions().dtype(at::kFloat));
}

// The library of float32 matmuls on plain weights: set_expert_matmul, from Python
// (pimoe.moe.threaded.set_expert_matmul). avx512: the own kernel (gemm_source) in the forward and
// the backward of the experts below, where the CPU has AVX-512, else as onednn; onednn: oneDNN in
// the forward, at::mm in the backward; mkl: at::mm everywhere.
enum class Matmul { mkl, onednn, avx512 };
static std::atomic<Matmul> expert_matmul{Matmul::mkl};

void set_expert_matmul(const std::string& name) {
  TORCH_CHECK(name == "avx512" || name == "onednn" || name == "mkl", "unknown expert matmul ", name);
  expert_matmul = name == "avx512" ? Matmul::avx512 : name == "onednn" ? Matmul::onednn : Matmul::mkl;
}

// Which experts run on the own kernel where it is chosen: in the forward those of 4 to 128 rows
// (it computes the forward transposed, 64 rows to a tile: with 1-3 rows most of each vector is
// idle and decoding one token was slower than on oneDNN, python benchmarks/moe_packed.py), in
// the backward those of up to 512; beyond, the weights are reused over enough rows that the
// libraries' packing pays (python benchmarks/moe_avx512_matmul.py --tokens 512 2048 16384).
static constexpr int64_t own_forward_min_rows = 4, own_forward_rows = 128,
                         own_backward_rows = 512;

// Whether the own AVX-512 kernel runs float32 matmuls of these tensors
static bool own_gemm(std::initializer_list<at::Tensor> tensors) {
  if (expert_matmul != Matmul::avx512 || !cpu_has_avx512()) return false;
  for (const auto& t : tensors)
    if (t.scalar_type() != at::kFloat || !t.device().is_cpu()) return false;
  return true;
}

"""
