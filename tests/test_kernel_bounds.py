"""No kernel addresses memory outside its launch's tensors (tests/support/bounds.py).

Triton's interpreter runs the library's kernels with every load, store and atomic checked, at every lane its mask
keeps, against the storage of the launch's tensor arguments: the many-groups pi step (both variants, one and two
updates, kept launches with carried sums, an error word and a report, an empty batch), GroupWeights in both modes on
the many-groups and single-program paths (with its weighted-loss kernels), the optimizers' Adam kernel and the RGD
loss kernel, at sizes that leave partial tiles and ranges. On a GPU such an access is an illegal memory access or a write into another tensor.
Interpreter only (CPU).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import also_fused  # noqa: E402
from also_fused.kernels import group_pi  # noqa: E402
from support import bounds  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not bounds.available(),
                                reason="the checks run in Triton's interpreter (CPU)")

HP = dict(pi_lr=0.3, pi_decay=0.1, temperature=1.0, eps=1.1920929e-07)


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n + EXTRA, other=0.0), mask=i < n)


def raises_out_of_bounds(call) -> bool:
    try:
        call()
    except Exception as exc:  # the interpreter wraps a kernel's exception in its own
        while exc is not None:
            if isinstance(exc, bounds.OutOfBounds):
                return True
            exc = exc.__cause__
        raise
    return False


def test_the_checks_catch_a_read_one_past_the_end() -> None:
    x, y = torch.rand(10), torch.zeros(10)
    with bounds.checked_accesses() as counts:
        assert not raises_out_of_bounds(lambda: _copy_kernel[(1,)](x, y, 10, EXTRA=0, BLOCK=16))
        assert torch.equal(x, y) and counts["checked"] == 2
        assert raises_out_of_bounds(lambda: _copy_kernel[(1,)](x, y, 10, EXTRA=1, BLOCK=16))
    # outside the block the interpreter is as it was
    _copy_kernel[(1,)](x, y, 10, EXTRA=0, BLOCK=16)


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("second", [False, True])
def test_the_many_groups_pi_step(path: str, second: bool) -> None:
    """Three kept, in-place steps (the sparse ones take carried sums), an empty batch, a fresh call writing another
    tensor; with an error word, a report slot and a mean; n_groups and the batches leave partial tiles."""
    n = 2 * 1024 + 77
    gen = torch.Generator().manual_seed(3)
    pi = torch.full((n,), 1.0 / n)
    mid = torch.empty(n) if second else None
    word, report, mean = torch.zeros((), dtype=torch.int32), torch.zeros((), dtype=torch.int32), torch.zeros(())
    cache, workspace = {}, {}
    batches = [torch.randint(-2, n + 2, (b,), generator=gen) for b in (37, 37, 300, 0)]
    with bounds.checked_accesses() as counts:
        for ids in batches:
            losses = torch.rand(ids.numel(), generator=gen) * 3
            group_pi.pi_update_checked(pi, ids, losses, out=pi, second_out=mid, error_word=word, report_out=report,
                                       mean_out=mean, log_pi_reg=None, cache=cache, workspace=workspace, _path=path,
                                       **HP)
        out = torch.empty(n)
        group_pi.pi_update_checked(pi, batches[0], torch.rand(37, generator=gen), out=out, log_pi_reg=None,
                                   _path=path, **HP)
    assert counts["launches"] >= 12 and torch.isfinite(pi).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
@pytest.mark.parametrize("n, batch", [(10, 6), (3000, 40), (30_000, 16)])
def test_group_weights(mode: str, n: int, batch: int) -> None:
    """The single program with its staged step (10 groups), the dense (3000) and sparse (30 000) many-groups
    variants; weighted_loss, backward and step, validated, three iterations."""
    gen = torch.Generator().manual_seed(n)
    gw = also_fused.GroupWeights(n, batch_size=batch, mode=mode, pi_lr=0.3, backend="triton")
    with bounds.checked_accesses() as counts:
        for _ in range(3):
            losses = (torch.rand(batch, generator=gen) * 2).requires_grad_()
            gw.weighted_loss(losses, torch.randint(0, n, (batch,), generator=gen)).backward()
            gw.step()
        pi = gw.pi
    assert counts["launches"] >= 3 and torch.isfinite(pi).all()


@pytest.mark.parametrize("name", ["AdamW", "ALSO"])
def test_the_optimizers_step(name: str) -> None:
    """Parameters of odd sizes (partial tiles), two steps; ALSO in optimistic mode with its pi step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
    x, ids = torch.randn(8, 7), torch.randint(0, 3, (8,))
    if name == "AdamW":
        opt = also_fused.AdamW(model.parameters(), lr=1e-2, amsgrad=True, backend="triton")
    else:
        opt = also_fused.ALSO(model.parameters(), n_groups=3, batch_size=8, mode="optimistic", backend="triton")

    def reachable():  # the kernel reaches the parameters, gradients and moments through a table of addresses
        params = list(model.parameters())
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return params + [p.grad for p in params if p.grad is not None] + state

    with bounds.checked_accesses(reachable) as counts:
        for _ in range(2):
            opt.zero_grad()
            losses = torch.nn.functional.cross_entropy(model(x), ids, reduction="none")
            (losses.mean() if name == "AdamW" else opt.weighted_loss(losses, ids)).backward()
            opt.step()
    assert counts["launches"] >= 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_the_rgd_loss() -> None:
    losses = (torch.rand(1000) * 4).requires_grad_()
    with bounds.checked_accesses() as counts:
        also_fused.rgd_loss(losses, 1.5, backend="triton").backward()
    assert counts["launches"] >= 1 and torch.isfinite(losses.grad).all()
