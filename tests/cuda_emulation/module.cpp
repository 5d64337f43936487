// The CUDA kernels, run on the host, registered for the CPU dispatch key through the same host
// layer (host_ops.h) as revdeq_kernels._C: loaded as revdeq_kernels._C by plugin.py, so the
// "cpp" backend's parity tests check the CUDA kernels' source. REVDEQ_EMULATED_RESIDENT_THREADS
// (default 512: a grid of at most 2 blocks) sets Launch::resident_threads, read at every op.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdlib>

#include "../../csrc/cuda/kernels.cuh"
#include "../../csrc/host_ops.h"

namespace revdeq::cuda {
namespace {

Launch emulated_launch() {
  const char* resident = std::getenv("REVDEQ_EMULATED_RESIDENT_THREADS");
  return {nullptr, resident != nullptr ? std::atoi(resident) : 512};
}

struct EmulatedCudaDevice {
  static constexpr c10::DeviceType kType = c10::DeviceType::CPU;
  struct Context : public LaunchedKernels {
    explicit Context(const at::Tensor&) : LaunchedKernels(emulated_launch()) {}
  };
};

}  // namespace
}  // namespace revdeq::cuda

TORCH_LIBRARY_IMPL(revdeq_native, CPU, m) {
  revdeq::register_ops<revdeq::cuda::EmulatedCudaDevice>(m);
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "revdeq_kernels._C",
      "The CUDA kernels of the revdeq_native ops, emulated on the host (tests only).",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "CPU_ISA", "CUDA-EMULATED") < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
