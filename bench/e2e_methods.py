"""The methods the e2e suite compares, built around the language model's transformer block.

Every method gets the same forward budget of f evaluations at sweep point N ("steps"):
the reversible iteration's 1 + 2N.
    reversible        rk.DEQ(solver="reversible", adjoint="reversible", reversal="float"), N steps
    reversible_ck     the same with checkpoint_every=K (drift bounded by K steps, memory O(N/K))
    reversible_exact  the same with reversal="exact", the default (bit-exact states, + digit planes of
                      log2(d/n) bits/step)
    unrolled          the same iteration, autograd through every step (the truth for reversible)
    implicit          rk.DEQ(solver=baseline, adjoint="implicit"), 2N steps; adjoint solve 2N steps
    phantom           rk.DEQ(solver=baseline, adjoint="phantom"), 2N steps; k damped steps back
    broyden           rk.DEQ(solver="broyden", adjoint="implicit", backward_solver="broyden"), 2N steps
                      both ways: the DEQ-Transformer recipe of locuslab/deq
    explicit          L = 1 + 2N blocks with separate weights: z = 0; z = block_l(z, x)
    torchdeq_ift      torchdeq's DEQIndexing, same solver and 2N steps, IFT (its output is f(z*))
    torchdeq_phantom  torchdeq's DEQIndexing, phantom gradient with the same k and damping
All solves run with tol = 0, so every method spends its whole budget at every point.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import revdeq_kernels as rk
from revdeq_kernels.lm.block import BLOCKS, Block, init_weights_

# The float reversal's drift warnings: the table reports its gradient error instead.
warnings.filterwarnings("ignore", message="the reversible backward", category=RuntimeWarning)

METHODS = ("reversible", "reversible_ck", "reversible_exact", "unrolled", "implicit", "phantom", "broyden",
           "explicit", "torchdeq_ift", "torchdeq_phantom")
TORCHDEQ_SOLVERS = {"fixed_point": "fixed_point_iter", "anderson": "anderson"}


@dataclass(frozen=True)
class Setup:
    batch: int = 8
    seq: int = 64
    width: int = 128
    heads: int = 4
    mlp_ratio: float = 4.0
    block: str = "residual"        # a key of revdeq_kernels.lm.block.BLOCKS
    dtype: str = "float32"         # parameters, inputs and DEQ states
    autocast: str = "off"          # "bf16": the forward under bf16 autocast (f in bf16, states in dtype)
    device: str = "cpu"
    beta: float = 0.8              # reversible coupling
    checkpoint_every: int = 4      # reversible_ck
    baseline_solver: str = "fixed_point"
    damping: float = 0.8           # fixed-point / Anderson damping of the baselines
    m: int = 5                     # Anderson window (baseline_solver="anderson")
    lam: float = 1e-4
    broyden_m: int = 30            # Broyden's stored inverse-Jacobian pairs (method "broyden")
    phantom_steps: int = 5
    phantom_beta: float = 0.8
    seed: int = 0

    def small(self, width: int, seq: int, batch: int, heads: int) -> "Setup":
        """The float64 copy the gradient errors are measured on."""
        fields = asdict(self) | dict(width=width, seq=seq, batch=batch, heads=heads, dtype="float64", autocast="off")
        return Setup(**fields)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def torchdeq_status() -> str | None:
    """None if torchdeq can be used, else why not."""
    try:
        import torchdeq  # noqa: F401
    except ImportError as error:
        return f"torchdeq is not installed ({error}); `pip install torchdeq` adds its rows"
    return None


def make_block(setup: Setup, depth: int) -> Block:
    """The LM's block (``setup.block``) with the LM's initialisation (depth = block evaluations on the
    residual path)."""
    block = BLOCKS[setup.block](setup.width, setup.heads, int(setup.mlp_ratio * setup.width))
    init_weights_(block, depth)
    return block.to(device=setup.device, dtype=setup.torch_dtype)


class Explicit(nn.Module):
    def __init__(self, blocks: list[Block]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        z = torch.zeros_like(x)
        for block in self.blocks:
            z = block(z, x)
        return z


class TorchDEQ(nn.Module):
    """torchdeq's DEQIndexing around the block, driven like the others: forward(x) -> z."""

    def __init__(self, block: Block, setup: Setup, steps: int, ift: bool):
        super().__init__()
        import torchdeq

        self.block = block
        kwargs = dict(ift=True) if ift else dict(grad=setup.phantom_steps, tau=setup.phantom_beta)
        self.deq = torchdeq.get_deq(
            core="indexing", f_solver=TORCHDEQ_SOLVERS[setup.baseline_solver], f_max_iter=steps, f_tol=0.0,
            b_solver="fixed_point_iter", b_max_iter=steps, b_tol=0.0, **kwargs)
        self.solver_kwargs = dict(tau=setup.damping, return_final=True)
        if setup.baseline_solver == "anderson":
            self.solver_kwargs |= dict(m=setup.m, lam=setup.lam)

    def forward(self, x: Tensor) -> Tensor:
        z_out, _ = self.deq(lambda z: self.block(z, x), torch.zeros_like(x), solver_kwargs=self.solver_kwargs)
        return z_out[-1]


