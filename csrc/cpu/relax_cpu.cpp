// CPU implementations of the revdeq_native ops (schemas defined in Python, see
// revdeq_kernels/ops/_library.py): argument checks, the choice of kernel ISA, registration.
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../checks.h"
#include "relax_cpu.h"

namespace revdeq::cpu {

const KernelTable& kernels() {
  static const KernelTable* const table = [] {
#if REVDEQ_CPU_HAVE_AVX2
    // torch's own choice (honours ATEN_CPU_CAPABILITY), and the CPU must really have it.
    const std::string capability = at::get_cpu_capability();
    if ((capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
      return &AVX2::kernels;
    }
#endif
    return &DEFAULT::kernels;
  }();
  return *table;
}

namespace {

constexpr auto kCPU = c10::DeviceType::CPU;

void relax_impl(at::Tensor& state, const at::Tensor& f_out, double beta, bool inverse) {
  check_written(state, "state", /*state_dtype=*/true, kCPU);
  const at::Tensor f = checked_input(f_out, "f_out", false, state, "state");
  check_beta(beta, inverse);
  at::assert_no_partial_overlap(state, f);
  kernels().relax(state, f, beta, inverse);
  mark_written(state);
}

void relax_cpu(at::Tensor& state, const at::Tensor& f_out, double beta) {
  relax_impl(state, f_out, beta, /*inverse=*/false);
}

void unrelax_cpu(at::Tensor& state, const at::Tensor& f_out, double beta) {
  relax_impl(state, f_out, beta, /*inverse=*/true);
}

std::tuple<at::Tensor, at::Tensor> new_sums(const at::Tensor& z) {
  const auto options = z.options().dtype(accumulation_dtype(z.scalar_type()));
  return {at::empty({z.size(0)}, options), at::empty({z.size(0)}, options)};
}

std::tuple<at::Tensor, at::Tensor> residual_norms_cpu(const at::Tensor& z, const at::Tensor& f_out) {
  const at::Tensor zc = checked_root(z, "z", kCPU);
  const at::Tensor f = checked_input(f_out, "f_out", false, z, "z");
  auto sums = new_sums(zc);
  kernels().residual(at::Tensor(), zc, f, 0.0, std::get<0>(sums), std::get<1>(sums));
  return sums;
}

std::tuple<at::Tensor, at::Tensor> relax_residual_cpu(at::Tensor& y, const at::Tensor& z,
                                                      const at::Tensor& f_out, double beta) {
  check_written(y, "y", true, kCPU);
  const at::Tensor zc = checked_input(z, "z", true, y, "y");
  TORCH_CHECK(z.scalar_type() == y.scalar_type(), "z has dtype ", z.scalar_type(),
              " but y has ", y.scalar_type(), "; they must match");
  const at::Tensor f = checked_input(f_out, "f_out", false, y, "y");
  check_beta(beta, false);
  at::assert_no_partial_overlap(y, zc);
  at::assert_no_partial_overlap(y, f);
  auto sums = new_sums(zc);
  kernels().residual(y, zc, f, beta, std::get<0>(sums), std::get<1>(sums));
  mark_written(y);
  return sums;
}

void adjoint_accumulate_cpu(at::Tensor& grad, const at::Tensor& vjp, at::Tensor& cotangent,
                            double beta, bool scale_after) {
  check_written(grad, "grad", true, kCPU);
  check_written(cotangent, "cotangent", false, kCPU);
  TORCH_CHECK(cotangent.sizes() == grad.sizes(), "cotangent has shape ", cotangent.sizes(),
              " but grad has ", grad.sizes());
  const at::Tensor v = checked_input(vjp, "vjp", false, grad, "grad");
  check_beta(beta, false);
  at::assert_no_overlap(grad, cotangent);
  at::assert_no_partial_overlap(grad, v);
  at::assert_no_partial_overlap(cotangent, v);
  kernels().adjoint(grad, v, cotangent, beta, scale_after);
  mark_written(grad);
  mark_written(cotangent);
}

}  // namespace
}  // namespace revdeq::cpu

TORCH_LIBRARY_IMPL(revdeq_native, CPU, m) {
  m.impl("relax_", TORCH_FN(revdeq::cpu::relax_cpu));
  m.impl("unrelax_", TORCH_FN(revdeq::cpu::unrelax_cpu));
  m.impl("relax_residual_", TORCH_FN(revdeq::cpu::relax_residual_cpu));
  m.impl("residual_norms", TORCH_FN(revdeq::cpu::residual_norms_cpu));
  m.impl("adjoint_accumulate_", TORCH_FN(revdeq::cpu::adjoint_accumulate_cpu));
}
