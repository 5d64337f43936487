"""A loss on the trajectory (``states_at``): exactness, saved memory and step time, measured.

`python bench/trajectory.py [--json PATH]` solves the language model's block shape
(z + 0.5 MLP(LN(z + Wx)), width 64, batch 8; expansive) for N steps and puts a loss on z at
N/4, N/2, 3N/4 and N, as a fixed-point correction does. For each N it prints:
- the relative error of dL/d(x, parameters) against float64 autograd through the unrolled
  iteration, for float32 autograd (backprop's own rounding), the exact reversal and the
  float reversal in float32;
- the bytes autograd saves for the backward (the saved-tensor hooks' count), with and
  without the four states, and for unrolled autograd;
- the training step time of the exact reversal with the four states over without, at
  batch 128 (median of alternated runs; one CPU thread).

`--checkpoint runs/tiny/last.pt` measures the same errors on a trained language model
instead: the mean cross-entropy of the read-out of each of the four states, on
`--windows` validation windows, the gradient over every parameter.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import revdeq_kernels as rk
from bench_env import header, print_header
from drift import ResidualBlock
from result_file import write_json

WIDTH, BATCH = 64, 8
TIMING_BATCH = 128  # large enough that the step's arithmetic, not Python, sets the time


def quarter_steps(steps: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, steps * q // 4) for q in (1, 2, 3, 4)}))


def problem(dtype: torch.dtype, steps: int, batch: int = BATCH):
    torch.manual_seed(0)  # drawn in float64, then cast: the same problem in every dtype
    f = ResidualBlock(WIDTH).double()
    x = torch.randn(batch, WIDTH, dtype=torch.float64)
    weights = [torch.randn(batch, WIDTH, dtype=torch.float64) for _ in quarter_steps(steps)]
    return f.to(dtype), x.to(dtype).requires_grad_(), [w.to(dtype) for w in weights]


def trajectory_loss(f, x, weights, steps, **settings):
    solution = rk.solve(f, x, beta=settings.pop("beta"), max_steps=steps, tol=0, states_at=quarter_steps(steps),
                        **settings)
    return sum((w * s).double().sum() for w, s in zip(weights, solution.states))


def gradients(dtype, steps, **settings):
    f, x, weights = problem(dtype, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float reversal's drift warning: measured here
        trajectory_loss(f, x, weights, steps, on_nonfinite="warn", **settings).backward()
    return torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in f.parameters()]).double()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def saved_bytes(steps, with_states: bool, **settings) -> int:
    """What autograd saves while the solve runs (the loss's own saved tensors not counted)."""
    f, x, _ = problem(torch.float32, steps)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rk.solve(f, x, max_steps=steps, tol=0, states_at=quarter_steps(steps) if with_states else None, **settings)
    return total


def step_time_ratio(steps: int, beta: float, repeats: int) -> float:
    """Median time of (solve + four-state loss + backward) over (solve + loss on z + backward)."""
    f, x, weights = problem(torch.float32, steps, TIMING_BATCH)

    def with_states():
        trajectory_loss(f, x, weights, steps, beta=beta).backward()

    def plain():
        rk.solve(f, x, beta=beta, max_steps=steps, tol=0).z.square().sum().backward()

    times = {with_states: [], plain: []}
    for run in (with_states, plain):
        run()  # warm-up
    for _ in range(repeats):
        for run in (with_states, plain):
            start = time.perf_counter()
            run()
            times[run].append(time.perf_counter() - start)
    return statistics.median(times[with_states]) / statistics.median(times[plain])


def trained_model_gradients(model, idx, targets, steps: int, dtype: torch.dtype, **settings) -> torch.Tensor:
    """dL/d(parameters) of the mean cross-entropy of the read-outs of the states at N/4 .. N."""
    model = copy.deepcopy(model).to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    with model.solver_settings(max_steps=steps, tol=0, **settings), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the float reversal's drift warning: measured here
        x = model.embed(idx)
        states = model.deq(x, states_at=quarter_steps(steps))
        loss = sum(model.cross_entropy(model.readout(z.to(x.dtype)), targets) for z in states) / len(states)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double() for g, p in zip(grads, params)])


