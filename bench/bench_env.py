"""What every benchmark prints first and stores in its JSON: device, torch, backends, commit."""

from __future__ import annotations

import os

import torch

from revdeq_kernels import provenance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
    return provenance.commit(REPO)


def header(device: torch.device) -> dict:
    return provenance.header(device, REPO)


def print_header(info: dict, title: str) -> None:
    print(f"# {title}")
    print(f"# device: {info['device']} | torch {info['torch']} | revdeq_kernels {info['revdeq_kernels']} "
          f"| commit {info['commit']} | {info['utc']} UTC"
          + (f" | CPU kernels {info['cpu_isa']}" if "cpu_isa" in info else ""))
    for line in info["backends"].values():
        print(f"#   {line}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