def evaluations(steps: int) -> int:
    """Forward budget at sweep point N = steps: the reversible iteration's 1 + 2N."""
    return 1 + 2 * steps


def seeded_block(steps: int, setup: Setup) -> Block:
    """The weight-tied block every DEQ method at sweep point ``steps`` starts from."""
    torch.manual_seed(setup.seed)
    return make_block(setup, evaluations(steps))


def broyden_forward(steps: int, setup: Setup) -> dict:
    """The forward solve of method "broyden" (its first step damped like the baselines')."""
    return dict(solver="broyden", max_steps=2 * steps, tol=0, beta=setup.damping, m=setup.broyden_m)


def build(method: str, steps: int, setup: Setup) -> nn.Module:
    """A module mapping x [B, T, D] to z [B, T, D] for ``method`` at sweep point ``steps``."""
    if method == "explicit":
        torch.manual_seed(setup.seed)
        return Explicit([make_block(setup, evaluations(steps)) for _ in range(evaluations(steps))])
    block = seeded_block(steps, setup)
    baseline = dict(solver=setup.baseline_solver, max_steps=2 * steps, tol=0, beta=setup.damping)
    if setup.baseline_solver == "anderson":
        baseline |= dict(m=setup.m, lam=setup.lam)
    # The float reversal drifts to NaN on this block at large N: "warn" lets it be timed
    # anyway (the table reports its gradient error); the exact one cannot drift.
    reversible = dict(solver="reversible", adjoint="reversible", beta=setup.beta, max_steps=steps, tol=0)
    if method == "reversible":
        return rk.DEQ(block, **reversible, on_nonfinite="warn", reversal="float")
    if method == "reversible_ck":
        return rk.DEQ(block, **reversible, on_nonfinite="warn", reversal="float",
                      checkpoint_every=setup.checkpoint_every)
    if method == "reversible_exact":
        return rk.DEQ(block, **reversible, reversal="exact")
    if method == "unrolled":
        return rk.DEQ(block, solver="reversible", adjoint="unrolled", beta=setup.beta, max_steps=steps, tol=0)
    if method == "implicit":
        return rk.DEQ(block, adjoint="implicit", backward_max_steps=2 * steps, backward_tol=0, **baseline)
    if method == "phantom":
        return rk.DEQ(block, adjoint="phantom", phantom_steps=setup.phantom_steps,
                      phantom_beta=setup.phantom_beta, **baseline)
    if method == "broyden":
        return rk.DEQ(block, **broyden_forward(steps, setup), adjoint="implicit", backward_solver="broyden",
                      backward_max_steps=2 * steps, backward_tol=0)
    if method in ("torchdeq_ift", "torchdeq_phantom"):
        return TorchDEQ(block, setup, 2 * steps, ift=method == "torchdeq_ift")
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def inputs(setup: Setup) -> tuple[Tensor, Tensor]:
    """x (a leaf that requires grad, like the LM's embeddings) and the regression target."""
    generator = torch.Generator().manual_seed(setup.seed + 1)
    shape = (setup.batch, setup.seq, setup.width)
    x = torch.randn(shape, generator=generator, dtype=setup.torch_dtype).to(setup.device).requires_grad_(True)
    target = torch.randn(shape, generator=generator, dtype=setup.torch_dtype).to(setup.device)
    return x, target


def loss_fn(z: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(z.to(target.dtype), target)


class TrainStep:
    """One training step without the optimizer update: zero grads, forward, MSE loss, backward.

    The update is left out so that every repeat computes exactly the same thing (weights
    never move: a method whose gradients are wrong cannot derail the later repeats), and
    because its cost does not depend on the method, only on the number of parameters."""

    def __init__(self, model: nn.Module, setup: Setup):
        self.model = model
        self.params = list(model.parameters())
        self.x, self.target = inputs(setup)
        self.autocast = dict(device_type=torch.device(setup.device).type, dtype=torch.bfloat16,
                             enabled=setup.autocast == "bf16")

    def __call__(self) -> None:
        for p in self.params:
            p.grad = None
        self.x.grad = None
        with torch.autocast(**self.autocast):
            z = self.model(self.x)
        loss_fn(z, self.target).backward()
