"""bench/gpu_check.sh, the one-call GPU check: its --smoke mode end to end on the CPU (so the
script cannot rot before a GPU is lent), and the pieces that decide pass or fail."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tests.helpers import bench_module

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


@pytest.mark.slow
def test_smoke_mode_runs_every_stage_and_writes_its_outputs(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--smoke", "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "## gpu_check summary" in done.stdout, done.stdout[-2000:]  # printed last, after the targets
    assert "## targets" in done.stdout.split("## gpu_check summary")[0]
    summary = json.loads((out / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    expected = ["build", "backends", "tests", "odd views cpp", "odd views triton", "ops", "e2e N=2", "train"]
    assert list(stages) == expected, list(stages)
    assert summary["ok"] and summary["mode"] == "smoke", summary
    not_passed = {n: (s["status"], s["result"]) for n, s in stages.items() if s["status"] != "passed"}
    allowed = {"build": ("skipped", "--smoke uses the installed build")}
    # as rk.backends() says under the smoke's environment: no triton, or an interpreter that cannot run it
    smoke_env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    unavailable = bench_module("gpu_check")._triton_unavailable(smoke_env)
    if unavailable:
        allowed["odd views triton"] = ("skipped", unavailable[:160])
    assert not_passed == allowed, not_passed
    # at most 8 files come back from a device call
    files = sorted(p.name for p in out.iterdir())
    assert files == ["e2e.json", "e2e_memory.png", "e2e_time.png", "gpu_check.json", "gpu_check.log",
                     "ops.json", "tests.xml"], files
    assert "calls, 0 mismatches" in stages["odd views cpp"]["result"], stages["odd views cpp"]
    ops_rows = json.loads((out / "ops.json").read_text())["results"]
    ops_names = set(bench_module("ops_suite").OPS)
    assert {r["op"] for r in ops_rows} == ops_names, {r["op"] for r in ops_rows} ^ ops_names
    assert all(r["copy_gbps"] > 0 and r["of_copy"] > 0 for r in ops_rows), ops_rows[0]
    e2e_rows = json.loads((out / "e2e.json").read_text())["rows"]
    methods = {r["method"] for r in e2e_rows if "error" not in r}
    assert methods == set(bench_module("gpu_check").E2E_METHODS.split(",")), methods
    assert all(r["time_ms"] > 0 and r["step_mb"] is not None for r in e2e_rows), e2e_rows[0]
    assert "tokens/s" in stages["train"]["result"], stages["train"]
    # ... and the report for RESULTS.md renders all of it
    text = bench_module("gpu_report").report(out)
    assert all(f"| {name} | {s['status']} |" in text for name, s in stages.items()), text[:2000]
    assert text.count("| `") == len({(r["op"], r["mix"], r["elements"]) for r in ops_rows}), text
    assert all(f"| {m} |" in text for m in methods), text[-3000:]


def _check(tmp_path, **overrides):
    gpu_check = bench_module("gpu_check")
    args = dict(smoke=True, quick=False, out=str(tmp_path), budget_s=60.0, archs="9.0", test_jobs=1, train_s=5.0,
                stages="")
    return gpu_check, gpu_check.Check(Namespace(**(args | overrides)))


def test_a_failing_stage_fails_the_check_and_names_its_exit_status(tmp_path):
    gpu_check, check = _check(tmp_path)
    stage, text = check.run("fails", [sys.executable, "-c", "print('hello'); raise SystemExit(3)"], 30)
    assert (stage.status, stage.result) == ("failed", "exit 3") and "hello" in text, (stage, text)
    assert check.finish() == 1
    assert not json.loads((tmp_path / "gpu_check.json").read_text())["ok"]
    assert "hello" in (tmp_path / "gpu_check.log").read_text()


def test_a_stage_past_its_limit_is_killed_with_its_children(tmp_path):
    _, check = _check(tmp_path)
    check.min_stage_s = 0
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
            "print('started', flush=True); time.sleep(60)"
    start = time.monotonic()
    stage, text = check.run("sleeps", [sys.executable, "-c", child], 3)
    assert stage.status == "timeout" and "started" in text, (stage, text)
    assert time.monotonic() - start < 20, f"the stage took {time.monotonic() - start:.0f} s to stop"


def test_the_scratch_folder_goes_with_a_check_that_never_finishes(tmp_path):
    """A run cut short (an exception, Ctrl-C, a caller that stops early) leaves no
    gpu_check_* folder behind in the temporary directory."""
    _, check = _check(tmp_path)
    scratch = check.scratch
    (scratch / "data").mkdir()
    assert scratch.is_dir()
    check.log.close()
    del check
    gc.collect()
    assert not scratch.exists(), f"{scratch} outlived its check"


def test_a_stage_without_budget_left_is_skipped(tmp_path):
    _, check = _check(tmp_path, budget_s=5.0)
    stage, _ = check.run("late", [sys.executable, "-c", "pass"], 100)
    assert stage.status == "skipped" and "budget" in stage.result, stage
    assert check.finish() == 0  # skipped for a stated reason is not a failure


def test_a_parity_file_without_a_test_that_ran_is_reported(tmp_path):
    gpu_check = bench_module("gpu_check")
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite>'
                     '<testcase classname="tests.test_ops" name="a"/>'
                     '<testcase classname="tests.test_triton" name="b"><skipped/></testcase>'
                     '</testsuite></testsuites>')
    files = ["tests/test_ops.py", "tests/test_triton.py", "tests/test_reversible.py"]
    assert gpu_check.files_without_tests(junit, files) == ["tests/test_triton.py", "tests/test_reversible.py"]
    assert gpu_check.files_without_tests(tmp_path / "missing.xml", files) == files


def _e2e_row(method, steps, time_ms, step_mb):
    return dict(method=method, steps=steps, time_ms=time_ms, step_mb=step_mb)


def test_e2e_targets_compare_reversible_with_unrolled():
    gpu_check = bench_module("gpu_check")
    rows = [_e2e_row("unrolled", 2, 10.0, 100.0), _e2e_row("unrolled", 16, 60.0, 800.0),
            _e2e_row("reversible", 2, 12.0, 50.0), _e2e_row("reversible", 16, 90.0, 52.0),
            _e2e_row("reversible_exact", 2, 13.0, 50.0), _e2e_row("reversible_exact", 16, 70.0, 70.0),
            dict(method="reversible_exact", steps=8, error="timed out")]
    checks = {c["target"]: c for c in gpu_check.e2e_targets(rows)}
    time_rev = checks["reversible step time <= 1.35x unrolled at every N"]
    assert time_rev["value"] == pytest.approx(1.5) and not time_rev["met"], time_rev
    memory_rev = checks["reversible step memory at N=16 <= 1.1x at N=2"]
    assert memory_rev["value"] == pytest.approx(1.04) and memory_rev["met"], memory_rev
    assert "unrolled 100 -> 800 MB" in memory_rev["detail"], memory_rev
    time_exact = checks["reversible_exact step time <= 1.35x unrolled at every N"]
    assert time_exact["value"] == pytest.approx(1.3) and time_exact["met"], time_exact
    assert not checks["reversible_exact step memory at N=16 <= 1.1x at N=2"]["met"]


def test_odd_views_are_misaligned_or_strided_and_hold_the_values():
    odd = bench_module("odd_views")
    values = torch.randn(3, 7, dtype=torch.float32)
    layouts = odd.views(values)
    assert layouts["offset"].is_contiguous() and layouts["offset"].data_ptr() % 8 != 0
    assert not layouts["transposed"].is_contiguous() and not layouts["strided"].is_contiguous()
    for name, view in layouts.items():
        assert torch.equal(view, values), name


def test_odd_views_mismatch_catches_one_bad_element_and_a_nan():
    odd = bench_module("odd_views")
    expected = torch.randn(4, 5, dtype=torch.float32)
    tol = odd.elementwise(torch.float32)
    assert odd.mismatch("state", expected.clone(), expected, tol) is None
    bad = expected.clone()
    bad[2, 3] += 1e-3
    assert "element 13" in odd.mismatch("state", bad, expected, tol)
    bad = expected.clone()
    bad[0, 1] = float("nan")
    assert "element 1 " in odd.mismatch("state", bad, expected, tol)
    ints = torch.arange(6)
    assert odd.mismatch("digits", ints + (ints == 5), ints, odd.BITS) is not None
    assert odd.mismatch("digits", ints.clone(), ints, odd.BITS) is None


def test_the_correctness_stages_run_triton_untuned_and_the_timed_ones_tune(tmp_path, monkeypatch):
    monkeypatch.setenv("REVDEQ_TRITON_AUTOTUNE", "0")  # a caller's setting must not reach the timed stages
    gpu_check, check = _check(tmp_path, smoke=False)
    seen = {}

    def record(name, command, limit, env=None):
        seen[name] = (env or check.env).get("REVDEQ_TRITON_AUTOTUNE")
        stage = gpu_check.Stage(name, "passed")
        check.stages.append(stage)
        return stage, ""

    monkeypatch.setattr(check, "run", record)
    check.tests()
    check.ops()
    assert seen == {"tests": "0", "ops": "1"}, seen


def test_the_report_copies_each_measured_number_and_marks_what_is_missing(tmp_path):
    gpu_report = bench_module("gpu_report")
    stage = dict(name="ops", status="passed", seconds=91.4, result="worst relax_ bf16<-bf16 triton", command=[])
    (tmp_path / "gpu_check.json").write_text(json.dumps(dict(
        mode="full", ok=False, seconds=402.6, budget_s=480.0, stages=[stage],
        header=dict(device="NVIDIA H200", torch="2.11.0+cu130", cuda="13.0", python="3.12.3", commit="abc1234"),
        targets=[dict(target="every fused op >= 0.9x", value=0.874, met=False, detail="1 of 2 rows below")])))
    row = dict(op="relax_", mix="f32<-f32", elements=64 * 2**20, roofline_gbps=4012.2, copy_gbps=4300.0)
    (tmp_path / "ops.json").write_text(json.dumps(dict(results=[
        row | dict(backend="cuda", gbps=3912.6, of_roofline=0.9752),
        row | dict(backend="triton", gbps=3506.0, of_roofline=0.8738),
        row | dict(op="unrelax_", backend="cuda", gbps=3901.0, of_roofline=0.9723)])))
    text = gpu_report.report(tmp_path)
    assert "**NVIDIA H200**, torch 2.11.0+cu130 (CUDA 13.0), Python 3.12.3, commit abc1234" in text, text
    assert "403 s of its 480 s budget, FAILED" in text and "| ops | passed | 91 |" in text, text
    assert "- [ ] every fused op >= 0.9x: 0.874 (1 of 2 rows below)" in text, text
    assert "**67,108,864 elements** (device copy 4,300 GB/s" in text, text
    assert "| `relax_` | f32<-f32 | 4,012 | 3,913 (0.98) | 3,506 (0.87) |" in text, text
    assert "| `unrelax_` | f32<-f32 | 4,012 | 3,901 (0.97) | - |" in text, "a backend without a row must show '-'"
    assert "End to end" not in text, "no e2e.json, no e2e section"
    (tmp_path / "e2e.json").write_text("{ cut")
    with pytest.raises(SystemExit, match="e2e.json: not valid JSON"):
        gpu_report.report(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SystemExit, match="elsewhere: no gpu_check.json"):
        gpu_report.report(tmp_path / "elsewhere")
