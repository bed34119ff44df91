"""Moment storage precision of the drop-ins: torch's layout by default, float32 or bfloat16 on request.

Memory and state_dict dtypes are compared with torch.optim's; trajectories with torch's fused AdamW
(the same single rounding of the moments per step) and between the paths that run here.
"""
from __future__ import annotations

import copy

import pytest
import torch

import also_fused
from conftest import DEVICE, triton_importable

BACKENDS = ["reference", "auto"] + (["triton"] if triton_importable() else [])
SHAPES = [(33, 7), (130,), (1,), (4, 3, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype)) for s in SHAPES]


def train(opt, params, steps, seed=1, start=0):
    gen = torch.Generator().manual_seed(seed)
    for k in range(start + steps):
        grads = [torch.randn(p.shape, generator=gen).to(DEVICE, p.dtype) for p in params]
        if k < start:
            continue
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_default_state_has_torchs_memory_and_dtypes(dtype, amsgrad):
    ours, theirs = make_params(dtype), make_params(dtype)
    opt_a = also_fused.AdamW(ours, amsgrad=amsgrad)
    opt_b = torch.optim.AdamW(theirs, amsgrad=amsgrad, foreach=False)
    train(opt_a, ours, 2), train(opt_b, theirs, 2)
    assert state_bytes(opt_a) == state_bytes(opt_b)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for i in sb:
        assert {k: v.dtype for k, v in sa[i].items() if k != "step"} == \
               {k: v.dtype for k, v in sb[i].items() if k != "step"}


@pytest.mark.parametrize("precision,expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_precision_sets_the_moment_dtype(precision, expected, dtype):
    params = make_params(dtype)
    opt = also_fused.Adam(params, state_precision=precision, amsgrad=True)
    train(opt, params, 1)
    for s in opt.state.values():
        assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == s["max_exp_avg_sq"].dtype == expected
    assert state_bytes(opt) == sum(3 * p.numel() * expected.itemsize + 4 for p in params)


def test_unknown_precision_refused():
    with pytest.raises(ValueError, match="state_precision"):
        also_fused.AdamW(make_params(torch.float32), state_precision="int4")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_follow_torch_fused(backend, dtype):
    """Default state (the param dtype): the trajectory of torch.optim.AdamW(fused=True); bitwise where the
    path runs torch's own fused kernel (the CPU path), within a few roundings elsewhere."""
    ours, theirs = make_params(dtype), make_params(dtype)
    opt_a = also_fused.AdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    opt_b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, fused=True)
    train(opt_a, ours, 20), train(opt_b, theirs, 20)
    for a, b, start in zip(ours, theirs, make_params(dtype)):
        if backend == "auto" and DEVICE == "cpu":
            assert torch.equal(a, b)
        else:
            moved = float((b.detach().float() - start.detach().float()).norm())
            assert float((a.detach().float() - b.detach().float()).norm()) <= 0.02 * moved


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paths_agree_at_each_precision(precision, dtype):
    """The kernels (and the CPU path) against the reference at the same state precision."""
    runs = {}
    for backend in BACKENDS:
        params = make_params(dtype)
        opt = also_fused.AdamW(params, lr=1e-2, state_precision=precision, amsgrad=True, backend=backend)
        train(opt, params, 15)
        runs[backend] = (params, opt)
    ref_params, ref_opt = runs["reference"]
    for backend, (params, opt) in runs.items():
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p.float(), q.float(), rtol=2e-2 if dtype != torch.float32 else 1e-5,
                                       atol=1e-2 if dtype != torch.float32 else 1e-6)
        for p, q in zip(params, ref_params):
            m, mr = opt.state[p]["exp_avg"].float(), ref_opt.state[q]["exp_avg"].float()
            torch.testing.assert_close(m, mr, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["param", "bfloat16"])
def test_resume_is_bitwise(backend, precision):
    dtype = torch.bfloat16 if precision == "param" else torch.float32
    params = make_params(dtype)
    opt = also_fused.AdamW(params, lr=1e-2, state_precision=precision, backend=backend)
    train(opt, params, 4)
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    train(opt, params, 5, start=4)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt2 = also_fused.AdamW(resumed, lr=1e-2, state_precision=precision, backend=backend)
    opt2.load_state_dict(saved)
    train(opt2, resumed, 5, start=4)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    for sa, sb in zip(opt.state.values(), opt2.state.values()):
        assert sa["exp_avg"].dtype == sb["exp_avg"].dtype
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
