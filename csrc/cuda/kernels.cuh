// Launchers of the CUDA kernels of the revdeq_native ops (defined in kernels.cu, called
// by module_cuda.cpp). Plain C++: no CUDA syntax, so the host-side translation unit is
// compiled by the C++ compiler alone.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include "../checks.h"

namespace revdeq::cuda {

// Where to launch, read by the caller under its device guard.
struct Launch {
  cudaStream_t stream;  // the current stream of the tensors' device
  int resident_threads;  // SMs x threads per SM: the grids never need more (grid-stride loops)
};

// All tensors are checked by the caller: one CUDA device, supported dtypes, equal shapes,
// contiguous (read-only inputs copied if they were not).

// state <- (1-b) state + b f_out, or with inverse: state <- (state - b f_out) / (1-b)
void relax(const at::Tensor& state, const at::Tensor& f_out, double beta, bool inverse,
           const Launch& launch);

// sq_res[i] = sum_j (z_ij - f_ij)^2 and sq_f[i] = sum_j f_ij^2 (sq_* of shape [B], in the
// accumulation dtype); when y is defined, also y <- (1-b) y + b f_out in the same pass.
void residual(const at::Tensor& y, const at::Tensor& z, const at::Tensor& f_out, double beta,
              const at::Tensor& sq_res, const at::Tensor& sq_f, const Launch& launch);

// scale_after=false: grad <- (1-b) grad + vjp; cotangent <- b grad
// scale_after=true:  s = grad + vjp; grad <- (1-b) s; cotangent <- b s
void adjoint(const at::Tensor& grad, const at::Tensor& vjp, const at::Tensor& cotangent,
             double beta, bool scale_after, const Launch& launch);

// reversal="exact" (revdeq_kernels/ops/reference.py has the arithmetic): int64 state and
// digit plane, f_out of any f dtype, flags[params.step] |= kFlagNonfinite / kFlagRange.
// inverse=false: state <- mul(state, digits) + q;  inverse=true: state <- mul^-1(state - q)
void exact(const at::Tensor& state, const at::Tensor& digits, const at::Tensor& f_out,
           const at::Tensor& flags, const ExactParams& params, bool inverse, const Launch& launch);

// exact(y, ...) and, from the same read of f_out, the float64 per-sample sums of
// (z * 2^-frac_bits - f)^2 and f^2 (sq_* of shape [B], float64).
void exact_residual(const at::Tensor& y, const at::Tensor& digits, const at::Tensor& z,
                    const at::Tensor& f_out, const at::Tensor& flags, const ExactParams& params,
                    const at::Tensor& sq_res, const at::Tensor& sq_f, const Launch& launch);

// The five launchers on one Launch, as host_ops.h's register_ops calls them: the Context of
// module_cuda.cpp (with its device guard) and of the host emulation in tests/cuda_emulation.
class LaunchedKernels {
 public:
  explicit LaunchedKernels(const Launch& launch) : launch_(launch) {}
  void relax(const at::Tensor& state, const at::Tensor& f, double beta, bool inverse) const {
    cuda::relax(state, f, beta, inverse, launch_);
  }
  void residual(const at::Tensor& y, const at::Tensor& z, const at::Tensor& f, double beta,
                const at::Tensor& sq_res, const at::Tensor& sq_f) const {
    cuda::residual(y, z, f, beta, sq_res, sq_f, launch_);
  }
  void adjoint(const at::Tensor& grad, const at::Tensor& vjp, const at::Tensor& cotangent,
               double beta, bool scale_after) const {
    cuda::adjoint(grad, vjp, cotangent, beta, scale_after, launch_);
  }
  void exact(const at::Tensor& state, const at::Tensor& digits, const at::Tensor& f,
             const at::Tensor& flags, const ExactParams& params, bool inverse) const {
    cuda::exact(state, digits, f, flags, params, inverse, launch_);
  }
  void exact_residual(const at::Tensor& y, const at::Tensor& digits, const at::Tensor& z,
                      const at::Tensor& f, const at::Tensor& flags, const ExactParams& params,
                      const at::Tensor& sq_res, const at::Tensor& sq_f) const {
    cuda::exact_residual(y, digits, z, f, flags, params, sq_res, sq_f, launch_);
  }

 private:
  const Launch launch_;
};

}  // namespace revdeq::cuda
