// CUDA kernels of the reversal="exact" ops (the math: revdeq_kernels/ops/reference.py, the
// element arithmetic: exact_math.cuh). host_ops.h checks the arguments.
//
// Design
// - Bits: state, digits and flags must equal the reference's bit for bit, so all of the
//   element math lives in exact_math.cuh as __host__ __device__ code that is checked
//   against the reference off the GPU (tests/test_cuda_exact_math.py); this file only moves
//   memory.
// - Cost: an element moves 40-48 bytes but needs two 64-bit floor divisions by d and |n|.
//   A 64-bit division by a runtime value is a long software routine on the GPU, which would
//   make the kernels compute-bound, so every divisor is a type (exact_math::with_divisors): the six
//   common (|n|, d) as compile-time constants, else a power-of-two d as shifts, |n| = 1 as
//   nothing, anything else as one high multiply by a host-computed reciprocal. The sign of
//   n stays a runtime mask (one xor and subtract), which halves the kernel count.
// - Memory: as kernels.cu, whole 16-byte vectors (kVec<int64_t, f_t> elements) when every
//   pointer is 16-byte aligned, else scalar; grid-stride loops over at most one wave of
//   blocks; int64 indices. Each element is read and then written by one thread, so f, z
//   may alias state or digits (the reference, too, reads them before writing).
// - Flags: a thread ORs its lanes' bits into a register; at the end every block reduces
//   them with __syncthreads_or and thread 0 ORs the result into flags[step] with one
//   atomic, only when a bit is set. OR is order-free, so flags repeat bit for bit.
// - Residual sums: float64 throughout, reduced by kernels.cu's team scheme (common.cuh):
//   fixed-order team sums, chunk partials of long rows added in chunk order by a second
//   kernel, no atomics, so the sums depend on the shapes and alignment only.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common.cuh"
#include "exact_math.cuh"

namespace revdeq::cuda {
namespace {

namespace em = exact_math;
static_assert(em::kNonfinite == kFlagNonfinite && em::kRange == kFlagRange,
              "exact_math.cuh's flag bits must be checks.h's");

// ORs the block's flag bits into *flag: one atomic per block, and only when a bit is set.
// Every thread of the block calls it once, at the end (it syncs the block).
__device__ __forceinline__ void record_flags(int32_t bits, int32_t* flag) {
  const int nonfinite = __syncthreads_or(bits & kFlagNonfinite);
  const int range = __syncthreads_or(bits & kFlagRange);
  if (threadIdx.x == 0 && (nonfinite || range)) {
    atomicOr(flag, (nonfinite ? kFlagNonfinite : 0) | (range ? kFlagRange : 0));
  }
}

// Reads h, digits, f; writes h, digits: 4 streams of int64 and one of f.
template <bool kInverse, class DivD, class DivAn, typename f_t>
__global__ void __launch_bounds__(kThreads)
    exact_kernel(int64_t* h, int64_t* digits, const f_t* f, int64_t n, bool vectorized,
                 em::ExactArgs args, int32_t* flag) {
  constexpr int V = kVec<int64_t, f_t>;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t vectors = vectorized ? n / V : 0;
  int32_t bits = 0;
  for (int64_t k = first; k < vectors; k += stride) {
    int64_t hv[V], bv[V];
    double fv[V];
    load_vec(h + k * V, hv);
    load_vec(digits + k * V, bv);
    load_vec(f + k * V, fv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      em::exact_element<kInverse, DivD, DivAn>(hv[j], bv[j], fv[j], args, bits);
    }
    store_vec(h + k * V, hv);
    store_vec(digits + k * V, bv);
  }
  for (int64_t i = vectors * V + first; i < n; i += stride) {
    int64_t hi = h[i], bi = digits[i];
    em::exact_element<kInverse, DivD, DivAn>(hi, bi, static_cast<double>(f[i]), args, bits);
    h[i] = hi;
    digits[i] = bi;
  }
  record_flags(bits, flag);
}

// exact_kernel<false> over y plus the residual sums, from one read of z and f: reads y,
// digits, z, f; writes y, digits. The tasks and their sums are sum_tasks's (common.cuh), as
// for kernels.cu's residual_kernel.
template <class DivD, class DivAn, typename f_t>
__global__ void __launch_bounds__(kThreads)
    exact_residual_kernel(int64_t* y, int64_t* digits, const int64_t* z, const f_t* f,
                          int64_t rows, int64_t cols, int64_t chunks, int team, bool vectorized,
                          em::ExactArgs args, int32_t* flag, double* out_res, double* out_f,
                          double* partial) {
  constexpr int V = kVec<int64_t, f_t>;
  __shared__ double shared[2][kWarps];
  int32_t bits = 0;

  // A scalar element: z and f are read before y and digits are written.
  auto add_element = [&](int64_t i, double& res, double& sq_f) {
    const double fi = static_cast<double>(f[i]);
    double term_res, term_f;
    em::residual_terms(z[i], fi, args.grid, term_res, term_f);
    int64_t yi = y[i], bi = digits[i];
    em::exact_element<false, DivD, DivAn>(yi, bi, fi, args, bits);
    y[i] = yi;
    digits[i] = bi;
    res += term_res;
    sq_f += term_f;
  };
  auto add_vector = [&](int64_t k, double& res, double& sq_f) {
    int64_t yv[V], bv[V], zv[V];
    double fv[V];
    load_vec(z + k * V, zv);
    load_vec(f + k * V, fv);
    load_vec(y + k * V, yv);
    load_vec(digits + k * V, bv);
    double part_res = 0.0, part_f = 0.0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      double term_res, term_f;
      em::residual_terms(zv[j], fv[j], args.grid, term_res, term_f);
      part_res = __dadd_rn(part_res, term_res);
      part_f = __dadd_rn(part_f, term_f);
      em::exact_element<false, DivD, DivAn>(yv[j], bv[j], fv[j], args, bits);
    }
    store_vec(y + k * V, yv);
    store_vec(digits + k * V, bv);
    res += part_res;
    sq_f += part_f;
  };
  sum_tasks<V>(rows, cols, chunks, team, vectorized, add_element, add_vector, out_res, out_f,
               partial, shared);
  record_flags(bits, flag);
}

em::ExactArgs exact_args(const ExactParams& params) {
  return em::make_exact_args(params.numerator, params.denominator, params.scale, params.grid);
}

int64_t magnitude(int64_t x) { return x < 0 ? -x : x; }

}  // namespace

