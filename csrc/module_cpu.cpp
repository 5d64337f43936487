// revdeq_kernels._C: importing it registers the CPU kernels of the revdeq_native ops (schemas
// defined in Python, revdeq_kernels/ops/_library.py) for the CPU dispatch key. The host side
// is host_ops.h; this file picks the kernel ISA and is the CPU policy. The module has no
// functions; CPU_ISA names the kernel build in use ("AVX2" or "DEFAULT"), for tests and benchmarks.
#include <Python.h>

#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"
#include "host_ops.h"

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

struct CpuDevice {
  static constexpr c10::DeviceType kType = c10::DeviceType::CPU;
  struct Context {  // no guard or stream on CPU: the chosen kernel table is all there is
    explicit Context(const at::Tensor&) {}
    void relax(const at::Tensor& state, const at::Tensor& f, double beta, bool inverse) const {
      kernels().relax(state, f, beta, inverse);
    }
    void residual(const at::Tensor& y, const at::Tensor& z, const at::Tensor& f, double beta,
                  const at::Tensor& sq_res, const at::Tensor& sq_f) const {
      kernels().residual(y, z, f, beta, sq_res, sq_f);
    }
    void adjoint(const at::Tensor& grad, const at::Tensor& vjp, const at::Tensor& cotangent,
                 double beta, bool scale_after) const {
      kernels().adjoint(grad, vjp, cotangent, beta, scale_after);
    }
    void exact(const at::Tensor& state, const at::Tensor& digits, const at::Tensor& f,
               const at::Tensor& flags, const ExactParams& params, bool inverse) const {
      kernels().exact(state, digits, f, flags, params, inverse);
    }
    void exact_residual(const at::Tensor& y, const at::Tensor& digits, const at::Tensor& z,
                        const at::Tensor& f, const at::Tensor& flags, const ExactParams& params,
                        const at::Tensor& sq_res, const at::Tensor& sq_f) const {
      kernels().exact_residual(y, digits, z, f, flags, params, sq_res, sq_f);
    }
  };
};

}  // namespace
}  // namespace revdeq::cpu

TORCH_LIBRARY_IMPL(revdeq_native, CPU, m) { revdeq::register_ops<revdeq::cpu::CpuDevice>(m); }

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "revdeq_kernels._C",
      "C++ CPU kernels of the revdeq_native ops (registered on import).",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "CPU_ISA", revdeq::cpu::kernels().isa) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
