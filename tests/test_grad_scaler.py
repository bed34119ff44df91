"""torch.amp.GradScaler's fused route (docs/semantics.md, "Mixed precision with GradScaler").

The optimizers here declare ``_step_supports_amp_scaling``: the scaler hands them its scale and found_inf,
the update unscales inside, and a step whose gradients overflowed changes nothing, decided on the device.
The check needs no golden model: with GradScaler's power-of-two scales, ``scale * loss`` backpropagates to
exactly ``scale * grad``, so a scaled run whose step k overflows must equal, bit for bit, an unscaled run
that never saw batch k (params, Adam state, step counts, pi).
"""
from __future__ import annotations

import pytest
import torch

import also_fused
from also_fused.update_spec import AdamSpec, AdamTensors, GradScaling
from support import DEVICE

SKIPPED = 3  # the step whose loss is made infinite in the scaled run
STEPS = 6
BACKENDS = ["reference", "auto"] + (["triton"] if DEVICE == "cpu" else [])  # "triton" on CPU: the interpreter

OPTIMIZERS = {
    "Adam-amsgrad": lambda params, backend: also_fused.Adam(params, lr=1e-2, amsgrad=True, backend=backend),
    "AdamW": lambda params, backend: also_fused.AdamW(params, lr=1e-2, backend=backend),
    "AdamW-int8": lambda params, backend: also_fused.AdamW(params, lr=1e-2, backend=backend, state_precision="int8"),
    "AdamW-maximize": lambda params, backend: also_fused.AdamW(params, lr=1e-2, maximize=True, backend=backend),
    "ThetaAdam-optimistic": lambda params, backend: also_fused.theta.ThetaAdam(params, lr=1e-2, mode="optimistic",
                                                                               alpha=0.5, backend=backend),
    "ALSO-optimistic": lambda params, backend: also_fused.ALSO(params, n_groups=3, loss_scale=1.0, lr=1e-2, pi_lr=0.1,
                                                               mode="optimistic", alpha=0.5, backend=backend),
    "ALSO-descent-ascent": lambda params, backend: also_fused.ALSO(params, n_groups=3, loss_scale=1.0, lr=1e-2,
                                                                   pi_lr=0.1, mode="descent-ascent", backend=backend),
}


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(DEVICE, dtype)


def _batches():
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield (torch.randn(32, 8, generator=gen).to(DEVICE), torch.randint(0, 4, (32,), generator=gen).to(DEVICE),
               torch.randint(0, 3, (32,), generator=gen).to(DEVICE))


def _losses(model, x, y):
    return torch.nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y,
                                             reduction="none")


def _snapshot(model, opt, weights=None) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for state in opt.state.values():
        out += [v.clone() for v in state.values() if isinstance(v, torch.Tensor)]
    pi_owner = weights if weights is not None else getattr(opt, "weights", None)
    if pi_owner is not None:
        out.append(pi_owner.pi.clone())
        if pi_owner.mode == "optimistic":
            out.append(pi_owner.pi_mid.clone())
    return out


def _assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        # NaN equals NaN here: an overflow step's gradients are compared as they are
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"entry {i}: {m}")


