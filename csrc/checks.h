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

}  // namespace revdeq
