"""Build revdeq_kernels: pure Python always; C++ CPU and CUDA extensions when possible.

Install with the build isolation off so the build sees your torch:
    pip install --no-build-isolation .
Each extension is built only on evidence that it can be (a C++ compiler; for CUDA also a
CUDA build of torch and a toolkit root holding nvcc, cuda_runtime.h and cudart of torch's
major version), so a missing toolkit never fails the install. What was skipped, and why,
is printed here and recorded in revdeq_kernels/_build_info.py for rk.backends().
Environment flags (also in the README's table):
    REVDEQ_SKIP_CPP_BUILD=1    do not build the C++ CPU extension (revdeq_kernels._C)
    REVDEQ_SKIP_CUDA_BUILD=1   do not build the CUDA extension (revdeq_kernels._C_cuda)
    REVDEQ_FORCE_CUDA_BUILD=1  build the CUDA extension or fail (CI uses this: a broken .cu fails)
    REVDEQ_CUDA_ARCHS="8.0;9.0" compute capabilities; PTX is also emitted for the newest
    MAX_JOBS=N                 parallel compile jobs (read by torch's ninja build)
    CUDA_HOME=/usr/local/cuda  the toolkit to use (default: found from the nvcc on PATH)
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def say(message: str) -> None:
    print(f"revdeq_kernels: {message}", file=sys.stderr)


def cuda_gencode_flags(archs: str) -> list[str]:
    """'8.0;9.0' -> -gencode for each arch, plus PTX for the newest (forward compatibility)."""
    codes = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not codes:
        raise SystemExit("REVDEQ_CUDA_ARCHS is empty; give e.g. '8.0;9.0'")
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in codes]
    newest = max(codes, key=int)
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def run_text(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout + done.stderr


def toolkit_roots() -> list[str]:
    """Candidate toolkit roots, best evidence first. Not torch's guess: it takes the parent of
    the folder of the nvcc on PATH, which for a wrapper script (/usr/local/bin/nvcc) is a root
    without headers. nvcc itself reports its real root (TOP) in a dry run."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return [explicit]
    roots = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        dry_run = run_text(nvcc, "--dryrun", "-v", "-x", "cu", "-c", os.devnull, "-o", os.devnull)
        roots += re.findall(r"^#\$ TOP=(.+?)\s*$", dry_run, re.MULTILINE)
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    roots.append("/usr/local/cuda")
    return list(dict.fromkeys(os.path.realpath(root) for root in roots))


