// The host side of the eight revdeq_native ops, written once for every device: argument
// checks, the aliasing rules (the same as revdeq_kernels/ops/checks.py's SAME_TENSOR_OK, for
// direct torch.ops calls: the public entry points check them first), version-counter bumps
// and registration. A device supplies only
// a policy (module_cpu.cpp, module_cuda.cpp):
//
//   struct Device {
//     static constexpr c10::DeviceType kType;
//     struct Context {                   // built from the op's first tensor once it is checked:
//       explicit Context(const at::Tensor&);    // device guard, stream, kernel table
//       void relax(state, f, beta, inverse) const;
//       void residual(y, z, f, beta, sq_res, sq_f) const;
//       void adjoint(grad, vjp, cotangent, beta, scale_after) const;
//       void exact(state, digits, f, flags, params, inverse) const;      // reversal="exact"
//       void exact_residual(y, digits, z, f, flags, params, sq_res, sq_f) const;
//     };
//   };
//
// The kernels then see checked tensors only: one device, supported dtypes, equal shapes,
// contiguous (read-only inputs copied if they were not). Adding an op means one wrapper and
// one registration line here, and one Context method per device.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"

namespace revdeq {

// No shared memory at all (not even the same tensor). Empty tensors touch no memory, so
// nothing overlaps them: the rule of ops/checks.py, which every entry point applies first.
inline void assert_disjoint(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() != 0 && b.numel() != 0) at::assert_no_overlap(a, b);
}

template <class Device>
struct HostOps {
  using Context = typename Device::Context;
  static constexpr c10::DeviceType kDevice = Device::kType;

  static void relax_or_inverse(at::Tensor& state, const at::Tensor& f_out, double beta, bool inverse) {
    check_written(state, "state", /*state_dtype=*/true, kDevice);
    const Context context(state);
    const at::Tensor f = checked_input(f_out, "f_out", false, state, "state");
    check_beta(beta, inverse);
    at::assert_no_partial_overlap(state, f_out);
    context.relax(state, f, beta, inverse);
    mark_written(state);
  }

  static void relax_(at::Tensor& state, const at::Tensor& f_out, double beta) {
    relax_or_inverse(state, f_out, beta, /*inverse=*/false);
  }

  static void unrelax_(at::Tensor& state, const at::Tensor& f_out, double beta) {
    relax_or_inverse(state, f_out, beta, /*inverse=*/true);
  }

  // The two per-sample sums, shape [B], in the accumulation dtype of z.
  static std::tuple<at::Tensor, at::Tensor> new_sums(const at::Tensor& z) {
    const auto options = z.options().dtype(accumulation_dtype(z.scalar_type()));
    return {at::empty({z.size(0)}, options), at::empty({z.size(0)}, options)};
  }

  static std::tuple<at::Tensor, at::Tensor> residual_norms(const at::Tensor& z, const at::Tensor& f_out) {
    const at::Tensor zc = checked_root(z, "z", kDevice);
    const Context context(zc);
    const at::Tensor f = checked_input(f_out, "f_out", false, z, "z");
    auto sums = new_sums(zc);
    context.residual(at::Tensor(), zc, f, 0.0, std::get<0>(sums), std::get<1>(sums));
    return sums;
  }

  static std::tuple<at::Tensor, at::Tensor> relax_residual_(at::Tensor& y, const at::Tensor& z,
                                                            const at::Tensor& f_out, double beta) {
    check_written(y, "y", true, kDevice);
    const Context context(y);
    const at::Tensor zc = checked_input(z, "z", true, y, "y");
    TORCH_CHECK(z.scalar_type() == y.scalar_type(), "z has dtype ", z.scalar_type(),
                " but y has ", y.scalar_type(), "; they must match");
    const at::Tensor f = checked_input(f_out, "f_out", false, y, "y");
    check_beta(beta, false);
    assert_disjoint(y, z);  // not even the same tensor: the sums would depend on the order
    assert_disjoint(y, f_out);
    auto sums = new_sums(zc);
    context.residual(y, zc, f, beta, std::get<0>(sums), std::get<1>(sums));
    mark_written(y);
    return sums;
  }

