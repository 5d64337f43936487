"""How the CUDA per-sample-sum kernels (residual_kernel, exact_residual_kernel) split their
rows into tasks and a task into scalar and vector parts (csrc/cuda/row_tasks.cuh), computed on
the host by tests/row_tasks_host.cpp: no GPU has run them, so this is where a lost, doubled or
misaligned element would show. Tasks are laid out as the launchers lay them out: a row longer
than the chunk is split into chunks of that length (kChunk = 16384 on the GPU; smaller here,
so that many boundaries fall inside the vectors)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import build_host_program

DRIVER = Path(__file__).resolve().parent / "row_tasks_host.cpp"
# (rows, cols, chunk): empty rows, rows shorter than a vector, one chunk, split rows with a
# short last chunk, chunks that are not a multiple of the vector, the GPU's own chunk
SHAPES = [(3, 0, 16), (1, 1, 16), (4, 3, 16), (5, 37, 64), (3, 100, 16), (2, 129, 40), (7, 33, 33),
          (1, 40000, 16384), (6, 1000, 100)]


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    return build_host_program(DRIVER, tmp_path_factory.mktemp("row_tasks_host"))


@pytest.mark.parametrize("vectorized", [True, False], ids=["vectors", "scalar"])
@pytest.mark.parametrize("vector", [2, 4, 8, 16])  # kVec: 16 bytes of the narrowest tensor
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_task_spans_tile_every_row_once_with_aligned_vectors(driver, shape, vector, vectorized):
    rows, cols, chunk = shape
    chunks = -(-cols // chunk) if cols > chunk else 1  # as the launchers compute them
    task_len = cols if chunks == 1 else chunk
    done = subprocess.run([str(driver), str(rows), str(cols), str(chunks), str(task_len), str(int(vectorized)),
                           str(vector)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    spans = [tuple(map(int, line.split())) for line in done.stdout.splitlines()]
    assert len(spans) == rows * chunks, f"{len(spans)} tasks for {rows} rows x {chunks} chunks"
    covered = 0
    for task, (begin, head, body, end) in enumerate(spans):
        where = f"task {task} of {rows}x{cols} (chunks {chunks}, V {vector}): [{begin}, {head}, {body}, {end})"
        assert begin == covered, f"{where}: starts at {begin}, the previous task ended at {covered}"
        assert begin <= head <= body <= end, f"{where}: parts out of order"
        row = task // chunks
        assert row * cols <= begin and end <= (row + 1) * cols, f"{where}: leaves row {row}"
        last_of_row = task % chunks == chunks - 1
        assert end - begin == (cols - (chunks - 1) * task_len if last_of_row else task_len), (
            f"{where}: {end - begin} elements")
        if vectorized:
            assert head == end or head % vector == 0, f"{where}: vectors start off a multiple of V"
            assert head - begin < vector and end - body < vector, f"{where}: a whole vector left scalar"
            assert (body - head) % vector == 0, f"{where}: a partial vector"
        else:
            assert head == body == end, f"{where}: vectors from a misaligned pointer"
        covered = end
    assert covered == rows * cols, f"the tasks end at {covered}, not at {rows * cols}"
