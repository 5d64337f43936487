"""The language model as a user meets it: every shipped preset's reversible gradient equals
unrolled's on a trained model; the default block reaches an equilibrium that more steps
improve; the grad-check and the new config keys."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from revdeq_kernels.lm import TransformerLM, load_config, prepare_data, train
from revdeq_kernels.lm.adjoint_check import adjoint_gradient_error
from revdeq_kernels.lm.config import ConfigError, LMConfig, preset_names, read_yaml
from revdeq_kernels.lm.evaluation import evaluate_depths
from revdeq_kernels.lm.model import supervised_steps
from revdeq_kernels.lm.penalties import depth_penalty, residual_penalty
from tests.helpers import bench_module
from tests.test_lm_helpers import single_thread, small_config  # noqa: F401  (autouse fixture)
from tests.test_lm_model import model_config

# What decides a preset's numerics; everything else is shrunk to test size.
NUMERICS_KEYS = ("block", "method", "beta", "max_steps", "tol", "state_dtype", "reversal", "checkpoint_every",
                 "dropout", "mlp_ratio")
# float32 training, exact reversal: the two forwards differ by the fixed-point rounding
# (2^-32 of the state), the two backwards by float32 reassociation; measured 0.9e-7..2.5e-7.
GRAD_TOL = 1e-5


def shrunk_preset(name: str, tmp_path, **overrides) -> LMConfig:
    values, _ = read_yaml(name)
    return small_config(tmp_path, **{k: values[k] for k in NUMERICS_KEYS if k in values}, **overrides)


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_trains_with_reversible_gradients_equal_to_unrolled(preset, tmp_path):
    cfg = shrunk_preset(preset, tmp_path, max_iters=20, eval_interval=20, checkpoint_interval=20,
                        grad_check_interval=10)
    lines: list[str] = []
    result = train(cfg, log=lines.append)
    records = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    checks = {r["step"]: r["grad_error"] for r in records if r["kind"] == "grad_check"}
    assert sorted(checks) == [10, 20], f"{preset}: grad checks at steps {sorted(checks)}, expected [10, 20]"
    assert any("reversible gradient vs unrolled, relative error" in line for line in lines), lines
    worst = max(checks.values())
    assert worst <= GRAD_TOL, f"{preset}: reversible vs unrolled gradient relative error {worst:.3g} > {GRAD_TOL}"


def test_adjoint_check_sees_the_float_reversal_drift(tmp_path):
    """The check must be able to fail: on the residual block the float reversal drifts."""
    cfg = small_config(tmp_path, block="residual", reversal="float", max_steps=24, beta=0.5)
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len))
    with pytest.warns(RuntimeWarning, match="the gradients are inexact"):
        float_error = adjoint_gradient_error(model, x, x, cfg)
    exact_cfg = dataclasses.replace(cfg, reversal="exact")
    model.deq.settings = dataclasses.replace(model.deq.settings, reversal="exact")
    exact_error = adjoint_gradient_error(model, x, x, exact_cfg)
    assert exact_error <= GRAD_TOL, f"exact reversal: gradient error {exact_error:.3g} > {GRAD_TOL}"
    assert float_error > 100 * exact_error, (
        f"float reversal at 24 steps on the residual block: error {float_error:.3g}, not far above exact's "
        f"{exact_error:.3g}: the check would not catch a drifting adjoint")


@pytest.mark.parametrize("key,value,message", [
    ("block", "dense", "must be one of residual, postln, normed, anchored, direct"),
    ("checkpoint_every", "-1", "must be >= 0"),
    ("grad_check_interval", "-2", "must be >= 0"),
    ("inference_solver", "newton", "must be one of anderson, broyden or null"),
    ("tail_fraction", "-0.1", r"must be in \[0, 1\]"),
    ("tail_fraction", "1.5", r"must be in \[0, 1\]"),
    ("tail_iters", "100", "renamed: use tail_fraction"),
    ("tail_max_steps", "0", "must be >= 1"),
    ("state_loss", "-1", "must be >= 0"),
])
def test_new_config_keys_reject_bad_values(key, value, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config("tiny", [f"{key}={value}"])
    assert key in str(error.value)


@pytest.mark.parametrize("key,value", [("checkpoint_every", "2"), ("grad_check_interval", "5")])
def test_reversible_only_keys_name_the_method(key, value):
    with pytest.raises(ConfigError, match="method=reversible") as error:
        load_config("tiny", ["method=explicit", f"{key}={value}"])
    assert key in str(error.value)


def test_inference_solver_needs_a_deq():
    with pytest.raises(ConfigError, match="inference_solver='anderson': applies to a DEQ"):
        load_config("tiny", ["method=explicit", "inference_solver=anderson"])


def test_checkpoint_every_selects_the_checkpointed_float_reversal():
    cfg = load_config("tiny", ["checkpoint_every=2", "vocab_size=64", "d_model=16", "n_heads=2"])
    settings = TransformerLM(cfg).deq.settings
    assert settings.checkpoint_every == 2 and settings.resolved_reversal == "float", settings
    with pytest.raises(ConfigError, match="checkpoint_every"):
        load_config("tiny", ["checkpoint_every=2", "reversal=exact"])


def test_default_block_converges_and_more_steps_do_not_hurt(tmp_path):
    """The default model is an equilibrium: trained for a few dozen steps at N solver steps,
    its residual keeps falling at 2N and 4N, and evaluating deeper is not worse."""
    defaults = load_config("tiny")  # the shipped preset: its block, penalties and deep tail
    cfg = small_config(tmp_path, block=defaults.block, res_reg=defaults.res_reg, depth_reg=defaults.depth_reg,
                       depth_jitter=defaults.depth_jitter, tail_fraction=defaults.tail_fraction,
                       tail_max_steps=defaults.tail_max_steps,
                       max_steps=4, beta=0.8, max_iters=60, eval_interval=60, checkpoint_interval=60,
                       lr=1e-2, min_lr=1e-3, warmup_iters=5)
    result = train(cfg, log=lambda *a: None)
    assert result.val[60]["loss"] < 4.0, f"the model did not learn: val loss {result.val[60]['loss']:.3f}"
    rows = evaluate_depths(result.model, prepare_data(cfg, log=lambda *a: None)["validation"], cfg,
                           torch.device("cpu"), [4, 8, 16], max_windows=16)
    relative = [r["residual_max"] for r in rows]
    absolute = [r["abs_residual_max"] for r in rows]
    loss = [r["loss"] for r in rows]
    # both: a residual block's relative residual falls too, as ||z|| grows, while its absolute
    # one stays put (measured 3.64 at 4, 8 and 16 steps on this model)
    assert relative[0] > relative[1] > relative[2], f"relative residual at 4, 8, 16 steps: {relative}: not falling"
    assert absolute[0] > 10 * absolute[1] > 100 * absolute[2], (
        f"absolute residual at 4, 8, 16 steps: {absolute}: not falling 10x per doubling (measured 100x)")
    # Margin: 0.1% of the loss (measured here: +0.0003%; the main job from 16 to 64 steps: +0.003%)
    assert loss[1] <= loss[0] * 1.001 and loss[2] <= loss[0] * 1.001, f"val loss at 4, 8, 16 steps: {loss}"


def test_residual_penalty_is_the_squared_relative_residual_the_solver_reports():
    torch.manual_seed(0)
    model = TransformerLM(model_config(max_steps=3)).double().train()
    idx = torch.randint(0, 50, (3, 12))
    z = model.deq(model.embed(idx))
    reported = model.deq.last_stats.residual  # per sequence, with the 1e-5 guard in the denominator
    penalty = residual_penalty(z, model.deq.f(z, model.embed(idx))).detach()
    want = float(reported.pow(2).mean())
    assert abs(float(penalty) - want) <= 1e-4 * want, f"residual penalty {float(penalty):.6g} vs solver's {want:.6g}"


def test_depth_penalty_is_the_loss_one_more_evaluation_adds_and_trains_both_sides():
    torch.manual_seed(0)
    model = TransformerLM(model_config(max_steps=3, res_reg=0.0, depth_reg=7.0)).double().train()
    idx, targets = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    logits, loss = model(idx, targets)
    with torch.no_grad():  # by hand: the readout of one more evaluation of f at the solution
        z, x = model.solution(idx)
        deeper = model.cross_entropy(model.readout(model.deq.f(z, x)), targets)
    want = 7.0 * max(float(deeper) - float(loss.detach()), 0.0)
    got = float(model.last_penalty.detach())
    assert abs(got - want) <= 1e-12 * max(1.0, want), f"depth penalty {got!r} vs by hand {want!r}"

    # both sides keep their gradients: a rise pushes the deeper loss down and the loss at z* up
    loss, deeper = torch.tensor(1.0, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    depth_penalty(loss, deeper).backward()
    assert (float(loss.grad), float(deeper.grad)) == (-1.0, 1.0), (loss.grad, deeper.grad)
    assert float(depth_penalty(deeper.detach(), loss.detach())) == 0.0, "no penalty when one more evaluation lowers the loss"


@pytest.mark.parametrize("method", ["reversible", "implicit", "broyden"])
def test_residual_penalty_with_the_solve_s_masks_is_the_residual_the_solve_reached(method):
    """With dropout in the block and penalty_masks=solve, res_reg evaluates f at z* with the
    solve's masks: the penalty is the mean squared residual the solve's stats report
    (float64). The default, fresh masks, reads the masks' noise on top, several times more."""
    torch.manual_seed(0)
    model = TransformerLM(model_config(method=method, max_steps=6, tol=0.0, dropout=0.2, res_reg=1.0,
                                       penalty_masks="solve")).double()
    with torch.no_grad():  # branches of a trained model's size, so that dropout moves f(z*)
        for weight in (p for p in model.deq.f.parameters() if p.dim() == 2):
            weight.mul_(20)
    idx, targets = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    model.train()(idx, targets)
    got, want = float(model.last_penalty.detach()), float(model.last_stats.residual.double().square().mean())
    assert abs(got / want - 1) <= 1e-4, (  # the stats' residual divides by 1e-5 + ||f(z)||, the penalty by ||f(z)||
        f"{method}: res_reg penalty {got:.6g} against the solve's mean squared residual {want:.6g}")
    model.cfg.penalty_masks = "fresh"
    model(idx, targets)
    fresh = float(model.last_penalty.detach())
    solved = float(model.last_stats.residual.double().square().mean())
    assert fresh > 2 * solved, f"{method}: fresh masks read {fresh:.3g}, the solve's {solved:.3g}"


