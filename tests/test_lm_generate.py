"""Generation: seeded determinism, sampling filters, the equilibrium cache against full
recomputation, and the eval/generate command lines on a freshly trained checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from revdeq_kernels.lm import TransformerLM, cache_parity, generate, sample_token, train
from revdeq_kernels.lm.block import CachedSolveBlock
from revdeq_kernels.lm.cli import eval_main, generate_main
from tests.helpers import bench_module
from tests.test_lm_helpers import single_thread, small_config  # noqa: F401  (autouse fixture)
from tests.test_lm_model import model_config

# Max |p_cached - p_full| over next-token distributions: the cache replays the solve of the
# whole sequence, so only rounding separates them (measured ~2e-7 in float32, 0 in float64).
PARITY_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def spread_weights(model: TransformerLM, std: float = 0.3) -> TransformerLM:
    """Larger weights than the init, so attention and the MLP matter to the solve."""
    torch.manual_seed(1)
    for p in model.parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, 0.0, std)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method,tol", [("reversible", 0.0), ("reversible", 1e-3), ("explicit", 0.0)])
def test_cached_next_token_distribution_matches_full_recomputation(method, tol, dtype):
    torch.manual_seed(0)
    model = spread_weights(TransformerLM(model_config(method=method, seq_len=24, max_steps=4, tol=tol))).to(dtype)
    ids = torch.randint(0, 50, (2, 24))
    gap = cache_parity(model, ids, prompt_len=5)
    assert gap <= PARITY_TOL[dtype], f"{method} tol={tol} {dtype}: max |p_cached - p_full| {gap:.3g} > {PARITY_TOL[dtype]}"
    if method == "reversible":
        assert model.last_stats.residual.shape == (2,), "decode_step did not solve a [B, 1, D] state"


def test_generation_is_deterministic_with_a_seed_on_both_paths():
    torch.manual_seed(0)
    model = spread_weights(TransformerLM(model_config(seq_len=24)))
    prompt = torch.randint(0, 50, (2, 3))
    runs = {(cache, seed): generate(model, prompt, 15, seed=seed, use_cache=cache, top_k=20, top_p=0.95).ids
            for cache in (True, False) for seed in (7, 8)}
    again = generate(model, prompt, 15, seed=7, use_cache=True, top_k=20, top_p=0.95).ids
    assert torch.equal(runs[True, 7], again), "the same seed gave different tokens"
    assert torch.equal(runs[True, 7], runs[False, 7]), "cached and full recomputation sampled different tokens"
    assert not torch.equal(runs[True, 7], runs[True, 8]), "different seeds gave the same 30 tokens"
    assert runs[True, 7].shape == (2, 18) and torch.equal(runs[True, 7][:, :3], prompt)


def test_generation_past_the_context_window():
    torch.manual_seed(0)
    model = TransformerLM(model_config(seq_len=12))
    out = generate(model, torch.randint(0, 50, (1, 10)), 20, seed=0)  # cache refills past 12
    assert out.ids.shape == (1, 30) and int(out.ids.max()) < 50


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_token(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, top_k=1, generator=g).item() for _ in range(20)} == {1}
    assert {sample_token(logits, top_p=0.5, generator=g).item() for _ in range(20)} == {1}
    assert {sample_token(logits, top_k=2, generator=g).item() for _ in range(200)} == {1, 3}
    with pytest.raises(ValueError, match="top_p"):
        sample_token(logits, top_p=0.0)


def test_eval_and_generate_command_lines(tmp_path, capsys):
    train(small_config(tmp_path, max_iters=3, eval_interval=3, checkpoint_interval=3), log=lambda *a: None)
    ckpt = str(tmp_path / "run" / "last.pt")
    saved = tmp_path / "eval.json"
    assert eval_main(["--checkpoint", ckpt, "--split", "test", "--max-windows", "8", "threads=1",
                      "--json", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "test: loss" in out and "perplexity" in out and "solver: steps mean 3.00" in out, out
    payload = json.loads(saved.read_text())
    assert {"device", "commit", "torch", "utc", "backends"} <= set(payload["header"]), payload["header"]
    assert f"perplexity {payload['ppl']:.2f}" in out and payload["step"] == 3, (payload, out)
    png = tmp_path / "depth.png"
    assert eval_main(["--checkpoint", ckpt, "--split", "validation", "--max-windows", "4", "--depths", "2,6",
                      "--plot", str(png), "threads=1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["2"], ["6"])]
    assert [r[0] for r in rows] == ["2", "6"] and png.stat().st_size > 0, out
    assert float(rows[1][2]) < float(rows[0][2]), f"relative residual did not fall from 2 to 6 steps:\n{out}"
    assert eval_main(["--checkpoint", ckpt, "--plot", str(png)]) == 2
    assert "--plot needs --depths" in capsys.readouterr().err
    args = ["--checkpoint", ckpt, "--prompt", "KING: the", "--max-new-tokens", "12", "--seed", "3", "--top-k", "40"]
    assert generate_main(args) == 0
    first = capsys.readouterr()
    assert generate_main(args + ["--compare"]) == 0
    second = capsys.readouterr()
    assert first.out == second.out and first.out.startswith("KING: the"), (first.out, second.out)
    assert "tokens/s vs full recomputation" in second.err and "same tokens: True" in second.err, second.err
    assert eval_main(["--checkpoint", ckpt, "--split", "test", "--max-windows", "8", "threads=1",
                      "inference_solver=anderson"]) == 0
    out = capsys.readouterr().out
    assert "(anderson at up to 6 steps, max_steps 3" in out, out
    assert generate_main(args + ["inference_solver=anderson"]) == 0
    assert "equilibrium cache, anderson]" in capsys.readouterr().err
    # Anderson given 4 steps for tol 1e-12 misses it: each solve is redone, and both commands say so
    missing = ["inference_solver=anderson", "max_steps=2", "tol=1e-12"]
    assert eval_main(["--checkpoint", ckpt, "--split", "test", "--max-windows", "8", "threads=1", *missing]) == 0
    assert "batch solve(s) missed tol with anderson and were solved again by the reversible iteration" in (
        capsys.readouterr().out)
    assert generate_main(args + missing) == 0
    assert "of its solves missed tol and were solved again by the reversible iteration]" in capsys.readouterr().err
    assert generate_main(["--checkpoint", ckpt, "d_model=64"]) == 2
    assert "cannot override 'd_model' on a trained model" in capsys.readouterr().err


def converged_model(dtype=torch.float64) -> TransformerLM:
    """The anchored block at its initialisation: contractive, so tol=1e-10 is met."""
    torch.manual_seed(0)
    return TransformerLM(model_config(block="anchored", seq_len=24, max_steps=30, tol=1e-10)).to(dtype)


def test_equilibrium_cache_is_one_level_and_matches_full_recomputation_at_convergence():
    model = converged_model()
    ids = torch.randint(0, 50, (2, 24))
    _, caches = model.prefill(ids[:, :5])
    assert caches[0].kind == "equilibrium" and caches[0].levels == 1, (caches[0].kind, caches[0].levels)
    assert model.last_stats.steps < 30, "the contractive block did not meet tol"
    gap = cache_parity(model, ids, prompt_len=5, cache="equilibrium")
    assert gap <= 1e-8, f"equilibrium cache at a converged fixed point: max |p_cached - p_full| {gap:.3g} > 1e-8"


def test_auto_cache_keeps_every_evaluation_when_the_solve_does_not_converge():
    model = spread_weights(TransformerLM(model_config(seq_len=24, max_steps=4, tol=1e-3)))
    ids = torch.randint(0, 50, (2, 24))
    _, caches = model.prefill(ids[:, :5])
    assert not model.converged() and caches[0].kind == "per-evaluation" and caches[0].levels == 9
    out = generate(model, ids[:, :5], 4, seed=0)
    assert out.cache_kind == "per-evaluation", out.cache_kind
    # forcing the equilibrium cache on an unconverged model is allowed, and visibly inexact
    forced = cache_parity(model, ids, prompt_len=5, cache="equilibrium")
    exact = cache_parity(model, ids, prompt_len=5, cache="per-evaluation")
    assert exact <= PARITY_TOL[torch.float32] < forced, (exact, forced)


def test_inference_solver_reaches_the_same_fixed_point_in_fewer_evaluations():
    ids = torch.randint(0, 50, (2, 24))
    model = converged_model().eval()
    with torch.no_grad():
        reference = model(ids)
    iteration_evals = model.last_stats.nfe_forward
    anderson = anderson_model()
    with torch.no_grad():
        logits = anderson(ids)
    stats = anderson.last_stats
    assert stats.max_residual <= 1e-10 and stats.nfe_forward < iteration_evals, (stats, iteration_evals)
    gap = float((logits - reference).abs().max())
    assert gap <= 1e-9, f"anderson's fixed point vs the reversible iteration's: max |logit difference| {gap:.3g} > 1e-9"
    _, caches = anderson.prefill(ids[:, :5])
    assert caches[0].kind == "equilibrium" and caches[0].levels == 1, (caches[0].kind, caches[0].levels)
    gap = cache_parity(anderson, ids, prompt_len=5)
    assert gap <= 1e-10, f"anderson equilibrium cache vs full recomputation: max |p_cached - p_full| {gap:.3g} > 1e-10"
    with pytest.raises(ValueError, match="'per-evaluation' does not apply to inference_solver=anderson"):
        anderson.prefill(ids[:, :5], cache="per-evaluation")
    anderson.train()  # training keeps the reversible iteration: the solve that is differentiated
    with torch.no_grad():
        anderson(ids)
    assert anderson.last_stats.nfe_forward == iteration_evals, (anderson.last_stats.nfe_forward, iteration_evals)


def anderson_model() -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(model_config(block="anchored", seq_len=24, max_steps=30, tol=1e-10,
                                       inference_solver="anderson")).double().eval()
    model.load_state_dict(converged_model().state_dict())
    return model


def test_an_anderson_solve_that_misses_tol_is_solved_again_by_the_iteration():
    """Anderson can stall where the iteration converges (the main job's model: one position,
    128 steps at residual 0.02, its cached state 1.08 off the equilibrium). Cut short here
    (max_steps 3: 6 Anderson steps for tol 1e-10), the whole sequence's solve misses tol; the
    logits and the stats are then the iteration's, bit for bit, and the redone solves counted."""
    ids = torch.randint(0, 50, (2, 24))
    settings = dict(block="anchored", seq_len=24, max_steps=3, tol=1e-10)
    short, iteration = (TransformerLM(model_config(**settings, **extra)).double().eval()
                        for extra in ({"inference_solver": "anderson"}, {}))
    for model in (short, iteration):
        model.load_state_dict(converged_model().state_dict())
    with torch.no_grad():
        logits, want = short(ids), iteration(ids)
    assert short.iteration_fallbacks == 1 and torch.equal(logits, want), short.iteration_fallbacks
    assert short.last_stats.nfe_forward == iteration.last_stats.nfe_forward == 7, short.last_stats
    # generation counts its own: the solves redone report the iteration's 3 steps, the others
    # Anderson's (a one-position solve against a converged context can meet tol in 6)
    out = generate(short, ids[:, :5], 4, seed=0)
    assert out.iteration_fallbacks == out.solver_steps.count(3) >= 1, (out.iteration_fallbacks, out.solver_steps)
    converged = anderson_model()
    with torch.no_grad():
        converged(ids)
    generate(converged, ids[:, :5], 4, seed=0)
    assert converged.iteration_fallbacks == 0, "an Anderson solve that met tol was redone"


