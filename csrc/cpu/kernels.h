// The CPU kernels, compiled once per instruction set and picked at run time.
//
// kernels_impl.h holds the kernel templates. kernels_default.cpp compiles them for
// any x86-64/ARM CPU (at::vec's portable Vectorized, auto-vectorized by the compiler);
// kernels_avx2.cpp compiles the same source with AVX2+FMA+F16C code generation and
// at::vec's AVX2 specializations, in their own namespace (as ATen's CPU_CAPABILITY
// builds do). module_cpu.cpp registers the ops (host_ops.h checks the arguments) and calls the table of the ISA that
// at::get_cpu_capability() reports (so ATEN_CPU_CAPABILITY=default selects the portable
// kernels, which is how the tests cover both).
#pragma once

#include <ATen/core/Tensor.h>

#include "../checks.h"

// The AVX2 build needs GCC's `#pragma GCC target` on x86-64 (see kernels_avx2.cpp).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define REVDEQ_CPU_HAVE_AVX2 1
#else
#define REVDEQ_CPU_HAVE_AVX2 0
#endif

namespace revdeq::cpu {

// All tensors are checked by the caller: CPU, supported dtypes, equal shapes, contiguous.
struct KernelTable {
  const char* isa;
  // state <- (1-b) state + b f_out, or with inverse: state <- (state - b f_out) / (1-b)
  void (*relax)(const at::Tensor& state, const at::Tensor& f_out, double beta, bool inverse);
  // sq_res[i] = sum_j (z_ij - f_ij)^2 and sq_f[i] = sum_j f_ij^2 (sq_* of shape [B], in the
  // accumulation dtype); when y is defined, also y <- (1-b) y + b f_out in the same pass.
  void (*residual)(const at::Tensor& y, const at::Tensor& z, const at::Tensor& f_out,
                   double beta, const at::Tensor& sq_res, const at::Tensor& sq_f);
  // scale_after=false: grad <- (1-b) grad + vjp; cotangent <- b grad
  // scale_after=true:  s = grad + vjp; grad <- (1-b) s; cotangent <- b s
  void (*adjoint)(const at::Tensor& grad, const at::Tensor& vjp, const at::Tensor& cotangent,
                  double beta, bool scale_after);
  // reversal="exact" (revdeq_kernels/ops/reference.py has the arithmetic): int64 state and
  // digit plane; flags[params.step] |= kFlagNonfinite / kFlagRange.
  // inverse=false: state <- mul(state, digits) + q;  inverse=true: state <- mul^-1(state - q)
  void (*exact)(const at::Tensor& state, const at::Tensor& digits, const at::Tensor& f_out,
                const at::Tensor& flags, const ExactParams& params, bool inverse);
  // exact(y, ...) and the float64 per-sample sums of (z * 2^-frac_bits - f)^2 and f^2.
  void (*exact_residual)(const at::Tensor& y, const at::Tensor& digits, const at::Tensor& z,
                         const at::Tensor& f_out, const at::Tensor& flags, const ExactParams& params,
                         const at::Tensor& sq_res, const at::Tensor& sq_f);
};

namespace DEFAULT {
extern const KernelTable kernels;
}
#if REVDEQ_CPU_HAVE_AVX2
namespace AVX2 {
extern const KernelTable kernels;
}
#endif

// The table in use: AVX2 when at::get_cpu_capability() is AVX2 or AVX512, else DEFAULT.
const KernelTable& kernels();

}  // namespace revdeq::cpu
