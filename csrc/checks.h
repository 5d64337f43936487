// Argument checks shared by the CPU and CUDA registrations of the revdeq_native ops.
//
// The Python wrappers (revdeq_kernels/ops/__init__.py) validate first and give friendlier
// messages; these checks are the kernels' own guard for direct torch.ops calls, and they
// never let a kernel write into a temporary: a written tensor must be contiguous, only
// read-only inputs are made contiguous here.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <utility>

namespace revdeq {

inline bool is_state_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16;
}

inline bool is_f_dtype(at::ScalarType t) {
  return is_state_dtype(t) || t == at::kHalf;
}

// float64 for a float64 state, else float32: the arithmetic and the returned sums.
inline at::ScalarType accumulation_dtype(at::ScalarType state) {
  return state == at::kDouble ? at::kDouble : at::kFloat;
}

// A tensor the op writes in place: state dtype set, device, contiguous, dim >= 1.
inline void check_written(const at::Tensor& t, const char* name, bool state_dtype,
                          c10::DeviceType device) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.device().type() == device, name, " must be a ", c10::DeviceTypeName(device),
              " tensor, got one on ", t.device());
  TORCH_CHECK(state_dtype ? is_state_dtype(t.scalar_type()) : is_f_dtype(t.scalar_type()),
              name, " has unsupported dtype ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1, name, " must have a batch dimension (dim >= 1), got a 0-d tensor");
  TORCH_CHECK(t.is_contiguous(), name, " is written in place and must be contiguous (sizes ",
              t.sizes(), ", strides ", t.strides(), ")");
}

// The first read-only tensor of an op that writes nothing (z of residual_norms).
inline at::Tensor checked_root(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.device().type() == device, name, " must be a ", c10::DeviceTypeName(device),
              " tensor, got one on ", t.device());
  TORCH_CHECK(is_state_dtype(t.scalar_type()), name, " has unsupported dtype ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1, name, " must have a batch dimension (dim >= 1), got a 0-d tensor");
  return t.contiguous();
}

// A read-only tensor: same device and shape as `like`; returned contiguous (maybe a copy).
inline at::Tensor checked_input(const at::Tensor& t, const char* name, bool state_dtype,
                                const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name,
              " is on ", like.device());
  TORCH_CHECK(state_dtype ? is_state_dtype(t.scalar_type()) : is_f_dtype(t.scalar_type()),
              name, " has unsupported dtype ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), name, " has shape ", t.sizes(), " but ", like_name,
              " has ", like.sizes());
  return t.contiguous();
}

// The ops are registered for a backend key only (no ADInplaceOrView kernel), so nothing
// else tells autograd that a tensor was written: bump its version counter here, as the
// ADInplaceOrView kernels of ATen's own in-place ops do. Inference tensors have none.
inline void mark_written(const at::Tensor& t) {
  if (!t.is_inference()) {
    t.unsafeGetTensorImpl()->bump_version();
  }
}

inline void check_beta(double beta, bool inverse) {
  TORCH_CHECK(std::isfinite(beta), "beta must be finite, got ", beta);
  TORCH_CHECK(!inverse || beta != 1.0, "unrelax_ divides by 1 - beta; beta = 1 has no inverse");
}

// reversal="exact": the constants every exact kernel needs, checked and derived once.
// 1 - beta = numerator / denominator; scale = beta * 2^frac_bits, computed as in Python
// (fixed_point.quantisation_scale), so q = rint(f * scale) has the same bits everywhere.
struct ExactParams {
  int64_t step;
  int64_t numerator;
  int64_t denominator;
  int64_t frac_bits;
  double scale;
  double grid;  // 2^-frac_bits: one integer unit of the state
};

constexpr int64_t kMaxDenominator = 64;
constexpr int32_t kFlagNonfinite = 1;  // f_out held a NaN or Inf
constexpr int32_t kFlagRange = 2;      // a value left |h| < 2^62

inline ExactParams check_exact(const at::Tensor& state, const char* name, const at::Tensor& digits,
                               const at::Tensor& flags, int64_t step, int64_t numerator,
                               int64_t denominator, int64_t frac_bits, c10::DeviceType device) {
  for (const auto& [t, what] : {std::pair{&state, name}, std::pair{&digits, "digits"}}) {
    TORCH_CHECK(t->defined() && t->device().type() == device, what, " must be a ",
                c10::DeviceTypeName(device), " tensor");
    TORCH_CHECK(t->scalar_type() == at::kLong, what, " must be int64, got ", t->scalar_type());
    TORCH_CHECK(t->dim() >= 1 && t->is_contiguous(), what,
                " is written in place and must be contiguous with dim >= 1 (sizes ", t->sizes(), ")");
  }
  TORCH_CHECK(digits.device() == state.device() && digits.sizes() == state.sizes(), "digits has shape ",
              digits.sizes(), " on ", digits.device(), " but ", name, " has ", state.sizes(), " on ",
              state.device());
  TORCH_CHECK(flags.defined() && flags.scalar_type() == at::kInt && flags.dim() == 1 &&
                  flags.is_contiguous() && flags.device() == state.device(),
              "flags must be a contiguous 1-D int32 tensor on ", state.device());
  TORCH_CHECK(0 <= step && step < flags.numel(), "step ", step, " is outside flags (length ",
              flags.numel(), ")");
  TORCH_CHECK(0 < std::abs(numerator) && std::abs(numerator) < denominator &&
                  denominator <= kMaxDenominator,
              "1 - beta = ", numerator, "/", denominator,
              " must have 0 < |numerator| < denominator <= ", kMaxDenominator);
  TORCH_CHECK(0 <= frac_bits && frac_bits <= 62, "frac_bits must be in [0, 62], got ", frac_bits);
  const double ratio = static_cast<double>(denominator - numerator) / static_cast<double>(denominator);
  return {step, numerator, denominator, frac_bits, std::ldexp(ratio, static_cast<int>(frac_bits)),
          std::ldexp(1.0, -static_cast<int>(frac_bits))};
}

}  // namespace revdeq
