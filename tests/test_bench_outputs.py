"""Every benchmark's --json file starts with the same header (device, torch, Python, commit,
backends, time) and is written whole or not at all, so a committed result says where it was
measured and an interrupted run never leaves a cut file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import BENCH, bench_module
from tests.test_lm_helpers import write_corpus

HEADER_KEYS = {"device", "torch", "python", "revdeq_kernels", "commit", "utc", "backends"}


def assert_header(payload: dict, path: Path) -> None:
    missing = HEADER_KEYS - set(payload.get("header", {}))
    assert not missing, f"{path.name}: header lacks {sorted(missing)}; got {payload.get('header')}"


def test_write_json_keeps_the_old_file_when_writing_fails(tmp_path):
    result_file = bench_module("result_file")
    target = tmp_path / "out" / "rows.json"
    result_file.write_json(target, {"rows": [1]})
    assert json.loads(target.read_text()) == {"rows": [1]}
    assert oct(target.stat().st_mode & 0o777) == oct(0o644), "results must stay readable like any file"
    with pytest.raises(TypeError):
        result_file.write_json(target, {"rows": [object()]})  # json fails part-way through the dump
    assert json.loads(target.read_text()) == {"rows": [1]}, "a failed write replaced the previous file"
    assert sorted(p.name for p in target.parent.iterdir()) == ["rows.json"], "a temporary file was left behind"


def test_drift_json(tmp_path, capsys):
    out = tmp_path / "drift.json"
    blocks = ["tanh", "torch_encoder", "conv"]
    dtypes = ["float64", "float32", "float16-autocast"]
    assert bench_module("drift").main(["--steps", "4", "--betas", "0.5", "--blocks", ",".join(blocks),
                                       "--dtypes", ",".join(dtypes), "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert_header(payload, out)
    assert [r["reversal"] for r in payload["rows"]] == ["float", "exact"] * len(dtypes) * len(blocks), payload["rows"]
    assert [r["dtype"] for r in payload["rows"]][:6] == [d for d in dtypes for _ in range(2)], payload["rows"]
    assert max(payload["spectral_radius"]["tanh"]) < 1, payload["spectral_radius"]
    exact = [r for r in payload["rows"] if r["reversal"] == "exact"]
    assert all(r["reconstruction_error"] == 0.0 for r in exact), exact
    assert f"commit {payload['header']['commit']}" in capsys.readouterr().out


def test_solvers_json(tmp_path):
    out = tmp_path / "solvers.json"
    assert bench_module("solvers").main(["--widths", "8", "--tols", "1e-4", "--seeds", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert_header(payload, out)
    (row,) = payload["rows"]
    assert row["width"] == 8 and all(row[s]["nfe"] > 0 for s in ("fixed_point", "anderson", "broyden")), row


def test_dropout_masks_json(tmp_path, capsys):
    out = tmp_path / "dropout.json"
    assert bench_module("dropout_masks").main(["--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert_header(payload, out)
    rows = {(r["rng"], r["solver"]): r for r in payload["rows"]}
    assert len(rows) == 6, sorted(rows)
    for solver in ("reversible", "anderson", "fixed_point"):
        one_mask, many = rows["per_solve", solver], rows["per_evaluation", solver]
        assert one_mask["max_residual"] <= 1e-9 < many["max_residual"], (one_mask, many)
    assert "| per_solve | reversible |" in capsys.readouterr().out


def test_lm_blocks_json(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    small = (f"dataset:files,data_files:{corpus},data_dir:{tmp_path / 'cache'},tokenizer:bpe,vocab_size:320,"
             "seq_len:32,d_model:32,n_heads:2,max_steps:2,batch_size:4,warmup_iters:2,val_fraction:0.2,"
             "test_fraction:0.2,device:cpu")
    out = tmp_path / "blocks.json"
    assert bench_module("lm_blocks").main(["--steps", "2", "--depths", "1,2", "--windows", "4",
                                    "--variants", f"small={small}", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert_header(payload, out)
    assert [r["steps"] for r in payload["results"]["small"]["rows"]] == [1, 2], payload["results"]
    assert payload["args"]["steps"] == 2, payload["args"]


def test_every_json_writer_goes_through_result_file():
    """A benchmark that opens its --json file itself can leave it cut and without a header."""
    offenders = []
    for script in sorted(BENCH.glob("*.py")):
        if script.name == "throughput.py":  # hands --json to ops_suite or e2e_suite
            continue
        text = script.read_text()
        if "--json" in text and "write_json(" not in text:
            offenders.append(script.name)
    assert not offenders, f"{offenders} take --json but do not write it with result_file.write_json"


def test_the_commit_is_the_checkout_s_own_and_not_an_enclosing_repository_s(tmp_path):
    """An installed copy inside some other repository (a venv in a project) must not report
    that project's commit as the code that produced a result."""
    from revdeq_kernels.provenance import commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "tracked.txt").write_text("a")
    git("add", "tracked.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.strip()
    nested = tmp_path / "venv" / "site-packages"
    nested.mkdir(parents=True)
    assert commit(str(tmp_path)) == sha
    assert commit(str(nested)) == "unknown", "a folder inside another checkout took that checkout's commit"
    (tmp_path / "tracked.txt").write_text("b")
    assert commit(str(tmp_path)) == sha + "-dirty"
    assert commit(str(tmp_path / "no-such-folder")) == "unknown"
