"""The fixed-point format of ``reversal="exact"``: states as integers, 1 - beta as n/d.

The reversible iteration multiplies each state by 1 - beta every step, and its inverse
divides by it. In floating point each division amplifies the rounding of the forward
step, so the reconstructed states drift (``docs/numerics.md``). Here a state is an int64
``h`` standing for ``h * 2**-frac_bits``; adding the quantised ``beta * f`` is then exact,
and the one lossy operation, the multiplication by n/d, keeps its remainder in a digit
buffer (MacKay et al. 2018, "Reversible Recurrent Neural Networks", Algorithm 1):

    forward  B = B*d + (h mod d); h = h div d; h = h*|n| + (B mod |n|); B = B div |n|; h = sign(n) h
    inverse  the same steps undone in reverse order

Each step adds log2(d/|n|) bits of digits per element. They are packed into int64
planes of ``plane_capacity(n, d)`` steps; a full plane is set aside (it is what the
backward needs, besides the two states) and a zeroed one starts. The backward pops the
digits, so every state it rebuilds is the forward's, bit for bit.

``ops/reference.py`` holds the element arithmetic (the truth the kernels are tested
against); this file holds the format around it: the ratio, the plane size, the
conversions and the plane stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor

MAX_DENOMINATOR = 64
RANGE_BITS = 62  # |h| < 2**62: the sum of two in-range values cannot wrap an int64
# frac_bits when none is given: float32/16-bit f keeps its 24 bits for |values| >= 2^-8 with
# room up to 2^30; float64 f gets a 3.6e-15 grid with room up to 2^14 = 16384.
DEFAULT_FRAC_BITS = 32
DEFAULT_FRAC_BITS_FLOAT64 = 48
FRAC_BITS_RANGE = (8, 56)
FLAG_NONFINITE = 1  # f's output was NaN or Inf (flags[step] |= 1)
FLAG_RANGE = 2  # a state left (-2**62, 2**62) grid units (flags[step] |= 2)
_BETA_MATCH = 1e-9  # |beta - (1 - n/d)|: a float written as 0.8 is 1 - 1/5 to 1e-16


@dataclass(frozen=True)
class Ratio:
    """1 - beta = numerator / denominator, in lowest terms; numerator < 0 for beta > 1."""

    numerator: int
    denominator: int

    @property
    def beta(self) -> float:
        return 1.0 - self.numerator / self.denominator

    @property
    def bits_per_step(self) -> float:
        return math.log2(self.denominator / abs(self.numerator))


def nearest_ratio(beta: float) -> Ratio | None:
    """The ratio with d <= 64 nearest to 1 - beta (None when that is 0 or +-1)."""
    one_minus = Fraction(1.0 - float(beta)).limit_denominator(MAX_DENOMINATOR)
    if one_minus == 0 or abs(one_minus) >= 1:
        return None
    return Ratio(one_minus.numerator, one_minus.denominator)


def beta_ratio(beta: float) -> Ratio:
    """The exact ratio of ``beta``, or a ValueError naming the nearest beta that has one."""
    ratio = nearest_ratio(beta)
    if ratio is None or abs(ratio.beta - float(beta)) > _BETA_MATCH:
        nearest = f"the nearest is {ratio.beta!r} (1 - beta = {ratio.numerator}/{ratio.denominator})" if ratio \
            else "beta must be in (0, 2) and != 1"
        raise ValueError(f"must equal 1 - n/d with 0 < |n| < d <= {MAX_DENOMINATOR} for reversal='exact' "
                         f"(0.5, 0.8, 0.25, 0.75, 1.2, ...); {beta} does not: {nearest}")
    return ratio


def plane_capacity(ratio: Ratio) -> int:
    """Steps one int64 digit plane holds: the most k for which every forward step's
    B*d + (d-1) stays below 2**63, starting from B = 0 (computed on Python integers)."""
    d, n = ratio.denominator, abs(ratio.numerator)
    bound, steps = 0, 0
    while bound * d + d - 1 < 2**63:
        bound = (bound * d + d - 1) // n
        steps += 1
    return steps


def default_frac_bits(f_dtype: torch.dtype) -> int:
    return DEFAULT_FRAC_BITS_FLOAT64 if f_dtype == torch.float64 else DEFAULT_FRAC_BITS


def quantisation_scale(ratio: Ratio, frac_bits: int) -> float:
    """beta * 2**frac_bits in float64, the way every backend computes it: q = rint(f * scale)."""
    return math.ldexp((ratio.denominator - ratio.numerator) / ratio.denominator, frac_bits)


def range_limit(frac_bits: int) -> float:
    """The largest |value| a state can hold: 2**(62 - frac_bits)."""
    return math.ldexp(1.0, RANGE_BITS - frac_bits)


def to_fixed(t: Tensor, frac_bits: int, what: str = "z0") -> Tensor:
    """rint(t * 2**frac_bits) as int64; a FloatingPointError if t is non-finite or out of range."""
    scaled = torch.round(t.detach().to(torch.float64) * math.ldexp(1.0, frac_bits))
    if t.numel() and not bool((scaled.abs() < math.ldexp(1.0, RANGE_BITS)).all()):
        worst = float(t.detach().abs().max())
        raise FloatingPointError(
            f"{what} has a value of magnitude {worst:g}, outside the exact state range "
            f"+-{range_limit(frac_bits):g} of frac_bits={frac_bits}; lower frac_bits")
    return scaled.to(torch.int64)


def from_fixed(h: Tensor, frac_bits: int, dtype: torch.dtype) -> Tensor:
    """h * 2**-frac_bits in ``dtype`` (through float64: one rounding for 32-bit values)."""
    return (h.to(torch.float64) * math.ldexp(1.0, -frac_bits)).to(dtype)


@dataclass
class DigitPlanes:
    """The digit buffer of one state: the plane in use and the full ones set aside.

    ``before_forward`` runs before each forward multiplication and ``after_inverse``
    after each inverse one, so a speculative update undone at once (the fused stop
    test) leaves the stack as it was.
    """

    current: Tensor
    capacity: int
    used: int = 0  # multiplications whose digits are in ``current``
    full: list[Tensor] = field(default_factory=list)

    @classmethod
    def empty_like(cls, state: Tensor, capacity: int) -> DigitPlanes:
        return cls(torch.zeros_like(state, dtype=torch.int64), capacity)

    def before_forward(self) -> Tensor:
        if self.used == self.capacity:
            self.full.append(self.current)
            self.current = torch.zeros_like(self.current)
            self.used = 0
        self.used += 1
        return self.current

    def after_inverse(self, leftovers: list[Tensor]) -> None:
        """One inverse multiplication done; an emptied plane is checked (it must be all
        zeros again) by adding it to ``leftovers``, and the previous plane comes back."""
        self.used -= 1
        if self.used == 0 and self.full:
            leftovers.append(self.current)
            self.current = self.full.pop().clone()  # saved for backward: never written
            self.used = self.capacity

    def tensors(self) -> list[Tensor]:
        return self.full + [self.current]

    @classmethod
    def restore(cls, planes: list[Tensor], capacity: int, used: int) -> DigitPlanes:
        """From ``tensors()`` saved for backward. A plane is copied when it becomes the one
        written, so a second backward (retain_graph=True) finds the saved planes untouched
        and the copies cost one plane at a time."""
        return cls(planes[-1].clone(), capacity, used, list(planes[:-1]))
