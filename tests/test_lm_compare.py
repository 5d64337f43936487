"""bench/lm_compare.py end to end on a test-sized model: both tables, every seed, the
equal-steps point, and a run that continues past the budget to reach --steps."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from tests.test_lm_helpers import write_corpus

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "lm_compare.py"


def test_lm_compare_tables_over_seeds(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    small = ["dataset=files", f"data_files={corpus}", f"data_dir={tmp_path / 'cache'}", "tokenizer=bpe",
             "vocab_size=320", "seq_len=32", "d_model=32", "n_heads=2", "max_steps=2", "batch_size=4",
             "warmup_iters=2", "val_fraction=0.2", "test_fraction=0.2", "device=cpu"]
    out = tmp_path / "compare.json"
    cmd = [sys.executable, str(SCRIPT), "--steps", "6", "--budget", "1e-6", "--eval-interval", "3",
           "--eval-windows", "8", "--seeds", "2", "--rows", "explicit-1,reversible-normed-exact",
           "--out-dir", str(tmp_path / "runs"), "--json", str(out), *small]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"device", "commit", "torch"} <= set(result["header"]), result["header"]
    assert result["setup"][0].startswith("- machine:"), result["setup"]
    runs = result["runs"]
    assert sorted(runs) == ["explicit-1", "reversible-normed-exact"], sorted(runs)
    for row, seeds in runs.items():
        assert [r["seed"] for r in seeds] == [1337, 1338], (row, [r["seed"] for r in seeds])
        for run in seeds:
            # any step outlasts the 1 us budget, so it runs out after step 1 on every machine (a
            # 0.01 s budget ran out at step 4 on a fast one); the run validates there, then goes
            # on to --steps, validating every 3
            steps = [v["step"] for v in run["val"]]
            assert run["steps"] == 6 and steps == [1, 3, 6], (row, run["steps"], steps)
            assert run["val"][0]["train_seconds"] >= 1e-6, run["val"][0]
            assert all(math.isfinite(v["ppl"]) for v in run["val"]), (row, run["val"])
        assert seeds[0]["val"][-1]["ppl"] != seeds[1]["val"][-1]["ppl"], f"{row}: two seeds gave the same run"
    deq = runs["reversible-normed-exact"][0]["val"][-1]
    assert deq["residual_mean"] > 0 and deq["solver_steps_max"] == 2, deq
    tables = "\n".join(result["tables"])
    assert "Equal optimizer steps (6)" in tables and "Equal wall clock (1e-06 s of training)" in tables, tables
    assert tables.count("| explicit-1 |") == 2 and tables.count("| reversible-normed-exact |") == 2, tables
    assert " ± " in tables, tables
