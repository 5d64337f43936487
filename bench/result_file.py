"""Benchmark output files, written whole or not at all: a temporary file beside the target,
then ``os.replace``. An interrupted or failing run leaves the previous file, never a cut one.

Standard library only: gpu_check.py's driver writes its summary before the extensions are
built, without importing torch or revdeq_kernels (whose ``lm.io`` does the same for
checkpoints)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder; on a clean exit it replaces ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would survive the rename
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, payload: dict) -> None:
    with replacing(path) as tmp, open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
