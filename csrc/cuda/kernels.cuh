// Launchers of the CUDA kernels of the revdeq_native ops (defined in kernels.cu, called
// by module_cuda.cpp). Plain C++: no CUDA syntax, so the host-side translation unit is
// compiled by the C++ compiler alone.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

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

}  // namespace revdeq::cuda
