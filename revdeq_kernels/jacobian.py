"""f at a solution z*: the setup the Jacobian penalty and the spectral radius share, the
spectral radius of f's Jacobian, the reversible iteration's rate, and whether z* is a fixed
point of f or a 2-cycle.

Is z* an equilibrium the iteration reaches and keeps? ``iteration_rate`` answers for the
reversible iteration: the spectral radius of its linearised step, below 1 exactly when it
converges to z*. ``spectral_radius`` (of df/dz) is the stricter, solver-free test: below
1, f contracts around z* (in some norm), the plain iteration converges there, and so does
the reversible one for any beta in (0, 1); at 1 or above only the plain iteration is sure
to fail, since the reversible step damps an eigenvalue near +-i (see ``iteration_rate``).
The spectral radius also bears on a float reversal's drift: each reverse step divides by
1 - beta and passes the rounding of the rebuilt states through f, so an f that expands (a
residual block z + g(z) has rho near 1 or above) drifts faster (docs/numerics.md measures
both)."""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import Tensor

from .convergence import at_two_cycle, relative_residual
from .f_module import BufferSnapshot, bind_context, check_callable
from .ops.reference import residual_norms
from .packing import Layout, PackedF, is_several
from .settings import coupling


def _block_of(f):
    """f itself, or the f of a ReversibleDEQ or DEQ layer."""
    from .deq import DEQ
    from .reversible import ReversibleDEQ

    return f.f if isinstance(f, (ReversibleDEQ, DEQ)) else f


def as_last_solved(f) -> contextlib.AbstractContextManager:
    """For a layer whose last solve drew one set of random numbers (rng="per_solve"): those
    (``replaying_rng``). A bare block, a layer not yet called, or one solved with a new mask
    per evaluation has no such f, and f draws fresh numbers, as it would from the block."""
    from .deq import DEQ
    from .reversible import ReversibleDEQ

    stream = f.last_stats.random_stream if isinstance(f, (ReversibleDEQ, DEQ)) and f.last_stats else None
    return f.replaying_rng() if stream is not None and stream.mode == "per_solve" else contextlib.nullcontext()


def block_at(f, z, x, context: dict):
    """(block, z, x) for evaluating f at a solution: the block of a layer with its context
    keywords bound, a state of several tensors packed into one (the Jacobian of the whole),
    and z detached, in x's dtype, requiring grad."""
    block, _ = bind_context(_block_of(f), context)
    check_callable(block)
    if is_several(z) or is_several(x):
        z_layout = Layout.of(z, "z") if is_several(z) else None
        x_layout = Layout.of(x, "x") if is_several(x) else None
        block = PackedF(block, z_layout, x_layout)
        z = z_layout.pack(z) if z_layout is not None else z
        x = x_layout.pack(x) if x_layout is not None else x
    if not isinstance(z, Tensor) or not isinstance(x, Tensor):
        raise TypeError(f"z and x must be tensors, got {type(z).__name__} and {type(x).__name__}")
    return block, z.detach().to(x.dtype).requires_grad_(), x


def evaluate_at(block, z: Tensor, x: Tensor, what: str) -> Tensor:
    """f(z, x), which must have z's shape."""
    fz = block(z, x)
    if not isinstance(fz, Tensor) or fz.shape != z.shape:
        got = tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__
        raise ValueError(f"f returned {got} for z of shape {tuple(z.shape)}; {what} needs f(z, x) of z's shape, "
                         "at the solution z the layer returned")
    return fz


# A Ritz pair counts as converged when its residual |M^T u - mu u| is within 1% of |mu|: a
# trained language-model block's top pairs reach 1e-5 to 4e-3 in 100 iterations, where the
# spurious values measured on non-normal maps sat at 0.04 to 0.11.
RITZ_CONVERGED = 1e-2


