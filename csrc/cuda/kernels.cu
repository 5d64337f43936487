// CUDA kernels of the five float revdeq_native ops (the math: revdeq_kernels/ops/reference.py;
// the reversal="exact" ones are in exact.cu, the shared pieces in common.cuh).
// host_ops.h checks the arguments; module_cuda.cpp sets the device guard and registers the ops.
//
// Design
// - Arithmetic in acc_t: double for a double state, else float. Every element goes through
//   explicit round-to-nearest intrinsics (__fmul_rn, __fmaf_rn, __fdiv_rn, ...), which nvcc
//   never contracts into other FMAs nor replaces by approximate division, whatever
//   --use_fast_math or --fmad say. So an element's bits depend on this source only: the
//   vector and the scalar path agree, relax_residual_ writes the bits relax_ writes, and
//   unrelax_ divides exactly as the reference does. (Flushing of subnormals does follow -ftz.)
// - Memory: a thread moves whole vectors of kVec elements, 16 bytes of the narrowest tensor
//   (wider tensors take 2 or 4 16-byte accesses), when every pointer is 16-byte aligned;
//   the last < kVec elements, or all of them when a pointer is misaligned (a view at an odd
//   offset), take the scalar path. Grid-stride loops, at most one wave of resident blocks;
//   int64 indices throughout.
// - Per-sample sums: a row is one task, or kChunk-element tasks when it is longer. A team
//   of threads reduces a task: a power of two from 1 to the whole 256-thread block, sized
//   to the task's vector count, so a warp takes several short rows at once and a long row
//   gets whole blocks. A thread squares in acc_t, adds one vector's terms in acc_t and folds
//   that into double; the team adds with warp shuffles, then across its warps in shared
//   memory. Tasks of a split row write double partials that a second kernel adds in chunk
//   order. No atomics: the sums depend on the shapes, dtypes and pointer alignment only,
//   never on the grid or the GPU, and repeat bit for bit.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace revdeq::cuda {
namespace {

template <typename state_t>
using acc_t_of = std::conditional_t<std::is_same_v<state_t, double>, double, float>;

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// s <- (1-b) s + b f (one FMA over the rounded b f, as the CPU's AVX2 kernels), or the
// inverse s <- (s - b f) / (1-b) with a correctly rounded division.
template <bool kInverse, typename acc_t>
__device__ __forceinline__ acc_t relax_one(acc_t s, acc_t f, acc_t one_minus_b, acc_t b) {
  if constexpr (kInverse) {
    return div_rn(sub_rn(s, mul_rn(f, b)), one_minus_b);
  } else {
    return fma_rn(s, one_minus_b, mul_rn(f, b));
  }
}

// Reads s, f; writes s: 3 streams, like a.add_(f). Each element is read and then written
// by one thread, so f may be s itself.
template <bool kInverse, typename state_t, typename f_t, typename acc_t = acc_t_of<state_t>>
__global__ void __launch_bounds__(kThreads)
    relax_kernel(state_t* s, const f_t* f, int64_t n, bool vectorized, acc_t one_minus_b, acc_t b) {
  constexpr int V = kVec<state_t, f_t>;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t vectors = vectorized ? n / V : 0;
  for (int64_t k = first; k < vectors; k += stride) {
    acc_t sv[V], fv[V];
    load_vec(s + k * V, sv);
    load_vec(f + k * V, fv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      sv[j] = relax_one<kInverse>(sv[j], fv[j], one_minus_b, b);
    }
    store_vec(s + k * V, sv);
  }
  for (int64_t i = vectors * V + first; i < n; i += stride) {
    s[i] = static_cast<state_t>(relax_one<kInverse>(static_cast<acc_t>(s[i]),
                                                    static_cast<acc_t>(f[i]), one_minus_b, b));
  }
}

// Reads z, f (and y); writes y when kUpdate: 2 streams (4 with the update), f read once.
// The tasks and their sums: sum_tasks (common.cuh).
template <bool kUpdate, typename state_t, typename f_t, typename acc_t = acc_t_of<state_t>>
__global__ void __launch_bounds__(kThreads)
    residual_kernel(state_t* y, const state_t* z, const f_t* f, int64_t rows, int64_t cols,
                    int64_t chunks, int team, bool vectorized, acc_t one_minus_b, acc_t b,
                    acc_t* out_res, acc_t* out_f, double* partial) {
  constexpr int V = kVec<state_t, f_t>;
  __shared__ double shared[2][kWarps];

  // A scalar element: z and f are read before y is written (y may be z or f itself).
  auto add_element = [&](int64_t i, double& res, double& sq_f) {
    const acc_t fi = static_cast<acc_t>(f[i]);
    const acc_t d = sub_rn(static_cast<acc_t>(z[i]), fi);
    if constexpr (kUpdate) {
      y[i] = static_cast<state_t>(relax_one<false>(static_cast<acc_t>(y[i]), fi, one_minus_b, b));
    }
    res += mul_rn(d, d);
    sq_f += mul_rn(fi, fi);
  };
  auto add_vector = [&](int64_t k, double& res, double& sq_f) {
    acc_t zv[V], fv[V];
    load_vec(z + k * V, zv);
    load_vec(f + k * V, fv);
    if constexpr (kUpdate) {
      acc_t yv[V];
      load_vec(y + k * V, yv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        yv[j] = relax_one<false>(yv[j], fv[j], one_minus_b, b);
      }
      store_vec(y + k * V, yv);
    }
    acc_t part_res = 0, part_f = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t d = sub_rn(zv[j], fv[j]);
      part_res = fma_rn(d, d, part_res);
      part_f = fma_rn(fv[j], fv[j], part_f);
    }
    res += part_res;
    sq_f += part_f;
  };
  sum_tasks<V>(rows, cols, chunks, team, vectorized, add_element, add_vector, out_res, out_f,
               partial, shared);
}