def test_anderson_decoding_evaluates_f_only_inside_its_solve():
    # Anderson returns the state it evaluated last, so the equilibrium cache takes that
    # evaluation's keys/values: no evaluation beyond the solve's (one per token before)
    model, ids, calls = anderson_model(), torch.randint(0, 50, (2, 24)), []
    hook = model.deq.f.register_forward_hook(lambda *args: calls.append(1))
    try:
        _, caches = model.prefill(ids[:, :5])
        counts = [(len(calls), model.last_stats.nfe_forward)]
        for t in range(5, 8):
            calls.clear()
            model.decode_step(ids[:, t], caches)
            counts.append((len(calls), model.last_stats.nfe_forward))
    finally:
        hook.remove()
    assert all(evaluated == solved for evaluated, solved in counts), f"(evaluations of f, the solve's): {counts}"


def test_a_solve_that_ends_off_its_last_evaluation_caches_the_returned_states_keys(monkeypatch):
    # Broyden keeps its previous state where it rejects the last step: the returned state was
    # not the last one evaluated, and its keys/values must be the ones cached
    model, ids = anderson_model(), torch.randint(0, 50, (2, 6))
    returned = {}

    def ends_elsewhere(f, x):
        f(torch.zeros_like(x), x)
        returned["z"] = torch.randn_like(x)
        return returned["z"]

    monkeypatch.setattr(model, "_solve_accelerated", ends_elsewhere)
    _, caches = model.prefill(ids)
    expected = CachedSolveBlock(model.deq.f, None)
    expected(returned["z"], model.embed(ids))
    k, v = expected.recorded[-1]
    assert torch.equal(caches[0].k[0, :, :, :6], k) and torch.equal(caches[0].v[0, :, :, :6], v), (
        "the cache holds the keys/values of a state the solve did not return")


