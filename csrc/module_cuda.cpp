// revdeq_kernels._C_cuda: importing it registers the CUDA kernels of the revdeq_native ops
// (schemas defined in Python, revdeq_kernels/ops/_library.py) for the CUDA dispatch key, as
// importing revdeq_kernels._C does for CPU. The host side is host_ops.h; this file is the
// CUDA policy (device guard, current stream, launch size). The kernels are in cuda/kernels.cu.
// The module has no functions.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/kernels.cuh"
#include "host_ops.h"

namespace revdeq::cuda {
namespace {

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

// The guard comes first among the Context's bases: it is in place before the launch is read.
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& first) : guard(first.device()) {}
  const c10::cuda::CUDAGuard guard;
};

struct CudaDevice {
  static constexpr c10::DeviceType kType = c10::DeviceType::CUDA;
  // Guards the first tensor's device for the op's lifetime, so copies of strided inputs and
  // the launches land there, on its current stream.
  struct Context : private DeviceGuard, public LaunchedKernels {
    explicit Context(const at::Tensor& first)
        : DeviceGuard(first), LaunchedKernels(current_launch(guard)) {}
  };
};

}  // namespace
}  // namespace revdeq::cuda

TORCH_LIBRARY_IMPL(revdeq_native, CUDA, m) { revdeq::register_ops<revdeq::cuda::CudaDevice>(m); }

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