// Reads grad, vjp; writes grad, cotangent: 1 pass, 4 tensor-sized memory streams.
// The eager composites are 3 passes and 7 streams each (plus an allocation for cot):
//   y half-step (scale_after):  gy += v (3 streams); cot = b * gy (2); gy *= 1-b (2)
//   z half-step:                gz *= 1-b (2);       gz += v (3);      cot = b * gz (2)
// Both half-steps are t = fma(g, scale_g, v); g <- scale_t t; c <- b t, with
// (scale_g, scale_t) = (1-b, 1) for the z half-step and (1, 1-b) for the y half-step:
// fma(g, 1, v) rounds g + v once and t * 1 is t, so each gets exactly its own formula's
// roundings, from one kernel per dtype triple instead of two.
template <typename grad_t, typename vjp_t, typename cot_t, typename acc_t = acc_t_of<grad_t>>
__global__ void __launch_bounds__(kThreads)
    adjoint_kernel(grad_t* g, const vjp_t* v, cot_t* c, int64_t n, bool vectorized,
                   acc_t scale_g, acc_t scale_t, acc_t b) {
  constexpr int V = kVec<grad_t, vjp_t, cot_t>;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t vectors = vectorized ? n / V : 0;
  for (int64_t k = first; k < vectors; k += stride) {
    acc_t gv[V], vv[V], cv[V];
    load_vec(g + k * V, gv);
    load_vec(v + k * V, vv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t t = fma_rn(gv[j], scale_g, vv[j]);
      gv[j] = mul_rn(t, scale_t);
      cv[j] = mul_rn(t, b);
    }
    store_vec(g + k * V, gv);
    store_vec(c + k * V, cv);
  }
  for (int64_t i = vectors * V + first; i < n; i += stride) {
    const acc_t t = fma_rn(static_cast<acc_t>(g[i]), scale_g, static_cast<acc_t>(v[i]));
    g[i] = static_cast<grad_t>(mul_rn(t, scale_t));
    c[i] = static_cast<cot_t>(mul_rn(t, b));
  }
}

}  // namespace

void relax(const at::Tensor& state, const at::Tensor& f_out, double beta, bool inverse,
           const Launch& launch) {
  const int64_t n = state.numel();
  if (n == 0) return;
  REVDEQ_DISPATCH_STATE(state.scalar_type(), "revdeq_relax_cuda", [&] {
    using state_t = scalar_t;
    using acc_t = acc_t_of<state_t>;
    REVDEQ_DISPATCH_F(f_out.scalar_type(), "revdeq_relax_cuda", [&] {
      using f_t = scalar_t;
      constexpr int V = kVec<state_t, f_t>;
      state_t* s = state.mutable_data_ptr<state_t>();
      const f_t* f = f_out.const_data_ptr<f_t>();
      const bool vectorized = aligned16(s) && aligned16(f);
      const int grid = grid_for(ceil_div(vectorized ? ceil_div(n, V) : n, kThreads), launch);
      const auto one_minus_b = static_cast<acc_t>(1.0 - beta);
      const auto b = static_cast<acc_t>(beta);
      if (inverse) {
        launch_kernel(relax_kernel<true, state_t, f_t>, grid, launch, s, f, n, vectorized,
                      one_minus_b, b);
      } else {
        launch_kernel(relax_kernel<false, state_t, f_t>, grid, launch, s, f, n, vectorized,
                      one_minus_b, b);
      }
    });
  });
}