def test_cache_kind_errors():
    model = converged_model()
    with pytest.raises(ValueError, match="cache='levels': must be one of auto, equilibrium, per-evaluation"):
        model.prefill(torch.zeros(1, 3, dtype=torch.long), cache="levels")


def test_inference_bench_compares_the_solvers_on_a_checkpoint(tmp_path):
    bench = bench_module("lm_inference")
    train(small_config(tmp_path, max_iters=3, eval_interval=3, checkpoint_interval=3), log=lambda *a: None)
    out = tmp_path / "inference.json"
    assert bench.main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--settings", "20:1e-2", "--windows", "2",
                       "--new-tokens", "4", "--repeats", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {"device", "commit", "torch"} <= set(payload["header"]), payload["header"]
    rows = payload["rows"]
    assert [row["solver"] for row in rows] == ["reversible", "anderson"], rows
    for row in rows:
        assert row["auto_cache"] == "equilibrium" and row["window_residual"] <= 1e-2, row
        assert 0 <= row["parity_equilibrium"] < 1 and row["same_tokens"], row
        assert len(row["equilibrium_tokens_per_s"]) == 1 and row["same_tokens_equilibrium"], row
        # the parity gap lies in the two paths' own gaps to the equilibrium (triangle inequality)
        assert row["parity_equilibrium"] <= row["equilibrium_gap_cached"] + row["equilibrium_gap_full"] + 1e-12, row
        assert row["iteration_fallbacks"] >= 0, row
    # the per-evaluation cache reproduces full recomputation up to float32 rounding (the
    # iteration's only: Anderson mixes positions and has no per-evaluation cache)
    assert rows[0]["parity_per_evaluation"] <= 1e-5 and len(rows[0]["per_evaluation_tokens_per_s"]) == 1, rows[0]
    assert rows[1]["parity_per_evaluation"] is None and "per_evaluation_tokens_per_s" not in rows[1], rows[1]
    # the iteration evaluates the block 1 + 2 * steps times, Anderson once per step
    assert rows[0]["window_evals"] == 1 + 2 * rows[0]["window_steps"], rows[0]
    assert rows[1]["window_evals"] <= 2 * 20 + 1, rows[1]
    # ... and so does generation: no evaluation beyond the solves'
    assert rows[0]["decode_evals_mean"] == pytest.approx(1 + 2 * rows[0]["decode_steps_mean"]), rows[0]
    assert rows[1]["decode_evals_mean"] == pytest.approx(1 + rows[1]["decode_steps_mean"]), rows[1]


