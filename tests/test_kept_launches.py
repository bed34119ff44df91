"""A kept launch (``kernels.launch.Launcher.prepare``) repeats its first launch with only the ``varying`` arguments
rewritten: every other argument (a tensor by its address) stays as it was prepared, and so do the kernel and its
constexprs. A caller that reaches a kept launch with another fixed argument runs the kernel on a stale address on a
GPU (a write into a freed or foreign tensor, an illegal memory access) or with the wrong variant. The interpreter
never keeps a launch, so these tests audit the invariant itself: every prepared launch is replaced by a stand-in
that declines to launch (the caller then launches through a ``Launcher``, with the whole argument list), and that
launch must be by the same launcher with the fixed arguments the stand-in was prepared from. Covered: the
many-groups pi step (both variants, one and two updates, carried sums, batches of several sizes, another output),
GroupWeights in both modes on its three paths (validated and not, a rejected step, a short batch, a state_dict
load), and the optimizers' Adam kernel (AdamW with amsgrad, ALSO in both modes, a parameter that loses its
gradient).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import triton
import triton.language as tl

import also_fused
from also_fused.kernels import group_pi, launch
from support import DEVICE

HP = dict(pi_lr=0.3, pi_decay=0.1, temperature=1.0, eps=1.1920929e-07)


def _snapshot(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr(), value.dtype)
    return (type(value).__name__, value)


class KeptLaunchAudit:
    """``stale``: (kernel, positions of the fixed arguments that differ, or "another launcher") of every launch that
    a kept one would have run with other arguments; ``repeats``: how many times a kept launch was reached."""

    def __init__(self) -> None:
        self.pending = None  # (launcher, fixed snapshot) of the stand-in the caller just reached
        self.stale: list = []
        self.repeats = 0

    def stand_in(self, launcher: launch.Launcher, args, varying):
        fixed = [None if i in varying else _snapshot(a) for i, a in enumerate(args)]

        def declined(grid, *values) -> bool:
            self.repeats += 1
            self.pending = (launcher, fixed)
            return False  # the caller launches itself, with every argument

        return declined

    def check(self, launcher: launch.Launcher, args) -> None:
        if self.pending is None:
            return
        kept, fixed = self.pending
        self.pending = None
        name = getattr(launcher.kernel, "__name__", str(launcher.kernel))
        if kept is not launcher:
            self.stale.append((name, "another launcher"))
            return
        changed = [i for i, (was, a) in enumerate(zip(fixed, args)) if was is not None and was != _snapshot(a)]
        if changed:
            self.stale.append((name, changed))


@contextlib.contextmanager
def audited_launches():
    audit = KeptLaunchAudit()
    call = launch.Launcher.__call__

    def prepare(self, device, args, varying):
        return audit.stand_in(self, args, varying)

    def audited_call(self, grid, device, *args):
        audit.check(self, args)
        return call(self, grid, device, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch.Launcher, "prepare", prepare)
        patch.setattr(launch.Launcher, "__call__", audited_call)
        yield audit


@triton.jit
def _scaled_copy_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n, other=0.0) * scale, mask=i < n)


def test_the_audit_catches_a_changed_fixed_argument() -> None:
    """A kept launch reached with its varying argument changed passes; with another fixed tensor (the output) or
    other constexprs under the same key, it is reported."""
    x, y, z = (torch.rand(10, device=DEVICE) for _ in range(3))
    cache = {}

    def copy(src, dst, block=16) -> None:
        launch.launch_cached(cache, "one key", _scaled_copy_kernel, 1, x.device, (src, dst, 10, 2.0), (0,),
                             num_warps=1, BLOCK=block)

    with audited_launches() as audit:
        copy(x, y)
        copy(z, y)  # only the varying source changed
        assert audit.repeats == 1 and not audit.stale and torch.equal(y, 2 * z)
        copy(x, z)
        copy(x, z, block=32)
    assert audit.stale == [("_scaled_copy_kernel", [1]), ("_scaled_copy_kernel", "another launcher")]


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("second", [False, True])
def test_the_many_groups_pi_step(path: str, second: bool) -> None:
    """Kept, in-place steps (the sparse ones with carried sums) over batches of two sizes and back, with an error
    word, a report slot per step and a mean; then steps from the same pi into another output, and from a copy."""
    n = 2 * 1024 + 77
    gen = torch.Generator().manual_seed(5)
    pi = torch.full((n,), 1.0 / n, device=DEVICE)
    mid = torch.empty(n, device=DEVICE) if second else None
    word = torch.zeros((), dtype=torch.int32, device=DEVICE)
    cache, workspace = {}, {}
    out = torch.empty(n, device=DEVICE)
    steps = ([(pi, pi, b) for b in (37, 37, 37, 300, 300, 37, 37)] + [(pi, out, 37)] * 2
             + [(pi.clone(), out, 37), (pi.clone(), out, 37)])
    with audited_launches() as audit:
        for source, dst, b in steps:
            ids = torch.randint(0, n, (b,), generator=gen).to(DEVICE)
            losses = (torch.rand(b, generator=gen) * 3).to(DEVICE)
            group_pi.pi_update_checked(source, ids, losses, out=dst, second_out=mid, error_word=word,
                                       report_out=torch.zeros((), dtype=torch.int32, device=DEVICE),
                                       mean_out=torch.empty((), device=DEVICE), log_pi_reg=None, cache=cache,
                                       workspace=workspace, _path=path, **HP)
    assert audit.repeats >= 6, "no launch was repeated from its cache"
    assert not audit.stale, audit.stale
    assert torch.isfinite(pi).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
@pytest.mark.parametrize("n, batch", [(10, 6), (3000, 40), (30_000, 16)])
@pytest.mark.parametrize("validate", [True, False])
def test_group_weights(mode: str, n: int, batch: int, validate: bool) -> None:
    """The single program with its step staged in the weighted loss (10 groups), the dense (3000) and sparse
    (30 000) many-groups variants through GroupWeights: iterations, a rejected step (validated), a short last
    batch, a state_dict load into the same weights, more iterations."""
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
                gw.check_errors()  # on a GPU the device's checks surface here
        iterate(batch // 2)
        state = gw.state_dict()
        iterate(batch)
        gw.load_state_dict(state)
        for _ in range(3):
            iterate(batch)
    assert audit.repeats >= 4, "no launch was repeated from its cache"
    assert not audit.stale, audit.stale
    assert torch.isfinite(gw.pi).all()


@pytest.mark.parametrize("name", ["AdamW", "ALSO descent-ascent", "ALSO optimistic"])
def test_the_optimizers_step(name: str) -> None:
    """Steps of a small model in which one parameter loses its gradient for a step and gets it back, and the
    gradients are new tensors after a zero_grad(set_to_none=True)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)).to(DEVICE)
    x, ids = torch.randn(8, 7, device=DEVICE), torch.randint(0, 3, (8,), device=DEVICE)
    if name == "AdamW":
        opt = also_fused.AdamW(model.parameters(), lr=1e-2, amsgrad=True, backend="triton")
    else:
        opt = also_fused.ALSO(model.parameters(), n_groups=3, batch_size=8, mode=name.split()[1], backend="triton")
    with audited_launches() as audit:
        for step in range(6):
            opt.zero_grad(set_to_none=True)
            losses = torch.nn.functional.cross_entropy(model(x), ids, reduction="none")
            (losses.mean() if name == "AdamW" else opt.weighted_loss(losses, ids)).backward()
            if step == 3:
                model[0].bias.grad = None
            opt.step()
    assert audit.repeats >= 3, "no launch was repeated from its cache"
    assert not audit.stale, audit.stale
    assert all(torch.isfinite(p).all() for p in model.parameters())