@pytest.mark.parametrize("method", ["implicit", "broyden"])
def test_state_loss_needs_gradients_at_the_states(method):
    with pytest.raises(ConfigError, match=f"state_loss.*method=reversible or unrolled.*or phantom.*method is {method}"):
        load_config("tiny", [f"method={method}", "state_loss=1"])


@pytest.mark.parametrize("steps, supervised", [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (4, (1, 2, 3, 4)),
                                               (16, (4, 8, 12, 16))])
def test_state_loss_supervises_the_quarters(steps, supervised):
    assert supervised_steps(steps) == supervised


@pytest.mark.parametrize("method", ["reversible", "unrolled", "phantom"])
def test_state_loss_is_the_mean_loss_of_the_intermediate_states(method):
    """state_loss=w adds w * mean over k in (1, 2, 3) of the cross-entropy of a k-step solve's
    read-out (with tol=0 the k-th state of a 4-step solve is a k-step solve's z)."""
    torch.manual_seed(0)
    model = TransformerLM(model_config(method=method, max_steps=4, res_reg=0.0, state_loss=3.0)).double().train()
    idx, targets = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    model(idx, targets)
    got = float(model.last_penalty.detach())
    with torch.no_grad():
        x = model.embed(idx)
        losses = []
        for k in (1, 2, 3):
            with model.solver_settings(max_steps=k):
                losses.append(float(model.cross_entropy(model.readout(model.deq(x)), targets)))
    want = 3.0 * sum(losses) / 3
    assert abs(got - want) <= 1e-12 * want, f"state loss {got!r} vs by hand {want!r}"


