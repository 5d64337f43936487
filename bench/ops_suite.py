"""Throughput of the fused state updates: `python bench/throughput.py --suite ops`.

For each op x size x dtype mix x backend: median time (CUDA events on a GPU, the wall
clock on a CPU), effective GB/s (the bytes the op must move, counted in `OPS`), the
fraction of the roofline and of a plain device copy measured in the same run, and
the speed-up over the eager PyTorch composite a user would write (`eager`), plus that
composite under torch.compile (`compile`).

Roofline: the bandwidth of the simplest torch op with the same memory traffic, in the
same run, on the same sizes, in float32 and in each of the op's dtypes, the best of them
counting (the memory system does not care about dtype, and torch's bf16 `dot` runs far
below bandwidth, so a bf16-only yardstick would be too easy to beat):
`a.add_(b)` for read-two-write-one in place, `a.addcmul_(b, c)` for read-three-write-one,
`torch.add(a, b, out=c)` for read-two-write-one-fresh, `torch.dot` for read-two. A plain
copy is the wrong main yardstick on CPUs: its write-allocate traffic makes it look slower
than an in-place update; it is reported beside (`of copy`), since on a GPU the
device-to-device copy is the streaming rate people quote. Mixed-dtype `add_` is not used either: TensorIterator's dynamic
casts make it ~25x slower than either same-dtype `add_` here, an easy target.

In-place buffers are restored from a saved copy before every timed call (untimed), so
`unrelax_` never runs on a state that earlier calls already scaled by 1/(1-b).

Two baselines, on purpose: `torch` times ops/reference.py (the truth the tests compare
against: upcast, compute, round once), `eager` the fastest composite of the same math
(`lerp_`, `vector_norm`), so a speed-up is never measured against a slow reference.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bench_env import header, print_header
from result_file import write_json
from revdeq_kernels import ops
from revdeq_kernels.ops.reference import accumulation_dtype

BETA = 0.8
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}
DEFAULT_MIXES = "f32<-f32,f64<-f32,f64<-f64,bf16<-bf16,f32<-bf16"
ROOFLINES = {
    "add_": "a.add_(b): reads a, b; writes a",
    "addcmul_": "a.addcmul_(b, c): reads a, b, c; writes a",
    "add_out": "torch.add(a, b, out=c): reads a, b; writes c",
    "dot": "torch.dot(a, b): reads a, b",
}


@dataclass
class Case:
    """Tensors of one (op, dtype mix, size) point; `written` are restored before each call."""

    tensors: dict[str, torch.Tensor]
    written: tuple[str, ...]

    def __post_init__(self):
        self.saved = {k: self.tensors[k].clone() for k in self.written}

    def reset(self) -> None:
        for k in self.written:
            self.tensors[k].copy_(self.saved[k])


def _randn(n: int, rows: int, dtype: torch.dtype, device, g: torch.Generator) -> torch.Tensor:
    """(rows, n / rows): dim 0 is the batch the per-sample sums reduce over."""
    return torch.randn(rows, n // rows, generator=g, device=device).to(dtype)


@dataclass(frozen=True)
class OpSpec:
    make: Callable[[int, torch.dtype, torch.dtype, torch.device, int], Case]
    fused: Callable[[Case, str], Callable[[], object]]
    eager: Callable[..., object]  # eager(**case.tensors): the fastest composite a user would write
    bytes_per_element: Callable[[torch.dtype, torch.dtype], int]
    roofline: str


def _relax_case(n, state, f, device, rows):
    g = torch.Generator(device=device).manual_seed(0)
    return Case({"s": _randn(n, rows, state, device, g), "f": _randn(n, rows, f, device, g)}, ("s",))


def _residual_case(n, state, f, device, rows):
    g = torch.Generator(device=device).manual_seed(0)
    return Case({"y": _randn(n, rows, state, device, g), "z": _randn(n, rows, state, device, g),
                 "f": _randn(n, rows, f, device, g)}, ("y",))


def _adjoint_case(n, state, f, device, rows):
    # The backward keeps adjoints in the accumulation dtype; vjp and cotangent are in f's dtype.
    g = torch.Generator(device=device).manual_seed(0)
    return Case({"g": _randn(n, rows, accumulation_dtype(state), device, g), "v": _randn(n, rows, f, device, g),
                 "c": torch.empty(rows, n // rows, device=device, dtype=f)}, ("g",))


def _eager_relax(s, f):
    s.lerp_(f.to(s.dtype), BETA)


def _eager_unrelax(s, f):
    s.sub_(f.to(s.dtype), alpha=BETA).div_(1 - BETA)


def _eager_norms(z, f):
    acc = accumulation_dtype(z.dtype)
    diff = z - f.to(z.dtype)
    return (torch.linalg.vector_norm(diff, dim=1, dtype=acc).square(),
            torch.linalg.vector_norm(f, dim=1, dtype=acc).square())


def _eager_relax_residual(y, z, f):
    sums = _eager_norms(z, f)
    y.lerp_(f.to(y.dtype), BETA)
    return sums


def _eager_adjoint(g, v, c):
    # The y half-step, three passes: gy += v; cot = b gy; gy *= 1-b.
    g.add_(v)
    torch.mul(g, BETA, out=c)
    g.mul_(1 - BETA)


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# reversal="exact": int64 states and digit planes whatever the mix's state dtype (the rows
# say i64<-f), 1 - beta = 1/5 (beta 0.8), frac_bits 32. Eager baseline: the reference.
EXACT_RATIO = (1, 5, 32)


def _exact_case(n, state, f, device, rows):
    g = torch.Generator(device=device).manual_seed(0)
    def fixed():
        return (_randn(n, rows, torch.float64, device, g) * 2**32).round().to(torch.int64)
    digits = (_randn(n, rows, torch.float64, device, g).abs() * 1e6).to(torch.int64)
    return Case({"h": fixed(), "B": digits, "z": fixed(), "f": _randn(n, rows, f, device, g),
                 "flags": torch.zeros(1, dtype=torch.int32, device=device)}, ("h", "B"))


def _exact(name: str, residual: bool = False) -> OpSpec:
    from revdeq_kernels.ops import reference

    def fused(c, b):
        t = c.tensors
        if residual:
            return lambda: ops.exact_relax_residual_(t["h"], t["B"], t["z"], t["f"], t["flags"], 0, *EXACT_RATIO,
                                                     backend=b)
        return lambda: getattr(ops, name)(t["h"], t["B"], t["f"], t["flags"], 0, *EXACT_RATIO, backend=b)

    def eager(h, B, z, f, flags):
        if residual:
            return reference.exact_relax_residual_(h, B, z, f, flags, 0, *EXACT_RATIO)
        return getattr(reference, name)(h, B, f, flags, 0, *EXACT_RATIO)

    # reads h, B, f (and z); writes h, B
    return OpSpec(_exact_case, fused, eager, lambda s, f: 4 * 8 + _size(f) + (8 if residual else 0), "add_")


OPS: dict[str, OpSpec] = {
    # reads s, f; writes s
    "relax_": OpSpec(_relax_case, lambda c, b: lambda: ops.relax_(c.tensors["s"], c.tensors["f"], BETA, backend=b),
                     _eager_relax, lambda s, f: 2 * _size(s) + _size(f), "add_"),
    # reads s, f; writes s
    "unrelax_": OpSpec(_relax_case, lambda c, b: lambda: ops.unrelax_(c.tensors["s"], c.tensors["f"], BETA, backend=b),
                       _eager_unrelax, lambda s, f: 2 * _size(s) + _size(f), "add_"),
    # reads y, z, f; writes y (and B sums)
    "relax_residual_": OpSpec(
        _residual_case,
        lambda c, b: lambda: ops.relax_residual_(c.tensors["y"], c.tensors["z"], c.tensors["f"], BETA, backend=b),
        _eager_relax_residual, lambda s, f: 3 * _size(s) + _size(f), "addcmul_"),
    # reads z, f
    "residual_norms": OpSpec(
        lambda n, s, f, d, r: Case(_residual_case(n, s, f, d, r).tensors, ()),
        lambda c, b: lambda: ops.residual_norms(c.tensors["z"], c.tensors["f"], backend=b),
        lambda y, z, f: _eager_norms(z, f), lambda s, f: _size(s) + _size(f), "dot"),
    # reads g, v; writes g, c
    "adjoint_accumulate_": OpSpec(
        _adjoint_case,
        lambda c, b: lambda: ops.adjoint_accumulate_(c.tensors["g"], c.tensors["v"], c.tensors["c"], BETA, True,
                                                     backend=b),
        _eager_adjoint, lambda s, f: 2 * _size(accumulation_dtype(s)) + 2 * _size(f), "add_out"),
    "exact_relax_": _exact("exact_relax_"),
    "exact_unrelax_": _exact("exact_unrelax_"),
    "exact_relax_residual_": _exact("exact_relax_residual_", residual=True),
}


def median_seconds(fn: Callable[[], object], reset: Callable[[], None], device, repeats: int, warmup: int = 2) -> float:
    """Median over ``repeats`` calls, each after an untimed ``reset``. CUDA: events around the
    call on the current stream (no host launch latency in the number); CPU: the wall clock."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        reset()
        fn()
    times = []
    for _ in range(repeats):
        reset()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_gbps(n: int, device, repeats: int) -> float:
    """A device-to-device copy of n float32 elements (reads and writes counted): the second
    yardstick, the memory system's plain streaming rate in the same run."""
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    seconds = median_seconds(lambda: b.copy_(a), lambda: None, device, repeats)
    return 2 * n * a.element_size() / seconds / 1e9


