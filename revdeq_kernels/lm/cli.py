"""Command-line entry points: ``revdeq-train``, ``revdeq-eval``, ``revdeq-generate``
(also ``python -m revdeq_kernels.lm {train,eval,generate} ...``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import CACHE_KINDS, ConfigError, config_from_dict, load_config, parse_overrides, preset_names, valid_keys
from .sources import DataUnavailable
from .tokenizer import TokenizerUnavailable

# Errors that are the user's to fix: printed as one line, exit status 2.
_USER_ERRORS = (ConfigError, DataUnavailable, TokenizerUnavailable, FileNotFoundError, ValueError)


def _fail(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="revdeq-train",
        description="Train a RevDEQ transformer language model: a preset or YAML file, then key=value "
                    "overrides. Several processes: torchrun --nproc_per_node=N --no-python revdeq-train ...",
        epilog=f"presets: {', '.join(preset_names())}. keys: {', '.join(valid_keys())}")
    parser.add_argument("--config", default="tiny", help="preset name or path to a YAML file (default: tiny)")
    parser.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        return _fail(error)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    from .training import train

    try:
        result = train(cfg, resume=args.resume)
    except _USER_ERRORS as error:
        return _fail(error)
    return 1 if result.stopped == "nonfinite" else 0


def _load(checkpoint: str, overrides: list[str]):
    """(model on its device, tokenizer, config, checkpoint dict, device)."""
    import torch

    from .checkpoint import PREVIOUS, CheckpointError, load_model
    from .runtime import resolve_device

    try:
        model, tokenizer, cfg, ckpt = load_model(checkpoint, parse_overrides(overrides))
    except CheckpointError as error:
        previous = Path(checkpoint).with_name(PREVIOUS)
        if previous.exists() and previous != Path(checkpoint):
            raise CheckpointError(f"{error}; the previous checkpoint {previous} may still be usable") from None
        raise
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg)
    return model.to(device), tokenizer, cfg, ckpt, device


def _depths(text: str | None, plot: str | None) -> list[int]:
    if text is None:
        if plot:
            raise ValueError("--plot needs --depths (the solver steps to evaluate at)")
        return []
    try:
        depths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--depths {text!r}: expected comma-separated integers, e.g. 4,8,16") from None
    if not depths or min(depths) < 1:
        raise ValueError(f"--depths {text!r}: every depth must be an integer >= 1")
    return depths


def _print_fixed_point_gaps(result: dict, windows: int) -> None:
    from ..convergence import NOT_A_FIXED_POINT

    unconverged, cycles = result["not_fixed_point_windows"], result["two_cycle_windows"]
    if not unconverged:
        return
    print(f"  not a fixed point of f (relative residual above {NOT_A_FIXED_POINT:g}) at {unconverged} of {windows} "
          "windows: there both estimates linearise f where the solve stopped")
    if cycles:
        residuals = result["two_cycle_residuals"]
        off = ", ".join(f"{r:.3g}" for r in residuals[:4]) + (f", ... ({len(residuals)} in all)" if len(residuals) > 4 else "")
        print(f"  {cycles} of them rest at a 2-cycle of f (f(f(z)) returns to z within {result['two_cycle_gap_max']:.1e}; "
              f"f(z) is {off} off z), where the reversible iteration stands still for every beta; an accelerated "
              "solver (inference_solver=anderson) can reach f's own fixed point there")


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="revdeq-eval",
        description="Perplexity and DEQ solver statistics of a checkpoint on a data split. key=value "
                    "overrides may change inference settings (e.g. max_steps=8 tol=1e-4).")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--max-windows", type=int, default=0, help="evaluate this many evenly spaced windows (0: all)")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    parser.add_argument("--depths", default=None, metavar="N,N,...",
                        help="DEQ: also evaluate at each of these solver steps (tol=0), e.g. 4,8,16")
    parser.add_argument("--plot", default=None, help="with --depths: write perplexity against steps to this PNG")
    parser.add_argument("--spectral-radius", type=int, default=0, metavar="WINDOWS",
                        help="DEQ: also estimate, on this many windows, the spectral radius of the block's "
                             "Jacobian at the solution and the reversible iteration's rate there (below 1: the "
                             "iteration converges to the solution and stays)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    from ..provenance import header
    from .data import prepare_data
    from .evaluation import equilibrium_stability, evaluate, evaluate_depths

    try:
        depths = _depths(args.depths, args.plot)
        if args.spectral_radius < 0:
            raise ValueError(f"--spectral-radius {args.spectral_radius}: the number of windows must be >= 0")
        model, tokenizer, cfg, ckpt, device = _load(args.checkpoint, args.overrides)
        provenance = header(device)  # before the work, so its commit and time are the run's
        for flag, value in (("--depths", depths), ("--spectral-radius", args.spectral_radius)):
            if value and not model.is_deq:
                raise ValueError(f"{flag}: {args.checkpoint} is an explicit model (method=explicit), not a DEQ")
        data = prepare_data(cfg, tokenizer)
        fallbacks = model.iteration_fallbacks if model.is_deq else 0
        result = evaluate(model, data[args.split], cfg, device, max_windows=args.max_windows)
        if model.is_deq and model.cfg.inference_solver:
            result["iteration_fallbacks"] = model.iteration_fallbacks - fallbacks
        by_depth = evaluate_depths(model, data[args.split], cfg, device, depths, max_windows=args.max_windows)
        if args.spectral_radius:
            result.update(equilibrium_stability(model, data[args.split], cfg, device, args.spectral_radius))
    except _USER_ERRORS as error:
        return _fail(error)
    result = {"checkpoint": args.checkpoint, "step": ckpt["step"], "split": args.split,
              "method": cfg.method, "max_steps": cfg.max_steps, "tol": cfg.tol, **result}
    if model.is_deq:
        result["solver"] = model.accelerated_solver or "reversible"
    print(f"{args.split}: loss {result['loss']:.4f}  perplexity {result['ppl']:.2f}  over {result['tokens']:,} tokens")
    if model.is_deq:
        print(f"solver: steps mean {result['solver_steps_mean']:.2f} max {result['solver_steps_max']} "
              f"({_solver_name(model)}max_steps {cfg.max_steps}, tol {cfg.tol:g}); residual mean {result['residual_mean']:.3e} "
              f"max {result['residual_max']:.3e}; absolute (RMS) mean {result['abs_residual_mean']:.3e} "
              f"max {result['abs_residual_max']:.3e}")
        if result.get("windows_at_two_cycle"):
            print(f"  {result['windows_at_two_cycle']} of {result['windows']} windows ended at a 2-cycle of f, not a fixed "
                  "point: the reversible iteration stands still there, so more steps do not help; "
                  "inference_solver=anderson can reach f's own fixed point")
        if result.get("iteration_fallbacks"):
            print(f"  {result['iteration_fallbacks']} batch solve(s) missed tol with {model.accelerated_solver} and were "
                  "solved again by the reversible iteration")
    if args.spectral_radius:
        windows = result["spectral_radius_windows"]
        above = {name: round(result[f"{name}_at_least_1"] * windows) for name in ("spectral_radius", "iteration_rate")
                 if f"{name}_at_least_1" in result}
        print(f"spectral radius of df/dz at the solution: mean {result['spectral_radius_mean']:.4f} max "
              f"{result['spectral_radius_max']:.4f} over {windows} windows ({above['spectral_radius']} at 1 or above)")
        if "iteration_rate" in above:
            print(f"rate of the reversible iteration there (beta {model.deq.settings.beta:g}; below 1: it converges "
                  f"to the solution): mean {result['iteration_rate_mean']:.4f} max {result['iteration_rate_max']:.4f} "
                  f"({above['iteration_rate']} of {windows} at 1 or above)")
        _print_fixed_point_gaps(result, windows)
    if by_depth:
        result["depths"] = by_depth
        print("steps  perplexity  relative residual (mean, max)  absolute residual RMS (mean, max)")
        for row in by_depth:
            print(f"{row['steps']:>5}  {row['ppl']:>10.2f}  {row['residual_mean']:>14.3e} {row['residual_max']:>10.3e}"
                  f"      {row['abs_residual_mean']:>14.3e} {row['abs_residual_max']:>10.3e}")
        if args.plot:
            from .metrics import plot_depths

            trained = config_from_dict(ckpt["config"], f"checkpoint {args.checkpoint}").describe_training_depth()
            print(f"plot: {plot_depths(by_depth, args.plot, f'{args.checkpoint} ({args.split}), trained at {trained}')}")
    if args.json:
        from .io import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps({"header": provenance, **result}, indent=1))
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="revdeq-generate",
        description="Sample text from a checkpoint. The DEQ decodes incrementally through a key/value cache "
                    "(--cache) unless --no-cache. key=value overrides may change inference settings.")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    parser.add_argument("--cache", default="auto", choices=CACHE_KINDS,
                        help="DEQ: equilibrium (final states' keys/values), per-evaluation (every evaluation's), "
                             "or auto: equilibrium when the prompt's solve meets tol (default)")
    parser.add_argument("--compare", action="store_true",
                        help="also run the other path; report both tokens/s and the cache's max |p_cached - p_full|")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    import torch

    from .generation import cache_parity, generate

    try:
        model, tokenizer, cfg, _, device = _load(args.checkpoint, args.overrides)
        prompt = torch.tensor([tokenizer.encode(args.prompt) or [tokenizer.eot_id]], device=device)
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        cache=args.cache)
        out = generate(model, prompt, args.max_new_tokens, use_cache=not args.no_cache, **sampling)
    except _USER_ERRORS as error:
        return _fail(error)
    print(tokenizer.decode(out.ids[0].tolist()))
    mode = f"{out.cache_kind} cache" if out.cached else "full recomputation"
    if model.is_deq and model.accelerated_solver:
        mode += f", {model.accelerated_solver}"
    if out.iteration_fallbacks:
        mode += (f"; {out.iteration_fallbacks} of its solves missed tol and were solved again by the reversible "
                 "iteration")
    print(f"\n[{out.new_tokens} tokens in {out.seconds:.2f}s: {out.tokens_per_s:.1f} tokens/s, {mode}]", file=sys.stderr)
    if args.compare:
        other = generate(model, prompt, args.max_new_tokens, use_cache=not out.cached, **sampling)
        cached, full = (out, other) if out.cached else (other, out)
        line = (f"[{cached.cache_kind} cache {cached.tokens_per_s:.1f} tokens/s vs full recomputation {full.tokens_per_s:.1f} "
                f"tokens/s: {cached.tokens_per_s / full.tokens_per_s:.2f}x; same tokens: "
                f"{torch.equal(cached.ids, full.ids)}")
        if cached.ids.shape[1] <= cfg.seq_len:
            line += f"; max |p_cached - p_full| {cache_parity(model, cached.ids, prompt.shape[1], cached.cache_kind if model.is_deq else 'auto'):.2e}"
        print(line + "]", file=sys.stderr)
    return 0


def _solver_name(model) -> str:
    """"anderson, " when a solver other than the training one ran, else ""."""
    solver = model.accelerated_solver
    return f"{solver} at up to {2 * model.cfg.max_steps} steps, " if solver and model.cfg.method != "broyden" else \
        (f"{solver}, " if solver else "")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "eval": eval_main, "generate": generate_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m revdeq_kernels.lm {train,eval,generate} [args]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])