def test_state_loss_trains_with_exact_gradients(tmp_path):
    """The grad check differentiates the objective, intermediate states included: the reversible
    gradient of a run with state_loss equals unrolled's."""
    cfg = small_config(tmp_path, max_iters=20, eval_interval=20, checkpoint_interval=20, grad_check_interval=10,
                       state_loss=1.0, max_steps=4)
    result = train(cfg, log=lambda *args: None)
    records = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    checks = [r["grad_error"] for r in records if r["kind"] == "grad_check"]
    assert len(checks) == 2 and max(checks) <= GRAD_TOL, f"grad checks {checks}, tolerance {GRAD_TOL}"


def test_penalties_need_targets_and_training_mode():
    model = TransformerLM(model_config(max_steps=2, res_reg=1.0, depth_reg=1.0)).train()
    idx = torch.randint(0, 50, (2, 8))
    model(idx, idx)
    assert model.last_penalty is not None and model.last_penalty.requires_grad
    model(idx)
    assert model.last_penalty is None, "a forward without targets has no objective to add a penalty to"
    model.eval()
    model(idx, idx)
    assert model.last_penalty is None, "evaluation must not pay for the penalties"


def test_depth_jitter_draws_every_depth_in_its_range_and_only_in_training():
    torch.manual_seed(0)
    model = TransformerLM(model_config(max_steps=2, depth_jitter=3)).train()
    idx = torch.randint(0, 50, (2, 12))
    seen = set()
    for _ in range(40):
        model(idx)
        seen.add(model.last_stats.steps)
    assert seen == {2, 3, 4, 5}, f"training solves took {sorted(seen)} steps, expected 2..5"
    assert model.deq.settings.max_steps == 2, "the jitter leaked into the model's settings"
    model.eval()
    model(idx)
    assert model.last_stats.steps == 2, "evaluation must run the configured max_steps"


