#!/usr/bin/env bash
# The GPU check in one command (bench/gpu_check.py says what it does):
#   bash bench/gpu_check.sh            build, parity tests, memcheck, ops bandwidth, e2e, 60 s of training
#   bash bench/gpu_check.sh --quick    build and correctness only
#   bash bench/gpu_check.sh --smoke    every stage on the CPU at tiny sizes (what the test suite runs)
# PYTHON picks the interpreter (default: python3, the one that holds torch on the lent machine).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
