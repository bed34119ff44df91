"""select_batch at object-level scale: the sort-free cutoff against the sort the published method does.

For n_groups in --sizes, pi a softmax of random logits: ``functional.select_batch`` (past 2^16 groups the
cutoff by the backend's search without a sort: the Triton kernel on a GPU; its torch reference beside it) and ``functional.select_batch_reference`` (sort, float64
cumulative sum), both with the draw by pi, and the cutoff alone. Each call ends in a host read of the batch
size, so wall time per call is what a sampler pays: the median of --repeats calls after a warm-up, with a
device synchronize after each. The two cutoffs are checked equal. Writes JSON (default
benchmarks/results/select_<device>.json) and prints a table.

Run: ``python3 benchmarks/pi/bench_select.py`` (CUDA; on a CPU pass smaller --sizes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

from also_fused import functional as F
from also_fused.backends import resolve_backend

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)
from results_io import RESULTS_DIR, source_digest  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int) -> tuple[float, float, float]:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8")
    parser.add_argument("--threshold", type=float, default=0.999)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        gen = torch.Generator(device).manual_seed(0)
        pi = torch.softmax(torch.randn(n, device=device, generator=gen), 0)
        backend = resolve_backend("auto", device)  # the Triton kernel on a GPU, the torch search on a CPU
        cut_fast = backend.mass_cutoff(pi, args.threshold, "desc")
        sorted_pi = torch.sort(pi, descending=True)[0]
        cut_sorted = int(torch.searchsorted(torch.cumsum(sorted_pi.double(), 0),
                                            torch.tensor([args.threshold], dtype=torch.float64, device=device))) + 1
        del sorted_pi
        row = dict(n_groups=n, threshold=args.threshold, batch_size=max(1, n - cut_fast), cutoffs_equal=cut_fast == cut_sorted)
        for key, fn in (("cutoff_search", lambda: backend.mass_cutoff(pi, args.threshold, "desc")),
                        ("cutoff_search_torch", lambda: F.mass_cutoff(pi, args.threshold)),
                        ("select_batch", lambda: F.select_batch(pi, args.threshold, generator=gen,
                                                                cutoff=backend.mass_cutoff)),
                        ("select_batch_sorted", lambda: F.select_batch_reference(pi, args.threshold, generator=gen))):
            med, lo, hi = median_ms(fn, device, args.repeats)
            row.update({f"{key}_ms": med, f"{key}_ms_min": lo, f"{key}_ms_max": hi})
        rows.append(row)
        print(row, flush=True)
        del pi
    record = dict(device=name, torch=torch.__version__, also_fused_source=source_digest(),
                  date=datetime.datetime.now().isoformat(timespec="seconds"), repeats=args.repeats, rows=rows)
    out = args.out or os.path.join(RESULTS_DIR, f"select_{name.split()[-1].lower()}.json")
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {out}\n\n| n_groups | batch | cutoff search ms | (torch ops) | select_batch ms | with a sort ms | cutoffs equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n_groups']:.0e} | {r['batch_size']} | {r['cutoff_search_ms']:.2f} | {r['cutoff_search_torch_ms']:.2f} | "
              f"{r['select_batch_ms']:.2f} | "
              f"{r['select_batch_sorted_ms']:.2f} | {r['cutoffs_equal']} |")


if __name__ == "__main__":
    main()