def test_training_with_penalties_logs_them_and_still_learns(tmp_path):
    cfg = small_config(tmp_path, res_reg=20.0, jac_reg=0.01, depth_reg=1.0, depth_jitter=1, max_iters=20,
                       eval_interval=20, checkpoint_interval=20)
    result = train(cfg, log=lambda *a: None)
    records = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    penalties = [r["penalty"] for r in records if r["kind"] == "train"]
    assert len(penalties) == 20 and all(p > 0 for p in penalties), penalties
    assert result.losses[20] < result.losses[1] - 0.5, (result.losses[1], result.losses[20])


def test_a_checkpoint_from_before_the_block_key_loads_as_the_residual_block(tmp_path):
    from revdeq_kernels.lm.checkpoint import load_checkpoint, load_model, save_rotating

    cfg = small_config(tmp_path, block="residual", res_reg=0.0, max_iters=2, eval_interval=2, checkpoint_interval=2)
    result = train(cfg, log=lambda *a: None)
    payload = load_checkpoint(result.out_dir / "last.pt")
    for key in ("block", "res_reg", "jac_reg", "depth_jitter", "depth_reg", "checkpoint_every", "grad_check_interval",
                "lr_decay_iters", "tail_fraction", "tail_max_steps"):
        del payload["config"][key]  # as written before these keys existed
    save_rotating(tmp_path / "old", payload)
    model, _, loaded, _ = load_model(tmp_path / "old" / "last.pt")
    assert loaded.block == "residual" and loaded.res_reg == 0.0, (loaded.block, loaded.res_reg)
    assert not hasattr(model.deq.f, "ln3"), "an old checkpoint must build the block it was trained with"