def trained_model_rows(checkpoint: str, windows: int, depths: list[int]) -> list[dict]:
    from revdeq_kernels.lm.batches import eval_starts, window_batch
    from revdeq_kernels.lm.checkpoint import load_model
    from revdeq_kernels.lm.data import prepare_data

    model, tokenizer, cfg, ckpt = load_model(checkpoint)
    if cfg.method != "reversible":
        raise SystemExit(f"{checkpoint}: method={cfg.method}; the trajectory check needs method=reversible")
    tokens = prepare_data(cfg, tokenizer, log=lambda *args: None)["validation"]
    idx, targets = window_batch(tokens, eval_starts(len(tokens), cfg.seq_len, windows), cfg.seq_len)
    print(f"# trained model: {checkpoint} (step {ckpt['step']}, block {cfg.block}, beta {cfg.beta}, trained at "
          f"{cfg.describe_training_depth()}), {len(idx)} validation windows of {cfg.seq_len}; loss: the mean "
          "cross-entropy of the read-outs of z at N/4, N/2, 3N/4, N; gradient over every parameter")
    print("| N | float32 autograd | exact reversal | float reversal |")
    print("|---|---|---|---|")
    rows = []
    for steps in depths:
        truth = trained_model_gradients(model, idx, targets, steps, torch.float64, adjoint="unrolled", reversal=None,
                                        state_dtype=torch.float64)
        row = dict(model=checkpoint, steps=steps, **{
            name: relative(trained_model_gradients(model, idx, targets, steps, torch.float32, **settings), truth)
            for name, settings in (("autograd_f32", dict(adjoint="unrolled", reversal=None)),
                                   ("exact", dict(reversal="exact")), ("float", dict(reversal="float")))})
        rows.append(row)
        print(f"| {steps} | {row['autograd_f32']:.1e} | {row['exact']:.1e} | {row['float']:.2g} |", flush=True)
    return rows


def block_rows(args) -> list[dict]:
    print(f"# trajectory loss: residual block width {WIDTH}, batch {BATCH}, loss on z at N/4, N/2, 3N/4, N; float32 unless named")
    print("| beta | N | float32 autograd | exact reversal | float reversal | saved: exact, 4 states "
          "| saved: exact, z only | saved: unrolled | step time, 4 states / z only |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for beta in map(float, args.betas.split(",")):
        for steps in map(int, args.steps.split(",")):
            truth = gradients(torch.float64, steps, beta=beta, adjoint="unrolled")
            row = dict(beta=beta, steps=steps,
                       autograd_f32=relative(gradients(torch.float32, steps, beta=beta, adjoint="unrolled"), truth),
                       exact=relative(gradients(torch.float32, steps, beta=beta, reversal="exact"), truth),
                       float=relative(gradients(torch.float32, steps, beta=beta, reversal="float"), truth),
                       saved_exact_states=saved_bytes(steps, True, beta=beta, reversal="exact"),
                       saved_exact=saved_bytes(steps, False, beta=beta, reversal="exact"),
                       saved_unrolled=saved_bytes(steps, True, beta=beta, adjoint="unrolled"),
                       time_ratio=step_time_ratio(steps, beta, args.repeats))
            rows.append(row)
            print(f"| {beta} | {steps} | {row['autograd_f32']:.1e} | {row['exact']:.1e} | {row['float']:.2g} "
                  f"| {row['saved_exact_states'] / 1024:.0f} KiB | {row['saved_exact'] / 1024:.0f} KiB "
                  f"| {row['saved_unrolled'] / 1024:.0f} KiB | {row['time_ratio']:.3f} |", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="16,64", help="comma-separated")
    parser.add_argument("--betas", default="0.5,0.8", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--checkpoint", help="a trained language model (method=reversible) instead of the block")
    parser.add_argument("--windows", type=int, default=8, help="--checkpoint: validation windows in the batch")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = header(torch.device("cpu"))
    print_header(info, "trajectory: losses on z at N/4, N/2, 3N/4 and N (states_at)")
    rows = (trained_model_rows(args.checkpoint, args.windows, [int(n) for n in args.steps.split(",")])
            if args.checkpoint else block_rows(args))
    if args.json:
        write_json(args.json, dict(header=info, rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
