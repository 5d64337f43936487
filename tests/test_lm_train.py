"""Training: the loss falls, resume is exact, NaN stops cleanly (damaged checkpoints: test_lm_checkpoint.py)."""

from __future__ import annotations

import json

import pytest
import torch

from revdeq_kernels.lm import train

from revdeq_kernels.lm.checkpoint import load_checkpoint, load_model
from tests.test_lm_helpers import single_thread, small_config  # noqa: F401  (autouse fixture)

QUIET = dict(log=lambda *a, **k: None)
from revdeq_kernels.lm import training as train_module


def test_thirty_steps_loss_falls_and_run_records_are_written(tmp_path):
    cfg = small_config(tmp_path, max_iters=30, tensorboard=True)
    result = train(cfg, **QUIET)
    losses = [result.losses[s] for s in range(1, 31)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert result.stopped == "done" and result.step == 30
    assert last < first - 1.0, f"training loss did not fall by 1 nat: first 5 steps {first:.3f}, last 5 {last:.3f}"
    assert result.val[30]["loss"] < result.val[10]["loss"], f"validation loss did not fall: {result.val}"
    records = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 31))
    assert {"tokens_per_s", "solver_steps", "residual", "lr", "grad_norm"} <= set(records[1])
    run = records[0]  # what produced the records: machine, torch, commit, processes, the config
    assert run["kind"] == "run" and run["step"] == 0 and run["resumed_from"] is None, run
    assert {"device", "torch", "commit", "utc", "processes"} <= set(run["header"]), run["header"]
    assert run["config"] == cfg.to_dict(), run["config"]
    assert (result.out_dir / "loss.png").stat().st_size > 0
    assert any((result.out_dir / "tb").iterdir()), "no TensorBoard events written"
    model, tokenizer, loaded_cfg, ckpt = load_model(result.out_dir / "last.pt")
    assert ckpt["step"] == 30 and loaded_cfg == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), result.model.state_dict().values()))


def test_writing_the_plots_leaves_the_callers_matplotlib_alone(tmp_path):
    """Training in a notebook must not switch its plotting backend (an earlier version set
    Agg globally, and the notebook's plots after training vanished)."""
    import matplotlib
    import matplotlib.pyplot as plt

    from revdeq_kernels.lm.metrics import plot_depths, plot_losses

    original = matplotlib.get_backend()
    plt.switch_backend("svg")  # not Agg, so that switching to Agg shows
    before, figures = matplotlib.get_backend(), plt.get_fignums()
    (tmp_path / "m.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n'
                                      '{"kind": "val", "step": 1, "val_loss": 2.5}\n')
    plot_losses(tmp_path / "m.jsonl", tmp_path / "loss.png")
    plot_depths([{"steps": s, "ppl": 10.0, "residual_mean": 0.1 / s, "abs_residual_mean": 0.2 / s} for s in (1, 2)],
                tmp_path / "depth.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "depth.png").stat().st_size > 0
    assert matplotlib.get_backend() == before and plt.get_fignums() == figures, (
        f"backend {before} -> {matplotlib.get_backend()}, figures {figures} -> {plt.get_fignums()}")
    plt.switch_backend(original)


def crash_at_step(monkeypatch, step: int):
    """Make the forward of optimizer step ``step`` raise, as a killed run would stop."""
    calls = {"n": 0}
    real = train_module.compute_loss

    def crashing(model, x, y):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("simulated crash")
        return real(model, x, y)

    monkeypatch.setattr(train_module, "compute_loss", crashing)


def test_resume_after_a_crash_reproduces_the_uninterrupted_losses(tmp_path, monkeypatch):
    overrides = dict(max_iters=12, checkpoint_interval=6, eval_interval=4, dropout=0.1)
    full = train(small_config(tmp_path / "a", **overrides), **QUIET)
    cfg = small_config(tmp_path / "b", **overrides)
    crash_at_step(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, **QUIET)
    assert load_checkpoint(tmp_path / "b" / "run" / "last.pt")["step"] == 6
    monkeypatch.undo()
    resumed = train(cfg, resume=True, **QUIET)
    diffs = {s: resumed.losses[s] - full.losses[s] for s in range(7, 13)}
    assert resumed.step == 12 and all(d == 0 for d in diffs.values()), f"resumed - uninterrupted losses: {diffs}"
    assert resumed.val[12] == full.val[12]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume: max |diff| {(a - b).abs().max():.3g}"
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in l]
    assert steps == list(range(1, 13)), f"metrics.jsonl steps after resume: {steps}"
    records = [json.loads(line) for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    runs = [r for r in records if r["kind"] == "run"]
    assert [(r["step"], r["resumed_from"]) for r in runs] == [(0, None), (6, str(tmp_path / "b" / "run" / "last.pt"))], (
        runs)
    with pytest.raises(ValueError, match="cannot resume .* d_model: 32 -> 64"):
        train(small_config(tmp_path / "b", **overrides, d_model=64), resume=True, **QUIET)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = train_module.compute_loss
    calls = {"n": 0}

    def nan_at_step_5(model, x, y):
        calls["n"] += 1
        loss, objective = real(model, x, y)
        return (loss * float("nan"), objective) if calls["n"] == 5 else (loss, objective)

    monkeypatch.setattr(train_module, "compute_loss", nan_at_step_5)
    messages = []
    result = train(small_config(tmp_path, max_iters=10, checkpoint_interval=2), log=messages.append)
    assert result.stopped == "nonfinite" and result.step == 4, (result.stopped, result.step)
    assert any("non-finite loss (nan) at step 5" in m and "(step 4)" in m for m in messages), messages
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nonfinite_stop_names_prev_pt_when_last_pt_is_damaged(tmp_path, monkeypatch):
    real = train_module.compute_loss
    calls = {"n": 0}
    last = tmp_path / "run" / "last.pt"

    def damage_last_then_nan_at_step_5(model, x, y):
        calls["n"] += 1
        loss, objective = real(model, x, y)
        if calls["n"] == 5:
            last.write_bytes(last.read_bytes()[:100])  # e.g. a disk that filled up under another writer
            return loss * float("nan"), objective
        return loss, objective

    monkeypatch.setattr(train_module, "compute_loss", damage_last_then_nan_at_step_5)
    messages = []
    result = train(small_config(tmp_path, max_iters=10, checkpoint_interval=2), log=messages.append)
    assert result.stopped == "nonfinite", result.stopped
    stop = [m for m in messages if "non-finite loss" in m]
    assert stop and f"last good checkpoint is {tmp_path / 'run' / 'prev.pt'} (step 2)" in stop[0], messages


@pytest.fixture
def overflowing_scaler(monkeypatch):
    """GradScaler starting at 2**40: fp16 steps overflow until it has lowered its scale, as a
    real run's first steps may."""
    import functools

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 40))