void residual(const at::Tensor& y, const at::Tensor& z, const at::Tensor& f_out, double beta,
              const at::Tensor& sq_res, const at::Tensor& sq_f, const Launch& launch) {
  if (z.size(0) == 0) return;
  const RowSums sums(z);
  REVDEQ_DISPATCH_STATE(z.scalar_type(), "revdeq_residual_cuda", [&] {
    using state_t = scalar_t;
    using acc_t = acc_t_of<state_t>;
    acc_t* res = sq_res.mutable_data_ptr<acc_t>();
    acc_t* sqf = sq_f.mutable_data_ptr<acc_t>();
    REVDEQ_DISPATCH_F(f_out.scalar_type(), "revdeq_residual_cuda", [&] {
      using f_t = scalar_t;
      constexpr int V = kVec<state_t, f_t>;
      state_t* yp = y.defined() ? y.mutable_data_ptr<state_t>() : nullptr;
      const state_t* zp = z.const_data_ptr<state_t>();
      const f_t* fp = f_out.const_data_ptr<f_t>();
      const bool vectorized = aligned16(zp) && aligned16(fp) && aligned16(yp);
      const int team = sums.team(V);
      const int grid = sums.grid(team, launch);
      const auto one_minus_b = static_cast<acc_t>(1.0 - beta);
      const auto b = static_cast<acc_t>(beta);
      if (y.defined()) {
        launch_kernel(residual_kernel<true, state_t, f_t>, grid, launch, yp, zp, fp, sums.rows,
                      sums.cols, sums.chunks, team, vectorized, one_minus_b, b, res, sqf,
                      sums.partial_ptr);
      } else {
        launch_kernel(residual_kernel<false, state_t, f_t>, grid, launch, nullptr, zp, fp,
                      sums.rows, sums.cols, sums.chunks, team, vectorized, one_minus_b, b, res,
                      sqf, sums.partial_ptr);
      }
    });
    sums.finish(res, sqf, launch);
  });
}

// grad x vjp x cotangent dtypes: 3 x 4 x 4 = 48 kernels. The cotangent's dtype is f's
// output dtype and vjp's is f's input dtype, which differ under autocast, so all pairs occur.
void adjoint(const at::Tensor& grad, const at::Tensor& vjp, const at::Tensor& cotangent,
             double beta, bool scale_after, const Launch& launch) {
  const int64_t n = grad.numel();
  if (n == 0) return;
  REVDEQ_DISPATCH_STATE(grad.scalar_type(), "revdeq_adjoint_cuda", [&] {
    using grad_t = scalar_t;
    using acc_t = acc_t_of<grad_t>;
    REVDEQ_DISPATCH_F(vjp.scalar_type(), "revdeq_adjoint_cuda", [&] {
      using vjp_t = scalar_t;
      REVDEQ_DISPATCH_F(cotangent.scalar_type(), "revdeq_adjoint_cuda", [&] {
        using cot_t = scalar_t;
        constexpr int V = kVec<grad_t, vjp_t, cot_t>;
        grad_t* g = grad.mutable_data_ptr<grad_t>();
        const vjp_t* v = vjp.const_data_ptr<vjp_t>();
        cot_t* c = cotangent.mutable_data_ptr<cot_t>();
        const bool vectorized = aligned16(g) && aligned16(v) && aligned16(c);
        const int grid = grid_for(ceil_div(vectorized ? ceil_div(n, V) : n, kThreads), launch);
        const auto one_minus_b = static_cast<acc_t>(1.0 - beta);
        const auto one = static_cast<acc_t>(1);
        launch_kernel(adjoint_kernel<grad_t, vjp_t, cot_t>, grid, launch, g, v, c, n, vectorized,
                      scale_after ? one : one_minus_b, scale_after ? one_minus_b : one,
                      static_cast<acc_t>(beta));
      });
    });
  });
}

}  // namespace revdeq::cuda
