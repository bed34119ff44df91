"""also_fused.Adam / AdamW against torch.optim.Adam / AdamW (single-tensor path) over 100 steps."""
from __future__ import annotations

import copy

import pytest
import torch

import also_fused
from support import DEVICE
from support.dropin import CASES, assert_close, run_pair, shapes


@pytest.mark.parametrize("kwargs", CASES, ids=str)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_matches_torch(name, kwargs):
    ours, theirs, _, _ = run_pair(getattr(also_fused, name), getattr(torch.optim, name), kwargs)
    assert_close(ours, theirs)


@pytest.mark.parametrize("backend", ["reference", "auto"])  # "auto" on CPU tensors: the fast CPU path
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_param_groups_and_scheduler(name, backend):
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen) for s in shapes()]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt_a = getattr(also_fused, name)([dict(params=ours[:2], lr=1e-2), dict(params=ours[2:], weight_decay=0.3)],
                                      backend=backend)
    opt_b = getattr(torch.optim, name)([dict(params=theirs[:2], lr=1e-2), dict(params=theirs[2:], weight_decay=0.3)],
                                       foreach=False)
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=50)
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=50)
    for _ in range(60):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step(), opt_b.step(), sched_a.step(), sched_b.step()
    assert_close(ours, theirs)
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]


def test_state_dict_loads_into_torch_and_back():
    """The state_dict has torch.optim.Adam's layout: each loads the other's and continues identically."""
    ours, theirs, opt_a, opt_b = run_pair(also_fused.Adam, torch.optim.Adam, dict(amsgrad=True), steps=10)
    fresh_a = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    fresh_b = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    cross_a = also_fused.Adam(fresh_a, amsgrad=True, backend="reference")
    cross_a.load_state_dict(copy.deepcopy(opt_b.state_dict()))
    cross_b = torch.optim.Adam(fresh_b, amsgrad=True, foreach=False)
    cross_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    gen = torch.Generator().manual_seed(5)
    for _ in range(10):
        grads = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in ours]
        for params in (ours, theirs, fresh_a, fresh_b):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        for opt in (opt_a, opt_b, cross_a, cross_b):
            opt.step()
    assert_close(fresh_a, theirs)
    assert_close(fresh_b, ours)
    assert all(cross_a.state[p]["exp_avg"].dtype == torch.float32 for p in fresh_a)


def test_skips_params_without_grad():
    p = torch.nn.Parameter(torch.randn(4))
    q = torch.nn.Parameter(torch.randn(4))
    opt = also_fused.Adam([p, q], backend="reference")
    before = q.detach().clone()
    p.grad = torch.randn(4)
    opt.step()
    assert torch.equal(q.detach(), before) and q not in opt.state


def test_closure_returns_loss():
    p = torch.nn.Parameter(torch.randn(3))
    opt = also_fused.AdamW([p], backend="reference")

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure)) == pytest.approx(float((p.detach() ** 2).sum()), rel=0.1)


BAD_HYPER_MESSAGES = {"lr": "Invalid learning rate", "eps": "Invalid epsilon value",
                      "betas": "Invalid beta parameter at index 0", "weight_decay": "Invalid weight_decay value"}


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(eps=-1.0), dict(betas=(1.0, 0.9)), dict(weight_decay=-0.1)])
def test_rejects_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match=BAD_HYPER_MESSAGES[next(iter(bad))]):
        also_fused.Adam([torch.nn.Parameter(torch.randn(2))], **bad)


def test_rejects_sparse_and_complex():
    with pytest.raises(TypeError, match="complex parameters are not supported"):
        also_fused.Adam([torch.nn.Parameter(torch.randn(2, dtype=torch.complex64))])
    p = torch.nn.Parameter(torch.randn(3))
    opt = also_fused.Adam([p], backend="reference")
    p.grad = torch.randn(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
