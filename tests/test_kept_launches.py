"""A kept launch (``kernels.launch.launch_cached``) repeats its first launch with only the ``varying`` arguments
rewritten: every other argument (a tensor by its address), the kernel, its constexprs and warps must be the same on
each later call with the same cache and key, or the GPU runs the kernel on stale addresses (a write into a freed or
foreign tensor, an illegal memory access). The interpreter never keeps a launch, so these tests record the calls
and check that invariant directly: the many-groups pi step (both variants, one and two updates, carried sums,
batches of several sizes, a report slot) and GroupWeights in both modes (validated and not, a rejected step, a
state_dict load, a short last batch), on the CPU as on a GPU.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import also_fused
from also_fused.kernels import group_pi, losses as loss_kernels
from support import DEVICE

HP = dict(pi_lr=0.3, pi_decay=0.1, temperature=1.0, eps=1.1920929e-07)


def _snapshot(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr(), value.dtype)
    return (type(value).__name__, value)


class KeptLaunchAudit:
    """Wraps ``launch_cached`` where the library calls it. Per cache dict it holds what the launch of its current
    key was prepared from (a cache keeps one key, as ``launch_cached`` does); a call with that key whose fixed
    arguments differ is a stale kept launch, recorded in ``stale``."""

    def __init__(self) -> None:
        self.prepared: dict = {}  # id(cache) -> (cache, key, fixed part of the call)
        self.stale: list = []
        self.repeats = 0

    def wrap(self, original):
        def audited(cache, key, kernel, grid, device, args, varying, num_warps=4, **constexprs):
            if cache is not None:
                fixed = (kernel, num_warps, tuple(sorted(constexprs.items())),
                         tuple(_snapshot(a) if i not in varying else None for i, a in enumerate(args)))
                held = self.prepared.get(id(cache))
                if held is not None and held[0] is cache and held[1] == key:
                    self.repeats += 1
                    if held[2] != fixed:
                        changed = [i for i, (a, b) in enumerate(zip(held[2][3], fixed[3])) if a != b]
                        self.stale.append((getattr(kernel, "__name__", kernel), key, changed))
                else:
                    self.prepared[id(cache)] = (cache, key, fixed)
            return original(cache, key, kernel, grid, device, args, varying, num_warps=num_warps, **constexprs)
        return audited


@contextlib.contextmanager
def audited_launches():
    audit = KeptLaunchAudit()
    with pytest.MonkeyPatch.context() as patch:
        for module in (group_pi, loss_kernels):
            patch.setattr(module, "launch_cached", audit.wrap(module.launch_cached))
        yield audit


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("second", [False, True])
def test_the_many_groups_pi_step(path: str, second: bool) -> None:
    """Kept, in-place steps (the sparse ones with carried sums) over batches of two sizes and back, with an error
    word, a report slot per step and a mean; then the same steps into another output and from a copy of pi."""
    n = 2 * 1024 + 77
    gen = torch.Generator().manual_seed(5)
    pi = torch.full((n,), 1.0 / n, device=DEVICE)
    mid = torch.empty(n, device=DEVICE) if second else None
    word = torch.zeros((), dtype=torch.int32, device=DEVICE)
    cache, workspace = {}, {}
    sizes = (37, 37, 37, 300, 300, 37, 37)
    with audited_launches() as audit:
        for b in sizes:
            ids = torch.randint(0, n, (b,), generator=gen).to(DEVICE)
            losses = (torch.rand(b, generator=gen) * 3).to(DEVICE)
            report = torch.zeros((), dtype=torch.int32, device=DEVICE)  # a new slot every step, as the ring's
            group_pi.pi_update_checked(pi, ids, losses, out=pi, second_out=mid, error_word=word, report_out=report,
                                       mean_out=torch.empty((), device=DEVICE), log_pi_reg=None, cache=cache,
                                       workspace=workspace, _path=path, **HP)
        out = torch.empty(n, device=DEVICE)
        for source in (pi, pi, pi.clone(), pi.clone()):
            ids = torch.randint(0, n, (37,), generator=gen).to(DEVICE)
            losses = (torch.rand(37, generator=gen) * 3).to(DEVICE)
            group_pi.pi_update_checked(source, ids, losses, out=out, second_out=mid, error_word=word,
                                       report_out=torch.zeros((), dtype=torch.int32, device=DEVICE),
                                       mean_out=torch.empty((), device=DEVICE), log_pi_reg=None, cache=cache,
                                       workspace=workspace, _path=path, **HP)
    assert audit.repeats >= 6, "no launch was repeated from its cache"
    assert not audit.stale, audit.stale
    assert torch.isfinite(pi).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
@pytest.mark.parametrize("n, batch", [(3000, 40), (30_000, 16)])
@pytest.mark.parametrize("validate", [True, False])
def test_group_weights(mode: str, n: int, batch: int, validate: bool) -> None:
    """The dense (3000) and sparse (30 000) many-groups variants through GroupWeights: iterations, a rejected
    step (validated), a short last batch, a state_dict load into the same weights, more iterations."""
    gen = torch.Generator().manual_seed(n)
    gw = also_fused.GroupWeights(n, batch_size=batch, mode=mode, pi_lr=0.3, backend="triton", validate=validate,
                                 device=DEVICE)

    def iterate(b: int, bad: bool = False) -> None:
        losses = (torch.rand(b, generator=gen) * 2).to(DEVICE)
        if bad:
            losses[1] = math.nan
        losses.requires_grad_()
        gw.weighted_loss(losses, torch.randint(0, n, (b,), generator=gen).to(DEVICE)).backward()
        gw.step()

    with audited_launches() as audit:
        for _ in range(3):
            iterate(batch)
        if validate:
            with pytest.raises(ValueError):
                iterate(batch, bad=True)
        iterate(batch // 2)
        state = gw.state_dict()
        iterate(batch)
        gw.load_state_dict(state)
        for _ in range(3):
            iterate(batch)
    assert audit.repeats >= 4, "no launch was repeated from its cache"
    assert not audit.stale, audit.stale
    assert torch.isfinite(gw.pi).all()
