"""Test configuration. Triton runs on CPU tensors only through its interpreter, which
must be switched on before any Triton kernel is defined, so it is set here, before
revdeq_kernels is imported, whenever no GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
