"""The staged pi step: with the sum reduction on the kernels, weighted_loss() runs its batch's pi step in its
own launch and stages the result, step() only marks it pending, and the next weighted_loss() (or anything
else that reads pi) commits it. Held bitwise to the same optimizers with the stage switched off (the pi
step then runs at step(), ``kernels.group_pi.pi_update``): losses, their gradients, step()'s mean, pi,
pi_mid, params and state, whether or not pi is read between steps; a hyper-parameter changed between
weighted_loss() and step() falls back to the launch at step(); state_dict and load_state_dict see
the committed pi.
"""
from __future__ import annotations

import copy

import pytest
import torch

import also_fused
from also_fused import _input_errors
from support import DEVICE, triton_importable
from support.harness import assert_same

pytestmark = pytest.mark.skipif(not triton_importable(), reason="the staged step runs on the Triton kernels")
if triton_importable():
    from also_fused.backends.triton import TritonBackend
MODES = ("descent-ascent", "optimistic")
N_GROUPS, B = 5, 12


def batches(n: int, seed: int = 0, n_groups: int = N_GROUPS, batch: int = B):
    gen = torch.Generator().manual_seed(seed)
    return [((torch.rand(batch, generator=gen) * (1 + k % 3)).to(DEVICE),
             torch.randint(0, n_groups, (batch,), generator=gen).to(DEVICE)) for k in range(n)]


def twins(mode: str, n_groups: int = N_GROUPS, **kw):
    """Two GroupWeights alike, the second with the stage switched off (its pi step launches at step())."""
    make = lambda: also_fused.GroupWeights(n_groups, batch_size=B, mode=mode, pi_lr=0.4, device=DEVICE,
                                           backend="triton", **kw)
    staged, launched = make(), make()
    assert staged._stage is not None
    launched._stage = None
    return staged, launched


def weighted(weights, losses, ids):
    x = losses.clone().requires_grad_()
    loss = weights.weighted_loss(x, ids)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pi_reg", [None, [0.1, 0.2, 0.3, 0.15, 0.25]])
@pytest.mark.parametrize("validate", [True, False])
def test_staged_step_is_bitwise_the_launched_one(mode, pi_reg, validate):
    staged, launched = twins(mode, pi_reg=pi_reg, pi_decay=0.5, validate=validate)
    for k, (losses, ids) in enumerate(batches(6)):
        for a, b in zip(weighted(staged, losses, ids), weighted(launched, losses, ids)):
            assert torch.equal(a, b)
        assert torch.equal(staged.step(), launched.step())
        if k % 3 == 1:  # read between steps (committed through the host) or not (by the next launch)
            assert torch.equal(staged.pi, launched.pi) and torch.equal(staged.pi_mid, launched.pi_mid)
    assert torch.equal(staged.pi, launched.pi) and torch.equal(staged.pi_mid, launched.pi_mid)
    assert not torch.equal(staged.pi, torch.full_like(staged.pi, 1 / N_GROUPS))


@pytest.mark.parametrize("mode", MODES)
def test_staged_step_with_a_thousand_groups(mode):
    """1000 groups (ImageNet's classes), padded to the single program's largest width: still staged, and
    bitwise the step launched at step()."""
    n = 1000
    backend = TritonBackend(torch.device(DEVICE))
    assert 64 <= backend.staged_pi_max_batch(n) and backend.staged_pi_max_batch(2 * n) == 0
    staged, launched = twins(mode, n_groups=n, pi_decay=0.5)
    for losses, ids in batches(4, seed=3, n_groups=n, batch=64):
        for a, b in zip(weighted(staged, losses, ids), weighted(launched, losses, ids)):
            assert torch.equal(a, b)
        assert torch.equal(staged.step(), launched.step())
    assert torch.equal(staged.pi, launched.pi) and torch.equal(staged.pi_mid, launched.pi_mid)
    assert not torch.equal(staged.pi, torch.full_like(staged.pi, 1 / n))


@pytest.mark.parametrize("mode", MODES)
def test_a_batch_above_the_single_program_work_launches_at_step(mode, monkeypatch):
    """A batch with more id-group comparisons than the single program takes (its work limit lowered here so
    that B = 12 crosses it) is not staged: its pi step launches at step() on the many-groups path, bitwise
    the launched twin's; smaller batches after it are staged again."""
    from also_fused.kernels import group_pi
    monkeypatch.setattr(group_pi, "SINGLE_PROGRAM_WORK", 16 * 8)  # 5 groups pad to 16: batches up to 8
    staged, launched = twins(mode, pi_decay=0.5)
    assert staged._staged_max_batch == 8
    for k, (losses, ids) in enumerate(batches(4)):
        if k % 2:
            losses, ids = losses[:8], ids[:8]
        for a, b in zip(weighted(staged, losses, ids), weighted(launched, losses, ids)):
            assert torch.equal(a, b)
        assert (staged._recorded[-1][2] is not None) == (ids.shape[0] <= 8)
        if k == 0:
            assert "staged" not in staged._launches
        assert torch.equal(staged.step(), launched.step())
        assert torch.equal(staged.pi, launched.pi) and torch.equal(staged.pi_mid, launched.pi_mid)
    assert "staged" in staged._launches


@pytest.mark.parametrize("mode", MODES)
def test_a_staged_step_launches_nothing_at_step(mode, monkeypatch):
    staged, _ = twins(mode)
    losses, ids = batches(1)[0]
    staged.weighted_loss(losses, ids)

    def refuse(*args, **kwargs):
        raise AssertionError("the pi step was launched at step()")

    monkeypatch.setattr(TritonBackend, "pi_update", refuse)
    staged.step()
    assert staged._pending