def yardstick_gbps(kind: str, n: int, dtype: torch.dtype, device, repeats: int) -> float:
    """GB/s of the yardstick `kind` on n elements of one dtype. Its tensors live only in this
    call, so each dtype's are freed before the next one's are allocated."""
    a, b, c = (torch.randn(n, device=device).to(dtype) for _ in range(3))
    saved = a.clone()
    reset = (lambda: a.copy_(saved)) if kind in ("add_", "addcmul_") else (lambda: None)
    fn, streams = {
        "add_": (lambda: a.add_(b), 3),
        "addcmul_": (lambda: a.addcmul_(b, c), 4),
        "add_out": (lambda: torch.add(a, b, out=c), 3),
        "dot": (lambda: torch.dot(a, b) if dtype in (torch.float32, torch.float64) else (a * b).sum(), 2),
    }[kind]
    seconds = median_seconds(fn, reset, device, repeats)
    return streams * n * a.element_size() / seconds / 1e9


def roofline_gbps(kind: str, n: int, dtypes: set[torch.dtype], device, repeats: int) -> float:
    """Best GB/s of the yardstick `kind` over the op's dtypes, same size, same run."""
    return max(yardstick_gbps(kind, n, dtype, device, repeats) for dtype in dtypes)


def default_backends(device: torch.device) -> list[str]:
    names = []
    for name in ("cpp", "cuda", "triton"):
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter checks correctness; its speed means nothing
        try:
            ops.resolve_backend(name, device)
        except RuntimeError:
            continue
        names.append(name)
    return names + ["eager", "compile"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated, from: " + ", ".join(OPS))
    parser.add_argument("--sizes", default="1M,16M,64M", help="elements; K/M suffixes")
    parser.add_argument("--mixes", default=DEFAULT_MIXES, help="state<-f dtype pairs from " + ", ".join(DTYPES))
    parser.add_argument("--backends", default=None,
                        help="comma-separated: cpp, cuda, triton, torch (the reference), eager, compile. "
                             "Default: the compiled/Triton backends available for the device + eager + compile")
    parser.add_argument("--rows", type=int, default=8, help="batch size B of the per-sample sums")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", default=None, help="also write header and rows to this file")


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def _parse_mix(text: str) -> tuple[torch.dtype, torch.dtype]:
    try:
        state, f = (DTYPES[p.strip()] for p in text.split("<-"))
    except (KeyError, ValueError):
        raise SystemExit(f"bad dtype mix {text!r}: write state<-f with names from {', '.join(DTYPES)}") from None
    return state, f


def _compiled(op_name: str, spec: OpSpec, cache: dict):
    if op_name not in cache:
        cache[op_name] = torch.compile(spec.eager, dynamic=True)
    return cache[op_name]


def run(args) -> int:
    device = torch.device(args.device)
    names = [n.strip() for n in args.ops.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise SystemExit(f"unknown ops {unknown}; choose from {', '.join(OPS)}")
    sizes = [_parse_size(s) for s in args.sizes.split(",")]
    bad = [n for n in sizes if n % args.rows]
    if bad:
        raise SystemExit(f"sizes {bad} are not divisible by --rows {args.rows}")
    mixes = [(m.strip(), *_parse_mix(m)) for m in args.mixes.split(",")]
    backends = args.backends.split(",") if args.backends else default_backends(device)
    info = header(device)
    print_header(info, f"ops suite: beta={BETA}, B={args.rows} rows, median of {args.repeats}, in-place buffers "
                       "restored before each call")
    for kind in sorted({OPS[n].roofline for n in names}):
        print(f"#   roofline {kind}: {ROOFLINES[kind]}")
    print("#   copy: b.copy_(a), float32, reads a, writes b")
    print("| op | state<-f | elements | backend | ms | GB/s | roofline GB/s | of roofline | of copy | vs eager |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    rows, compiled = [], {}
    for n in sizes:
        exact_done = set()
        copy = copy_gbps(n, device, args.repeats)
        for mix_name, state, f in mixes:
            rooflines = {}
            for op_name in names:
                spec = OPS[op_name]
                exact = op_name.startswith("exact_")
                if exact:  # the state is int64 whatever the mix says: once per f dtype
                    if (op_name, f) in exact_done:
                        continue
                    exact_done.add((op_name, f))
                shown_mix = "i64<-" + mix_name.split("<-")[1] if exact else mix_name
                case = spec.make(n, state, f, device, args.rows)
                dtypes = {t.dtype for t in case.tensors.values()} | {torch.float32}
                key = (spec.roofline, frozenset(dtypes))
                if key not in rooflines:
                    rooflines[key] = roofline_gbps(spec.roofline, n, dtypes, device, args.repeats)
                roof = rooflines[key]
                moved = n * spec.bytes_per_element(state, f)
                eager_fn = lambda: spec.eager(**case.tensors)  # noqa: E731
                eager_s = median_seconds(eager_fn, case.reset, device, args.repeats)
                for backend in backends:
                    if exact and backend == "compile":
                        continue  # no user composite to compile: eager is the reference itself
                    if backend == "eager":
                        seconds = eager_s
                    elif backend == "compile":
                        fn = _compiled(op_name, spec, compiled)
                        seconds = median_seconds(lambda: fn(**case.tensors), case.reset, device,
                                                 args.repeats)
                    else:
                        seconds = median_seconds(spec.fused(case, backend), case.reset, device, args.repeats)
                    gbps = moved / seconds / 1e9
                    row = dict(op=op_name, mix=shown_mix, elements=n, backend=backend, ms=seconds * 1e3,
                               gbps=gbps, roofline_gbps=roof, of_roofline=gbps / roof, copy_gbps=copy,
                               of_copy=gbps / copy, vs_eager=eager_s / seconds, roofline=spec.roofline)
                    rows.append(row)
                    print(f"| {op_name} | {shown_mix} | {n:,} | {backend} | {row['ms']:.3f} | {gbps:.1f} | "
                          f"{roof:.1f} | {row['of_roofline']:.2f} | {row['of_copy']:.2f} | {row['vs_eager']:.2f}x |",
                          flush=True)
                case = None  # frees this op's tensors before the next op allocates its own
        if args.json:  # after every size, so that a run cut short keeps what it measured
            write_json(args.json, {"header": info, "beta": BETA, "rows_per_batch": args.rows, "results": rows})
    return 0
