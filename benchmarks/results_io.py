"""Where the GPU benchmarks write: benchmarks/results/<stem>_<gpu>.json, the GPU named by its last word."""
from __future__ import annotations

import json
import os

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_records(records: list, stem: str) -> str:
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{stem}_{gpu}.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path