def test_eval_reports_the_spectral_radius_and_the_rate_at_the_equilibrium(tmp_path, capsys):
    """revdeq-eval --spectral-radius: the estimates on a trained model's windows, and on one
    window the largest |eigenvalue| of the dense Jacobian of the block at that window's
    solution (1024 x 1024) agrees with it to 1% (measured: 0.4%; the top eigenvalues
    cluster), and the rate with the dense reversible step's (2048 x 2048)."""
    from revdeq_kernels.lm import load_model, prepare_data
    from revdeq_kernels.lm.batches import eval_starts, window_batch
    from revdeq_kernels.lm.evaluation import equilibrium_stability
    from tests.test_spectral_radius import dense_step

    train(small_config(tmp_path, max_iters=10, eval_interval=10, checkpoint_interval=10), log=lambda *a: None)
    ckpt = str(tmp_path / "run" / "last.pt")
    out = tmp_path / "eval.json"
    assert eval_main(["--checkpoint", ckpt, "--split", "validation", "--max-windows", "4", "--spectral-radius", "4",
                      "--json", str(out), "threads=1"]) == 0
    printed = capsys.readouterr().out
    assert "spectral radius of df/dz at the solution: mean" in printed, printed
    assert "rate of the reversible iteration there (beta 0.8; below 1: it converges" in printed, printed
    result = json.loads(out.read_text())
    assert result["spectral_radius_windows"] == 4 and 0 < result["spectral_radius_mean"] <= result["spectral_radius_max"]
    assert 0 < result["iteration_rate_mean"] <= result["iteration_rate_max"], result
    # a briefly trained model solved at its few steps: no window is at a fixed point, none at a 2-cycle
    assert result["not_fixed_point_windows"] == 4 and result["two_cycle_windows"] == 0, result
    assert "not a fixed point of f (relative residual above 0.001) at 4 of 4 windows" in printed, printed
    assert "2-cycle" not in printed, printed

    model, tokenizer, cfg, _ = load_model(ckpt)
    tokens = prepare_data(cfg, tokenizer, log=lambda *a: None)["validation"]
    one = equilibrium_stability(model, tokens, cfg, torch.device("cpu"), 1)
    idx, _ = window_batch(tokens, eval_starts(len(tokens), cfg.seq_len, 1), cfg.seq_len)
    model.eval()
    with torch.no_grad():
        z, x = model.solution(idx)
    jac = torch.autograd.functional.jacobian(lambda state: model.deq.f(state, x), z).reshape(z.numel(), z.numel())
    dense = float(torch.linalg.eigvals(jac.double()).abs().max())
    assert abs(one["spectral_radius_max"] - dense) <= 1e-2 * dense, (one, dense)
    dense_rate = float(torch.linalg.eigvals(dense_step(jac.double(), model.deq.settings.beta)).abs().max())
    assert abs(one["iteration_rate_max"] - dense_rate) <= 1e-2 * dense_rate, (one, dense_rate)


