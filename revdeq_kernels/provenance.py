"""Where a measurement was taken: device and threads, torch, Python, this package and its
commit, UTC time, ``rk.backends()``. The benchmarks (``bench/bench_env.py``) and
``revdeq-eval --json`` store it as their output's ``header``, so a number can be traced to
the machine and the code that produced it."""

from __future__ import annotations

import os
import platform
import subprocess
import time

import torch

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(root: str, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()


def commit(root: str = PACKAGE_ROOT) -> str:
    """The short commit of the checkout at ``root`` (default: the one this package is imported
    from), ``-dirty`` if tracked files differ from it; ``unknown`` for an installed copy. Only a
    checkout rooted there counts: a site-packages folder inside some other repository (a venv in
    a project) would otherwise report that project's commit."""
    try:
        if os.path.realpath(_git(root, "rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return "unknown"
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
        return _git(root, "rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
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


def header(device: torch.device | str, root: str = PACKAGE_ROOT) -> dict:
    """The provenance of a result measured on ``device`` by the code checked out at ``root``,
    as a JSON-ready dict."""
    import revdeq_kernels as rk

    info = {
        "device": device_name(torch.device(device)),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "revdeq_kernels": rk.__version__,
        "commit": commit(root),
        "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "backends": {name: str(b) for name, b in rk.backends().items()},
    }
    try:
        from revdeq_kernels import _C
        info["cpu_isa"] = _C.CPU_ISA
    except ImportError:
        pass
    return info
