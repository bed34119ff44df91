"""The Adam / AdamW drop-ins beside torch.optim: the cases of hyper-parameters, the params' shapes, a run
of both on the same gradients (``run_pair``) and the relative error they must stay within
(``assert_close``). Used by test_adam_dropin, test_cpu_fused, test_triton_backend and test_step_plans.
"""
from __future__ import annotations

import torch

from support import DEVICE

CASES = [
    dict(),
    dict(weight_decay=0.1),
    dict(amsgrad=True),
    dict(maximize=True),
    dict(amsgrad=True, maximize=True, weight_decay=0.05),
    dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6),
]


def shapes():
    return [(7, 5), (13,), (1,), (3, 4, 2)]


def run_pair(ours_cls, theirs_cls, kwargs, steps=100, backend="reference", device=DEVICE, grouped=False):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in shapes()]
    ours = [torch.nn.Parameter(t.clone().to(device)) for t in init]
    theirs = [torch.nn.Parameter(t.clone().to(device)) for t in init]

    def groups(ps):
        if not grouped:
            return ps
        return [dict(params=ps[:2], lr=1e-2), dict(params=ps[2:], lr=1e-3, weight_decay=0.2)]

    opt_a = ours_cls(groups(ours), backend=backend, **kwargs)
    opt_b = theirs_cls(groups(theirs), foreach=False, **kwargs)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen).to(device) for s in shapes()]
        for p, q, g in zip(ours, theirs, grads):
            p.grad = g.clone()
            q.grad = g.clone()
        opt_a.step()
        opt_b.step()
    return ours, theirs, opt_a, opt_b


def assert_close(ours, theirs, tol=1e-6):
    for a, b in zip(ours, theirs):
        err = float((a.detach() - b.detach()).norm() / b.detach().norm())
        assert err <= tol, err
