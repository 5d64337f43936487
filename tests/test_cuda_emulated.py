"""The CUDA kernels' own source (csrc/cuda/kernels.cu, exact.cu), run with no GPU.

tests/cuda_emulation builds the .cu files with the host compiler on a small emulation of the
CUDA they use (blocks of 256 fiber threads, __syncthreads, warp shuffles, __shared__), under
the address and UB sanitizers, and registers them as the "cpp" backend's CPU kernels through
the same host layer (host_ops.h) as the real extension. A subprocess then runs:

- the "cpp" cases of the op parity suite (test_ops, test_exact_ops, test_ops_contracts):
  every op, dtype mix, odd and empty shape, offset view, opcheck and torch.compile;
- tests/cuda_emulation/check_kernels.py: the per-sample sums are the same bits on grids of 1
  to 256 blocks, and the exact ops on rows split into 16384-element chunks are the reference.

An out-of-bounds or misaligned access, a barrier some thread never reaches, or a wrong bit
fails it; tests/cuda_emulation/self_test.cpp shows the emulation catches each on purpose-broken
kernels. What stays for a GPU: timing, the device-only intrinsics, and memory ordering."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cuda_emulation import build
from tests.helpers import build_host_program

ROOT = Path(__file__).resolve().parents[1]
SUITES = {
    # file: the fewest cases it must run (a filter that silently selects nothing fails)
    "tests/test_ops.py": 396,
    "tests/test_exact_ops.py": 33,
    "tests/test_ops_contracts.py": 24,
    "tests/cuda_emulation/check_kernels.py": 124,
}


@pytest.fixture(scope="module")
def emulation() -> build.Emulation:
    try:
        return build.build()
    except RuntimeError as e:
        if "no C++ compiler" in str(e):
            pytest.skip(str(e))
        raise AssertionError(f"the CUDA kernels do not build for the host emulation: {e}") from None


@pytest.mark.parametrize("suite", list(SUITES), ids=lambda s: Path(s).stem)
def test_cuda_kernels_pass_on_the_host(emulation, suite):
    selection = ["-k", "cpp"] if suite.startswith("tests/test_") else []
    # -v names each case before it runs, so a sanitizer's abort can be pinned on one; Python-level
    # capture leaves the sanitizers' reports (written to fd 2) in this process's stderr.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.cuda_emulation.plugin", "-p", "no:cacheprovider", "-v",
         "--capture=sys", "-o", "addopts=", suite, *selection],
        cwd=ROOT, env=emulation.env(), capture_output=True, text=True, timeout=1800)
    output = done.stdout + done.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    started = re.findall(r"^(\S+::\S+)", done.stdout, re.M)
    sanitizer = re.search(r"^(?:==\d+==ERROR: AddressSanitizer.*|.*runtime error:.*)$", output, re.M)
    assert done.returncode == 0, (
        f"{suite} on the emulated CUDA kernels (-fsanitize={emulation.sanitizers}): exit {done.returncode}; "
        + (f"{len(failed)} failed, first {failed[0]}" if failed else
           f"aborted in {started[-1] if started else 'collection'}")
        + (f"; {sanitizer.group(0)}" if sanitizer else "") + f"\n{output[-6000:]}")
    passed = re.search(r"(\d+) passed", output)
    ran = int(passed.group(1)) if passed else 0
    assert ran >= SUITES[suite], f"{suite}: {ran} cases passed, expected at least {SUITES[suite]}\n{output[-3000:]}"


def test_the_emulation_runs_cuda_semantics_and_catches_broken_kernels(tmp_path):
    """Known answers (warp butterfly, block sums, __syncthreads_or) and broken kernels (a thread
    returning before a barrier, a shuffle past the block, a missing barrier's race)."""
    program = build_host_program(ROOT / "tests" / "cuda_emulation" / "self_test.cpp", tmp_path)
    done = subprocess.run([str(program), "run"], capture_output=True, text=True, timeout=120)
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert done.returncode == 0 and not failed, f"exit {done.returncode}: {failed or done.stderr[-2000:]}"
    assert done.stdout.count("\nok") + done.stdout.startswith("ok") == 6, done.stdout
