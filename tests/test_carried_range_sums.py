"""The sparse pi step's carried range sums (kernels/group_pi.py, ``_carried_sums``).

A kept, in-place sparse step leaves in its workspace the G = 0 range sums of the pi it wrote and the correction for
the groups it patched; the next step over that pi takes them instead of its stats launch. It must give the bits of
the step that reads pi again, and drop the carried sums whenever pi or the workspace changed in between.
Without CUDA the kernels run in Triton's interpreter (small sizes).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import also_fused  # noqa: E402
from also_fused.kernels import group_pi  # noqa: E402
from support import DEVICE  # noqa: E402

N = 3000  # above SMALL_MAX; the sparse variant is forced (B = 24 is below its own choice's 1000 samples a group)
B = 24
WIDE_B = 300  # a tenth of the groups present: the correction for the patched groups carries weight
HP = dict(pi_lr=0.4, pi_decay=0.0, temperature=1.0, eps=1.1920929e-07)


def model_step(pi: torch.Tensor, ids: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """PiUpdate in float64 from the formula (uniform pi_reg, pi_decay 0): softmax((log(pi + eps) + lr S) / T)."""
    s = torch.zeros(pi.numel(), dtype=torch.float64)
    ids, losses = ids.cpu(), losses.cpu().double()
    keep = (ids >= 0) & (ids < pi.numel())
    s.index_add_(0, ids[keep], losses[keep])
    z = torch.log(pi.cpu().double() + HP["eps"]) + HP["pi_lr"] * s
    return torch.softmax(z / HP["temperature"], dim=0)


def batches(count: int, seed: int, b: int = B) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, N, (b,), generator=gen)
        ids[:5] = ids[5]  # one group of six samples
        ids[6] = N + 3  # an id outside [0, N): ignored
        if b > 256:
            ids[-3:] = ids[130]  # a group whose samples lie far apart in the batch
        out.append((ids.to(DEVICE), (torch.rand(b, generator=gen) * 3).to(DEVICE)))
    return out


@pytest.fixture
def stats_launches(monkeypatch) -> list:
    """Every stats launch group_pi makes, appended to this list (its launch helper spied on)."""
    launched: list = []
    real = group_pi.launch_cached

    def spy(cache, key, kernel, *args, **kwargs):
        if kernel is group_pi._pi_stats_kernel:
            launched.append(kernel)
        return real(cache, key, kernel, *args, **kwargs)

    monkeypatch.setattr(group_pi, "launch_cached", spy)
    return launched


def step(pi, mid, ids, losses, cache, workspace, launched, word=None, hp=HP) -> int:
    """One in-place step of pi (and pi_mid) with a kept layout; returns how many stats launches it made."""
    before = len(launched)
    group_pi.pi_update_checked(pi, ids, losses, out=pi, second_out=mid, error_word=word, log_pi_reg=None,
                               cache=cache, workspace=workspace, _path="sparse", **hp)
    return len(launched) - before


@pytest.mark.parametrize("b", [B, WIDE_B])
@pytest.mark.parametrize("optimistic", [False, True])
def test_carried_sums_give_the_bits_of_a_fresh_read(optimistic: bool, b: int, stats_launches: list) -> None:
    """Eight steps, the fourth rejected by its error word: pi (and pi_mid) equal, bitwise at every step, those of
    steps whose workspace forgets the carried sums (each reads pi again), and stay close to the float64 model. Only
    the first step launches the stats kernel (the rejected step leaves pi and its carried sums as they were)."""
    start = torch.full((N,), 1.0 / N, device=DEVICE)
    data = batches(8, seed=3, b=b)
    runs = []
    for carried in (True, False):
        pi = start.clone()
        mid = start.clone() if optimistic else None
        cache, workspace, results, counts = {}, {}, [], []
        word = torch.zeros((), dtype=torch.int32, device=DEVICE)  # one error word, as an optimizer keeps it
        for t, (ids, losses) in enumerate(data):
            if not carried:
                workspace.pop("carried", None)
            word.fill_(4 if t == 3 else 0)
            counts.append(step(pi, mid, ids, losses, cache, workspace, stats_launches, word))
            results.append((pi.clone(), None if mid is None else mid.clone()))
        runs.append((results, counts))
    (kept, kept_counts), (fresh, fresh_counts) = runs
    assert kept_counts == [1, 0, 0, 0, 0, 0, 0, 0] and fresh_counts == [1] * 8
    model = start.cpu().double()
    for t, ((pi_k, mid_k), (pi_f, mid_f)) in enumerate(zip(kept, fresh)):
        assert torch.equal(pi_k, pi_f), t
        if optimistic:
            assert torch.equal(mid_k, mid_f), t
        if t != 3:
            model = model_step(model, *data[t])
        assert float(((pi_k.cpu().double() - model).abs() / model).max()) < 2e-5, t


def test_a_change_to_pi_or_the_workspace_voids_the_carried_sums(stats_launches: list) -> None:
    """Between kept steps: pi changed in place through torch (its version moves; the step that reads it again is
    rejected, and the next one takes the sums that step read), another pi's step through the same workspace, and a
    step with other hyper-parameters. Each step equals the step taken with a workspace of its own, and reads pi
    again (a stats launch) exactly where the carried sums were void."""
    pi = torch.full((N,), 1.0 / N, device=DEVICE)
    other = torch.rand(N, device=DEVICE)
    other /= other.sum()
    cache, workspace = {}, {}
    word = torch.zeros((), dtype=torch.int32, device=DEVICE)
    data = batches(8, seed=4)

    def checked_step(ids, losses, stats: int, rejected: bool = False, hp: dict = HP) -> None:
        expect = pi.clone()
        if not rejected:
            step(expect, None, ids, losses, {}, {}, stats_launches, hp=hp)
        word.fill_(8 if rejected else 0)
        assert step(pi, None, ids, losses, cache, workspace, stats_launches, word, hp=hp) == stats
        assert torch.equal(pi, expect)

    checked_step(*data[0], stats=1)
    checked_step(*data[1], stats=0)
    with torch.no_grad():
        pi[: N // 2].mul_(3.0)  # an in-place change: pi's version counter moves
    checked_step(*data[2], stats=1, rejected=True)
    checked_step(*data[3], stats=0)
    checked_step(*data[4], stats=0)
    # another tensor's step through the same workspace (not in place: it carries nothing) overwrites the sums
    out = torch.empty_like(other)
    group_pi.pi_update_checked(other, *data[5], out=out, log_pi_reg=None, workspace=workspace, _path="sparse", **HP)
    checked_step(*data[6], stats=1)
    checked_step(*data[7], stats=1, hp=dict(HP, pi_lr=0.7))  # another layout: its own kept launches, a fresh read


@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
def test_group_weights_steps_with_and_without_carried_sums(mode: str, monkeypatch, stats_launches: list) -> None:
    """GroupWeights over many groups (the sparse variant by its own choice), GradScaler's found_inf given from the
    third step on (it skips the third): pi and pi_mid after each step equal, bitwise, a run in which no sums are
    carried. The kernels take the skip as their word (pi is not rewritten), so the carried sums outlive the
    skipped step; the first step with found_inf reads pi again (its kernels read another word: a new layout)."""
    n, batch = 30_000, 16  # n > 1000 * batch: sparse
    gen = torch.Generator().manual_seed(7)
    data = [(torch.randint(0, n, (batch,), generator=gen).to(DEVICE), (torch.rand(batch, generator=gen) * 2).to(DEVICE))
            for _ in range(6)]
    found_inf = {2: 1.0, 3: 0.0, 4: 0.0, 5: 0.0}
    runs = []
    for carried in (True, False):
        if not carried:
            monkeypatch.setattr(group_pi, "_carried_sums", lambda *args: False)
        gw = also_fused.GroupWeights(n, batch_size=batch, mode=mode, pi_lr=0.5, device=DEVICE, backend="triton")
        steps, counts = [], []
        for t, (ids, losses) in enumerate(data):
            gw.weighted_loss(losses, ids)
            before = len(stats_launches)
            gw.step(found_inf=torch.tensor(found_inf[t], device=DEVICE) if t in found_inf else None)
            counts.append(len(stats_launches) - before)
            steps.append((gw.pi.clone(), gw.pi_mid.clone()))
        runs.append(steps)
        assert counts == ([1, 0, 1, 0, 0, 0] if carried else [1] * 6)
    assert not torch.equal(runs[0][0][0], runs[0][1][0])  # the steps move pi
    assert torch.equal(runs[0][1][0], runs[0][2][0])  # the skipped step keeps it
    for (pi_c, mid_c), (pi_f, mid_f) in zip(*runs):
        assert torch.equal(pi_c, pi_f) and torch.equal(mid_c, mid_f)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="10^7 groups: a GPU's many programs and tickets")
@pytest.mark.parametrize("optimistic", [False, True])
def test_carried_sums_at_ten_million_groups(optimistic: bool, stats_launches: list) -> None:
    """At 10^7 groups and batch 4096 (the sparse variant by its own choice; hundreds of range programs and 256
    sample programs, the last of which finishes the normaliser): five kept steps give the bits of steps that read
    pi again, and only the first launches the stats kernel."""
    n, batch = 10_000_000, 4096
    gen = torch.Generator(device="cuda").manual_seed(11)
    start = torch.rand(n, device="cuda", generator=gen) + 0.5
    start /= start.sum()
    hp = dict(pi_lr=1e-3, pi_decay=1e-2, temperature=1.0, eps=1.1920929e-07, log_pi_reg=None)
    runs = []
    for carried in (True, False):
        pi = start.clone()
        mid = torch.empty_like(pi) if optimistic else None
        cache, workspace, counts, results = {}, {}, [], []
        g = torch.Generator(device="cuda").manual_seed(12)
        for _ in range(5):
            ids = torch.randint(0, n, (batch,), device="cuda", generator=g)
            ids[100:110] = ids[5]
            losses = torch.rand(batch, device="cuda", generator=g) * 3
            if not carried:
                workspace.pop("carried", None)
            before = len(stats_launches)
            group_pi.pi_update_checked(pi, ids, losses, out=pi, second_out=mid, cache=cache, workspace=workspace,
                                       **hp)
            counts.append(len(stats_launches) - before)
            results.append(torch.cat([pi, mid]) if optimistic else pi.clone())
        runs.append((results, counts))
    assert runs[0][1] == [1, 0, 0, 0, 0] and runs[1][1] == [1] * 5
    for kept, fresh in zip(runs[0][0], runs[1][0]):
        assert torch.equal(kept, fresh)


@pytest.mark.parametrize("optimistic", [False, True])
def test_groups_at_the_edges_of_the_write_ranges_are_patched(optimistic: bool, stats_launches: list) -> None:
    """The write's ranges write every group with G = 0 and its last program then patches the batch's groups: groups
    on both sides of every range boundary (and the first and last group) take their true values in both updates,
    as the float64 model gives them, and the next (carried) step still gives the bits of a fresh read."""
    pi = torch.full((N,), 1.0 / N, device=DEVICE)
    mid = pi.clone() if optimistic else None
    cache, workspace = {}, {}
    ids, losses = batches(1, seed=9)[0]
    step(pi.clone(), None, ids, losses, cache, {}, stats_launches)  # the layout, to learn the ranges
    range_len = cache["many"][1].range_len
    assert range_len < N  # more than one range
    edges = sorted({0, N - 1} | {e for k in range(range_len, N, range_len) for e in (k - 1, k)})
    assert len(edges) + 2 <= B
    ids = ids.clone()
    ids[:len(edges)] = torch.tensor(edges, device=DEVICE)
    ids[len(edges)] = edges[1]  # a second sample of one edge group
    cache = {}
    model = pi.cpu().double()
    for t in range(2):
        scaled = losses * (t + 1)
        fresh_pi = pi.clone()
        fresh_mid = None if mid is None else mid.clone()
        step(fresh_pi, fresh_mid, ids, scaled, {}, {}, stats_launches)
        step(pi, mid, ids, scaled, cache, workspace, stats_launches)
        assert torch.equal(pi, fresh_pi) and (mid is None or torch.equal(mid, fresh_mid)), t
        model = model_step(model, ids, scaled)
        edge = torch.tensor(edges)
        got = pi.cpu().double()[edge]
        assert float(((got - model[edge]).abs() / model[edge]).max()) < 2e-5, t
        if optimistic:
            extrapolated = model_step(model, ids, scaled)[edge]
            assert float(((mid.cpu().double()[edge] - extrapolated).abs() / extrapolated).max()) < 2e-5, t
