"""A few pi steps of the many-groups path (kept launches and workspace, in place, descent-ascent), for Nsight
Compute to profile one launch of: at 10^7 groups the sparse variant with carried sums (the sample launch with the
normaliser, then the write), at 10^5 the dense one. CUDA only.

Run (one launch of the fourth step, hardware counters, the clocks left alone)::

    ncu --clock-control none --set full --launch-skip 3 --launch-count 1 -k regex:_pi_write_kernel \\
        python3 benchmarks/explore/ncu_pi_step.py 1e7 > benchmarks/results/ncu_pi_write_1e7_h100.txt

(``-k regex:_pi_sample_sums_kernel`` for the sample programs; sizes as the first argument.)
"""
from __future__ import annotations

import sys

import torch

from also_fused.kernels import group_pi

HP = dict(pi_lr=1e-3, pi_decay=1e-2, temperature=1.0, eps=1.1920929e-07, log_pi_reg=None)


def main() -> None:
    n = int(float(sys.argv[1]))
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    batch = 4096
    gen = torch.Generator("cuda").manual_seed(n)
    pi = torch.rand(n, device="cuda", generator=gen) + 0.5
    pi /= pi.sum()
    ids = torch.randint(0, n, (batch,), device="cuda", generator=gen)
    losses = torch.rand(batch, device="cuda", generator=gen) * 3
    cache: dict = {}
    workspace: dict = {}
    for _ in range(steps):
        group_pi.pi_update_checked(pi, ids, losses, out=pi, cache=cache, workspace=workspace, **HP)
    torch.cuda.synchronize()
    print("ok", n, "dense" if cache["many"][1].dense_s else "sparse")


if __name__ == "__main__":
    main()