// 10 divisor pairs (6 constant, 4 run-time) x 2 directions x 4 f dtypes = 80 kernels.
void exact(const at::Tensor& state, const at::Tensor& digits, const at::Tensor& f_out,
           const at::Tensor& flags, const ExactParams& params, bool inverse, const Launch& launch) {
  const int64_t n = state.numel();
  if (n == 0) return;  // the reference ORs 0 into flags[step]
  const em::ExactArgs args = exact_args(params);
  int64_t* h = state.mutable_data_ptr<int64_t>();
  int64_t* b = digits.mutable_data_ptr<int64_t>();
  int32_t* flag = flags.mutable_data_ptr<int32_t>() + params.step;
  REVDEQ_DISPATCH_F(f_out.scalar_type(), "revdeq_exact_cuda", [&] {
    using f_t = scalar_t;
    constexpr int V = kVec<int64_t, f_t>;
    const f_t* f = f_out.const_data_ptr<f_t>();
    const bool vectorized = aligned16(h) && aligned16(b) && aligned16(f);
    const int grid = grid_for(ceil_div(vectorized ? ceil_div(n, V) : n, kThreads), launch);
    em::with_divisors(magnitude(params.numerator), params.denominator, [&](auto dd, auto dan) {
      using DivD = decltype(dd);
      using DivAn = decltype(dan);
      if (inverse) {
        launch_kernel(exact_kernel<true, DivD, DivAn, f_t>, grid, launch, h, b, f, n, vectorized,
                      args, flag);
      } else {
        launch_kernel(exact_kernel<false, DivD, DivAn, f_t>, grid, launch, h, b, f, n, vectorized,
                      args, flag);
      }
    });
  });
}

// 10 divisor pairs x 4 f dtypes = 40 kernels (+ the sums' second pass).
void exact_residual(const at::Tensor& y, const at::Tensor& digits, const at::Tensor& z,
                    const at::Tensor& f_out, const at::Tensor& flags, const ExactParams& params,
                    const at::Tensor& sq_res, const at::Tensor& sq_f, const Launch& launch) {
  if (y.size(0) == 0) return;
  const RowSums sums(y);
  double* res = sq_res.mutable_data_ptr<double>();
  double* sqf = sq_f.mutable_data_ptr<double>();
  const em::ExactArgs args = exact_args(params);
  int64_t* yp = y.mutable_data_ptr<int64_t>();
  int64_t* b = digits.mutable_data_ptr<int64_t>();
  const int64_t* zp = z.const_data_ptr<int64_t>();
  int32_t* flag = flags.mutable_data_ptr<int32_t>() + params.step;
  REVDEQ_DISPATCH_F(f_out.scalar_type(), "revdeq_exact_residual_cuda", [&] {
    using f_t = scalar_t;
    constexpr int V = kVec<int64_t, f_t>;
    const f_t* fp = f_out.const_data_ptr<f_t>();
    const bool vectorized = aligned16(yp) && aligned16(b) && aligned16(zp) && aligned16(fp);
    const int team = sums.team(V);
    const int grid = sums.grid(team, launch);
    em::with_divisors(magnitude(params.numerator), params.denominator, [&](auto dd, auto dan) {
      using DivD = decltype(dd);
      using DivAn = decltype(dan);
      launch_kernel(exact_residual_kernel<DivD, DivAn, f_t>, grid, launch, yp, b, zp, fp,
                    sums.rows, sums.cols, sums.chunks, team, vectorized, args, flag, res, sqf,
                    sums.partial_ptr);
    });
  });
  sums.finish(res, sqf, launch);
}

}  // namespace revdeq::cuda