def spectral_radius(f, z, x, *, iters: int = 100, vectors: int = 4, seed: int = 0, **context) -> Tensor:
    """Per sample, an estimate of the spectral radius of f's Jacobian in z at (z, x): the
    largest |eigenvalue| of df/dz. Subspace iteration with vector-Jacobian products (the
    transposed Jacobian has the same eigenvalues): ``vectors`` orthonormal directions per
    sample, multiplied by J^T and re-orthonormalised ``iters`` times from a random start
    (``seed``; the global RNG is left alone), then the largest |eigenvalue| of J^T projected
    on them. With two or more vectors a complex or opposite-signed dominant pair converges,
    where a single power iteration oscillates; the error falls like
    (|lambda_{vectors+1}| / rho)^iters, slowly where the top eigenvalues cluster (a trained
    language-model block: its top six within 0.1% of each other, the default 100 x 4 lands
    0.4% low, 400 x 4 within 0.03%). Costs iters * vectors VJPs through one graph of f.

    ``f`` is the block, or the ``ReversibleDEQ``/``DEQ`` holding it; ``context`` its
    keywords; z and x may be tuples of tensors, as for the layer. Samples are taken to be
    independent (each sample's Jacobian is its own diagonal block), as they are for a block
    in eval mode; BatchNorm in training mode mixes them. f's buffers are left as they were
    and no gradient is recorded. Given the layer, f draws its last solve's random numbers
    (dropout masks; ``replaying_rng``): the f whose fixed point z is. Returns a tensor of
    shape [batch] in z's dtype (float32 at least), NaN for a sample whose Jacobian products
    are not finite.
    """
    _check_subspace(iters, vectors)
    block, z, x = block_at(f, z, x, context)
    with torch.enable_grad(), BufferSnapshot(block):
        with as_last_solved(f):
            jt = _transposed_jacobian(block, z, x, "spectral_radius")
        return _largest_modulus(jt, z.shape[0], z[0].numel(), z, iters, vectors, seed)


def iteration_rate(f, z, x, *, beta: float | None = None, iters: int = 100, vectors: int = 4, seed: int = 0,
                   **context) -> Tensor:
    """Per sample, the reversible iteration's rate at a solution z*: the spectral radius of
    its linearised step, the factor by which one step (``y <- (1-b) y + b f(z)``, then
    ``z <- (1-b) z + b f(y)``) shrinks a small error around z* in the long run. Below 1,
    the iteration converges to z* and more steps keep it there; at 1 or above it does not.

    This, not ``spectral_radius``, decides whether the iteration reaches z*: in the
    eigenbasis of J = df/dz, the step acts on (dy, dz) as [[1-b, b l], [b(1-b) l, 1-b +
    b^2 l^2]] for each eigenvalue l of J, whose larger root is 1 at l = +-1 and below 1 for
    real |l| < 1, but also below 1 for a nearly imaginary l of modulus above 1 (l = 1.02i:
    0.34 at b = 0.8). A trained language-model block has such a dominant pair: its spectral
    radius reads 1 or above on many windows that the iteration solves to about 1e-7.

    ``beta``: the coupling; by default the layer's when ``f`` is a ``ReversibleDEQ``, or a
    ``DEQ`` with ``solver="reversible"``. The estimate is the same subspace iteration as
    ``spectral_radius``'s, on the transposed step (2 VJPs per direction and iteration), and
    takes the same arguments and conventions. Where every eigenvalue of the step has the
    modulus |1 - b| (beta above 1 on a small J), no Ritz pair converges and the estimate
    lands between |1 - b| and about 1.3 |1 - b| (tests/test_spectral_radius.py).
    """
    _check_subspace(iters, vectors)
    beta = coupling("beta", _layer_beta(f) if beta is None else beta)
    block, z, x = block_at(f, z, x, context)
    with torch.enable_grad(), BufferSnapshot(block):
        with as_last_solved(f):
            jt = _transposed_jacobian(block, z, x, "iteration_rate")
        size = z[0].numel()

        def step_transposed(v: Tensor) -> Tensor:
            # the step is B A, with A: y <- (1-b) y + b J z and B: z <- (1-b) z + b J y; its
            # transpose A^T B^T needs J^T twice
            u, w = v[:, :size], v[:, size:]
            u = u + beta * jt(w)
            return torch.cat([(1 - beta) * u, (1 - beta) * w + beta * jt(u)], dim=1)

        rate = _largest_modulus(step_transposed, z.shape[0], 2 * size, z, iters, vectors, seed)
    # each eigenvalue of J gives two of the step whose product is (1 - b)^2, so the rate is at
    # least |1 - b|: where many share that modulus the subspace need not find one
    return rate.clamp(min=abs(1 - beta))


class FixedPointGaps(NamedTuple):
    """Per sample, shape [batch]: how far z is from a fixed point of f and from a 2-cycle."""

    residual: Tensor  # ||f(z) - z|| / (1e-5 + ||f(z)||), as the solvers' stats measure it
    cycle_gap: Tensor  # ||f(f(z)) - z|| / (1e-5 + ||z||)
    at_two_cycle: Tensor  # residual above 1e-3 and cycle_gap below 1% of it


