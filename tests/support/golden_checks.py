"""ALSO against the float64 golden model: ``check`` (one run, its tolerances, and that pi moved), the
matrix of configurations (``MATRIX``) and the variants (``VARIANTS``) test_also_golden runs on the
reference path and test_cpu_fused on the fast CPU path.
"""
from __future__ import annotations

import torch

from support import DEVICE
from support.compare import ulp_distance
from support.harness import Config, rel, rel_each, run

# float32 arithmetic against the float64 model: about 2^-24 relative per operation, a few hundred
# operations deep over a run (measured: params within 3e-7, pi within 6e-6 of each entry)
TOL = 1e-5


def check(cfg: Config, backend: str = "reference", device: str = DEVICE, tol: float = TOL):
    golden, x, opt, losses = run(cfg, device, backend)
    for got, want in zip(x, golden.params):
        if cfg.dtype == torch.float32:
            assert rel(got, want) <= tol, (rel(got, want), cfg)
        else:  # 16 bits, the model holding them in the same storage: the same values, or a neighbour
            assert int(ulp_distance(got.to(cfg.dtype), want.to(cfg.dtype)).max()) <= 1, cfg
    assert rel_each(opt.pi, golden.pi) <= tol, (rel_each(opt.pi, golden.pi), cfg)
    assert abs(float(opt.pi.sum()) - 1.0) <= 1e-5
    # the returned loss is the batch mean of the per-sample losses
    for got, want in losses[:5]:
        assert abs(got - want) <= 1e-4 * max(1.0, abs(want))
    # pi and the params really moved away from their start, so the comparisons above are not vacuous
    start = torch.full_like(golden.pi, 1.0 / cfg.n_groups) if cfg.pi_init is None else None
    if start is not None and cfg.n_groups > 1:
        assert rel_each(golden.pi, start) > 1e-2
    return golden, opt


MATRIX = [
    Config(mode=mode, api=api, amsgrad=amsgrad, weight_decay=wd)
    for mode in ("optimistic", "descent-ascent")
    for api in ("closure", "loop")
    for amsgrad in (False, True)
    for wd in (0.0, 1e-3)
]

VARIANTS = {
    "alpha_temperature": dict(alpha=0.5, temperature=2.0),
    "nonuniform_pi": dict(pi_init=[4.0, 1.0, 2.0, 3.0], pi_reg=[1.0, 2.0, 3.0, 4.0]),
    "lost_gradient": dict(lose_grad_every=3),
    "same_ids": dict(ids="same"),
    "one_sample": dict(batch=1),
    "distinct_ids": dict(ids="distinct", n_groups=16, batch=8),
    "one_group": dict(n_groups=1),
    "large_pi_decay": dict(pi_decay=5.0, pi_lr=0.2),
    # eps comparable to sqrt(v): tells ALSO's eps placement (before the bias correction) from torch's
    "large_eps": dict(eps=3e-2, amsgrad=True),
}