def test_a_checkpoint_with_the_renamed_tail_iters_key_loads_as_its_fraction(tmp_path):
    from revdeq_kernels.lm.checkpoint import load_checkpoint, load_model, save_rotating

    cfg = small_config(tmp_path, max_iters=4, eval_interval=4, checkpoint_interval=4)
    payload = load_checkpoint(train(cfg, log=lambda *a: None).out_dir / "last.pt")
    del payload["config"]["tail_fraction"]
    payload["config"]["tail_iters"] = 1  # the step count this key held before it became a fraction
    save_rotating(tmp_path / "old", payload)
    _, _, loaded, _ = load_model(tmp_path / "old" / "last.pt")
    assert (loaded.tail_fraction, loaded.tail_iters) == (0.25, 1), (loaded.tail_fraction, loaded.tail_iters)


@pytest.mark.parametrize("method,solver_steps", [("reversible", 3), ("broyden", 6)])
def test_tail_fraction_trains_the_last_steps_at_tail_max_steps(tmp_path, method, solver_steps):
    cfg = small_config(tmp_path, method=method, max_steps=2, tol=0.0, max_iters=6, tail_fraction=0.34, tail_max_steps=3,
                       eval_interval=6, checkpoint_interval=6, log_interval=1)
    result = train(cfg, log=lambda *a: None)
    records = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["solver_steps"] for r in records if r["kind"] == "train"]
    before = 2 * 2 if method == "broyden" else 2
    assert steps == [before] * 4 + [solver_steps] * 2, f"solver steps per training step: {steps}"
    assert result.model.deq.settings.max_steps == before, "the tail's depth must not outlive the step"


def test_the_training_depth_names_the_tail_that_a_fraction_of_max_iters_gives():
    assert load_config("tiny").describe_training_depth() == "4 steps, the last 100 of 1000 at 16"
    assert load_config("tiny", ["max_iters=50"]).describe_training_depth() == "4 steps, the last 5 of 50 at 16"
    assert load_config("tiny", ["tail_fraction=0"]).describe_training_depth() == "4 steps"


def test_under_a_time_budget_the_tail_is_the_last_share_of_the_training_time(tmp_path):
    cfg = small_config(tmp_path, max_steps=2, tol=0.0, max_iters=100_000, time_budget_s=2.0, tail_fraction=0.5,
                       tail_max_steps=3, eval_interval=100_000, checkpoint_interval=100_000, log_interval=1)
    result = train(cfg, log=lambda *a: None)
    records = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["solver_steps"] for r in records if r["kind"] == "train"]
    assert result.stopped == "time_budget", result.stopped
    # the step count alone would never reach a tail 50,000 steps away
    assert steps[0] == 2 and steps[-1] == 3 and steps == sorted(steps), f"solver steps per training step: {steps}"


def test_trajectory_loss_on_a_trained_model_is_exact(tmp_path):
    """bench/trajectory.py --checkpoint: on a trained model, the gradient of a loss on the read-outs
    of z at N/4 .. N (rk.DEQ's states_at) with the exact reversal is float32 autograd's, to within
    10x of its own error against float64."""
    cfg = small_config(tmp_path, max_iters=20, eval_interval=20, checkpoint_interval=20)
    result = train(cfg, log=lambda *args: None)
    trajectory = bench_module("trajectory")
    out = tmp_path / "rows.json"
    checkpoint = str(result.out_dir / "last.pt")
    assert trajectory.main(["--checkpoint", checkpoint, "--steps", "4", "--windows", "4", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert {"device", "commit", "torch"} <= set(payload["header"]), payload["header"]
    (row,) = payload["rows"]
    assert row["exact"] <= 10 * row["autograd_f32"], row
