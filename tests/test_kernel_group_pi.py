"""Tests of the PiUpdate kernels against a float64 model written here from the formula:

    z_j = (log(pi_j + eps) + c log(pi_reg_j) - pi_lr G_j) / (1 + c),  G_j = -sum_{g_i = j} l_i,
    c = pi_decay * pi_lr,  PiUpdate = softmax(z / temperature).

Without CUDA the kernels run in Triton's interpreter (small sizes, fewer steps in the long loops).
"""
from __future__ import annotations


import math
import os
from typing import Optional

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from also_fused.kernels import group_pi  # noqa: E402
from also_fused.kernels.group_pi import SMALL_MAX, pi_update  # noqa: E402

CUDA = torch.cuda.is_available()
from support import SHORT  # noqa: E402
DEV = "cuda" if CUDA else "cpu"
LARGE_N = 2000  # above SMALL_MAX: the large-n_groups paths
assert LARGE_N > SMALL_MAX


def model_pi_update(pi: torch.Tensor, ids: torch.Tensor, losses: torch.Tensor, lr: float,
                    decay: float, temperature: float, eps: float,
                    pi_reg: Optional[torch.Tensor] = None) -> torch.Tensor:
    p = pi.detach().double().cpu()
    n = p.numel()
    ids = ids.cpu().long()
    l64 = losses.detach().cpu().double()
    G = torch.zeros(n, dtype=torch.float64)
    for i in range(ids.numel()):  # plain loop: the model must not share the kernel's scatter
        j = int(ids[i])
        if 0 <= j < n:
            G[j] -= l64[i]
    c = decay * lr
    z = torch.log(p + eps) - lr * G
    if pi_reg is not None:
        z = z + c * torch.log(pi_reg.double().cpu())
    return torch.softmax(z / (1.0 + c) / temperature, dim=0)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().double().cpu() - ref).norm() / ref.norm())


def rand_simplex(n: int, gen: torch.Generator) -> torch.Tensor:
    p = torch.rand(n, generator=gen, dtype=torch.float64) + 0.05
    return (p / p.sum()).float()


def make_batch(kind: str, n: int, gen: torch.Generator, B: int = 300):
    if kind == "equal":
        ids = torch.full((B,), int(torch.randint(0, n, (1,), generator=gen)), dtype=torch.int64)
    elif kind == "distinct":
        ids = torch.randperm(n, generator=gen)[: min(B, n)]
    elif kind == "one":
        ids = torch.randint(0, n, (1,), generator=gen)
    elif kind == "empty":
        ids = torch.zeros(0, dtype=torch.int64)
    else:  # repeated ids drawn from a few groups
        ids = torch.randint(0, min(n, 7), (B,), generator=gen)
    losses = torch.rand(ids.numel(), generator=gen) * 3.0
    return ids, losses


HP = dict(pi_lr=0.3, pi_decay=0.5, temperature=0.7, eps=1.1920929e-07)


def call(pi, ids, losses, hp=HP, **kw):
    return pi_update(pi.to(DEV), ids.to(DEV), losses.to(DEV), **hp, **kw)


def check(pi, ids, losses, hp=HP, tol=2e-6, reg=None, **kw):
    lpr = None if reg is None else torch.log(reg).to(DEV)
    out = call(pi, ids, losses, hp, log_pi_reg=lpr, **kw)
    ref = model_pi_update(pi, ids, losses, hp["pi_lr"], hp["pi_decay"], hp["temperature"],
                          hp["eps"], reg)
    assert torch.isfinite(out).all()
    # float32 rounding of the logits z / T grows with 1 / T
    tol = tol * max(1.0, 1.0 / hp["temperature"])
    assert rel_err(out, ref) < tol, rel_err(out, ref)
    return out


CASES = [(n, k) for n in (1, 10, 1000, LARGE_N) for k in ("equal", "distinct", "one", "empty", "repeat")]
CASES += [(100_000, "repeat"), (100_000, "empty")]


