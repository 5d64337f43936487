"""Builds the host emulation of the CUDA kernels (kernels.cpp, exact.cpp, module.cpp here) as a
shared library under the address and UB sanitizers, and says how to run Python with it.

The build is cached in build/cuda_emulation/<hash of sources, flags, compiler, torch>/, written
under a temporary name and renamed into place, so an interrupted build is never reused."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
UNITS = ("kernels", "exact", "module")
# Sources whose text decides the build: the units, the shim, and the CUDA and host headers.
SOURCES = sorted([*HERE.glob("*.cpp"), *HERE.glob("*.h"), *(ROOT / "csrc").glob("*.h"),
                  *(ROOT / "csrc" / "cuda").glob("*.cu*")])


def _compiles(cxx: str, flags: list[str], scratch: Path) -> bool:
    probe = scratch / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    return subprocess.run([cxx, *flags, str(probe), "-o", str(scratch / "probe")],
                          capture_output=True).returncode == 0


def _runtime(cxx: str, name: str) -> str | None:
    """The path of the compiler's shared runtime `name`, if it has one."""
    found = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return found if os.path.isabs(found) and os.path.exists(found) else None


class Emulation:
    """The built library and the environment a Python process needs to load it."""

    def __init__(self, library: Path, preload: list[str], sanitizers: str):
        self.library, self.preload, self.sanitizers = library, preload, sanitizers

    def env(self) -> dict[str, str]:
        env = dict(os.environ, REVDEQ_CUDA_EMULATION=str(self.library))
        if self.preload:
            # The address sanitizer's runtime must come first; libstdc++ too, or its
            # interception of C++ exceptions fails when a later module (Triton's) throws.
            env["LD_PRELOAD"] = " ".join(self.preload)
            env["ASAN_OPTIONS"] = "detect_leaks=0:detect_stack_use_after_return=0"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
        return env


def build(jobs: int | None = None) -> Emulation:
    """The library, built now or found in the cache. Raises RuntimeError naming what is
    missing (no compiler) or what failed (the compiler's last output)."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler on PATH (c++ or g++)")
    torch_dir = Path(torch.__file__).resolve().parent
    base = ["-std=c++20", "-O1", "-g", "-fPIC", "-fno-omit-frame-pointer", "-ffp-contract=off", "-Wall",
            "-Wno-unknown-pragmas", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    with tempfile.TemporaryDirectory() as scratch:
        asan, libstdcxx = _runtime(cxx, "libasan.so"), _runtime(cxx, "libstdc++.so")
        if asan and libstdcxx and _compiles(cxx, ["-fsanitize=address,undefined"], Path(scratch)):
            sanitizers, preload = "address,undefined", [asan, libstdcxx]
        elif _compiles(cxx, ["-fsanitize=undefined"], Path(scratch)):
            sanitizers, preload = "undefined", []
        else:
            sanitizers, preload = "", []
    if sanitizers != "address,undefined":  # said, not silent: out-of-bounds accesses go unseen
        warnings.warn(f"{cxx} cannot build with the address sanitizer; the CUDA kernels' host emulation runs "
                      f"with {'-fsanitize=' + sanitizers if sanitizers else 'no sanitizer'}", RuntimeWarning,
                      stacklevel=2)
    flags = base + ([f"-fsanitize={sanitizers}", "-fno-sanitize-recover=all"] if sanitizers else [])
    includes = [f"-I{HERE}", f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include/torch/csrc/api/include'}",
                f"-I{sysconfig.get_paths()['include']}"]
    link = [f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256("\0".join([*flags, *includes, *link, version, torch.__version__]).encode())
    for source in SOURCES:
        digest.update(source.name.encode() + source.read_bytes())
    out = ROOT / "build" / "cuda_emulation" / digest.hexdigest()[:16]
    library = out / "_C.so"
    if not library.exists():
        out.mkdir(parents=True, exist_ok=True)
        objects, compiles = [], []
        for unit in UNITS:
            obj = out / f"{unit}.{os.getpid()}.o"
            objects.append(obj)
            compiles.append([cxx, *flags, *includes, "-c", str(HERE / f"{unit}.cpp"), "-o", str(obj)])
        _run_all(compiles, jobs or os.cpu_count() or 1)
        partial = out / f"_C.{os.getpid()}.so"
        _run_all([[cxx, "-shared", *flags, *map(str, objects), *link, "-o", str(partial)]], 1)
        os.replace(partial, library)
        for obj in objects:
            obj.unlink()
    return Emulation(library, preload, sanitizers)


def _run_all(commands: list[list[str]], jobs: int) -> None:
    """Runs the commands, `jobs` at a time; raises with the output of the first that fails."""
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < jobs:
            command = pending.pop(0)
            running.append((command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True)))
        command, process = running.pop(0)
        output = process.communicate()[0]
        if process.returncode != 0:
            for _, other in running:
                other.kill()
            raise RuntimeError(f"{' '.join(command[-3:])} failed:\n{output[-4000:]}")
