"""Where the GPU benchmarks write: benchmarks/results/<stem>_<gpu>.json, the GPU named by its last word."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_records(records: list, stem: str) -> str:
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{stem}_{gpu}.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (first 12 hex digits) of the package's source files (also_fused/, kernels/, the C++ extension):
    names the code a record measured even where the checkout's git metadata is missing or stale."""
    root = Path(RESULTS_DIR).parent.parent
    digest = hashlib.sha256()
    for folder in ("also_fused", "kernels"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".cpp", ".h"):
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]
