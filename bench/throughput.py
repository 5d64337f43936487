"""Benchmarks: `python bench/throughput.py [--suite ops|e2e] [--json PATH] ...`

- ops: each fused state update x size x dtype mix x backend: time, effective GB/s,
  fraction of the same-run roofline, speed-up over eager PyTorch (bench/ops_suite.py).
- e2e: one training step of a transformer-block DEQ for every method (reversible,
  unrolled, implicit, phantom, explicit) and number of steps: time, tokens/s, peak
  memory, f evaluations, gradient error (bench/e2e_suite.py).
Each suite adds its own options; `--suite X --help` lists them.
"""

import argparse
import importlib
import sys

SUITES = {"ops": "ops_suite", "e2e": "e2e_suite"}


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", choices=sorted(SUITES), default="ops")
    known, _ = pre.parse_known_args(argv)
    suite = importlib.import_module(SUITES[known.suite])
    parser = argparse.ArgumentParser(description=suite.__doc__, parents=[pre])
    suite.add_arguments(parser)
    return suite.run(parser.parse_args(argv)) or 0


if __name__ == "__main__":
    sys.exit(main())