  static void adjoint_accumulate_(at::Tensor& grad, const at::Tensor& vjp, at::Tensor& cotangent,
                                  double beta, bool scale_after) {
    check_written(grad, "grad", true, kDevice);
    check_written(cotangent, "cotangent", false, kDevice);
    TORCH_CHECK(cotangent.device() == grad.device(), "cotangent is on ", cotangent.device(),
                " but grad is on ", grad.device());
    TORCH_CHECK(cotangent.sizes() == grad.sizes(), "cotangent has shape ", cotangent.sizes(),
                " but grad has ", grad.sizes());
    const Context context(grad);
    const at::Tensor v = checked_input(vjp, "vjp", false, grad, "grad");
    check_beta(beta, false);
    assert_disjoint(grad, cotangent);
    at::assert_no_partial_overlap(grad, vjp);
    at::assert_no_partial_overlap(cotangent, vjp);
    context.adjoint(grad, v, cotangent, beta, scale_after);
    mark_written(grad);
    mark_written(cotangent);
  }
};

// reversal="exact" ops: int64 states and digit planes (revdeq_kernels/fixed_point.py).
template <class Device>
struct ExactHostOps {
  using Context = typename Device::Context;
  static constexpr c10::DeviceType kDevice = Device::kType;

  static void relax_or_inverse(at::Tensor& state, at::Tensor& digits, const at::Tensor& f_out,
                               at::Tensor& flags, int64_t step, int64_t numerator, int64_t denominator,
                               int64_t frac_bits, bool inverse) {
    const ExactParams params =
        check_exact(state, "state", digits, flags, step, numerator, denominator, frac_bits, kDevice);
    const Context context(state);
    const at::Tensor f = checked_input(f_out, "f_out", false, state, "state");
    assert_disjoint(state, digits);
    assert_disjoint(state, f_out);
    assert_disjoint(digits, f_out);
    context.exact(state, digits, f, flags, params, inverse);
    mark_written(state);
    mark_written(digits);
    mark_written(flags);
  }

  static void relax_(at::Tensor& state, at::Tensor& digits, const at::Tensor& f_out, at::Tensor& flags,
                     int64_t step, int64_t numerator, int64_t denominator, int64_t frac_bits) {
    relax_or_inverse(state, digits, f_out, flags, step, numerator, denominator, frac_bits, false);
  }

  static void unrelax_(at::Tensor& state, at::Tensor& digits, const at::Tensor& f_out, at::Tensor& flags,
                       int64_t step, int64_t numerator, int64_t denominator, int64_t frac_bits) {
    relax_or_inverse(state, digits, f_out, flags, step, numerator, denominator, frac_bits, true);
  }

  static std::tuple<at::Tensor, at::Tensor> relax_residual_(
      at::Tensor& y, at::Tensor& digits, const at::Tensor& z, const at::Tensor& f_out, at::Tensor& flags,
      int64_t step, int64_t numerator, int64_t denominator, int64_t frac_bits) {
    const ExactParams params =
        check_exact(y, "y", digits, flags, step, numerator, denominator, frac_bits, kDevice);
    const Context context(y);
    TORCH_CHECK(z.defined() && z.scalar_type() == at::kLong && z.device() == y.device() &&
                    z.sizes() == y.sizes(),
                "z must be an int64 tensor of y's shape ", y.sizes(), " on ", y.device());
    const at::Tensor zc = z.contiguous();
    const at::Tensor f = checked_input(f_out, "f_out", false, y, "y");
    assert_disjoint(y, digits);
    assert_disjoint(y, z);
    assert_disjoint(y, f_out);
    assert_disjoint(digits, z);
    assert_disjoint(digits, f_out);
    const auto options = y.options().dtype(at::kDouble);
    at::Tensor sq_res = at::empty({y.size(0)}, options), sq_f = at::empty({y.size(0)}, options);
    context.exact_residual(y, digits, zc, f, flags, params, sq_res, sq_f);
    mark_written(y);
    mark_written(digits);
    mark_written(flags);
    return {sq_res, sq_f};
  }
};

// Registers the eight ops of `Device` into the revdeq_native namespace (inside TORCH_LIBRARY_IMPL).
template <class Device>
void register_ops(torch::Library& m) {
  using Ops = HostOps<Device>;
  m.impl("relax_", TORCH_FN(Ops::relax_));
  m.impl("unrelax_", TORCH_FN(Ops::unrelax_));
  m.impl("relax_residual_", TORCH_FN(Ops::relax_residual_));
  m.impl("residual_norms", TORCH_FN(Ops::residual_norms));
  m.impl("adjoint_accumulate_", TORCH_FN(Ops::adjoint_accumulate_));
  using Exact = ExactHostOps<Device>;
  m.impl("exact_relax_", TORCH_FN(Exact::relax_));
  m.impl("exact_unrelax_", TORCH_FN(Exact::unrelax_));
  m.impl("exact_relax_residual_", TORCH_FN(Exact::relax_residual_));
}

}  // namespace revdeq
