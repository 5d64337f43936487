"""What every benchmark prints first and stores in its JSON: device, torch, backends, commit."""

from __future__ import annotations

import os
import platform
import subprocess
import time

import torch

import revdeq_kernels as rk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def header(device: torch.device) -> dict:
    info = {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "revdeq_kernels": rk.__version__,
        "commit": commit(),
        "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "backends": {name: str(b) for name, b in rk.backends().items()},
    }
    try:
        from revdeq_kernels import _C
        info["cpu_isa"] = _C.CPU_ISA
    except ImportError:
        pass
    return info


def print_header(info: dict, title: str) -> None:
    print(f"# {title}")
    print(f"# device: {info['device']} | torch {info['torch']} | revdeq_kernels {info['revdeq_kernels']} "
          f"| commit {info['commit']} | {info['utc']} UTC"
          + (f" | CPU kernels {info['cpu_isa']}" if "cpu_isa" in info else ""))
    for line in info["backends"].values():
        print(f"#   {line}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