def test_fp16_skips_overflowing_steps_then_trains(tmp_path, overflowing_scaler):
    messages = []
    result = train(small_config(tmp_path, amp="fp16", max_iters=30), log=messages.append)
    losses = [result.losses[s] for s in range(1, 31)]
    assert result.stopped == "done" and result.step == 30, (result.stopped, result.step, messages[-2:])
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, f"fp16 training loss did not fall by 1 nat: {losses}"
    scales = [json.loads(line).get("loss_scale") for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()
              if '"train"' in line]
    assert len(scales) == 30 and scales[0] < 2.0 ** 40, f"no overflowing step was skipped: scales {scales[:3]}"
    assert load_checkpoint(result.out_dir / "last.pt")["scaler"]["scale"] == scales[-1]


def test_fp16_resume_restores_the_loss_scale(tmp_path, monkeypatch, overflowing_scaler):
    overrides = dict(amp="fp16", max_iters=12, checkpoint_interval=6, eval_interval=6)
    full = train(small_config(tmp_path / "a", **overrides), **QUIET)
    real_checkpoint = train_module.Trainer.checkpoint

    def crash_after_step_6(trainer):
        real_checkpoint(trainer)
        if trainer.step == 6:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(train_module.Trainer, "checkpoint", crash_after_step_6)
    cfg = small_config(tmp_path / "b", **overrides)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, **QUIET)
    saved_scale = load_checkpoint(tmp_path / "b" / "run" / "last.pt")["scaler"]["scale"]
    monkeypatch.undo()  # the crash and the 2**40 start: the resumed run's scale must come from the checkpoint
    resumed = train(cfg, resume=True, **QUIET)
    assert saved_scale < 2.0 ** 16, f"the run must have lowered its scale below the default first: {saved_scale}"
    diffs = {s: resumed.losses[s] - full.losses[s] for s in range(7, 13)}
    assert all(d == 0 for d in diffs.values()), f"resumed - uninterrupted fp16 losses: {diffs}"


def test_fp16_that_overflows_every_step_stops_naming_amp(tmp_path, monkeypatch):
    real = train_module.compute_loss

    def objective_beyond_float32(model, x, y):
        loss, objective = real(model, x, y)
        return loss, objective * 1e35  # the reported loss stays finite; every scaled gradient overflows

    monkeypatch.setattr(train_module, "compute_loss", objective_beyond_float32)
    messages = []
    result = train(small_config(tmp_path, amp="fp16", max_iters=40), log=messages.append)
    assert result.stopped == "nonfinite" and result.step == 0, (result.stopped, result.step)
    assert any(f"in {train_module.MAX_OVERFLOW_SKIPS} fp16 steps in a row" in m and "use amp=bf16 or amp=off" in m
               for m in messages), messages