@pytest.mark.parametrize("n,kind", CASES)
def test_matches_model(n: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(n * 7 + len(kind))
    pi = rand_simplex(n, gen)
    ids, losses = make_batch(kind, n, gen)
    check(pi, ids, losses)


@pytest.fixture
def launched(monkeypatch) -> list:
    """The kernels that group_pi launches, in order (its launch helper, launch_cached, spied on)."""
    kernels: list = []
    real = group_pi.launch_cached
    spy = lambda *a, **k: (kernels.append(next(x for x in a if hasattr(x, "arg_names"))), real(*a, **k))
    monkeypatch.setattr(group_pi, "launch_cached", spy)
    return kernels


@pytest.mark.parametrize("n", [1, 10, 1000])
def test_batches_above_the_single_program_work_take_the_many_groups_path(n: int, monkeypatch, launched) -> None:
    """Up to SINGLE_PROGRAM_WORK id-group comparisons the single program runs, above it the many-groups path
    (the work limit lowered so that small batches cross it): each bitwise the forced path, both close to the
    float64 model, the mean written by either."""
    npad = max(16, 1 << (n - 1).bit_length())
    monkeypatch.setattr(group_pi, "SINGLE_PROGRAM_WORK", 8 * npad)
    assert group_pi.single_program_max_batch(n) == 8
    gen = torch.Generator().manual_seed(41 + n)
    pi = rand_simplex(n, gen)
    for B, forced in ((8, "single"), (9, "dense")):
        ids = torch.randint(0, n, (B,), generator=gen)
        losses = torch.rand(B, generator=gen) * 3
        means = [torch.full((), float("nan"), device=DEV) for _ in range(2)]
        launched.clear()
        auto = check(pi, ids, losses, mean_out=means[0])
        assert (launched == [group_pi._pi_small_kernel]) == (forced == "single"), launched
        again = call(pi, ids, losses, mean_out=means[1], _path=forced)
        assert torch.equal(auto, again) and torch.equal(means[0], means[1])
        assert abs(float(means[0]) - float(losses.double().mean())) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 9, 4096, 5000])
def test_the_many_groups_mean_is_the_losses_mean(B: int, dtype: torch.dtype) -> None:
    """The many-groups path writes the mean through torch's reduction: the bits of losses.float().mean()."""
    gen = torch.Generator().manual_seed(B)
    pi = rand_simplex(LARGE_N, gen)
    ids = torch.randint(0, LARGE_N, (B,), generator=gen)
    losses = (torch.randn(B, generator=gen) * 50).to(dtype)
    mean = torch.full((), float("nan"), device=DEV)
    call(pi, ids, losses, mean_out=mean)
    assert torch.equal(mean, losses.to(DEV).float().mean())


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("second", [False, True])
def test_kept_many_groups_launches_follow_fresh_ones(path: str, second: bool) -> None:
    """With a ``cache`` (the optimizers' calls) the many-groups launches are kept and only the batch and the report
    slot are rewritten: over new batches, a new output tensor and a new batch size, pi (and the second update) and
    the reports are those of calls without a cache, bitwise; on a GPU every launch of the step is kept."""
    gen = torch.Generator().manual_seed(5)
    start = rand_simplex(LARGE_N, gen).to(DEV)
    batches = []
    for step, B in enumerate((37, 37, 37, 37, 50, 50)):
        g = torch.Generator().manual_seed(100 + step)
        batches.append((torch.randint(0, LARGE_N, (B,), generator=g).to(DEV), (torch.rand(B, generator=g) * 3).to(DEV)))
    results = []
    for cache in (None, {}):
        pi, mid, other = start.clone(), torch.zeros_like(start), torch.empty_like(start)
        word, workspace, steps = torch.zeros((), dtype=torch.int32, device=DEV), {}, []
        for step, (ids, losses) in enumerate(batches):
            report = torch.zeros((), dtype=torch.int32, pin_memory=CUDA)
            dst = other if step == 2 else pi  # one step writes another tensor, then pi takes its values
            group_pi.pi_update_checked(pi, ids, losses, out=dst, second_out=mid if second else None, error_word=word,
                                       report_out=report, log_pi_reg=None, cache=cache, workspace=workspace,
                                       _path=path, **HP)
            pi.copy_(dst)
            if CUDA:
                torch.cuda.synchronize()
            steps.append((pi.clone(), mid.clone(), int(report)))
            if CUDA and cache is not None:
                assert cache["many"][2] and all(True in kept for kept in cache["many"][2].values())
        results.append(steps)
    for fresh, kept in zip(*results):
        assert torch.equal(fresh[0], kept[0]) and torch.equal(fresh[1], kept[1])
        assert fresh[2] == kept[2] == group_pi.REPORTED


