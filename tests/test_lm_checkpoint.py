"""Checkpoints survive damage: atomic writes, prev.pt rotation, a checksum, one clear error line
for every kind of bad file, the --resume fallback, and kill -9 at random moments."""

from __future__ import annotations

import io
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from revdeq_kernels.lm import train
from revdeq_kernels.lm.checkpoint import (
    FORMAT, CheckpointError, load_checkpoint, save_checkpoint, save_rotating, verify_checkpoint)
from tests.test_lm_helpers import single_thread, small_config  # noqa: F401  (autouse fixture)

QUIET = dict(log=lambda *a, **k: None)
PAYLOAD = {"config": {}, "model": {"w": torch.arange(4000.0)}, "step": 1}
REAL_SAVE = torch.save


def good_checkpoint(path: Path, step: int = 1) -> Path:
    save_checkpoint(path, {**PAYLOAD, "step": step})
    return path


def test_checkpoint_round_trips_and_is_verified(tmp_path):
    path = good_checkpoint(tmp_path / "last.pt", step=7)
    assert verify_checkpoint(path) is None
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 7 and torch.equal(ckpt["model"]["w"], PAYLOAD["model"]["w"])


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def payload_byte_flipped(path: Path) -> Path:
    """Flip one byte inside the stored payload (found by its own bytes), keeping the file a valid zip."""
    envelope = torch.load(path, weights_only=True)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(envelope["payload"][1000:1064].numpy().tobytes())
    assert at > 0, "the payload bytes are not stored verbatim in the file"
    data[at + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


class Foreign:  # a pickled object of an arbitrary class: what a malicious file would hold
    pass


def write(path: Path, obj) -> Path:
    REAL_SAVE(obj, path)
    return path


DAMAGE = {
    "truncated": (lambda p: truncated(good_checkpoint(p)), "truncated or damaged"),
    "checksum": (lambda p: payload_byte_flipped(good_checkpoint(p)), "checksum mismatch"),
    "wrong_sha": (lambda p: write(p, {**torch.load(good_checkpoint(p), weights_only=True), "sha256": "0" * 64}),
                  "checksum mismatch"),
    "text_file": (lambda p: (p.write_text("hello\n"), p)[1], "not a checkpoint \\(not a torch.save file\\)"),
    "empty_file": (lambda p: (p.write_bytes(b""), p)[1], "not a checkpoint"),
    "plain_torch_dict": (lambda p: write(p, {"w": torch.ones(2)}), "not a revdeq_kernels checkpoint"),
    "foreign_pickle": (lambda p: write(p, {"x": Foreign()}), "not a revdeq_kernels checkpoint \\(refused to unpickle"),
    "format_1": (lambda p: write(p, {"format": 1, **PAYLOAD}), "incompatible version \\(format 1;"),
    "format_99": (lambda p: write(p, {**torch.load(good_checkpoint(p), weights_only=True), "format": 99}),
                  f"incompatible version \\(format 99, revdeq_kernels .*reads format {FORMAT}"),
    "folder": (lambda p: (p.mkdir(), p)[1], "is a folder"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_every_kind_of_bad_file_is_one_clear_error(tmp_path, case):
    make, message = DAMAGE[case]
    path = make(tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(path)
    text = str(caught.value)
    assert text.startswith(str(path)) and "\n" not in text, f"not one line naming the file: {text!r}"
    assert verify_checkpoint(path) == text


def test_revdeq_eval_on_a_damaged_checkpoint_prints_one_line_and_exits_2(tmp_path):
    path = truncated(good_checkpoint(tmp_path / "last.pt"))
    good_checkpoint(tmp_path / "prev.pt")
    done = subprocess.run([sys.executable, "-m", "revdeq_kernels.lm", "eval", "--checkpoint", str(path)],
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, f"exit {done.returncode}, stderr:\n{done.stderr}"
    assert len(lines) == 1 and "Traceback" not in done.stderr, f"not one line:\n{done.stderr}"
    assert lines[0].startswith(f"error: {path}: truncated or damaged") and "prev.pt may still be usable" in lines[0]


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = good_checkpoint(tmp_path / "last.pt")

    def dies_halfway(obj, f):
        if isinstance(f, io.BytesIO):  # serialising the payload in memory works
            return REAL_SAVE(obj, f)
        Path(f).write_bytes(b"partial checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, {**PAYLOAD, "step": 2})
    with pytest.raises(OSError, match="simulated"):
        save_rotating(tmp_path, {**PAYLOAD, "step": 2})
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev.pt"], "a temporary file was left behind"
    assert load_checkpoint(tmp_path / "prev.pt")["step"] == 1


def test_rotation_keeps_the_previous_good_checkpoint_and_never_rotates_a_damaged_one(tmp_path):
    for step in (1, 2, 3):
        save_rotating(tmp_path, {**PAYLOAD, "step": step})
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3 and load_checkpoint(tmp_path / "prev.pt")["step"] == 2
    truncated(tmp_path / "last.pt")
    save_rotating(tmp_path, {**PAYLOAD, "step": 4})
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    assert load_checkpoint(tmp_path / "prev.pt")["step"] == 2, "a damaged last.pt was rotated over the good prev.pt"


def test_rotation_reads_only_a_last_pt_this_process_did_not_write(tmp_path, monkeypatch):
    from revdeq_kernels.lm import checkpoint
    verified = []
    real_verify = checkpoint.verify_checkpoint
    monkeypatch.setattr(checkpoint, "verify_checkpoint", lambda path: verified.append(path) or real_verify(path))
    for step in (1, 2, 3):
        save_rotating(tmp_path, {**PAYLOAD, "step": step})
    assert verified == [], f"our own last.pt was read back and hashed before rotation: {verified}"
    # A same-size byte flip in place keeps the inode and the size; only the mtime tells.
    payload_byte_flipped(tmp_path / "last.pt")
    save_rotating(tmp_path, {**PAYLOAD, "step": 4})
    assert verified == [tmp_path / "last.pt"], f"a last.pt changed since we wrote it was not verified: {verified}"
    assert load_checkpoint(tmp_path / "prev.pt")["step"] == 2, "a damaged last.pt was rotated over the good prev.pt"


def test_resume_falls_back_to_prev_when_last_is_damaged(tmp_path):
    overrides = dict(max_iters=8, checkpoint_interval=2, eval_interval=4, dropout=0.1)
    full = train(small_config(tmp_path / "a", **overrides), **QUIET)
    cfg = small_config(tmp_path / "b", **overrides)
    train(cfg, **QUIET)
    run = tmp_path / "b" / "run"
    truncated(run / "last.pt")  # the step-8 checkpoint; prev.pt holds step 6
    messages = []
    resumed = train(cfg, resume=True, log=messages.append)
    warning = [m for m in messages if m.startswith("warning: --resume:")]
    assert warning and str(run / "last.pt") in warning[0] and str(run / "prev.pt") in warning[0], messages
    assert f"resumed from {run / 'prev.pt'} at step 6" in messages, messages
    diffs = {s: resumed.losses[s] - full.losses[s] for s in (7, 8)}
    assert all(d == 0 for d in diffs.values()), f"resumed - uninterrupted losses: {diffs}"

    truncated(run / "last.pt")
    (run / "prev.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="neither checkpoint is usable: .*last.pt: truncated.*prev.pt: not a"):
        train(cfg, resume=True, **QUIET)


CRASH_MID_WRITE = """
import os, sys, torch
from revdeq_kernels.lm.checkpoint import save_rotating
folder = sys.argv[1]
save_rotating(folder, {"config": {}, "model": {"w": torch.ones(1000)}, "step": 1})
real_save = torch.save
def killed_halfway(obj, f):
    if not isinstance(f, (str, os.PathLike)):
        return real_save(obj, f)
    with open(f, "wb") as fh:
        fh.write(b"PK partial")
        fh.flush()
    os._exit(9)  # the process dies mid-write: no exception handler, no cleanup
torch.save = killed_halfway
save_rotating(folder, {"config": {}, "model": {"w": torch.zeros(1000)}, "step": 2})
"""


def test_checkpoint_survives_a_process_killed_mid_write(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CRASH_MID_WRITE, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 1 and math.isclose(float(ckpt["model"]["w"].sum()), 1000.0)


def train_process(config: Path, resume: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "revdeq_kernels.lm", "train", "--config", str(config)]
    return subprocess.Popen(command + (["--resume"] if resume else []), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def train_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_a_loadable_checkpoint_and_an_exact_resume(tmp_path):
    steps = 150
    configs = {}
    for name in ("full", "killed"):
        cfg = small_config(tmp_path / name, max_iters=steps, checkpoint_interval=1, eval_interval=50,
                           dropout=0.1, threads=1)
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg.to_dict()))
    full = train_process(configs["full"], resume=False)
    assert full.wait(timeout=600) == 0, full.stdout.read()
    run = tmp_path / "killed" / "run"
    rng = random.Random(0)
    kills = 0
    for attempt in range(5):
        proc = train_process(configs["killed"], resume=attempt > 0)
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:  # finished before the kill
            break
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
        kills += 1
        problems = [verify_checkpoint(run / name) for name in ("last.pt", "prev.pt")]
        assert None in problems, f"after kill {kills} no checkpoint is loadable: {problems}"
    assert kills >= 3, f"only {kills} kills landed during training; the run is too short for this test"
    final = train_process(configs["killed"], resume=True)
    assert final.wait(timeout=600) == 0, final.stdout.read()
    leftovers = sorted(p.name for p in run.iterdir() if p.name.startswith("."))
    assert not leftovers, f"temporary files of killed writers were left behind: {leftovers}"
    want, got = train_losses(tmp_path / "full" / "run"), train_losses(run)
    assert sorted(got) == list(range(1, steps + 1)), f"metrics.jsonl steps: {sorted(got)[:5]}..."
    diffs = {s: got[s] - want[s] for s in want if got[s] != want[s]}
    assert not diffs, f"after {kills} kills, {len(diffs)} steps' losses differ from the uninterrupted run: {diffs}"
