"""The drop-ins' per-step fast path: plans reused while nothing changed, re-planned when something did.

Every case runs the same steps on also_fused and on torch.optim (single-tensor path) and compares the
params, on each path that runs here (reference, the CPU path, the Triton kernels on CUDA or in the
interpreter). The lr schedule reaches the kernel as launch arguments for up to MAX_LR_ARGS param
groups and through the device table beyond: both must give the same bits.
"""
from __future__ import annotations

import pytest
import torch

import also_fused
from support import DEVICE, triton_importable
from support.dropin import assert_close

BACKENDS = ["reference", "auto"] + (["triton"] if triton_importable() else [])
SHAPES = [(7, 5), (13,), (1,), (3, 4, 2), (6,), (2, 2)]


def make_pair(name, n_groups, backend, **kwargs):
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in init]
    theirs = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in init]

    def groups(ps):
        per = -(-len(ps) // n_groups)
        return [dict(params=ps[i:i + per], lr=1e-2 * (1 + k), weight_decay=0.05 * k)
                for k, i in enumerate(range(0, len(ps), per))]

    opt_a = getattr(also_fused, name)(groups(ours), backend=backend, **kwargs)
    opt_b = getattr(torch.optim, name)(groups(theirs), foreach=False, **kwargs)
    return ours, theirs, opt_a, opt_b, gen


def set_grads(ours, theirs, gen, pool=None, k=0, skip=()):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        if i in skip:
            p.grad = q.grad = None
            continue
        g = torch.randn(p.shape, generator=gen).to(DEVICE)
        if pool is not None:  # gradients at alternating addresses, as set_to_none=True gives them
            buf = pool.setdefault((i, k % 2), torch.empty_like(g))
            p.grad = buf.copy_(g)
        else:
            p.grad = g.clone()
        q.grad = g.clone()


def snapshot(opt, params):
    """Copies of the params and of the first param's optimizer state."""
    return [p.detach().clone() for p in params], {k: v.clone() for k, v in opt.state[params[0]].items()}


def assert_same_snapshot(got, want):
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
    assert got[1].keys() == want[1].keys() and all(torch.equal(got[1][k], want[1][k]) for k in want[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_groups", [1, 2, 4, 6])  # 6 > MAX_LR_ARGS: the table path
def test_schedule_and_moving_grads_match_torch(backend, n_groups):
    ours, theirs, opt_a, opt_b, gen = make_pair("AdamW", n_groups, backend)
    sched_a = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=12)
    sched_b = torch.optim.lr_scheduler.CosineAnnealingLR(opt_b, T_max=12)
    pool = {}
    for k in range(14):
        set_grads(ours, theirs, gen, pool=pool, k=k)
        opt_a.step(), opt_b.step(), sched_a.step(), sched_b.step()
    assert_close(ours, theirs)


@pytest.mark.skipif(not triton_importable(), reason="triton is not installed")
def test_lr_launch_arguments_equal_the_table_bitwise():
    """The same groups, once through lr launch arguments (4 groups) and once through the table (5 groups,
    the fifth without params): identical bits."""
    results = []
    for extra_group in (False, True):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in SHAPES[:4]]
        groups = [dict(params=[p], lr=1e-2 / (k + 1), weight_decay=0.1 * k) for k, p in enumerate(params)]
        if extra_group:
            groups.append(dict(params=[torch.nn.Parameter(torch.zeros(1, device=DEVICE))], lr=0.5))
        opt = also_fused.AdamW(groups, backend="triton")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            opt.step()
            sched.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changes_between_steps_are_seen(backend):
    """Flags flipped, a param losing and regaining its gradient, a param group added, a param's storage
    replaced: each step after the change follows torch."""
    ours, theirs, opt_a, opt_b, gen = make_pair("Adam", 2, backend)
    for k in range(12):
        if k == 3:
            for opt in (opt_a, opt_b):
                opt.param_groups[0]["maximize"] = True
        if k == 6:
            extra_a = torch.nn.Parameter(torch.ones(4, device=DEVICE))
            extra_b = torch.nn.Parameter(torch.ones(4, device=DEVICE))
            opt_a.add_param_group(dict(params=[extra_a], lr=3e-2))
            opt_b.add_param_group(dict(params=[extra_b], lr=3e-2))
            ours.append(extra_a), theirs.append(extra_b)
        if k == 8:
            with torch.no_grad():
                for p in (ours[0], theirs[0]):
                    p.data = p.data.clone() + 1.0
        set_grads(ours, theirs, gen, skip=(1,) if k in (4, 5) else ())
        opt_a.step(), opt_b.step()
    assert_close(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradient_refused_after_fast_steps(backend):
    ours, theirs, opt_a, _, gen = make_pair("Adam", 1, backend)
    for _ in range(3):
        set_grads(ours, theirs, gen)
        opt_a.step()
    before = snapshot(opt_a, ours)
    ours[0].grad = torch.randn(ours[0].shape).to(DEVICE).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt_a.step()
    assert_same_snapshot(snapshot(opt_a, ours), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_gradient_layout_checked_after_fast_steps(backend):
    """A channels_last param's plan is reused while its gradients keep its strides; a gradient in another
    layout after such steps is refused and changes nothing, and one back in the param's layout steps again."""
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(4, 3, 2, 2, generator=gen)
    ours = [torch.nn.Parameter(w0.clone().to(DEVICE).to(memory_format=torch.channels_last)),
            torch.nn.Parameter(torch.randn(5, generator=gen).to(DEVICE))]
    theirs = [torch.nn.Parameter(p.detach().clone().contiguous()) for p in ours]
    opt_a = also_fused.Adam(ours, lr=1e-2, backend=backend)
    opt_b = torch.optim.Adam(theirs, lr=1e-2, foreach=False)

    def grads():
        g = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in ours]
        for p, q, x in zip(ours, theirs, g):
            p.grad, q.grad = x.clone().contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.clone(), x
        return g

    for _ in range(3):
        grads()
        opt_a.step(), opt_b.step()
    before = snapshot(opt_a, ours)
    ours[0].grad = grads()[0].contiguous()
    with pytest.raises(RuntimeError, match="dense in one layout"):
        opt_a.step()
    assert_same_snapshot(snapshot(opt_a, ours), before)
    for _ in range(2):
        grads()
        opt_a.step(), opt_b.step()
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    assert_close([p.detach().contiguous() for p in ours], [q.detach() for q in theirs])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("api", ["loop", "closure"])
def test_eval_and_train_between_steps_change_nothing(backend, api):
    """Optimistic ALSO: eval() and train() swap the buffers the step's plans point at; the steps after them
    (reusing nothing stale) follow a twin that never called them, bitwise."""
    from support.harness import Config, batches, make_package, package_step

    cfg = Config(mode="optimistic", api=api, steps=8)
    runs = []
    for interrupt in (False, True):
        Wp, bp, opt = make_package(cfg, DEVICE, backend)
        for k, (X, Y, ids, use_bias) in enumerate(batches(cfg)):
            package_step(opt, Wp, bp, api, X, Y, ids, use_bias, DEVICE, cfg.dtype)
            if interrupt and k in (2, 5):
                opt.eval()
                opt.train()
        opt.eval()
        runs.append([Wp.detach().clone(), bp.detach().clone(), opt.pi.clone()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
