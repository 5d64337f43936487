"""The e2e suite's outputs: the Markdown table, the target checks, the plots."""

from __future__ import annotations

import os

from result_file import replacing

TIME_RATIO_LIMIT = 1.35     # reversible step time / unrolled step time, same steps
MEMORY_RATIO_LIMIT = 1.1    # reversible step memory at the most steps / at 4 steps
GRAD_ERROR_LIMIT = 1e-9     # reversible gradient error vs unrolled autograd, float64
# reversal="exact": against the float reversal and unrolled, and its error. The target is
# float32 backprop's level; on the float64 copy its states sit on a 2^-48 grid (the default
# frac_bits for float64 f), which lands near 1e-12.
EXACT_TIME_LIMIT = 1.15        # reversible_exact step time / reversible step time
EXACT_MEMORY_GROWTH_LIMIT = 0.1  # its step-memory growth N=4 -> most steps / unrolled's
EXACT_GRAD_ERROR_LIMIT = 1e-6

COLUMNS = [
    ("method", "method", "{}"), ("steps", "steps", "{}"), ("nfe_forward", "f evals fwd", "{}"),
    ("nfe_backward", "f evals bwd", "{}"), ("vjp_backward", "VJPs bwd", "{}"),
    ("time_ms", "step ms (median)", "{:.1f}"), ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("peak_mb", "peak MB", "{:.1f}"), ("step_mb", "step MB", "{:.1f}"),
    ("residual", "residual (f64 copy)", "{:.2e}"), ("grad_error", "grad err vs autograd (f64)", "{:.2e}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def _by(rows: list[dict], method: str) -> dict[int, dict]:
    return {r["steps"]: r for r in rows if r["method"] == method and r.get("time_ms") is not None}


def targets(rows: list[dict]) -> list[dict]:
    """The targets for the reversible rows (plain, checkpointed, exact), each with the
    measured value, the limit and whether it is met."""
    out = []
    unr = _by(rows, "unrolled")
    for method in ("reversible", "reversible_ck"):
        rows_of = _by(rows, method)
        common = sorted(set(rows_of) & set(unr))
        if common:
            ratios = {n: rows_of[n]["time_ms"] / unr[n]["time_ms"] for n in common}
            worst = max(ratios.values())
            out.append(dict(target=f"{method} step time <= {TIME_RATIO_LIMIT}x unrolled at every N",
                            value=worst, met=worst <= TIME_RATIO_LIMIT,
                            detail=", ".join(f"N={n}: {r:.2f}x" for n, r in ratios.items())))
    for method in ("reversible", "reversible_ck"):
        rows_of = _by(rows, method)
        low = 4 if 4 in rows_of else min(rows_of, default=0)
        high = max(rows_of, default=0)
        if high <= low:
            continue
        ratio = rows_of[high]["step_mb"] / rows_of[low]["step_mb"]
        detail = (f"step memory {rows_of[low]['step_mb']:.1f} MB at N={low}, "
                  f"{rows_of[high]['step_mb']:.1f} MB at N={high}")
        if method == "reversible" and low in unr and high in unr:
            detail += (f"; unrolled {unr[low]['step_mb']:.1f} -> {unr[high]['step_mb']:.1f} MB "
                       f"({unr[high]['step_mb'] / unr[low]['step_mb']:.1f}x, "
                       f"{(unr[high]['step_mb'] - unr[low]['step_mb']) / (high - low):.2f} MB per step)")
        out.append(dict(target=f"{method} step memory at N={high} <= {MEMORY_RATIO_LIMIT}x at N={low}",
                        value=ratio, met=ratio <= MEMORY_RATIO_LIMIT, detail=detail))
    for method, limit in (("reversible", GRAD_ERROR_LIMIT), ("reversible_ck", GRAD_ERROR_LIMIT),
                          ("reversible_exact", EXACT_GRAD_ERROR_LIMIT)):
        errors = {r["steps"]: r["grad_error"] for r in rows
                  if r["method"] == method and r.get("grad_error") is not None}
        if errors:
            worst = max(errors.values())
            out.append(dict(target=f"{method} gradient error <= {limit:g} (float64, unrolled = truth)",
                            value=worst, met=worst <= limit,
                            detail=", ".join(f"N={n}: {e:.1e}" for n, e in errors.items())))
    return out + _exact_targets(rows)


def _exact_targets(rows: list[dict]) -> list[dict]:
    exact, floating, unr = _by(rows, "reversible_exact"), _by(rows, "reversible"), _by(rows, "unrolled")
    out = []
    common = sorted(set(exact) & set(floating))
    if common:
        ratios = {n: exact[n]["time_ms"] / floating[n]["time_ms"] for n in common}
        detail = ", ".join(f"N={n}: {r:.2f}x" + (f" ({exact[n]['time_ms'] / unr[n]['time_ms']:.2f}x unrolled)"
                                                  if n in unr else "") for n, r in ratios.items())
        out.append(dict(target=f"reversible_exact step time <= {EXACT_TIME_LIMIT}x reversible at every N",
                        value=max(ratios.values()), met=max(ratios.values()) <= EXACT_TIME_LIMIT, detail=detail))
    both = sorted(set(exact) & set(unr))
    low, high = (4 if 4 in both else min(both, default=0)), max(both, default=0)
    if high > low:
        grow_exact = exact[high]["step_mb"] - exact[low]["step_mb"]
        grow_unr = unr[high]["step_mb"] - unr[low]["step_mb"]
        ratio = grow_exact / grow_unr if grow_unr > 0 else float("inf")
        out.append(dict(target=f"reversible_exact step-memory growth N={low} -> {high} <= "
                               f"{EXACT_MEMORY_GROWTH_LIMIT}x unrolled's", value=ratio,
                        met=ratio <= EXACT_MEMORY_GROWTH_LIMIT,
                        detail=f"{exact[low]['step_mb']:.1f} -> {exact[high]['step_mb']:.1f} MB; unrolled "
                               f"{unr[low]['step_mb']:.1f} -> {unr[high]['step_mb']:.1f} MB"))
    return out


def print_targets(checks: list[dict]) -> None:
    print("\n# targets (ratios within this one run)")
    for check in checks:
        print(f"- [{'met' if check['met'] else 'NOT met'}] {check['target']}: {check['value']:.3g} ({check['detail']})")


def plot(rows: list[dict], folder: str, title: str) -> list[str]:
    """Two PNGs: step memory vs steps and step time vs steps, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    written = []
    for key, ylabel, name in (("step_mb", "step memory (MB): peak above the resident model", "e2e_memory.png"),
                              ("time_ms", "training-step time, median (ms)", "e2e_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in methods:
            points = sorted((r["steps"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps N (forward budget: 1 + 2N evaluations of the block)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(folder, name)
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        written.append(path)
    return written
