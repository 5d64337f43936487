"""Per-op micro benchmarks: `pytest bench/ --benchmark-only` (not part of the test run).

The same ops, cases and eager composites as `python bench/throughput.py --suite ops`,
through pytest-benchmark (its statistics, `--benchmark-json`, `--benchmark-compare`).
Each round restores the in-place buffers first, outside the timed call.
"""

from __future__ import annotations

import pytest
import torch

from bench_env import synchronize
from ops_suite import OPS, _parse_mix, default_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ELEMENTS = 4 * 2**20
ROWS = 8
MIXES = ["f32<-f32", "f64<-f32", "bf16<-bf16"]
BACKENDS = [b for b in default_backends(DEVICE) if b != "compile"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", MIXES, ids=lambda m: m.replace("<-", "_from_"))
@pytest.mark.parametrize("op_name", list(OPS))
def test_op(benchmark, op_name, mix, backend):
    spec = OPS[op_name]
    state, f = _parse_mix(mix)
    case = spec.make(ELEMENTS, state, f, DEVICE, ROWS)
    if backend == "eager":
        call = lambda: spec.eager(**case.tensors)  # noqa: E731
    else:
        call = spec.fused(case, backend)

    def timed():
        call()
        synchronize(DEVICE)

    benchmark.extra_info.update(elements=ELEMENTS, bytes=ELEMENTS * spec.bytes_per_element(state, f))
    benchmark.pedantic(timed, setup=case.reset, rounds=20, warmup_rounds=2)
