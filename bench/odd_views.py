"""Every fused op on odd sizes and on misaligned and strided views, checked against the
reference: `python bench/odd_views.py --device cuda --backends cuda,triton`.

Written for `compute-sanitizer --tool memcheck` (bench/gpu_check.py runs it so): the sizes
are not multiples of any vector width or block, the written tensors start one element
into their buffer (so 16-byte vector paths must not be taken), and the read-only tensors
are also passed as transposed and every-other-element views. A kernel that reads or
writes past a tail, or vectorises a misaligned pointer, is reported by the sanitizer; a
wrong result is reported here. Exit 1 on any mismatch. Under the sanitizer, set
REVDEQ_TRITON_AUTOTUNE=0 (gpu_check does): tuning each size bucket and dtype there takes minutes.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from revdeq_kernels import ops
from revdeq_kernels.ops import reference

SHAPES = [(1, 1), (3, 5), (2, 257), (7, 1001), (3, 7, 13), (2, 65539)]
MIXES = [(torch.float32, torch.float32), (torch.float64, torch.float32), (torch.bfloat16, torch.bfloat16),
         (torch.float32, torch.bfloat16), (torch.float32, torch.float16)]
BETA = 0.7
EXACT_RATIO = (3, 10, 30)  # 1 - beta = 3/10, frac_bits 30


def offset(values: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``values`` that starts one element into its buffer."""
    buffer = torch.empty(values.numel() + 1, dtype=values.dtype, device=values.device)
    view = buffer[1:].view(values.shape)
    view.copy_(values)
    return view


