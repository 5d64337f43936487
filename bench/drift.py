"""Reconstruction drift of the reversible backward, measured.

`python bench/drift.py [--json PATH]` prints, for float64 and float32 states, several
beta and step counts, with and without checkpoints: the relative gradient error against
autograd through the unrolled iteration (same weights, same inputs, same dtype) and the
reconstruction error the backward reports (how far the rebuilt start lands from the truth).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from torch import nn

import revdeq_kernels as rk


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.mix, self.inject = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, z, x):
        return torch.tanh(self.mix(z) + self.inject(x))


def gradients(adjoint, dtype, beta, steps, checkpoint_every, width=32, batch=8):
    torch.manual_seed(0)
    f = Block(width).to(dtype)
    x = torch.randn(batch, width, dtype=dtype, requires_grad=True)
    sol = rk.solve(f, x, beta=beta, max_steps=steps, tol=0, adjoint=adjoint,
                   checkpoint_every=checkpoint_every, backend="torch")
    sol.z.double().square().sum().backward()
    grads = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in f.parameters()]).double()
    return grads, sol.reconstruction_error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--betas", default="0.5,0.8", help="comma-separated")
    parser.add_argument("--steps", default="4,8,16,32", help="comma-separated")
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print(f"# drift: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, tanh(Wz + Ux) width 32, batch 8, loss sum z^2")
    print("| states | beta | steps | checkpoints | grad rel. error vs unrolled | reconstruction error |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float64, torch.float32):
        for beta in map(float, args.betas.split(",")):
            for steps in map(int, args.steps.split(",")):
                truth, _ = gradients("unrolled", dtype, beta, steps, None)
                for ck in (None, args.checkpoint_every):
                    if ck is not None and ck >= steps:
                        continue
                    got, recon = gradients("reversible", dtype, beta, steps, ck)
                    err = float((got - truth).norm() / truth.norm())
                    row = dict(dtype=str(dtype).removeprefix("torch."), beta=beta, steps=steps,
                               checkpoint_every=ck, grad_rel_error=err, reconstruction_error=recon)
                    rows.append(row)
                    print(f"| {row['dtype']} | {beta} | {steps} | {ck or '-'} | {err:.2e} | {recon:.2e} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
