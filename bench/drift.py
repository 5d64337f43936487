"""Reconstruction drift of the reversible backward, measured.

`python bench/drift.py [--json PATH]` prints, for float64 and float32 states (and with
`--dtypes ...,float16-autocast`, float32 states with f under float16 autocast), several
beta and step counts, for the float reversal (with and without checkpoints) and the exact
one: the relative gradient error against autograd through the unrolled iteration (same
weights, same inputs, same dtype) and the reconstruction error the backward reports (how
far the rebuilt start lands from the truth; NaN when it is not finite).

Blocks: ``tanh`` (the README quick start's, contractive) and ``residual`` (z + 0.5
MLP(LN(z + Wx)), the language model's shape: expansive, where a float reversal drifts), the
default two; and two that users bring, ``torch_encoder`` (PyTorch's nn.TransformerEncoderLayer
in eval mode, whose fused inference path runs only without a graph) and ``conv`` (a
multiscale DEQ's conv + GroupNorm residual block on 8x8 maps). First, for each block, the
spectral radius of df/dz at its solution (rk.spectral_radius) says which expand.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

import torch
from torch import nn

import revdeq_kernels as rk
from bench_env import header, print_header
from result_file import write_json


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.mix, self.inject = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, z, x):
        return torch.tanh(self.mix(z) + self.inject(x))


class ResidualBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.inject, self.norm = nn.Linear(width, width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, z, x):
        return z + 0.5 * self.mlp(self.norm(z + self.inject(x)))


class TorchEncoderBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True).eval()

    def forward(self, z, x):
        return self.layer(z + x)


class ConvBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(4, channels)

    def forward(self, z, x):
        return self.norm(z + self.conv2(torch.relu(self.conv1(z))) + x)


# block: (its class, the input's dims between the batch and the width)
BLOCKS = {"tanh": (Block, ()), "residual": (ResidualBlock, ()), "torch_encoder": (TorchEncoderBlock, (8,)),
          "conv": (ConvBlock, None)}


def block_and_input(block, dtype, width=32, batch=8):
    torch.manual_seed(0)
    cls, middle = BLOCKS[block]
    shape = (batch, width, 8, 8) if middle is None else (batch, *middle, width)  # conv: channels first
    return cls(width).to(dtype), torch.randn(shape, dtype=dtype, requires_grad=True)


def jacobian_radius(block, beta, steps) -> torch.Tensor:
    """rk.spectral_radius of df/dz at the float64 solution after ``steps`` steps, per sample."""
    f, x = block_and_input(block, torch.float64)
    with torch.no_grad():
        z = rk.solve(f, x, beta=beta, max_steps=steps, tol=0).z
    return rk.spectral_radius(f, z, x.detach())


# what the table's "states and f" column names: (dtype of x, f's weights and the states; autocast dtype)
DTYPES = {"float64": (torch.float64, None), "float32": (torch.float32, None),
          "float16-autocast": (torch.float32, torch.float16)}


def gradients(block, dtypes, beta, steps, **settings):
    dtype, autocast = DTYPES[dtypes]
    f, x = block_and_input(block, dtype)
    precision = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with warnings.catch_warnings(), precision:
        warnings.simplefilter("ignore")  # the drift warning: this table is the measurement
        on_nonfinite = "raise" if settings.get("reversal") == "exact" else "warn"  # float: NaN rows, not errors
        sol = rk.solve(f, x, beta=beta, max_steps=steps, tol=0, on_nonfinite=on_nonfinite, **settings)
        sol.z.double().square().sum().backward()
    grads = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in f.parameters()]).double()
    return grads, sol.reconstruction_error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--betas", default="0.5,0.8", help="comma-separated")
    parser.add_argument("--steps", default="4,8,16,32,64,128", help="comma-separated")
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--blocks", default="tanh,residual", help=f"comma-separated: {', '.join(BLOCKS)}")
    parser.add_argument("--dtypes", default="float64,float32", help=f"comma-separated: {', '.join(DTYPES)}")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows, radii = [], {}
    info = header(torch.device("cpu"))
    print_header(info, "drift: width 32, batch 8, loss sum z^2, backend auto")
    print("| block | states and f | beta | steps | reversal | grad rel. error vs unrolled | reconstruction error |")
    print("|---|---|---|---|---|---|---|")
    betas, steps_list = [float(b) for b in args.betas.split(",")], [int(n) for n in args.steps.split(",")]
    for block in args.blocks.split(","):
        radius = jacobian_radius(block, betas[0], max(steps_list))
        radii[block] = radius.tolist()
        print(f"# {block}: spectral radius of df/dz at the float64 solution after {max(steps_list)} steps, beta "
              f"{betas[0]}: median {radius.median():.3f}, max {radius.max():.3f} over the batch", flush=True)
    for block in args.blocks.split(","):
        for dtype in args.dtypes.split(","):
            for beta in betas:
                for steps in steps_list:
                    truth, _ = gradients(block, dtype, beta, steps, adjoint="unrolled", reversal=None)
                    variants = [("float", dict(reversal="float")),
                                (f"float, checkpoint_every={args.checkpoint_every}",
                                 dict(reversal="float", checkpoint_every=args.checkpoint_every)),
                                ("exact", dict(reversal="exact"))]
                    for name, settings in variants:
                        if settings.get("checkpoint_every", 0) >= steps:
                            continue
                        got, recon = gradients(block, dtype, beta, steps, **settings)
                        err = float((got - truth).norm() / truth.norm())
                        row = dict(block=block, dtype=dtype, beta=beta, steps=steps,
                                   reversal=name, grad_rel_error=err, reconstruction_error=recon)
                        rows.append(row)
                        print(f"| {block} | {row['dtype']} | {beta} | {steps} | {name} | {err:.2e} | {recon:.2e} |",
                              flush=True)
    if args.json:
        write_json(args.json, dict(header=info, spectral_radius=radii, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
