"""copy.deepcopy and pickle of the optimizers: a working, independent copy.

torch.optim.Optimizer pickles only defaults, state and param_groups; ours also hold the group weights,
the optimistic mode's bookkeeping and caches of prepared launches (which must not be carried over,
since they hold the original's tensors). Checked: a copy of (params, optimizer) taken mid-run and
stepped on the same batches as the original stays bitwise equal to it, and stepping the copy leaves
the original untouched.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

import also_fused
from support import DEVICE, triton_importable
from support.bad_inputs import BACKENDS, Run
from support.harness import assert_same


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,api", [("optimistic", "loop"), ("optimistic", "closure"), ("descent-ascent", "loop")])
@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_deepcopy_of_also_steps_like_the_original(backend, mode, api, precision):
    original = Run(backend, mode, api, state_precision=precision)
    clone = copy.deepcopy(original)  # params, optimizer and group weights copied together
    assert clone.opt.weights is not original.opt.weights and clone.opt._errors is clone.opt.weights._errors
    before = original.snapshot()
    clone.good_step()
    assert_same(original.snapshot(), before)  # the copy's step changed nothing of the original's
    original.good_step()
    assert_same(clone.snapshot(), original.snapshot())
    for _ in range(2):
        clone.good_step(), original.good_step()
    assert_same(clone.snapshot(), original.snapshot())


@pytest.mark.parametrize("backend", ["reference", "auto"] + (["triton"] if triton_importable() else []))
@pytest.mark.parametrize("precision", ["param", "bfloat16", "int8"])
def test_pickled_adamw_resumes_bitwise(backend, precision):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in [(7, 5), (5,), (1,)]]
    opt = also_fused.AdamW(params, lr=1e-2, state_precision=precision, backend=backend)
    grads = [[torch.randn(p.shape, generator=gen).to(DEVICE) for p in params] for _ in range(4)]

    def step(o, ps, gs):
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        o.step()

    for gs in grads[:2]:
        step(opt, params, gs)
    buffer = io.BytesIO()
    torch.save((params, opt), buffer)
    buffer.seek(0)
    params2, opt2 = torch.load(buffer, weights_only=False)
    for gs in grads[2:]:
        step(opt, params, gs), step(opt2, params2, gs)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    assert_same(opt.state_dict(), opt2.state_dict())


def test_deepcopy_of_group_weights():
    weights = also_fused.GroupWeights(4, batch_size=6, mode="optimistic", pi_lr=0.3, device=DEVICE)
    ids = torch.tensor([0, 1, 1, 2, 3, 3], device=DEVICE)
    weights.weighted_loss(torch.rand(6, device=DEVICE), ids)
    clone = copy.deepcopy(weights)  # the recorded batch comes along
    assert_same(clone.step(), weights.step())
    assert_same(clone.state_dict(), weights.state_dict())