def fixed_point_gaps(f, z, x, **context) -> FixedPointGaps:
    """Is the state z a fixed point of f, or a 2-cycle (z = f(f(z)), f(z) != z)? Any solver
    can stop at a 2-cycle: the reversible iteration rests at every one, for every beta (its
    stats say so at no cost: ``at_two_cycle``), and so does the undamped iteration
    z <- f(z). For a state any solver returned, this asks f itself: two evaluations, no
    graph. A state still converging has both gaps of one size ((J + I)(f(z) - z) for the
    second); at a 2-cycle the second is at rounding level.

    ``f``, ``z``, ``x`` and ``context`` as for ``spectral_radius``: the block or the layer
    holding it, tuples of tensors packed into one state. f's buffers are left as they were.
    """
    block, z, x = block_at(f, z, x, context)
    with torch.no_grad(), BufferSnapshot(block):
        with as_last_solved(f):
            fz = evaluate_at(block, z, x, "fixed_point_gaps")
        with as_last_solved(f):
            ffz = evaluate_at(block, fz, x, "fixed_point_gaps")
        # the solvers' own definition: ||a - b|| / (1e-5 + ||b||), summed as the stop test sums;
        # under no_grad, since block_at's z requires grad
        residual = relative_residual(*residual_norms(z, fz))
        cycle_gap = relative_residual(*residual_norms(ffz, z))
    return FixedPointGaps(residual, cycle_gap, at_two_cycle(residual, cycle_gap))


def _layer_beta(f) -> float:
    from .deq import DEQ
    from .reversible import ReversibleDEQ

    if isinstance(f, ReversibleDEQ) or (isinstance(f, DEQ) and f.settings.solver == "reversible"):
        return f.settings.beta
    what = f"a DEQ with solver={f.settings.solver!r}" if isinstance(f, DEQ) else "a block"
    raise ValueError(f"iteration_rate needs beta: f is {what}, not a reversible layer that carries one; "
                     "pass beta=")


def _check_subspace(iters, vectors) -> None:
    for name, value, least in (("iters", iters, 1), ("vectors", vectors, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _transposed_jacobian(block, z: Tensor, x: Tensor, what: str):
    """v [batch, size] -> J^T v, through one retained graph of f at (z, x)."""
    if z.dim() == 0:
        raise ValueError("z must have a batch dimension (dim 0), got a 0-d tensor")
    fz = evaluate_at(block, z, x, what)

    def jt(v: Tensor) -> Tensor:
        (image,) = torch.autograd.grad(fz, z, v.reshape(z.shape).to(z.dtype), retain_graph=True)
        return image.reshape(v.shape).to(v.dtype)

    return jt


def _largest_modulus(apply_transposed, batch: int, size: int, z: Tensor, iters: int, vectors: int,
                     seed: int) -> Tensor:
    """Per sample, the largest |eigenvalue| of the linear map whose transpose
    ``apply_transposed`` applies to [batch, size]: subspace iteration, then Rayleigh-Ritz.
    NaN for a sample whose products are not finite."""
    vectors = min(vectors, size)
    acc = torch.promote_types(z.dtype, torch.float32)
    generator = torch.Generator(device=z.device).manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(batch, size, vectors, generator=generator, device=z.device, dtype=acc))[0]
    finite = torch.ones(batch, dtype=torch.bool, device=z.device)
    for i in range(iters):
        image = torch.stack([apply_transposed(basis[..., j]) for j in range(vectors)], dim=-1)
        finite &= torch.isfinite(image).flatten(1).all(dim=1)
        image = torch.where(finite[:, None, None], image, 0.0)  # a NaN sample must not poison QR's batch
        if i < iters - 1:
            basis = torch.linalg.qr(image)[0]
    # Rayleigh-Ritz on V^T M^T V. For a non-normal map, directions of the basis that have
    # not converged (several eigenvalues of one modulus, as the reversible step has at
    # |1 - beta|) can give a Ritz value above every true eigenvalue: only pairs whose
    # residual |M^T u - mu u| is within RITZ_CONVERGED of |mu| count; where none is, the
    # pair nearest to converging.
    values, coefficients = torch.linalg.eig(basis.transpose(1, 2) @ image)
    residual = (image.to(values.dtype) @ coefficients - (basis.to(values.dtype) @ coefficients) * values[:, None, :])
    modulus = values.abs()
    relative = residual.norm(dim=1) / modulus
    converged = relative <= RITZ_CONVERGED
    accepted = torch.where(converged, modulus, 0.0).amax(dim=1)
    nearest = modulus.gather(1, relative.nan_to_num(math.inf).argmin(dim=1, keepdim=True))[:, 0]
    radius = torch.where(converged.any(dim=1), accepted, nearest)
    return torch.where(finite, radius, float("nan"))