def views(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The read-only layouts: offset, transposed (last two dims swapped back), every other element."""
    out = {"offset": offset(values)}
    if values.dim() >= 2:
        out["transposed"] = values.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.empty(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype, device=values.device)
    out["strided"] = wide[..., ::2]
    out["strided"].copy_(values)
    return out


BITS = None  # a check's tolerance: bit for bit


def elementwise(dtype: torch.dtype) -> float:
    """Relative bound of an elementwise result: a few roundings, amplified by 1/(1-beta) in
    unrelax_. Loose on purpose: an out-of-bounds read or a misaligned access breaks it by
    orders of magnitude; the parity suite (tests/) holds the tight, rounding-derived bounds."""
    return 16 * torch.finfo(dtype).eps / (1 - BETA)


def summed(dtype: torch.dtype, shape) -> float:
    """A per-sample sum of squares: positive terms, so any order is within (terms - 1) eps."""
    return torch.finfo(dtype).eps * max(1, math.prod(shape[1:]))


def mismatch(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float | None) -> str | None:
    """None if ``actual`` matches ``expected``: bit for bit (rtol None), else within
    rtol * (|expected| + 1) elementwise, NaN where and only where the reference has one."""
    if actual.shape != expected.shape:
        return f"{name}: shape {tuple(actual.shape)}, the reference's {tuple(expected.shape)}"
    if rtol is BITS:
        return None if torch.equal(actual, expected) else f"{name}: not bit-identical to the reference"
    a, e = actual.double(), expected.double()
    excess = torch.where(torch.isnan(a) | torch.isnan(e), torch.isnan(a).ne(torch.isnan(e)).double(),
                         (a - e).abs() - rtol * (e.abs() + 1))
    if not bool((excess > 0).any()):
        return None
    i = int(excess.flatten().argmax())
    return (f"{name}: element {i} is {a.flatten()[i].item():.9g}, reference {e.flatten()[i].item():.9g} "
            f"(allowed {rtol:.1e} relative)")


def _float_cases(shape, state_dtype, f_dtype, device, g):
    """(name, run(backend) -> [(what, actual, expected, rtol)]) for the five float ops."""
    def rand(dtype):
        return torch.randn(shape, generator=g, device=device, dtype=torch.float64).to(dtype)
    state, z, f = rand(state_dtype), rand(state_dtype), rand(f_dtype)
    grad = rand(reference.accumulation_dtype(state_dtype))
    tol, sums = elementwise(state_dtype), summed(reference.accumulation_dtype(state_dtype), shape)

    def relax(fv, b, inverse):
        mine, want = offset(state), state.clone()
        (ops.unrelax_ if inverse else ops.relax_)(mine, fv, BETA, backend=b)
        (reference.unrelax_ if inverse else reference.relax_)(want, fv, BETA)
        return [("state", mine, want, tol)]

    def norms(fv, b):
        return [(f"sum {i}", a, e, sums) for i, (a, e) in
                enumerate(zip(ops.residual_norms(offset(z), fv, backend=b), reference.residual_norms(z, fv)))]

    def relax_residual(fv, b):
        mine, want = offset(state), state.clone()
        got = ops.relax_residual_(mine, offset(z), fv, BETA, backend=b)
        ref = reference.relax_residual_(want, z, fv, BETA)
        return [("state", mine, want, tol)] + [(f"sum {i}", a, e, sums) for i, (a, e) in enumerate(zip(got, ref))]

    def adjoint(vjp, b, scale_after):
        mine, want = offset(grad), grad.clone()
        cot_mine = offset(torch.zeros(shape, dtype=f_dtype, device=device))
        cot_want = torch.zeros(shape, dtype=f_dtype, device=device)
        ops.adjoint_accumulate_(mine, vjp, cot_mine, BETA, scale_after, backend=b)
        reference.adjoint_accumulate_(want, vjp, cot_want, BETA, scale_after)
        return [("grad", mine, want, elementwise(grad.dtype)), ("cotangent", cot_mine, cot_want, elementwise(f_dtype))]

    for layout, fv in views(f).items():
        yield f"relax_ {layout}", lambda b, fv=fv: relax(fv, b, False)
        yield f"unrelax_ {layout}", lambda b, fv=fv: relax(fv, b, True)
        yield f"residual_norms {layout}", lambda b, fv=fv: norms(fv, b)
        yield f"relax_residual_ {layout}", lambda b, fv=fv: relax_residual(fv, b)
        for scale_after in (False, True):
            yield (f"adjoint_accumulate_ {layout} scale_after={scale_after}",
                   lambda b, fv=fv, sa=scale_after: adjoint(fv, b, sa))


def _exact_cases(shape, f_dtype, device, g):
    """The three exact ops: state, digit plane and flags bit for bit; sums within summed()."""
    def fixed():
        return (torch.randn(shape, generator=g, device=device, dtype=torch.float64) * 2**30).round().long()
    h, z = fixed(), fixed()
    digits = (torch.rand(shape, generator=g, device=device, dtype=torch.float64) * 1e6).long()
    f = torch.randn(shape, generator=g, device=device, dtype=torch.float64).to(f_dtype)

    def run(name, b, fv):
        flags = [torch.zeros(2, dtype=torch.int32, device=device) for _ in range(2)]
        mine, want = (offset(h), offset(digits)), (h.clone(), digits.clone())
        if name == "exact_relax_residual_":
            got = ops.exact_relax_residual_(*mine, offset(z), fv, flags[0], 1, *EXACT_RATIO, backend=b)
            ref = reference.exact_relax_residual_(*want, z, fv, flags[1], 1, *EXACT_RATIO)
            sums = [(f"sum {i}", a, e, summed(torch.float64, shape)) for i, (a, e) in enumerate(zip(got, ref))]
        else:
            getattr(ops, name)(*mine, fv, flags[0], 1, *EXACT_RATIO, backend=b)
            getattr(reference, name)(*want, fv, flags[1], 1, *EXACT_RATIO)
            sums = []
        return [("state", mine[0], want[0], BITS), ("digits", mine[1], want[1], BITS),
                ("flags", flags[0], flags[1], BITS)] + sums

    for layout, fv in views(f).items():
        for name in ("exact_relax_", "exact_unrelax_", "exact_relax_residual_"):
            yield f"{name} {layout}", lambda b, n=name, fv=fv: run(n, b, fv)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default=None, help="comma-separated (default: every one available)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = args.backends.split(",") if args.backends else list(ops.BACKENDS)
    backends = []
    for name in names:
        try:
            ops.resolve_backend(name, device)
            backends.append(name)
        except RuntimeError as error:
            print(f"skip {name}: {error}")
    if not backends:
        print(f"no backend to check on {device}", file=sys.stderr)
        return 1
    g = torch.Generator(device=device).manual_seed(0)
    calls, failures = 0, []
    for shape in SHAPES:
        cases = []
        for state_dtype, f_dtype in MIXES:
            mix = f"{str(state_dtype)[6:]}<-{str(f_dtype)[6:]}"
            cases += [(f"{mix} {name}", case) for name, case in _float_cases(shape, state_dtype, f_dtype, device, g)]
        for f_dtype in (torch.float32, torch.bfloat16, torch.float64):
            cases += [(f"i64<-{str(f_dtype)[6:]} {name}", case) for name, case in _exact_cases(shape, f_dtype, device, g)]
        for backend in backends:
            for name, case in cases:
                calls += 1
                for what, actual, expected, rtol in case(backend):
                    problem = mismatch(what, actual, expected, rtol)
                    if problem:
                        failures.append(f"{backend} {tuple(shape)} {name}: {problem}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for line in failures[:20]:
        print("MISMATCH", line)
    print(f"odd_views: {calls} calls on {device} ({', '.join(backends)}), shapes {SHAPES}: "
          f"{len(failures)} mismatch(es)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