@pytest.mark.parametrize("mode", MODES)
def test_hyperparameters_changed_before_step_are_used(mode):
    staged, launched = twins(mode)
    for k, (losses, ids) in enumerate(batches(4)):
        staged.weighted_loss(losses, ids), launched.weighted_loss(losses, ids)
        if k == 1:
            staged.pi_lr = launched.pi_lr = 0.05
        if k == 2:
            staged.pi_temperature = launched.pi_temperature = 2.0
        assert torch.equal(staged.step(), launched.step())
    assert torch.equal(staged.pi, launched.pi) and torch.equal(staged.pi_mid, launched.pi_mid)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_holds_the_committed_step_and_resumes(mode):
    staged, launched = twins(mode)
    data = batches(6)
    for losses, ids in data[:3]:
        staged.weighted_loss(losses, ids), launched.weighted_loss(losses, ids)
        staged.step(), launched.step()
    assert staged._pending
    saved = copy.deepcopy(staged.state_dict())
    assert torch.equal(saved["pi"], launched.pi)
    if mode == "optimistic":
        assert torch.equal(saved["pi_mid"], launched.pi_mid)
    resumed, _ = twins(mode)
    staged.weighted_loss(*data[3]), staged.step()  # pending again, then replaced by the load
    staged.load_state_dict(saved)
    for weights in (staged, resumed):
        if weights is resumed:
            weights.load_state_dict(saved)
        for losses, ids in data[3:]:
            weights.weighted_loss(losses, ids)
            weights.step()
    for losses, ids in data[3:]:
        launched.weighted_loss(losses, ids), launched.step()
    for weights in (staged, resumed):
        assert torch.equal(weights.pi, launched.pi) and torch.equal(weights.pi_mid, launched.pi_mid)


@pytest.mark.parametrize("mode", MODES)
def test_also_with_the_staged_step_is_bitwise_the_launched_one(mode):
    gen = torch.Generator().manual_seed(1)
    W0 = torch.randn(4, 3, generator=gen)

    def build():
        W = torch.nn.Parameter(W0.clone().to(DEVICE))
        return W, also_fused.ALSO([W], n_groups=N_GROUPS, batch_size=B, mode=mode, pi_lr=0.3, lr=1e-2,
                                  backend="triton")

    (W1, staged), (W2, launched) = build(), build()
    launched.weights._stage = None
    X = torch.randn(B, 4, generator=gen).to(DEVICE)
    for k, (_, ids) in enumerate(batches(5)):
        results = []
        for W, opt in ((W1, staged), (W2, launched)):
            opt.zero_grad(set_to_none=True)
            losses = ((X @ W) ** 2).mean(1) + ids.float()
            opt.weighted_loss(losses, ids).backward()
            results.append(opt.step())
            if k == 2:
                opt.eval()
                opt.train()
        assert torch.equal(*results)
    assert staged.weights._pending
    assert torch.equal(W1, W2) and torch.equal(staged.pi, launched.pi)
    assert_same(copy.deepcopy(staged.state_dict())["state"][0]["exp_avg"],
                launched.state_dict()["state"][0]["exp_avg"], "exp_avg")


@pytest.mark.parametrize("mode", MODES)
def test_an_also_step_is_one_launch_that_also_reports(mode, monkeypatch):
    """With the pi step staged, ALSO's step() launches only the theta update, which writes the step's error
    report itself: no pi launch and no copy of the error word."""
    W = torch.nn.Parameter(torch.randn(4, 3).to(DEVICE))
    opt = also_fused.ALSO([W], n_groups=N_GROUPS, batch_size=B, mode=mode, backend="triton")
    X = torch.randn(B, 4).to(DEVICE)

    def refuse(*args, **kwargs):
        raise AssertionError("a second launch at step()")

    for k, (_, ids) in enumerate(batches(3)):
        if k == 1:
            monkeypatch.setattr(TritonBackend, "pi_update", refuse)
            monkeypatch.setattr(_input_errors, "report", refuse)
        opt.zero_grad(set_to_none=True)
        opt.weighted_loss(((X @ W) ** 2).mean(1), ids).backward()
        opt.step()
    opt.check_errors()
    assert opt.weights._pending


@pytest.mark.parametrize("mode", MODES)
def test_every_call_writes_a_row_no_later_call_writes(mode, monkeypatch):
    """The weighted loss's buffers are carved from blocks of rows (here 3 per block): step()'s returned means
    keep their values however many steps follow, across blocks and batch sizes, and every loss, gradient,
    mean and pi stays bitwise that of the launch at step()."""
    from also_fused.kernels import group_pi

    monkeypatch.setattr(group_pi, "_ROWS_PER_BLOCK", 3)
    staged, launched = twins(mode)
    gen = torch.Generator().manual_seed(3)
    kept = []
    for k in range(10):
        size = B if k % 4 else 7  # another batch size now and then: rows of another width
        losses = (torch.rand(size, generator=gen) * 3).to(DEVICE)
        ids = torch.randint(0, N_GROUPS, (size,), generator=gen).to(DEVICE)
        got, want = weighted(staged, losses, ids), weighted(launched, losses, ids)
        assert_same(got, want)
        mean = staged.step()
        assert torch.equal(mean, launched.step())
        kept.append((mean, mean.clone()))
    for mean, value in kept:
        assert torch.equal(mean, value)
    assert torch.equal(staged.pi, launched.pi) and torch.equal(staged.pi_mid, launched.pi_mid)
