"""The GPU check's outputs as Markdown for bench/RESULTS.md: `python bench/gpu_report.py DIR`.

DIR is what `bash bench/gpu_check.sh` wrote (gpu_check.json, and ops.json / e2e.json when
those stages ran). Printed: the machine line, the stage table, the targets, one ops table
per size (each backend's GB/s and fraction of the same-run roofline, per op and dtype mix)
and the e2e table. Every number is copied from the JSON, none is computed anew, so what
goes into RESULTS.md is what the run measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_report import table as e2e_table  # noqa: E402


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not valid JSON ({error})") from None


def summary(check: dict) -> list[str]:
    h = check.get("header", {})
    lines = [f"**{h.get('device', '?')}**, torch {h.get('torch', '?')} (CUDA {h.get('cuda', '?')}), Python "
             f"{h.get('python', '?')}, commit {h.get('commit', '?')}; `gpu_check` {check['mode']}: "
             f"{check['seconds']:.0f} s of its {check['budget_s']:.0f} s budget, "
             f"{'every stage passed or was skipped for a stated reason' if check['ok'] else 'FAILED'}.",
             "", "| stage | status | seconds | result |", "|---|---|---:|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['result']} |" for s in check["stages"]]
    if check.get("targets"):
        lines += ["", "Targets:", ""]
        lines += [f"- [{'x' if t['met'] else ' '}] {t['target']}: {t['value']:.3g} ({t['detail']})"
                  for t in check["targets"]]
    return lines


def ops_tables(ops: dict) -> list[str]:
    """Per size: rows op x mix, a column per backend with 'GB/s (fraction of roofline)'."""
    lines = []
    sizes = list(dict.fromkeys(r["elements"] for r in ops["results"]))
    for n in sizes:
        rows = [r for r in ops["results"] if r["elements"] == n]
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        cells: dict[tuple[str, str], dict] = {}
        for r in rows:
            cells.setdefault((r["op"], r["mix"]), {})[r["backend"]] = r
        lines += ["", f"**{n:,} elements** (device copy {rows[0]['copy_gbps']:,.0f} GB/s; each cell: GB/s "
                      f"(fraction of the same-run roofline))", "",
                  "| op | state<-f | roofline GB/s | " + " | ".join(backends) + " |",
                  "|---|---|---:|" + "---:|" * len(backends)]
        for (op, mix), by_backend in cells.items():
            roofline = next(iter(by_backend.values()))["roofline_gbps"]
            shown = [f"{by_backend[b]['gbps']:,.0f} ({by_backend[b]['of_roofline']:.2f})" if b in by_backend else "-"
                     for b in backends]
            lines.append(f"| `{op}` | {mix} | {roofline:,.0f} | " + " | ".join(shown) + " |")
    return lines


def report(folder: Path) -> str:
    check = _load(folder, "gpu_check.json")
    if check is None:
        raise SystemExit(f"{folder}: no gpu_check.json (is it the folder bench/gpu_check.sh wrote?)")
    lines = summary(check)
    ops = _load(folder, "ops.json")
    if ops and ops.get("results"):
        lines += ["", "#### Ops"] + ops_tables(ops)
    e2e = _load(folder, "e2e.json")
    if e2e and e2e.get("rows"):
        setup = e2e.get("setup", {})
        lines += ["", "#### End to end", "",
                  f"{setup.get('block', '?')} block, batch {setup.get('batch', '?')} x seq {setup.get('seq', '?')} x "
                  f"width {setup.get('width', '?')}, {setup.get('heads', '?')} heads, {setup.get('dtype', '?')} states, "
                  f"autocast {setup.get('autocast', '?')}", "", e2e_table(e2e["rows"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the folder bench/gpu_check.sh wrote ($OUT or bench/results/gpu_check)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        raise SystemExit(f"{args.folder}: not a folder")
    sys.stdout.write(report(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