def toolkit_problem(root: str, torch_cuda: str) -> str | None:
    """None if ``root`` can build against a torch built with CUDA ``torch_cuda``, else why not."""
    nvcc = os.path.join(root, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        return f"{root} has no bin/nvcc"
    if not glob.glob(os.path.join(root, "include", "cuda_runtime.h")) and not glob.glob(
            os.path.join(root, "targets", "*", "include", "cuda_runtime.h")):
        return f"{root} has no include/cuda_runtime.h"
    if not any(glob.glob(os.path.join(root, pattern, "libcudart.so*"))
               for pattern in ("lib64", "lib", "targets/*/lib")):
        return f"{root} has no libcudart.so"
    release = re.search(r"release (\d+)\.(\d+)", run_text(nvcc, "--version"))
    if release is None:
        return f"{nvcc} --version does not report a release"
    if release.group(1) != torch_cuda.split(".")[0]:
        return f"{nvcc} is CUDA {release.group(1)}.{release.group(2)} but torch was built with CUDA {torch_cuda}"
    return None


def find_toolkit(torch) -> tuple[str | None, str]:
    """(usable toolkit root, '') or (None, why there is none)."""
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    problems = []
    for root in toolkit_roots():
        problem = toolkit_problem(root, torch.version.cuda)
        if problem is None:
            return root, ""
        problems.append(problem)
    return None, "no usable CUDA toolkit (" + "; ".join(problems) + ")"


def extensions():
    """(ext_modules, cmdclass, {extension: why it was not built})."""
    skipped = {}
    try:
        import torch
    except ImportError:
        why = "torch is not importable in the build environment (install with --no-build-isolation)"
        return [], {}, {"cpp": why, "cuda": why}
    compiler = os.environ.get("CXX", "c++")
    no_compiler = None if shutil.which(compiler.split()[0]) else f"no C++ compiler ({compiler!r} is not on PATH)"
    cuda_root, no_cuda = find_toolkit(torch)
    if flag("REVDEQ_FORCE_CUDA_BUILD") and (no_compiler or no_cuda):
        raise SystemExit(f"REVDEQ_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {no_compiler or no_cuda}")
    if cuda_root:  # torch.utils.cpp_extension reads it once, when imported
        os.environ["CUDA_HOME"] = cuda_root
    from torch.utils import cpp_extension

    cxx = ["-O3", "-std=c++20"]
    modules = []
    if flag("REVDEQ_SKIP_CPP_BUILD") or no_compiler:
        skipped["cpp"] = "REVDEQ_SKIP_CPP_BUILD=1" if flag("REVDEQ_SKIP_CPP_BUILD") else no_compiler
    else:
        # kernels_avx2.cpp targets AVX2 by pragma and is picked at run time; no -march flag.
        # -ffp-contract=off: FMAs only where the kernels ask for one, so tails match bodies.
        cpu = ["module_cpu.cpp", "cpu/kernels_default.cpp", "cpu/kernels_avx2.cpp"]
        modules.append(cpp_extension.CppExtension(
            "revdeq_kernels._C", [f"csrc/{name}" for name in cpu],
            extra_compile_args={"cxx": cxx + ["-fopenmp", "-ffp-contract=off"]},
            extra_link_args=["-fopenmp"], py_limited_api=False))
    if flag("REVDEQ_SKIP_CUDA_BUILD") or no_compiler or no_cuda:
        skipped["cuda"] = "REVDEQ_SKIP_CUDA_BUILD=1" if flag("REVDEQ_SKIP_CUDA_BUILD") else no_compiler or no_cuda
    else:
        say(f"building the CUDA extension with the toolkit at {cuda_root}")
        # No --use_fast_math: it flushes float32 subnormals, and unrelax_ must invert relax_ there
        # too; the kernels are bandwidth-bound, so fast math buys nothing.
        nvcc = ["-O3", "-std=c++20", "-lineinfo"]
        nvcc += cuda_gencode_flags(os.environ.get("REVDEQ_CUDA_ARCHS", "8.0;9.0"))
        modules.append(cpp_extension.CUDAExtension(
            "revdeq_kernels._C_cuda", ["csrc/module_cuda.cpp", "csrc/cuda/kernels.cu", "csrc/cuda/exact.cu"],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}))
    return modules, {"build_ext": cpp_extension.BuildExtension}, skipped


ext_modules, cmdclass, skipped = extensions()
for name, why in skipped.items():
    hint = {"cpp": "install a C++ compiler and reinstall",
            "cuda": "set CUDA_HOME to a toolkit root and reinstall; REVDEQ_FORCE_CUDA_BUILD=1 makes this an error"}
    say(f"not building the {name} extension: {why}. To build it, {hint[name]}")
with open(os.path.join("revdeq_kernels", "_build_info.py"), "w", encoding="utf-8") as out:
    out.write(f'"""Written by setup.py: why an extension was not built."""\nSKIPPED = {skipped!r}\n')

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
        "test": ["pytest", "pytest-benchmark", "nbclient", "nbformat", "ipykernel"],
    },
    entry_points={"console_scripts": [
        "revdeq-train=revdeq_kernels.lm.cli:train_main",
        "revdeq-eval=revdeq_kernels.lm.cli:eval_main",
        "revdeq-generate=revdeq_kernels.lm.cli:generate_main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
