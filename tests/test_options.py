"""Public options that other files do not reach: ALSO's state_precision="param", an explicit loss_scale,
check_errors(wait=False), Adam(decoupled_weight_decay=True), the backend choice's errors and fallback
warning, and PiBatchSampler's edges."""
from __future__ import annotations

import warnings

import pytest
import torch

import also_fused
from also_fused import backends
from support import DEVICE, triton_importable
from support.golden_checks import check
from support.harness import Config


# ------------------------------------------------------------------ ALSO's options
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
def test_also_moments_in_the_param_dtype(dtype, mode):
    """state_precision="param": the moments in the 16-bit param dtype; the float64 model holding them in that
    dtype too gives the same trajectory."""
    _, opt = check(Config(mode=mode, api="loop", dtype=dtype, steps=40, extra=dict(state_precision="param")))
    for state in opt.state.values():
        assert state["exp_avg"].dtype == dtype and state["exp_avg_sq"].dtype == dtype


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_explicit_loss_scale(reduction):
    """loss_scale given (instead of batch_size) scales the sum reduction's loss; the mean reduction does not
    use it."""
    pi_init = [1.0, 2.0, 3.0, 4.0]
    losses = torch.tensor([0.5, 1.5, 2.0, 4.0, 1.0], device=DEVICE)
    ids = torch.tensor([0, 1, 1, 3, 2], device=DEVICE)
    weights = also_fused.GroupWeights(4, loss_scale=1.75, pi_init=pi_init, group_reduction=reduction, device=DEVICE)
    W = torch.nn.Parameter(torch.ones(2, device=DEVICE))
    opt = also_fused.ALSO([W], 4, loss_scale=1.75, pi_init=pi_init, group_reduction=reduction)
    pi = torch.tensor(pi_init, dtype=torch.float64) / 10
    if reduction == "sum":
        want = 1.75 * sum(float(pi[g]) * float(l) for g, l in zip(ids.tolist(), losses.tolist()))
        assert weights.loss_scale == opt.loss_scale == 1.75
    else:
        means = {g: float(losses[ids == g].double().mean()) for g in set(ids.tolist())}
        want = sum(float(pi[g]) * m for g, m in means.items()) / sum(float(pi[g]) for g in means)
    for got in (weights.weighted_loss(losses, ids), opt.weighted_loss(losses, ids)):
        assert abs(float(got) - want) <= 1e-6 * want


@pytest.mark.skipif(not triton_importable(), reason="the device checks run in the Triton kernels")
def test_check_errors_without_waiting_reads_only_finished_steps(monkeypatch):
    """check_errors(wait=False) raises for a rejected step once the device has finished it, and neither waits
    nor raises before; check_errors() waits and raises."""
    W = torch.nn.Parameter(torch.ones(3, device=DEVICE))
    weights = also_fused.GroupWeights(4, batch_size=2, device=DEVICE, backend="triton")
    weights._errors.deferred = True  # as on a GPU: the word is read once the device has run the step
    weights.weighted_loss((W[:2] ** 2), torch.tensor([0, 9], device=DEVICE)).backward()
    weights.step()
    monkeypatch.setattr(weights._errors, "_in_flight", lambda value: True)  # the device has not finished it
    weights.check_errors(wait=False)  # nothing to read yet: no error, no wait
    with pytest.raises(ValueError, match=r"group_ids must lie in \[0, 4\); step 1 was not taken"):
        weights.check_errors()  # waits for the device, then raises
    monkeypatch.undo()
    weights.weighted_loss((W[:2] ** 2), torch.tensor([0, 7], device=DEVICE)).backward()
    weights.step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # the device has finished the step (on a CPU it has at once)
    with pytest.raises(ValueError, match="step 2 was not taken"):
        weights.check_errors(wait=False)  # finished: raised without waiting


# ------------------------------------------------------------------ the drop-ins
def test_adam_with_decoupled_weight_decay_is_adamw():
    """Adam(decoupled_weight_decay=True) is AdamW bitwise, and torch's AdamW within float32 rounding."""
    def run(make):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(300, generator=gen).to(DEVICE))
        opt = make([p])
        for _ in range(20):
            p.grad = torch.randn(300, generator=gen).to(DEVICE)
            opt.step()
        return p.detach()

    ours = run(lambda ps: also_fused.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True))
    assert torch.equal(ours, run(lambda ps: also_fused.AdamW(ps, lr=1e-2, weight_decay=0.1)))
    theirs = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1))
    coupled = run(lambda ps: also_fused.Adam(ps, lr=1e-2, weight_decay=0.1))
    assert float((ours - theirs).norm()) <= 1e-6 * float(theirs.norm())
    assert float((coupled - theirs).norm()) > 1e-3 * float(theirs.norm())  # the flag changes the update


