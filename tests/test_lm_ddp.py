"""Two-process data parallelism over gloo, launched the way torchrun launches it (the
process group described in the environment): the ranks read different data and end
with identical weights; rank 0 alone writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from revdeq_kernels.lm.checkpoint import load_checkpoint
from tests.test_lm_helpers import small_config

RANK_MAIN = """
import functools, sys, torch
from revdeq_kernels.lm import LMConfig, train
from revdeq_kernels.lm import training
cfg = LMConfig(**{cfg!r})
if cfg.amp == "fp16":  # overflow first, so that the ranks must skip the same steps
    torch.amp.GradScaler = functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 40)
rank = int(sys.argv[1])
seen = []
real = training.compute_loss
def recording(model, x, y):
    seen.append(x[:, 0].tolist())
    return real(model, x, y)
training.compute_loss = recording
result = train(cfg, log=lambda *a, **k: None)
torch.save({{"state": result.model.state_dict(), "batches": seen, "val": result.val, "step": result.step}},
           sys.argv[2])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_two_gloo_ranks_end_with_identical_weights(tmp_path, amp):
    cfg = small_config(tmp_path, max_iters=4, eval_interval=2, checkpoint_interval=2, threads=1, dropout=0.1, amp=amp)
    from revdeq_kernels.lm import prepare_data

    prepare_data(cfg, log=lambda *a: None)  # build the cache once, outside the timed ranks
    script = RANK_MAIN.format(cfg=cfg.to_dict())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank), str(tmp_path / f"rank{rank}.pt")],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out[-3000:]}"
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["step"] == r1["step"] == 4
    if amp == "fp16":  # both ranks skipped the overflowing steps together, and saved the same scale
        assert len(r0["batches"]) == len(r1["batches"]) > 4, "no fp16 step overflowed"
        assert load_checkpoint(tmp_path / "run" / "last.pt")["scaler"]["scale"] < 2.0 ** 40
    assert r0["batches"] != r1["batches"], "both ranks trained on the same windows"
    for (name, a), b in zip(r0["state"].items(), r1["state"].values()):
        assert torch.equal(a, b), f"{name} differs between ranks: max |diff| {(a - b).abs().max():.3g}"
    assert r0["val"] == r1["val"], "the ranks disagree on the (all-reduced) validation loss"
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == len(ckpt["data"]) == 2
    assert not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"]), "rank 1's RNG state was not gathered"
    written = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert written == ["last.pt", "loss.png", "metrics.jsonl", "prev.pt"], f"unexpected files in out_dir: {written}"
    assert load_checkpoint(tmp_path / "run" / "prev.pt")["step"] == 2, "prev.pt is not the step-2 checkpoint"