def test_an_empty_batch_over_many_groups_stays_off_the_single_program(launched) -> None:
    """The single program exists up to SMALL_MAX groups only, whatever the batch (an empty one included)."""
    gen = torch.Generator().manual_seed(43)
    pi = rand_simplex(LARGE_N, gen)
    check(pi, torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    assert launched and group_pi._pi_small_kernel not in launched


@pytest.mark.parametrize("B", [0, 1])
def test_low_temperature_over_many_groups(B: int) -> None:
    """At temperature 0.05 every logit lies about 170 below the sparse variant's fixed reference, past float32's
    range, so the choice takes the dense variant (whose ranges are against their own maxima), an empty batch
    included; pi stays accurate."""
    gen = torch.Generator().manual_seed(44)
    n = 10 * LARGE_N
    pi = rand_simplex(n, gen)
    ids, losses = make_batch("one", n, gen)
    hp = dict(HP, temperature=0.05)
    a = 1.0 / ((1.0 + hp["pi_decay"] * hp["pi_lr"]) * hp["temperature"])
    assert not group_pi._sparse_is_exact(n, B, a, hp["eps"])
    check(pi, ids[:B], losses[:B], hp, tol=1e-6)


def test_the_sparse_choice_keeps_range_terms_in_float32s_normal_range() -> None:
    """The sparse variant's range sums take each term through a float32 exp (``_range_term``): wherever the
    choice takes that variant, the lowest logit with G = 0, a log(eps / (1 + eps)) against the reference, must
    stay above float32's smallest normal exponent, ln(2^-126) ~ -87.3 (batches of 0 to n - 1 samples, up to 2^62
    groups, temperatures down to where the choice refuses)."""
    floor = math.log(2.0 ** -126)
    checked = 0
    for n in (1001, 10**5, 10**9, 2**62):
        for B in (0, 1, 7, 4096, n // 2, n - 1):
            for eps in (1.1920929e-07, 1e-12, 1e-30, 0.5):
                for temperature in (0.01, 0.05, 0.1, 0.3, 1.0, 10.0):
                    a = 1.0 / ((1.0 + HP["pi_decay"] * HP["pi_lr"]) * temperature)
                    if group_pi._sparse_is_exact(n, B, a, eps):
                        assert a * math.log(eps / (1.0 + eps)) > floor, (n, B, eps, temperature)
                        checked += 1
    assert checked > 100


@pytest.mark.parametrize("n", [10, LARGE_N])
def test_non_uniform_reg_and_temperature(n: int) -> None:
    gen = torch.Generator().manual_seed(3)
    pi = rand_simplex(n, gen)
    reg = rand_simplex(n, gen)
    ids, losses = make_batch("repeat", n, gen)
    for T in (0.25, 1.0, 3.0):
        check(pi, ids, losses, dict(HP, temperature=T), reg=reg)
    # a non-uniform pi_reg must change the result
    a = call(pi, ids, losses, log_pi_reg=torch.log(reg).to(DEV))
    b = call(pi, ids, losses)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("n", [10, LARGE_N])
def test_in_place_and_second_out(n: int) -> None:
    gen = torch.Generator().manual_seed(5)
    pi = rand_simplex(n, gen)
    ids, losses = make_batch("repeat", n, gen)
    reg = rand_simplex(n, gen)
    ref1 = model_pi_update(pi, ids, losses, 0.3, 0.5, 0.7, HP["eps"], reg)
    ref2 = model_pi_update(ref1.float(), ids, losses, 0.3, 0.5, 0.7, HP["eps"], reg)
    buf = pi.clone().to(DEV)
    mid = torch.full_like(buf, float("nan"))
    ret = pi_update(buf, ids.to(DEV), losses.to(DEV), **HP, log_pi_reg=torch.log(reg).to(DEV),
                    out=buf, second_out=mid)
    assert ret.data_ptr() == buf.data_ptr()
    assert rel_err(buf, ref1) < 2e-6
    assert rel_err(mid, ref2) < 4e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [10, LARGE_N])
def test_loss_dtypes(dtype: torch.dtype, n: int) -> None:
    gen = torch.Generator().manual_seed(11)
    pi = rand_simplex(n, gen)
    ids, losses = make_batch("repeat", n, gen)
    losses = losses.to(dtype)  # the model sees the same rounded values
    check(pi, ids, losses)


@pytest.mark.parametrize("n,path", [(10, None), (LARGE_N, "sparse"), (LARGE_N, "dense")])
def test_deterministic(n: int, path: Optional[str]) -> None:
    gen = torch.Generator().manual_seed(13)
    pi = rand_simplex(n, gen).to(DEV)
    ids = torch.randint(0, 10, (4096,), generator=gen).to(DEV)
    losses = (torch.rand(4096, generator=gen) * 5).to(DEV)
    a1, b1 = torch.empty_like(pi), torch.empty_like(pi)
    a2, b2 = torch.empty_like(pi), torch.empty_like(pi)
    pi_update(pi, ids, losses, **HP, out=a1, second_out=b1, _path=path)
    pi_update(pi, ids, losses, **HP, out=a2, second_out=b2, _path=path)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    ref = model_pi_update(pi, ids, losses, HP["pi_lr"], HP["pi_decay"], HP["temperature"],
                          HP["eps"])
    assert rel_err(a1, ref) < 1e-5


@pytest.mark.skipif(not CUDA, reason="the interpreter runs the loops over pi without pipelining")
@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("n", [LARGE_N, 3_000_017])
def test_pipelining_stages_leave_the_bits(path: str, n: int, monkeypatch) -> None:
    """The loops over pi software-pipelined into 1, 2 or 3 stages give the same pi and pi_mid, bitwise."""
    gen = torch.Generator().manual_seed(n)
    pi = rand_simplex(n, gen).to(DEV)
    ids = torch.randint(0, n, (4096,), generator=gen).to(DEV)
    losses = (torch.rand(4096, generator=gen) * 5).to(DEV)
    results = []
    for stages in (1, 2, 3):
        monkeypatch.setattr(group_pi, "_LOOP_STAGES", stages)
        out, second = torch.empty_like(pi), torch.empty_like(pi)
        pi_update(pi, ids, losses, **HP, out=out, second_out=second, _path=path)
        results.append((out, second))
    for out, second in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(second, results[0][1])


@pytest.mark.parametrize("n,path", [(10, None), (LARGE_N, "sparse"), (LARGE_N, "dense")])
def test_bad_ids_stay_inside_pi(n: int, path: Optional[str]) -> None:
    gen = torch.Generator().manual_seed(17)
    pad = 64
    sentinel = 12345.0
    pi = rand_simplex(n, gen)
    bufs = [torch.full((n + 2 * pad,), sentinel, device=DEV) for _ in range(3)]
    p_view, o_view, m_view = (b[pad:pad + n] for b in bufs)
    p_view.copy_(pi)
    good = torch.cat([torch.randint(0, n, (40,), generator=gen), torch.tensor([5])])
    # the last two are 5 modulo 2^32: an id compared in 32 bits must still not count for group 5
    bad = torch.tensor([-1, -pad, -pad - 1, n, n + 1, n + pad, 2**40, -(2**40), 5 + 2**32, 5 - 2**32])
    ids = torch.cat([good, bad])[torch.randperm(51, generator=gen)]
    losses = torch.rand(51, generator=gen) * 4
    pi_update(p_view, ids.to(DEV), losses.to(DEV), **HP, out=o_view, second_out=m_view,
              _path=path)
    for b in bufs:
        assert torch.all(b[:pad] == sentinel) and torch.all(b[pad + n:] == sentinel)
    ref = model_pi_update(pi, ids, losses, HP["pi_lr"], HP["pi_decay"], HP["temperature"],
                          HP["eps"])
    assert rel_err(o_view, ref) < 2e-6
    # in place, ids as int32 (the ids that fit)
    fits = ids.abs() < 2**31
    ref = model_pi_update(pi, ids[fits], losses[fits], HP["pi_lr"], HP["pi_decay"],
                          HP["temperature"], HP["eps"])
    pi_update(p_view, ids[fits].to(torch.int32).to(DEV), losses[fits].to(DEV), **HP, out=p_view,
              _path=path)
    assert torch.all(bufs[0][:pad] == sentinel) and torch.all(bufs[0][pad + n:] == sentinel)
    assert rel_err(p_view, ref) < 2e-6


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_ids_compared_in_64_bits_give_the_same_bits(path: str, monkeypatch) -> None:
    """The many-groups sample programs compare ids in 32 bits below 2^31 groups and in 64 bits from there: both
    comparisons give the same pi (64 bits forced here at a small n_groups), repeated and bad ids included."""
    gen = torch.Generator().manual_seed(19)
    pi = rand_simplex(LARGE_N, gen)
    ids = torch.cat([torch.randint(0, LARGE_N, (60,), generator=gen), torch.full((9,), 5),
                     torch.tensor([-1, LARGE_N, 5 + 2**32, 2**40])])
    losses = torch.rand(ids.numel(), generator=gen) * 3
    narrow = call(pi, ids, losses, second_out=torch.empty(LARGE_N, device=DEV), _path=path)
    monkeypatch.setattr(group_pi, "_WIDE_IDS_FROM", 0)
    wide = call(pi, ids, losses, second_out=torch.empty(LARGE_N, device=DEV), _path=path)
    assert torch.equal(narrow, wide)


@pytest.mark.parametrize("path", [None, "sparse", "dense"])
def test_negative_losses_on_dominant_groups(path: Optional[str]) -> None:
    """Present groups that hold almost all the mass and get large negative losses (large path;
    the sparse variant only where its exactness bound holds, T = 1)."""
    n = LARGE_N
    gen = torch.Generator().manual_seed(19)
    pi = torch.full((n,), 1e-9)
    pi[[3, 500]] = 0.5
    pi = pi / pi.sum()
    ids = torch.tensor([3, 500, 3, 17])
    losses = torch.tensor([-2000.0, -3000.0, -500.0, 1.0])
    for T in (1.0, 0.1):
        if path == "sparse" and T < 1.0:
            continue
        check(pi, ids, losses, dict(HP, pi_lr=1.0, temperature=T), tol=1e-5, _path=path)
    # mixed signs at random
    pi = rand_simplex(n, gen)
    ids = torch.randint(0, n, (200,), generator=gen)
    losses = torch.randn(200, generator=gen) * 20
    check(pi, ids, losses, tol=5e-6, _path=path)


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_second_update_on_dominant_groups(path: str) -> None:
    """second_out = PiUpdate(out, G): the sparse variant takes its range sums while writing out, before the present
    groups are patched, and swaps those groups' terms afterwards; here they hold almost all the mass, so a term
    swapped with the wrong value would show."""
    n = LARGE_N
    pi = torch.full((n,), 1e-7)
    pi[[3, 500, 1999]] = 0.3
    pi = pi / pi.sum()
    ids = torch.tensor([3, 500, 3, 17, 1999, 0])
    losses = torch.tensor([-20.0, 30.0, -5.0, 1.0, 7.0, 2.0])
    hp = dict(HP, pi_lr=0.1, temperature=1.0)
    ref1 = model_pi_update(pi, ids, losses, hp["pi_lr"], hp["pi_decay"], 1.0, hp["eps"])
    ref2 = model_pi_update(ref1.float(), ids, losses, hp["pi_lr"], hp["pi_decay"], 1.0, hp["eps"])
    out, mid = torch.empty(n, device=DEV), torch.empty(n, device=DEV)
    pi_update(pi.to(DEV), ids.to(DEV), losses.to(DEV), **hp, out=out, second_out=mid, _path=path)
    assert rel_err(out, ref1) < 2e-6 and rel_err(mid, ref2) < 4e-6, (rel_err(out, ref1), rel_err(mid, ref2))


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_both_updates_of_an_empty_batch(path: str) -> None:
    """No sample: each update is PiUpdate with G = 0, the second update's normaliser is still finished (in the
    sparse variant by the step's patch, which has no group to patch) and the report is written."""
    gen = torch.Generator().manual_seed(17)
    pi = rand_simplex(LARGE_N, gen)
    ids, losses = torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    ref1 = model_pi_update(pi, ids, losses, HP["pi_lr"], HP["pi_decay"], HP["temperature"], HP["eps"])
    ref2 = model_pi_update(ref1.float(), ids, losses, HP["pi_lr"], HP["pi_decay"], HP["temperature"], HP["eps"])
    out, mid = torch.empty(LARGE_N, device=DEV), torch.full((LARGE_N,), float("nan"), device=DEV)
    report = torch.zeros((), dtype=torch.int32, pin_memory=CUDA)
    pi_update(pi.to(DEV), ids.to(DEV), losses.to(DEV), **HP, out=out, second_out=mid, report_out=report, _path=path)
    if CUDA:
        torch.cuda.synchronize()
    tol = 4e-6 / HP["temperature"]
    assert rel_err(out, ref1) < tol and rel_err(mid, ref2) < tol, (rel_err(out, ref1), rel_err(mid, ref2))
    assert int(report) == group_pi.REPORTED


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("n", [LARGE_N, 100_000])
def test_both_updates_where_absent_groups_hold_the_mass(path: str, n: int) -> None:
    """Small losses on a few groups: the groups absent from the batch hold almost all of pi's mass, so the range
    sums of each update (pi's, and pi_mid's, which the sparse variant takes while writing out) set the normaliser;
    an error of 1e-5 in them shows here (the tests with heavy losses are blind to it)."""
    gen = torch.Generator().manual_seed(47 + n)
    pi = rand_simplex(n, gen)
    ids = torch.randint(0, n, (64,), generator=gen)
    losses = torch.rand(64, generator=gen) * 0.5
    hp = dict(HP, temperature=1.0)
    ref1 = model_pi_update(pi, ids, losses, hp["pi_lr"], hp["pi_decay"], 1.0, hp["eps"])
    ref2 = model_pi_update(ref1.float(), ids, losses, hp["pi_lr"], hp["pi_decay"], 1.0, hp["eps"])
    present = torch.zeros(n, dtype=torch.bool)
    present[ids] = True
    assert float(ref1[~present].sum()) > 0.95  # the regime this test is for
    out, mid = torch.empty(n, device=DEV), torch.empty(n, device=DEV)
    pi_update(pi.to(DEV), ids.to(DEV), losses.to(DEV), **hp, out=out, second_out=mid, _path=path)
    # the bounds of test_large_paths (float32 logits, on a GPU through its fast log and exp)
    assert rel_err(out, ref1) < 2e-6 and rel_err(mid, ref2) < 4e-6, (rel_err(out, ref1), rel_err(mid, ref2))


@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("n", [LARGE_N, 100_000])
def test_large_paths(path: str, n: int) -> None:
    """Both large-n_groups variants (G = 0 plus correction, dense loss sums) on every feature."""
    gen = torch.Generator().manual_seed(31 + n)
    pi = rand_simplex(n, gen)
    reg = rand_simplex(n, gen)
    ids = torch.cat([torch.randint(0, n, (150,), generator=gen), torch.full((50,), 3),
                     torch.tensor([-1, n])])
    losses = torch.randn(202, generator=gen) * 2 + 1
    hp = dict(HP, temperature=0.9)
    workspace = {}  # kept across the calls, as an optimizer keeps it
    words = []
    for r in (None, reg):
        lpr = None if r is None else torch.log(r).to(DEV)
        ref1 = model_pi_update(pi, ids, losses, hp["pi_lr"], hp["pi_decay"], 0.9, hp["eps"], r)
        ref2 = model_pi_update(ref1.float(), ids, losses, hp["pi_lr"], hp["pi_decay"], 0.9,
                               hp["eps"], r)
        out = pi.clone().to(DEV)
        mid = torch.empty_like(out)
        pi_update(out, ids.to(DEV), losses.to(DEV), **hp, log_pi_reg=lpr, out=out,
                  second_out=mid, _path=path, workspace=workspace)
        assert rel_err(out, ref1) < 2e-6 and rel_err(mid, ref2) < 4e-6
        again = torch.empty_like(out)
        pi_update(pi.to(DEV), ids.to(DEV), losses.to(DEV), **hp, log_pi_reg=lpr, out=again,
                  _path=path, workspace=workspace)
        assert torch.equal(again, out)
        words.append(workspace["zero_word"])
    # the calls without an error word share one zero word, kept in the workspace (no allocation per call)
    assert all(word is words[0] for word in words) and not words[0].any()
    assert (path == "dense") == ("loss_sums" in workspace)
    for buf in workspace.values():  # the dense path leaves its loss sums cleared
        if buf.dtype == torch.float32:
            assert not buf.any()


def run_simplex_loop(n: int, steps: int, optimistic: bool, path: Optional[str]) -> int:
    gen = torch.Generator().manual_seed(23 + n)
    pi = torch.full((n,), 1.0 / n, device=DEV)
    mid = torch.empty_like(pi)
    B = 64
    batches = [(torch.randint(0, n, (B,), generator=gen).to(DEV),
                (torch.rand(B, generator=gen) * 1e4).to(DEV)) for _ in range(16)]
    worst = torch.zeros((), dtype=torch.float64, device=DEV)
    lowest = torch.ones((), device=DEV)
    done = 0
    hp = dict(pi_lr=1e-3, pi_decay=1e-2, temperature=1.0, eps=1.1920929e-07)
    while done < steps:
        ids, losses = batches[done % 16]
        pi_update(pi, ids, losses, **hp, out=pi, second_out=mid if optimistic else None,
                  _path=path)
        worst = torch.maximum(worst, (pi.double().sum() - 1).abs())
        lowest = torch.minimum(lowest, pi.min())
        if optimistic:
            worst = torch.maximum(worst, (mid.double().sum() - 1).abs())
            lowest = torch.minimum(lowest, mid.min())
        done += 1
    # NaN anywhere propagates into worst / lowest
    assert float(worst) <= 1e-5, float(worst)
    assert float(lowest) >= 0.0
    assert torch.isfinite(pi).all()
    return done


@pytest.mark.parametrize("n,optimistic,path", [(10, False, None), (10, True, None),
                                               (LARGE_N, False, "sparse"), (LARGE_N, True, "dense")])
def test_stays_on_simplex_long(n: int, optimistic: bool, path: Optional[str]) -> None:
    """Kernel steps with losses up to 1e4, pi checked after every step: on CUDA 10^5 steps on the
    small path and 2*10^4 on the large one; in the interpreter 400 and 50 (a few seconds each on a
    2-core CPU)."""
    if CUDA:
        steps = (100_000 if n <= SMALL_MAX else 20_000) // (50 if SHORT else 1)
    else:
        steps = 400 if n <= SMALL_MAX else 50
    assert run_simplex_loop(n, steps, optimistic, path) == steps


def test_rejects_bad_arguments() -> None:
    pi = torch.full((4,), 0.25, device=DEV)
    ids = torch.zeros(3, dtype=torch.int64, device=DEV)
    l = torch.ones(3, device=DEV)
    with pytest.raises(ValueError, match="pi must be a contiguous 1-D float32 tensor"):
        pi_update(pi.double(), ids, l, **HP)
    with pytest.raises(ValueError, match="group_ids must be a 1-D int32/int64 tensor"):
        pi_update(pi, ids.float(), l, **HP)
    with pytest.raises(ValueError, match="losses must be 1-D with one entry per group id"):
        pi_update(pi, ids, l[:2], **HP)
    with pytest.raises(ValueError, match="temperature must be positive"):
        pi_update(pi, ids, l, **dict(HP, temperature=0.0))


@pytest.mark.skipif(not CUDA, reason="large n_groups only on CUDA")
@pytest.mark.parametrize("n", [1_000_000, 10_000_000])
def test_large_cuda(n: int) -> None:
    gen = torch.Generator().manual_seed(29)
    pi = rand_simplex(n, gen)
    ids = torch.randint(0, n, (4096,), generator=gen)
    ids[:100] = 7  # repeats
    losses = torch.rand(4096, generator=gen) * 3
    reg = rand_simplex(n, gen)
    out = check(pi, torch.cat([ids, torch.tensor([-1, n])]),
                torch.cat([losses, torch.tensor([1.0, 1.0])]), tol=1e-5, reg=reg)
    again = call(pi, torch.cat([ids, torch.tensor([-1, n])]),
                 torch.cat([losses, torch.tensor([1.0, 1.0])]), log_pi_reg=torch.log(reg).to(DEV))
    assert torch.equal(out, again)
