"""Child processes of the e2e suite: peak memory of one (method, N) point, and the step
times of all methods at one N.

`python bench/e2e_point.py memory '<json>'`: a fresh process per point, so no other
point's allocations count. After `warmup` steps, one more step; prints the peak.
CPU: peak RSS of the process (ru_maxrss) and the step memory, peak RSS minus the RSS just
before the first step (model, inputs and the torch runtime already resident).
CUDA: torch.cuda.max_memory_allocated, and the same minus the allocation before the first step.

`python bench/e2e_point.py time '<json>'`: builds every method at one N in one process,
warms each up, then runs rounds, each one step of every method in turn (at least `repeats`
rounds, more until `min_seconds` have passed, at most 100), and prints each method's
median. Interleaving makes a burst of load from other processes hit all methods alike, so
the ratios between methods hold on a shared machine.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

import torch

from e2e_methods import Setup, TrainStep, build  # bench/ is on sys.path: this file runs as a script

MB = 1024.0 * 1024.0
MAX_ROUNDS = 100


def current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _prepare(config: dict) -> tuple[Setup, torch.device]:
    setup = Setup(**config["setup"])
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    return setup, torch.device(setup.device)


def measure_memory(config: dict) -> dict:
    setup, device = _prepare(config)
    cuda = device.type == "cuda"
    step = TrainStep(build(config["method"], config["steps"], setup), setup)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = current_rss()
    for _ in range(config["warmup"] + 1):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
    return dict(peak_mb=peak / MB, step_mb=(peak - before) / MB,
                memory_kind="cuda max_memory_allocated" if cuda else "peak RSS",
                backend=getattr(getattr(step.model, "last_stats", None), "backend", None))


def measure_times(config: dict) -> dict:
    setup, device = _prepare(config)
    cuda = device.type == "cuda"
    steps = {m: TrainStep(build(m, config["steps"], setup), setup) for m in config["methods"]}
    for _ in range(config["warmup"]):
        for step in steps.values():
            step()
    times = {m: [] for m in steps}
    started = time.perf_counter()
    rounds = 0
    while rounds < config["repeats"] or (time.perf_counter() - started < config["min_seconds"]
                                         and rounds < MAX_ROUNDS):
        rounds += 1
        for method, step in steps.items():
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            times[method].append(time.perf_counter() - start)
    out = {}
    for method, values in times.items():
        median = statistics.median(values)
        out[method] = dict(time_ms=1e3 * median, times_ms=[1e3 * t for t in values],
                           tokens_per_s=setup.batch * setup.seq / median)
    return out


if __name__ == "__main__":
    modes = {"memory": measure_memory, "time": measure_times}
    if len(sys.argv) != 3 or sys.argv[1] not in modes:
        raise SystemExit(f"usage: {sys.argv[0]} memory|time '<json config>'")
    print(json.dumps(modes[sys.argv[1]](json.loads(sys.argv[2]))))
