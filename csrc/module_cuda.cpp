// revdeq_kernels._C_cuda: importing it registers the CUDA kernels of the revdeq_native ops
// (schemas defined in Python, revdeq_kernels/ops/_library.py) for the CUDA dispatch key, as
// importing revdeq_kernels._C does for CPU. The module has no functions. This file holds the
// host side: the argument checks (those of cpu/relax_cpu.cpp), the device guard, the
// current stream, and the registration; the kernels are in cuda/relax_cuda.cu.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda/relax_cuda.cuh"

namespace revdeq::cuda {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

// The current stream and size of the guarded device. (c10's stream getter is the one
// at::cuda::getCurrentCUDAStream forwards to; ATen/cuda/CUDAContext.h would pull in the
// cuBLAS/cuSPARSE headers, which a bare CUDA toolkit does not ship.)
Launch current_launch(const c10::cuda::CUDAGuard& guard) {
  const c10::DeviceIndex device = guard.current_device().index();
  int sms = 0;
  int threads_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  return {c10::cuda::getCurrentCUDAStream(device).stream(), sms * threads_per_sm};
}

void relax_impl(at::Tensor& state, const at::Tensor& f_out, double beta, bool inverse) {
  check_written(state, "state", /*state_dtype=*/true, kCUDA);
  const c10::cuda::CUDAGuard guard(state.device());
  const at::Tensor f = checked_input(f_out, "f_out", false, state, "state");
  check_beta(beta, inverse);
  at::assert_no_partial_overlap(state, f);
  relax(state, f, beta, inverse, current_launch(guard));
  mark_written(state);
}

void relax_cuda(at::Tensor& state, const at::Tensor& f_out, double beta) {
  relax_impl(state, f_out, beta, /*inverse=*/false);
}

void unrelax_cuda(at::Tensor& state, const at::Tensor& f_out, double beta) {
  relax_impl(state, f_out, beta, /*inverse=*/true);
}

std::tuple<at::Tensor, at::Tensor> new_sums(const at::Tensor& z) {
  const auto options = z.options().dtype(accumulation_dtype(z.scalar_type()));
  return {at::empty({z.size(0)}, options), at::empty({z.size(0)}, options)};
}

std::tuple<at::Tensor, at::Tensor> residual_norms_cuda(const at::Tensor& z,
                                                       const at::Tensor& f_out) {
  const at::Tensor zc = checked_root(z, "z", kCUDA);
  const c10::cuda::CUDAGuard guard(zc.device());
  const at::Tensor f = checked_input(f_out, "f_out", false, z, "z");
  auto sums = new_sums(zc);
  residual(at::Tensor(), zc, f, 0.0, std::get<0>(sums), std::get<1>(sums), current_launch(guard));
  return sums;
}

std::tuple<at::Tensor, at::Tensor> relax_residual_cuda(at::Tensor& y, const at::Tensor& z,
                                                       const at::Tensor& f_out, double beta) {
  check_written(y, "y", true, kCUDA);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor zc = checked_input(z, "z", true, y, "y");
  TORCH_CHECK(z.scalar_type() == y.scalar_type(), "z has dtype ", z.scalar_type(),
              " but y has ", y.scalar_type(), "; they must match");
  const at::Tensor f = checked_input(f_out, "f_out", false, y, "y");
  check_beta(beta, false);
  at::assert_no_partial_overlap(y, zc);
  at::assert_no_partial_overlap(y, f);
  auto sums = new_sums(zc);
  residual(y, zc, f, beta, std::get<0>(sums), std::get<1>(sums), current_launch(guard));
  mark_written(y);
  return sums;
}

void adjoint_accumulate_cuda(at::Tensor& grad, const at::Tensor& vjp, at::Tensor& cotangent,
                             double beta, bool scale_after) {
  check_written(grad, "grad", true, kCUDA);
  check_written(cotangent, "cotangent", false, kCUDA);
  TORCH_CHECK(cotangent.device() == grad.device(), "cotangent is on ", cotangent.device(),
              " but grad is on ", grad.device());
  TORCH_CHECK(cotangent.sizes() == grad.sizes(), "cotangent has shape ", cotangent.sizes(),
              " but grad has ", grad.sizes());
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor v = checked_input(vjp, "vjp", false, grad, "grad");
  check_beta(beta, false);
  at::assert_no_overlap(grad, cotangent);
  at::assert_no_partial_overlap(grad, v);
  at::assert_no_partial_overlap(cotangent, v);
  adjoint(grad, v, cotangent, beta, scale_after, current_launch(guard));
  mark_written(grad);
  mark_written(cotangent);
}

}  // namespace
}  // namespace revdeq::cuda

TORCH_LIBRARY_IMPL(revdeq_native, CUDA, m) {
  m.impl("relax_", TORCH_FN(revdeq::cuda::relax_cuda));
  m.impl("unrelax_", TORCH_FN(revdeq::cuda::unrelax_cuda));
  m.impl("relax_residual_", TORCH_FN(revdeq::cuda::relax_residual_cuda));
  m.impl("residual_norms", TORCH_FN(revdeq::cuda::residual_norms_cuda));
  m.impl("adjoint_accumulate_", TORCH_FN(revdeq::cuda::adjoint_accumulate_cuda));
}

PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "revdeq_kernels._C_cuda",
      "CUDA kernels of the revdeq_native ops (registered on import).",
      -1,                                  // m_size: no module state
      nullptr,                             // m_methods: none
      nullptr, nullptr, nullptr, nullptr,  // m_slots, m_traverse, m_clear, m_free
  };
  return PyModule_Create(&module_def);
}