# ------------------------------------------------------------------ choosing the backend
def test_triton_backend_refused_where_it_cannot_run(monkeypatch):
    p = torch.nn.Parameter(torch.ones(2))
    monkeypatch.setattr(backends, "interpreter_enabled", lambda: False)
    if triton_importable():
        with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors \(or TRITON_INTERPRET=1"):
            also_fused.AdamW([p], backend="triton")
    monkeypatch.setattr(backends, "triton_available", lambda: (False, "ImportError: no triton here"))
    for make in (lambda: also_fused.AdamW([p], backend="triton"),
                 lambda: also_fused.GroupWeights(3, batch_size=2, backend="triton"),
                 lambda: also_fused.rgd_loss(torch.ones(2), 1.0, backend="triton")):
        with pytest.raises(RuntimeError, match=r"needs the Triton kernels, which failed to import \(ImportError: no "
                                               r"triton here\)"):
            make()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'triton'\), got 'cuda'"):
        also_fused.AdamW([p], backend="cuda")


def test_cuda_without_triton_falls_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(backends, "triton_available", lambda: (False, "ImportError: no triton here"))
    monkeypatch.setattr(backends.FALLBACK_WARNINGS, "warned", set())
    cuda = torch.device("cuda", 0)  # resolving a backend does not touch the device
    with pytest.warns(UserWarning, match=r"Triton kernels unavailable \(ImportError: no triton here\); using the "
                                         r"reference path on cuda:0"):
        chosen = backends.resolve_backend("auto", cuda)
    assert chosen.name == "reference" and chosen.step_device == torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert backends.resolve_backend("auto", cuda).name == "reference"


# ------------------------------------------------------------------ PiBatchSampler
def test_pi_batch_sampler_edges():
    weights = also_fused.GroupWeights(6, batch_size=2, pi_init=[8.0, 4.0, 2.0, 1.0, 0.5, 0.5])
    with pytest.raises(TypeError, match="needs an also_fused.ALSO optimizer or an also_fused.GroupWeights"):
        also_fused.PiBatchSampler(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), 0.5, 2)
    with pytest.raises(ValueError, match="num_batches must be >= 1, got 0"):
        also_fused.PiBatchSampler(weights, 0.5, 0)
    with pytest.raises(ValueError, match="strategy must be 'pi' or 'uniform'"):
        next(iter(also_fused.PiBatchSampler(weights, 0.5, 1, strategy="greedy")))
    with pytest.raises(ValueError, match="order must be 'desc' or 'asc'"):
        next(iter(also_fused.PiBatchSampler(weights, 0.5, 1, order="up")))
    # pi sorted descending is [0.5, 0.25, 0.125, ...]: mass 0.5 is reached at the first entry (cutoff 1, a
    # batch of 5), mass 1 at the last (a batch of max(1, 0) = 1); ascending, 0.5 needs five entries
    sizes = {(t, o): len(next(iter(also_fused.PiBatchSampler(weights, t, 1, order=o))))
             for t in (0.5, 1.0) for o in ("desc", "asc")}
    assert sizes == {(0.5, "desc"): 5, (1.0, "desc"): 1, (0.5, "asc"): 1, (1.0, "asc"): 1}
    sampler = also_fused.PiBatchSampler(weights, 0.2, 3, strategy="uniform",
                                        generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(sampler) == 3 and len(batches) == 3
    for b in batches:
        assert len(b) == len(set(b)) == 5 and all(isinstance(i, int) and 0 <= i < 6 for i in b)
    again = list(also_fused.PiBatchSampler(weights, 0.2, 3, strategy="uniform",
                                           generator=torch.Generator().manual_seed(0)))
    assert again == batches  # a seeded generator repeats the draws


@pytest.mark.parametrize("backend", ["auto", "reference"] + (["triton"] if triton_importable() else []))
def test_also_refuses_params_on_several_devices(backend):
    """Before any backend is chosen (a backend that cannot run on one of the devices would refuse it first):
    the meta device stands in for a second one here; the bad-input matrix does it with CUDA and the CPU."""
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, device="meta"))]
    with pytest.raises(ValueError, match=r"ALSO's params must share one device \(pi's\), got \['cpu', 'meta'\]"):
        also_fused.ALSO(params, 4, batch_size=2, backend=backend)
    also_fused.theta.ThetaAdam([torch.nn.Parameter(torch.ones(2, device=DEVICE))], backend=backend)  # one device: built