def test_eval_json_header_is_taken_before_the_evaluation(tmp_path, monkeypatch):
    """The header's commit and time are those of the run: a header taken at the end of a
    long --spectral-radius run named a commit made while it ran."""
    import revdeq_kernels.lm.evaluation as evaluation
    import revdeq_kernels.provenance as provenance

    train(small_config(tmp_path, max_iters=2, eval_interval=2, checkpoint_interval=2), log=lambda *a: None)
    calls = []
    take_header, evaluate = provenance.header, evaluation.evaluate
    monkeypatch.setattr(provenance, "header", lambda *a, **k: calls.append("header") or take_header(*a, **k))
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: calls.append("evaluate") or evaluate(*a, **k))
    out = tmp_path / "eval.json"
    assert eval_main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--max-windows", "2", "threads=1",
                      "--json", str(out)]) == 0
    assert calls == ["header", "evaluate"], calls
    assert "commit" in json.loads(out.read_text())["header"]


def test_eval_names_the_windows_that_rest_at_a_two_cycle(capsys):
    """What revdeq-eval prints for the main job's model (2 of 755 windows at a 2-cycle)."""
    from revdeq_kernels.lm.cli import _print_fixed_point_gaps

    _print_fixed_point_gaps({"not_fixed_point_windows": 2, "two_cycle_windows": 2, "two_cycle_gap_max": 2.1e-7,
                             "two_cycle_residuals": [0.0125, 0.0222]}, 755)
    printed = capsys.readouterr().out
    assert "not a fixed point of f (relative residual above 0.001) at 2 of 755 windows" in printed, printed
    assert "2 of them rest at a 2-cycle of f (f(f(z)) returns to z within 2.1e-07; f(z) is 0.0125, 0.0222 off z)" in (
        printed), printed
    _print_fixed_point_gaps({"not_fixed_point_windows": 9, "two_cycle_windows": 6, "two_cycle_gap_max": 1e-7,
                             "two_cycle_residuals": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}, 755)
    assert "f(z) is 0.1, 0.2, 0.3, 0.4, ... (6 in all) off z" in capsys.readouterr().out  # a line, not a list
    _print_fixed_point_gaps({"not_fixed_point_windows": 0, "two_cycle_windows": 0}, 755)
    assert capsys.readouterr().out == ""