def _run(make, backend, scaled, dtype=torch.float32, check_route=False):
    """STEPS steps; scaled: under a GradScaler with the loss of step SKIPPED made infinite (and the state before
    and after that step compared); else without a scaler and without batch SKIPPED."""
    model = _model(dtype)
    opt = make(list(model.parameters()), backend)
    grouped = hasattr(opt, "weighted_loss")
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 12, growth_interval=2) if scaled else None
    for i, (x, y, ids) in enumerate(_batches()):
        if not scaled and i == SKIPPED:
            continue
        losses = _losses(model, x, y)
        loss = opt.weighted_loss(losses, ids) if grouped else losses.mean()
        opt.zero_grad()
        if not scaled:
            loss.backward()
            opt.step()
            continue
        if i == SKIPPED:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        before = _snapshot(model, opt)
        grads = [p.grad.clone() for p in model.parameters()]
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if check_route:  # the fused route: the scaler did not unscale the gradients in a pass of its own
            _assert_bitwise([p.grad for p in model.parameters()], grads)
        if i == SKIPPED:
            _assert_bitwise(_snapshot(model, opt), before)
            assert scaler.get_scale() == scale / 2  # the scaler saw the overflow
    return _snapshot(model, opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_overflow_step_is_a_no_op_and_the_rest_unscaled(name, backend):
    make = OPTIMIZERS[name]
    _assert_bitwise(_run(make, backend, scaled=True, check_route=True), _run(make, backend, scaled=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "ALSO-optimistic"])
def test_unscaled_first_for_clipping(name, backend):
    """scaler.unscale_(opt) before scaler.step(opt) (to clip): the scaler then hands over found_inf alone."""
    def run(scaled):
        model = _model()
        opt = OPTIMIZERS[name](list(model.parameters()), backend)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 12)
        for i, (x, y, ids) in enumerate(_batches()):
            if not scaled and i == SKIPPED:
                continue
            losses = _losses(model, x, y)
            loss = opt.weighted_loss(losses, ids) if hasattr(opt, "weighted_loss") else losses.mean()
            opt.zero_grad()
            if not scaled:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
                continue
            scaler.scale(loss * float("inf") if i == SKIPPED else loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            scaler.step(opt)
            scaler.update()
        return _snapshot(model, opt)

    _assert_bitwise(run(scaled=True), run(scaled=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_params(dtype, backend):
    """16-bit params and gradients. A network's 16-bit backward is not exactly linear in the loss scale (an
    unscaled gradient below the format's normal range loses bits: why fp16 needs the scaler), so the loss
    here is sum(c * p) with each |c| in the normal range: its gradient is c, scaled exactly to scale * c."""
    if dtype == torch.bfloat16 and DEVICE == "cuda":
        pytest.skip("torch's GradScaler does not unscale bfloat16 gradients on CUDA")
    gen = torch.Generator().manual_seed(4)
    signs = torch.randint(0, 2, (STEPS, 64), generator=gen) * 2 - 1
    coefficients = (signs * torch.empty(STEPS, 64).uniform_(0.01, 1.0, generator=gen)).to(DEVICE, dtype)

    def run(scaled):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 64).to(DEVICE, dtype))
        opt = OPTIMIZERS["AdamW"]([param], backend)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 12, growth_interval=2) if scaled else None
        for i in range(STEPS):
            if not scaled and i == SKIPPED:
                continue
            loss = (coefficients[i] * param).float().sum()
            opt.zero_grad()
            if not scaled:
                loss.backward()
                opt.step()
                continue
            scaler.scale(loss * float("inf") if i == SKIPPED else loss).backward()
            before = _snapshot(torch.nn.ParameterList([param]), opt)
            scaler.step(opt)
            scaler.update()
            if i == SKIPPED:
                _assert_bitwise(_snapshot(torch.nn.ParameterList([param]), opt), before)
        return _snapshot(torch.nn.ParameterList([param]), opt)

    _assert_bitwise(run(scaled=True), run(scaled=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,reduction,n_groups", [("optimistic", "sum", 3), ("descent-ascent", "sum", 3),
                                                     ("optimistic", "mean", 3), ("optimistic", "sum", 2000),
                                                     ("descent-ascent", "sum", 40_000)])
def test_group_weights_beside_a_scaled_optimizer(mode, reduction, n_groups, backend):
    """pi stays put on the step the scaler skipped (also_fused.amp.found_inf), and that batch's recorded
    losses do not reach the next step. 3 groups: the staged step; 2000 and 40000: the many-groups kernels
    (dense and sparse), which take the skip as their error word."""
    def run(scaled):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        weights = also_fused.GroupWeights(n_groups, loss_scale=1.0, mode=mode, pi_lr=0.1, group_reduction=reduction,
                                          device=DEVICE, backend=backend)
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 12) if scaled else None
        for i, (x, y, ids) in enumerate(_batches()):
            if not scaled and i == SKIPPED:
                continue
            loss = weights.weighted_loss(_losses(model, x, y), ids)
            opt.zero_grad()
            if not scaled:
                loss.backward()
                opt.step()
                weights.step()
                continue
            scaler.scale(loss * float("inf") if i == SKIPPED else loss).backward()
            scaler.step(opt)
            found_inf = also_fused.amp.found_inf(scaler, opt)
            before = _snapshot(model, opt, weights)
            weights.step(found_inf=found_inf)
            if i == SKIPPED:
                assert float(found_inf) == 1.0
                _assert_bitwise(_snapshot(model, opt, weights), before)
            scaler.update()
        return _snapshot(model, opt, weights)

    _assert_bitwise(run(scaled=True), run(scaled=False))


