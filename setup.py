"""Build revdeq_kernels: pure Python always; C++ CPU and CUDA extensions when possible.

Install with the build isolation off so the build sees your torch:
    pip install --no-build-isolation .
Environment flags (also in the README's table):
    REVDEQ_SKIP_CPP_BUILD=1    do not build the C++ CPU extension (revdeq_kernels._C)
    REVDEQ_SKIP_CUDA_BUILD=1   do not build the CUDA extension (revdeq_kernels._C_cuda)
    REVDEQ_FORCE_CUDA_BUILD=1  build the CUDA extension or fail (CI uses this: a broken .cu fails)
    REVDEQ_CUDA_ARCHS="8.0;9.0" compute capabilities; PTX is also emitted for the newest
    MAX_JOBS=N                 parallel compile jobs (read by torch's ninja build)
    CUDA_HOME=/usr/local/cuda  the toolkit to use
"""

import os
import sys

from setuptools import find_packages, setup


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def cuda_gencode_flags(archs: str) -> list[str]:
    """'8.0;9.0' -> -gencode for each arch, plus PTX for the newest (forward compatibility)."""
    codes = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not codes:
        raise SystemExit("REVDEQ_CUDA_ARCHS is empty; give e.g. '8.0;9.0'")
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in codes]
    newest = max(codes, key=int)
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def extensions():
    """(ext_modules, cmdclass); empty when torch is not importable in the build environment."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("revdeq_kernels: torch is not importable in this build environment; installing "
              "the pure-Python package only. Use `pip install --no-build-isolation .` to build "
              "the kernels.", file=sys.stderr)
        return [], {}
    cxx = ["-O3", "-std=c++20"]
    modules = []
    if not flag("REVDEQ_SKIP_CPP_BUILD"):
        # relax_cpu_avx2.cpp targets AVX2 by pragma and is picked at run time; no -march flag.
        # -ffp-contract=off: FMAs only where the kernels ask for one, so tails match bodies.
        cpu = ["module.cpp", "cpu/relax_cpu.cpp", "cpu/relax_cpu_default.cpp", "cpu/relax_cpu_avx2.cpp"]
        modules.append(cpp_extension.CppExtension(
            "revdeq_kernels._C", [f"csrc/{name}" for name in cpu],
            extra_compile_args={"cxx": cxx + ["-fopenmp", "-ffp-contract=off"]},
            extra_link_args=["-fopenmp"], py_limited_api=False))
    cuda_home = cpp_extension.CUDA_HOME
    can_cuda = torch.version.cuda is not None and cuda_home is not None and os.path.exists(
        os.path.join(cuda_home, "bin", "nvcc"))
    if flag("REVDEQ_FORCE_CUDA_BUILD") and not can_cuda:
        raise SystemExit(
            f"REVDEQ_FORCE_CUDA_BUILD=1 but cannot build CUDA: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cuda_home}")
    if can_cuda and not flag("REVDEQ_SKIP_CUDA_BUILD"):
        # No --use_fast_math: it flushes float32 subnormals, and unrelax_ must invert relax_ there
        # too; the kernels are bandwidth-bound, so fast math buys nothing.
        nvcc = ["-O3", "-std=c++20", "-lineinfo"]
        nvcc += cuda_gencode_flags(os.environ.get("REVDEQ_CUDA_ARCHS", "8.0;9.0"))
        modules.append(cpp_extension.CUDAExtension(
            "revdeq_kernels._C_cuda", ["csrc/module_cuda.cpp", "csrc/cuda/relax_cuda.cu"],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}))
    return modules, {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="revdeq_kernels",
    version="0.1.0",
    description="Reversible Deep Equilibrium Models for PyTorch, with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["revdeq_kernels", "revdeq_kernels.*"]),
    package_data={"revdeq_kernels.lm": ["configs/*.yaml"]},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "lm": ["pyyaml", "tqdm", "tokenizers", "tensorboard", "matplotlib"],
        "hf": ["datasets", "transformers"],
        "test": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": [
        "revdeq-train=revdeq_kernels.lm.cli:train_main",
        "revdeq-eval=revdeq_kernels.lm.cli:eval_main",
        "revdeq-generate=revdeq_kernels.lm.cli:generate_main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