def test_eval_counts_the_windows_the_solve_left_at_a_two_cycle(tmp_path, capsys, monkeypatch):
    """Every revdeq-eval reads the reversible solve's ``at_two_cycle``, at no extra cost: a
    trained model whose block is swapped for -2 tanh(z + 0.1) (fixed point unstable, f' ~ -2)
    ends every window at the 2-cycle; the model's own block, solved at its few steps, none."""
    import revdeq_kernels.lm.checkpoint as checkpoint
    from tests.test_spectral_radius import TwoCycleMap

    class ShiftedTwoCycleMap(TwoCycleMap):
        def forward(self, z, x):
            return super().forward(z + 0.1, x)

    train(small_config(tmp_path, max_iters=2, eval_interval=2, checkpoint_interval=2), log=lambda *a: None)
    ckpt = str(tmp_path / "run" / "last.pt")
    out = tmp_path / "eval.json"
    assert eval_main(["--checkpoint", ckpt, "--max-windows", "3", "threads=1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["windows_at_two_cycle"] == 0 and "2-cycle" not in capsys.readouterr().out

    load_model = checkpoint.load_model

    def load_with_a_cycling_block(*args, **kwargs):
        model, *rest = load_model(*args, **kwargs)
        model.deq.f = ShiftedTwoCycleMap()
        return (model, *rest)

    monkeypatch.setattr(checkpoint, "load_model", load_with_a_cycling_block)
    assert eval_main(["--checkpoint", ckpt, "--max-windows", "3", "threads=1", "max_steps=60", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["windows"] == 3 and result["windows_at_two_cycle"] == 3, result
    assert "3 of 3 windows ended at a 2-cycle of f, not a fixed point" in capsys.readouterr().out


def test_eval_spectral_radius_errors(tmp_path, capsys):
    train(small_config(tmp_path, max_iters=2, eval_interval=2, checkpoint_interval=2), log=lambda *a: None)
    ckpt = str(tmp_path / "run" / "last.pt")
    assert eval_main(["--checkpoint", ckpt, "--spectral-radius", "-1"]) == 2
    assert "--spectral-radius -1: the number of windows must be >= 0" in capsys.readouterr().err
    train(small_config(tmp_path, method="explicit", max_iters=2, eval_interval=2, checkpoint_interval=2,
                       out_dir=str(tmp_path / "explicit")), log=lambda *a: None)
    assert eval_main(["--checkpoint", str(tmp_path / "explicit" / "last.pt"), "--spectral-radius", "2"]) == 2
    assert "--spectral-radius: " in capsys.readouterr().err
