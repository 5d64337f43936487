"""Which Triton releases the triton backend can use: the version gate that ``dispatch.py``
reports in ``rk.backends()`` and that ``triton_launch.py`` enforces on import.
"""

from __future__ import annotations

import re
import warnings

# The oldest Triton the kernels keep their rounding contract on (tests/test_triton_build.py):
# 3.3-3.5 compile the float32 division to div.rn.ftz.f32, which flushes subnormal results to
# zero; before that the autotuner refuses (3.0/3.1) or drops (3.2) the interpreter's
# benchmark (triton_launch.tuned). Checked here on 3.0, 3.2, 3.3, 3.4, 3.5, 3.6 and 3.8.
MIN_TRITON = (3, 6)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def triton_too_old(triton_version: str) -> str | None:
    """Why ``triton_version`` is too old for the triton backend, or None."""
    if _release(triton_version) >= MIN_TRITON:
        return None
    oldest = ".".join(map(str, MIN_TRITON))
    return (f"triton {triton_version} is older than {oldest}, the oldest on which these kernels round like the "
            f"reference (3.3-3.5 flush float32 subnormals in division; older autotuners do not take the "
            f"interpreter's benchmark); install "
            f"triton>={oldest} (torch 2.11 brings 3.6.0)")


def interpreter_defect(triton_version: str) -> str | None:
    """Why the Triton interpreter of ``triton_version`` cannot run these kernels, or None.

    The row-sum kernels loop over column bounds computed from the program id. Before 3.7,
    the interpreter turns a loop bound into an int with ``int()`` of a one-element array,
    which recent NumPy refuses (older NumPy only warns); 3.7 squeezes the array first.
    Without this check the backend would look available and fail inside the interpreter."""
    if _release(triton_version) >= (3, 7):
        return None
    try:
        import numpy as np
    except ImportError as error:
        return f"the Triton interpreter needs numpy: {error}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            int(np.ones(1))
        except TypeError:
            return (f"the interpreter of triton {triton_version} cannot run these kernels under numpy "
                    f"{np.__version__} (it calls int() on a one-element array, fixed in triton 3.7); "
                    "install triton>=3.7 (or a numpy that still converts it)")
    return None