def test_found_inf_helper_errors():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert also_fused.amp.found_inf(torch.amp.GradScaler(DEVICE, enabled=False), opt) is None
    scaler = torch.amp.GradScaler(DEVICE)
    with pytest.raises(RuntimeError, match="after scaler.step"):
        also_fused.amp.found_inf(scaler, opt)
    weights = also_fused.GroupWeights(3, loss_scale=1.0, device=DEVICE)
    weights.weighted_loss(torch.ones(4, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE))
    pi = weights.pi.clone()
    with pytest.raises(TypeError, match="one-element tensor"):
        weights.step(found_inf=1.0)
    assert torch.equal(weights.pi, pi)  # refused before anything changed: the batch is still recorded
    weights.step(found_inf=torch.zeros((), device=DEVICE))
    assert not torch.equal(weights.pi, pi)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaling_refused_where_gradients_are_stored(backend):
    """The closure API stores gradients for the next extrapolation; a scaled one would be stored scaled."""
    from also_fused.backends import resolve_backend

    x, g = torch.ones(4, device=DEVICE), torch.ones(4, device=DEVICE)
    state = [torch.zeros(4, device=DEVICE) for _ in range(3)]
    step = torch.zeros((), device=resolve_backend(backend, torch.device(DEVICE)).step_device)
    tensors = AdamTensors([x], [state[0]], [state[1]], [step], [x], [0], save_grads_to=[state[2]])
    scaling = GradScaling(torch.full((), 4.0, device=DEVICE), torch.zeros((), device=DEVICE))
    with pytest.raises(ValueError, match="save or replay gradients"):
        resolve_backend(backend, torch.device(DEVICE)).adam_update(tensors, [g], [(1e-3, 0.9, 0.999, 1e-8, 0.0)],
                                                                   AdamSpec(), scaling=scaling)
    assert torch.equal(x, torch.ones(4, device=DEVICE)) and float(step) == 0.0


@pytest.mark.skipif(DEVICE != "cuda", reason="host syncs exist only with a GPU")
@pytest.mark.parametrize("name", ["AdamW", "ALSO-optimistic", "GroupWeights"])
def test_scaled_loop_has_no_host_sync(name):
    model = _model()
    if name == "GroupWeights":
        opt = also_fused.AdamW(model.parameters(), lr=1e-2)
        weights = also_fused.GroupWeights(3, loss_scale=1.0, device=DEVICE, mode="optimistic")
    else:
        opt = OPTIMIZERS[name](list(model.parameters()), "auto")
        weights = None
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12)
    batches = list(_batches())

    def step(x, y, ids, overflow):
        losses = _losses(model, x, y)
        owner = weights if weights is not None else opt
        loss = owner.weighted_loss(losses, ids) if hasattr(owner, "weighted_loss") else losses.mean()
        opt.zero_grad()
        scaler.scale(loss * float("inf") if overflow else loss).backward()
        scaler.step(opt)
        if weights is not None:
            weights.step(found_inf=also_fused.amp.found_inf(scaler, opt))
        scaler.update()

    for x, y, ids in batches[:2]:  # warm-up: state, plans and kernels made
        step(x, y, ids, False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, (x, y, ids) in enumerate(batches[2:]):
            step(x, y, ids, overflow=i == 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())



@pytest.mark.parametrize("n_groups", [2000, 40_000])
def test_a_step_with_bad_input_stays_rejected_beside_found_inf(n_groups):
    """The many-groups kernels read GradScaler's skip and the error word as one word: where the device found bad
    input (the word set, as a kernel that checked the batch leaves it) and the scaler did not skip, pi and pi_mid
    still keep their values, and the error is raised at the next check."""
    weights = also_fused.GroupWeights(n_groups, batch_size=8, mode="optimistic", pi_lr=0.5, device=DEVICE,
                                      backend="triton")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, n_groups, (8,), generator=gen).to(DEVICE)
    losses = (torch.rand(8, generator=gen) + 1).to(DEVICE)
    weights.weighted_loss(losses, ids)
    weights.step(found_inf=torch.zeros((), device=DEVICE))  # a step taken: pi moves
    before = (weights.pi.clone(), weights.pi_mid.clone())
    weights.weighted_loss(losses, ids)
    weights._errors.word.fill_(also_fused.error_bits.ID_OUT_OF_RANGE)  # what the weighted loss's check sets
    with pytest.raises(ValueError, match="step 2 was not taken"):  # from step() on a CPU, from the check on a GPU
        weights.step(found_inf=torch.zeros((), device=DEVICE))
        weights.check_errors()
    assert torch.equal(weights.pi, before[0]) and torch.equal(weights.pi_mid, before[1])
