"""Where a run executes: the device, autocast, the process group, and RNG states.

Multi-process runs are started by ``torchrun``, which describes the group in the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); the backend is
nccl on CUDA and gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import LMConfig


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Dist:
    """Join the process group torchrun describes, if any (an existing one is reused)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, created_group=True)


def resolve_device(cfg: LMConfig, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU."""
    if cfg.device == "auto":
        return torch.device("cuda", local_rank % torch.cuda.device_count()) if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={cfg.device} but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def amp_dtype(cfg: LMConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of amp=bf16 / fp16, or of amp=auto on CUDA: bf16 where the GPU
    computes it natively (sm_80 on), else fp16, which the trainer scales the loss for. None:
    no autocast (amp=off, or auto off CUDA)."""
    if cfg.amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)


def autocast_for(cfg: LMConfig, device: torch.device):
    dtype = amp_dtype(cfg, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
