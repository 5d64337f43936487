"""The in-place contracts of the fused ops, the same on every backend: a tensor that
autograd records is refused (the ops run unseen by it), and the aliasing rule of ``ops.SAME_TENSOR_OK`` holds
for every (written, other) argument pair: the very same tensor only where listed, and
then every backend computes what the reference computes; any other overlap is an error."""

from __future__ import annotations

import pytest
import torch

from revdeq_kernels import ops
from revdeq_kernels.ops import reference
from tests.helpers import assert_close, backend_device_pairs, pair_id

PAIRS = backend_device_pairs()
SHAPE = (4, 33)
RATIO = (1, 5, 20)  # 1 - beta = 1/5, frac_bits 20


def _float(device, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _fixed(device, seed):
    return (_float(device, seed, torch.float64) * 2**20).round().long()


def _arguments(op: str, device) -> dict[str, torch.Tensor]:
    """Fresh, separate arguments of ``op`` by name (the names the error messages use)."""
    if op in ("relax_", "unrelax_"):
        return dict(state=_float(device, 1), f_out=_float(device, 2))
    if op == "relax_residual_":
        return dict(y=_float(device, 1), z=_float(device, 2), f_out=_float(device, 3))
    if op == "adjoint_accumulate_":
        return dict(grad=_float(device, 1), vjp=_float(device, 2), cotangent=_float(device, 3))
    flags = torch.zeros(2, dtype=torch.int32, device=device)
    digits = _fixed(device, 4).abs()
    if op == "exact_relax_residual_":
        return dict(y=_fixed(device, 1), digits=digits, z=_fixed(device, 2), f_out=_float(device, 3), flags=flags)
    return dict(state=_fixed(device, 1), digits=digits, f_out=_float(device, 3), flags=flags)


def _call(op: str, args: dict, backend: str):
    if op in ("relax_", "unrelax_"):
        return getattr(ops, op)(args["state"], args["f_out"], 0.7, backend=backend)
    if op == "relax_residual_":
        return ops.relax_residual_(args["y"], args["z"], args["f_out"], 0.7, backend=backend)
    if op == "adjoint_accumulate_":
        return ops.adjoint_accumulate_(args["grad"], args["vjp"], args["cotangent"], 0.7, False, backend=backend)
    if op == "exact_relax_residual_":
        return ops.exact_relax_residual_(args["y"], args["digits"], args["z"], args["f_out"], args["flags"], 1,
                                         *RATIO, backend=backend)
    return getattr(ops, op)(args["state"], args["digits"], args["f_out"], args["flags"], 1, *RATIO, backend=backend)


def _reference(op: str, args: dict):
    if op in ("relax_", "unrelax_"):
        return getattr(reference, op)(args["state"], args["f_out"], 0.7)
    if op == "relax_residual_":
        return reference.relax_residual_(args["y"], args["z"], args["f_out"], 0.7)
    if op == "adjoint_accumulate_":
        return reference.adjoint_accumulate_(args["grad"], args["vjp"], args["cotangent"], 0.7, False)
    raise AssertionError(f"{op} allows no same-tensor pair")


WRITTEN = {"relax_": ["state"], "unrelax_": ["state"], "relax_residual_": ["y"],
           "adjoint_accumulate_": ["grad", "cotangent"], "exact_relax_": ["state", "digits"],
           "exact_unrelax_": ["state", "digits"], "exact_relax_residual_": ["y", "digits"]}
FLOAT_OPS = ["relax_", "unrelax_", "relax_residual_", "adjoint_accumulate_"]


def _pairs():
    """(op, written, other): every pair of a float tensor written in place and another
    argument of the same dtype (the exact ops' int64 pairs too)."""
    out = []
    for op, written in WRITTEN.items():
        names = list(_arguments(op, "cpu"))
        for w in written:
            for o in names:
                if o != w and o != "flags" and (op in FLOAT_OPS or _arguments(op, "cpu")[o].dtype == torch.int64):
                    out.append((op, w, o))
    return out


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("op", list(WRITTEN))
def test_a_written_tensor_that_autograd_records_is_refused(pair, op):
    backend, device = pair
    for name in WRITTEN[op]:
        args = _arguments(op, device)
        if not args[name].is_floating_point():
            continue  # integer tensors cannot require grad
        leaf = args[name].requires_grad_()
        with pytest.raises(RuntimeError, match=f"{name} requires grad and grad mode is on.*{name}.detach"):
            _call(op, args, backend)
        args[name] = leaf * 1.0  # a non-leaf: autograd would ignore the kernel's write
        with pytest.raises(RuntimeError, match=f"{name} requires grad and grad mode is on"):
            _call(op, args, backend)
        with torch.no_grad():  # the solvers' own calls: no graph is being recorded
            _call(op, args, backend)
    read = [n for n, t in _arguments(op, device).items() if n not in WRITTEN[op] and t.is_floating_point()]
    for name in read:  # no gradient would reach a read argument either
        args = _arguments(op, device)
        args[name].requires_grad_()
        with pytest.raises(RuntimeError, match=f"{name} requires grad and grad mode is on"):
            _call(op, args, backend)
    z, f_out = _float(device, 1).requires_grad_(), _float(device, 2)
    with pytest.raises(RuntimeError, match="z requires grad and grad mode is on"):
        ops.residual_norms(z, f_out, backend=backend)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
@pytest.mark.parametrize("op,written,other", _pairs(), ids=lambda v: str(v))
def test_each_aliasing_pair_follows_the_one_rule(pair, op, written, other):
    backend, device = pair
    args = _arguments(op, device)
    same = (written, other) in ops.SAME_TENSOR_OK.get(op, ())
    expected = {k: v.clone() for k, v in args.items()}
    args[other] = args[written]
    if same:
        expected[other] = expected[written]
        got = _call(op, args, backend)
        want = _reference(op, expected)
        for name in WRITTEN[op]:
            assert_close(args[name], expected[name], 1e-6 * (expected[name].abs() + 1),
                         f"{op} with {other} = {written} on {backend}: {name}")
        if want is not None:
            for i, (a, e) in enumerate(zip(got, want)):
                assert_close(a, e, 1e-5 * (e.abs() + 1), f"{op} with {other} = {written} on {backend}: sum {i}")
    else:
        with pytest.raises(ValueError, match=f"{op}: ({other} is {written}|{written} is {other}) itself, which {op} "
                                             "writes in place"):
            _call(op, args, backend)
    # a partial overlap, two views of one buffer shifted by a few elements, is refused everywhere
    args = _arguments(op, device)
    buffer = torch.empty(args[written].numel() + 5, dtype=args[written].dtype, device=device)
    args[written] = buffer[:args[written].numel()].view(SHAPE).copy_(args[written])
    args[other] = buffer[5:].view(SHAPE).copy_(args[other]) if args[other].dtype == buffer.dtype else args[other]
    if args[other].dtype == buffer.dtype:
        with pytest.raises(ValueError, match=f"{op}: .* overlap in memory without being the same tensor"):
            _call(op, args, backend)


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_a_strided_read_view_into_the_written_tensor_is_refused(pair):
    backend, device = pair
    buffer = _float(device, 5, torch.float32).new_zeros(4, 66)
    state = buffer[:, :33]
    with pytest.raises(ValueError, match="must be contiguous"):  # a written tensor must be contiguous
        ops.relax_(state, _float(device, 6), 0.5, backend=backend)
    flat = torch.zeros(4 * 33 * 2, device=device)
    state = flat[: 4 * 33].view(SHAPE)
    f_out = flat[1::2][: 4 * 33].view(SHAPE)  # every other element, starting inside state
    with pytest.raises(ValueError, match="relax_: f_out and state .* overlap in memory"):
        ops.relax_(state, f_out, 0.5, backend=backend)


def test_the_rule_table_lists_only_pairs_the_ops_have():
    for op, pairs in ops.SAME_TENSOR_OK.items():
        names = set(_arguments(op, "cpu"))
        for written, read in pairs:
            assert written in WRITTEN[op] and read in names, (op, written, read)
