"""pytest plugin (``-p tests.cuda_emulation.plugin``): installs the host build of the CUDA
kernels, the shared library at $REVDEQ_CUDA_EMULATION, as ``revdeq_kernels._C`` before the
package loads, so the "cpp" backend runs csrc/cuda's kernels (tests/test_cuda_emulated.py)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

import torch  # noqa: F401  (the library links against torch's, which must be loaded first)

_NAME = "revdeq_kernels._C"


def _install(path: str) -> None:
    if _NAME in sys.modules:
        raise RuntimeError(f"{_NAME} was imported before the plugin could replace it")
    loader = importlib.machinery.ExtensionFileLoader(_NAME, path)
    spec = importlib.util.spec_from_file_location(_NAME, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    loader.exec_module(module)
    if getattr(module, "CPU_ISA", None) != "CUDA-EMULATED":
        raise RuntimeError(f"{path} is not the host emulation of the CUDA kernels")


_install(os.environ["REVDEQ_CUDA_EMULATION"])
