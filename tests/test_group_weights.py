"""GroupWeights, the pi side alone, beside any optimizer; and ALSO as ThetaAdam + GroupWeights.

* trajectories against float64 models written from docs/algorithm.md (``support/golden.py``): pi with SGD,
  ALSO's Adam and torch's Adam on theta, both modes, both reductions, a param losing its gradient;
* bitwise: the pi trajectory of ALSO on the same losses, whatever moves theta; ALSO (loop API)
  step for step equal to ThetaAdam + GroupWeights, state and resume included;
* micro-batch accumulation, the optimistic pi_mid, the mean reduction's loss, state_dict round trip,
  bad input (state unchanged, also when the device defers the error), select_batch and the sampler;
* torch.optim.AdamW(fused=True) + GroupWeights trains the digits demo; no host sync on CUDA.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import also_fused
from also_fused import functional as F
from also_fused.theta import ThetaAdam
from support import DEVICE, SHORT, harness, triton_importable
from support.golden import GoldenGroupWeights, adam_delta, group_gradient, pi_update, sgd_delta, torch_adam_delta
from support.harness import Config, assert_same, batches, golden_forward, init_params, make_package, package_step, rel

BACKENDS = ("reference", "triton") if triton_importable() else ("reference",)
ON_GPU = DEVICE == "cuda"
WD = 1e-3
NAN = float("nan")


def steps_on(backend: str, steps: int) -> int:
    """Fewer steps through Triton's interpreter, which is slow."""
    return steps if backend != "triton" or ON_GPU else min(steps, 8)


def make_weights(cfg: Config, backend: str = "reference", **overrides) -> also_fused.GroupWeights:
    kw = dict(batch_size=cfg.batch, mode=cfg.mode, pi_lr=cfg.pi_lr, pi_decay=cfg.pi_decay,
              pi_temperature=cfg.temperature, eps=cfg.eps, group_reduction=cfg.group_reduction, device=DEVICE,
              backend=backend)
    kw.update(overrides)
    return also_fused.GroupWeights(cfg.n_groups, **kw)


def loss_batches(n: int, n_groups: int = 4, batch: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [((torch.rand(batch, generator=gen) * (1 + k % 3)).to(DEVICE),
             torch.randint(0, n_groups, (batch,), generator=gen).to(DEVICE)) for k in range(n)]


def recorded_losses(monkeypatch) -> list:
    """The per-sample losses harness.package_step computes, detached, one entry per call."""
    seen = []
    compute = harness.per_sample_losses

    def per_sample_losses(*args):
        losses = compute(*args)
        seen.append(losses.detach())
        return losses

    monkeypatch.setattr(harness, "per_sample_losses", per_sample_losses)
    return seen


# ------------------------------------------------------------ float64 golden trajectories
THETAS = {
    "sgd": (lambda groups: torch.optim.SGD(groups, weight_decay=WD),
            lambda state, x, d, lr: sgd_delta(state, x, d, lr, WD)),
    "also_adam": (lambda groups: ThetaAdam(groups, weight_decay=WD),
                  lambda state, x, d, lr: adam_delta(state, x, d, lr, (0.9, 0.999), F.FLOAT32_EPS, WD, False)),
    "torch_adam": (lambda groups: torch.optim.Adam(groups, weight_decay=WD),
                   lambda state, x, d, lr: torch_adam_delta(state, x, d, lr, (0.9, 0.999), 1e-8, WD)),
}


def golden_run(theta: str, cfg: Config, backend: str):
    """theta by ``theta`` and pi by GroupWeights on harness's regression; the float64 model beside them."""
    W, b = init_params(cfg)
    params = [torch.nn.Parameter(t.to(DEVICE, torch.float32)) for t in (W, b)]
    make_opt, delta = THETAS[theta]
    opt = make_opt([dict(params=[p], lr=lr) for p, lr in zip(params, cfg.lrs)])
    weights = make_weights(cfg, backend)
    gold = GoldenGroupWeights(cfg.n_groups, loss_scale=weights.loss_scale, mode=cfg.mode, pi_lr=cfg.pi_lr,
                              pi_decay=cfg.pi_decay, temperature=cfg.temperature, eps=cfg.eps,
                              reduction=cfg.group_reduction)
    x64 = [W, b]
    states = [dict(t=0, m=torch.zeros_like(x), v=torch.zeros_like(x)) for x in x64]
    for X, Y, ids, use_bias in batches(cfg):
        losses64, grads = golden_forward(X, Y, use_bias)(x64, *gold.weights(ids))
        x64 = [x if d is None else x + delta(s, x, d, lr) for x, d, s, lr in zip(x64, grads, states, cfg.lrs)]
        gold.step(losses64, ids)
        opt.zero_grad(set_to_none=True)
        losses = harness.per_sample_losses(*params, X.to(DEVICE, torch.float32), Y.to(DEVICE, torch.float32),
                                           use_bias)
        weights.weighted_loss(losses, ids.to(DEVICE)).backward()
        opt.step()
        weights.step()
    return x64, gold, params, weights


def check_golden(theta: str, cfg: Config, backend: str = "reference", tol: float = 1e-5) -> None:
    x64, gold, params, weights = golden_run(theta, cfg, backend)
    for got, want in zip(params, x64):
        assert rel(got.detach(), want) <= tol, (theta, rel(got.detach(), want))
    assert rel(weights.pi, gold.pi) <= tol, rel(weights.pi, gold.pi)
    assert rel(weights.pi_mid, gold.pi_mid()) <= tol
    assert rel(gold.pi, torch.full_like(gold.pi, 1.0 / cfg.n_groups)) > 1e-3  # pi moved: not a vacuous check


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
@pytest.mark.parametrize("theta", sorted(THETAS))
def test_matches_float64_model(theta, mode, reduction):
    check_golden(theta, Config(mode=mode, group_reduction=reduction, lose_grad_every=5))


@pytest.mark.skipif(not triton_importable(), reason="triton is not installed")
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
def test_matches_float64_model_on_the_kernels(mode, reduction):
    check_golden("sgd", Config(mode=mode, group_reduction=reduction, steps=steps_on("triton", 200)), "triton")


# --------------------------------------------------------------- bitwise against ALSO
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("api", ["closure", "loop"])
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
def test_pi_follows_also_on_the_same_losses_bitwise(mode, api, reduction, backend, monkeypatch):
    """Whatever moves theta, GroupWeights given ALSO's losses takes ALSO's pi steps bitwise."""
    cfg = Config(mode=mode, api=api, group_reduction=reduction, lose_grad_every=4,
                 steps=steps_on(backend, 30 if SHORT else 60))
    W, b, opt = make_package(cfg, DEVICE, backend)
    weights = make_weights(cfg, backend)
    seen = recorded_losses(monkeypatch)
    for X, Y, ids, use_bias in batches(cfg):
        package_step(opt, W, b, api, X, Y, ids, use_bias, DEVICE, cfg.dtype)
        weights.weighted_loss(seen[-1], ids.to(DEVICE))
        weights.step()
        assert torch.equal(weights.pi, opt.pi)
        if api == "loop":
            assert torch.equal(weights.pi_mid, opt.weights.pi_mid)
    assert not torch.equal(opt.pi, torch.full_like(opt.pi, 1.0 / cfg.n_groups))


def theta_twin(cfg: Config, backend: str) -> tuple[list[torch.nn.Parameter], ThetaAdam, also_fused.GroupWeights]:
    """ALSO's parts, built apart: harness's params, a ThetaAdam on them and a GroupWeights."""
    params = [torch.nn.Parameter(t.to(DEVICE, cfg.dtype)) for t in init_params(cfg)]
    theta = ThetaAdam([dict(params=[p], lr=lr) for p, lr in zip(params, cfg.lrs)], mode=cfg.mode, alpha=cfg.alpha,
                      weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad, eps=cfg.eps, backend=backend)
    return params, theta, make_weights(cfg, backend)


def twin_step(params, theta, weights, X, Y, ids, use_bias, dtype):
    theta.zero_grad(set_to_none=True)
    losses = harness.per_sample_losses(*params, X.to(DEVICE, dtype), Y.to(DEVICE, dtype), use_bias)
    weights.weighted_loss(losses, ids.to(DEVICE)).backward()
    theta.step()
    weights.step()


@pytest.mark.parametrize("backend", BACKENDS + ("auto",))
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
def test_also_is_theta_adam_plus_group_weights(mode, backend):
    """ALSO's loop API step for step bitwise ThetaAdam.step() then GroupWeights.step(), also across a
    resume of the two parts from their state_dicts; ALSO's state is the union of theirs."""
    cfg = Config(mode=mode, api="loop", amsgrad=True, alpha=0.5, lose_grad_every=3,
                 steps=steps_on(backend, 40))
    data = list(batches(cfg))
    W, b, opt = make_package(cfg, DEVICE, backend)
    params, theta, weights = theta_twin(cfg, backend)
    for k, (X, Y, ids, use_bias) in enumerate(data):
        if k == len(data) // 2:  # the parts resume from their state_dicts, with other params in between
            saved = copy.deepcopy((theta.state_dict(), weights.state_dict(), [p.detach() for p in params]))
            params, theta, weights = theta_twin(cfg, backend)
            with torch.no_grad():
                for p, value in zip(params, saved[2]):
                    p.copy_(value)
            theta.load_state_dict(saved[0])
            weights.load_state_dict(saved[1])
        package_step(opt, W, b, "loop", X, Y, ids, use_bias, DEVICE, cfg.dtype)
        twin_step(params, theta, weights, X, Y, ids, use_bias, cfg.dtype)
        assert torch.equal(W.detach(), params[0].detach()) and torch.equal(b.detach(), params[1].detach())
        assert torch.equal(opt.pi, weights.pi) and torch.equal(opt.weights.pi_mid, weights.pi_mid)
    also_sd, theta_sd = opt.state_dict(), theta.state_dict()
    assert_same(also_sd["state"], theta_sd["state"])
    assert_same(also_sd["also"], {**weights.state_dict(), **theta_sd["theta"]})
    opt.eval()
    theta.eval()
    assert torch.equal(W.detach(), params[0].detach())
    # ALSO's pi-side settings are its GroupWeights'; its "also" entry loads into a GroupWeights
    opt.pi_lr = 0.25
    assert opt.weights.pi_lr == 0.25 and opt.pi_eps == opt.weights.eps and opt.n_groups == cfg.n_groups
    fresh = make_weights(cfg, backend)
    fresh.load_state_dict(also_sd["also"])
    assert torch.equal(fresh.pi, opt.pi)


# ------------------------------------------------------------------ the pi side itself
def step_all(weights, data):
    for losses, ids in data:
        weights.weighted_loss(losses, ids)
        weights.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
def test_state_dict_round_trip_resumes_bitwise(mode, reduction, backend):
    cfg = Config(mode=mode, group_reduction=reduction, pi_lr=0.3)
    data = loss_batches(steps_on(backend, 12))
    whole = make_weights(cfg, backend)
    step_all(whole, data)
    first = make_weights(cfg, backend)
    step_all(first, data[:5])
    saved = copy.deepcopy(first.state_dict())
    del first
    resumed = make_weights(cfg, backend, pi_init=[4.0, 3.0, 2.0, 1.0])
    resumed.load_state_dict(saved)
    step_all(resumed, data[5:])
    assert_same(resumed.state_dict(), whole.state_dict())
    assert not torch.equal(whole.pi, torch.full_like(whole.pi, 0.25))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
def test_micro_batches_feed_one_pi_step(mode, reduction, backend):
    """weighted_loss once per micro-batch, then one step: the pi step of the concatenated batch (bitwise);
    summed sum-reduction losses equal the whole batch's loss."""
    cfg = Config(mode=mode, group_reduction=reduction, pi_lr=0.3)
    whole, split = make_weights(cfg, backend), make_weights(cfg, backend)
    for losses, ids in loss_batches(steps_on(backend, 10), batch=9):
        loss = whole.weighted_loss(losses, ids)
        parts = [split.weighted_loss(losses[s], ids[s]) for s in (slice(0, 4), slice(4, 5), slice(5, 9))]
        if reduction == "sum":
            torch.testing.assert_close(sum(parts), loss, rtol=1e-6, atol=0)
        assert torch.equal(whole.step(), split.step())
        assert torch.equal(whole.pi, split.pi) and torch.equal(whole.pi_mid, split.pi_mid)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimistic_weighted_loss_uses_pi_mid(backend):
    """pi_mid = pi before the first step, then PiUpdate(pi, G of the last batch); the loss weighs with it."""
    cfg = Config(mode="optimistic", pi_lr=0.5)
    weights = make_weights(cfg, backend)
    hyper = dict(pi_lr=cfg.pi_lr, pi_decay=cfg.pi_decay, temperature=cfg.temperature, eps=cfg.eps)
    pi64 = torch.full((cfg.n_groups,), 1.0 / cfg.n_groups, dtype=torch.float64)
    pi_mid64 = pi64
    for losses, ids in loss_batches(steps_on(backend, 6)):
        assert rel(weights.pi_mid, pi_mid64) <= 1e-6
        want = weights.loss_scale * float((pi_mid64[ids.cpu()] * losses.cpu().double()).sum())
        assert abs(float(weights.weighted_loss(losses, ids)) - want) <= 1e-6 * want
        weights.step()
        G = group_gradient(losses.cpu().double(), ids.cpu(), cfg.n_groups)
        pi64 = pi_update(pi64, G, pi_reg=torch.full_like(pi64, 0.25), **hyper)
        pi_mid64 = pi_update(pi64, G, pi_reg=torch.full_like(pi64, 0.25), **hyper)
        assert rel(weights.pi, pi64) <= 1e-6
    assert rel(pi_mid64, pi64) > 1e-3  # the extrapolation really moved pi_mid away from pi


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_mean_loss_and_step(backend):
    """Mean reduction: loss = sum_{j present} pi_j mean_j / sum_{j present} pi_j; the step uses the means."""
    pi0 = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    weights = also_fused.GroupWeights(4, group_reduction="mean", pi_init=pi0, pi_lr=0.5, device=DEVICE,
                                      backend=backend)
    ids = torch.tensor([0, 0, 1, 3, 3, 3], device=DEVICE)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 9.0], device=DEVICE, requires_grad=True)
    loss = weights.weighted_loss(losses, ids)
    means = {0: 1.5, 1: 3.0, 3: 6.0}
    want = sum(float(pi0[j]) * m for j, m in means.items()) / float(pi0[[0, 1, 3]].sum())
    assert abs(float(loss) - want) <= 1e-6 * want
    loss.backward()
    counts = torch.tensor([2, 2, 1, 3, 3, 3], dtype=torch.float64)
    want_grad = pi0[ids.cpu()] / counts / float(pi0[[0, 1, 3]].sum())
    assert torch.allclose(losses.grad.cpu().double(), want_grad, rtol=1e-6)
    weights.step()
    G = -torch.tensor([1.5, 3.0, 0.0, 6.0], dtype=torch.float64)
    want_pi = pi_update(pi0, G, 0.5, 1e-2, 1.0, F.FLOAT32_EPS, torch.full_like(pi0, 0.25))
    assert rel(weights.pi, want_pi) <= 1e-6
    sums = pi_update(pi0, -torch.tensor([3.0, 3.0, 0.0, 18.0], dtype=torch.float64), 0.5, 1e-2, 1.0,
                     F.FLOAT32_EPS, torch.full_like(pi0, 0.25))
    assert rel(weights.pi, sums) > 1e-2  # the sum reduction would have given another pi


# --------------------------------------------------------------------------- bad input
def good_batch(k: int):
    return loss_batches(1, seed=100 + k)[0]


class GWRun:
    """A GroupWeights stepped ``warm`` times with good batches."""

    def __init__(self, backend: str, mode: str, reduction: str = "sum", warm: int = 2) -> None:
        self.weights = also_fused.GroupWeights(4, batch_size=8, mode=mode, group_reduction=reduction, pi_lr=0.3,
                                               device=DEVICE, backend=backend)
        self.k = 0
        for _ in range(warm):
            self.good_step()

    def good_step(self) -> None:
        self.weights.weighted_loss(*good_batch(self.k))
        self.weights.step()
        self.k += 1

    def snapshot(self):
        return copy.deepcopy(self.weights.state_dict()), len(self.weights._recorded)


BAD_CALLS = {
    "ids_negative": (lambda l, i: (l, i - 4), ValueError, "must lie in"),
    "ids_too_large": (lambda l, i: (l, i + 4), ValueError, "must lie in"),
    "ids_float": (lambda l, i: (l, i.float()), ValueError, "integer tensor"),
    "ids_bool_list": (lambda l, i: (l, [bool(v > 1) for v in i.tolist()]), ValueError, "integer"),
    "ids_wrong_length": (lambda l, i: (l, i[:-1]), ValueError, "must have shape"),
    "ids_2d": (lambda l, i: (l.view(2, -1), i.view(2, -1)), ValueError, "1-D"),
    "ids_empty": (lambda l, i: (l[:0], i[:0]), ValueError, "empty"),
    "losses_nan": (lambda l, i: (l * NAN, i), ValueError, "NaN or inf"),
    "losses_one_inf": (lambda l, i: (torch.cat([l[:-1], l[-1:] + float("inf")]), i), ValueError, "NaN or inf"),
    "losses_integer": (lambda l, i: ((l * 100).long(), i), ValueError, "floating point"),
    "losses_2d": (lambda l, i: (l.unsqueeze(1), i), ValueError, "must have shape"),
    "losses_list": (lambda l, i: (l.tolist(), i), TypeError, "must be a tensor"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
@pytest.mark.parametrize("bad", sorted(BAD_CALLS))
def test_bad_input_leaves_the_state_as_it_was(bad, mode, reduction, backend):
    make_bad, exc, match = BAD_CALLS[bad]
    victim = GWRun(backend, mode, reduction)
    before = victim.snapshot()
    with pytest.raises(exc, match=match):
        victim.weights.weighted_loss(*make_bad(*good_batch(victim.k)))
        victim.weights.step()
        victim.weights.check_errors()  # on CUDA the device's checks surface here
    assert_same(victim.snapshot(), before)
    twin = GWRun(backend, mode, reduction)
    victim.good_step()
    twin.good_step()
    assert_same(victim.snapshot(), twin.snapshot())


@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
def test_bad_calls_and_states_are_refused(mode):
    victim = GWRun("reference", mode)
    before = victim.snapshot()
    with pytest.raises(RuntimeError, match="weighted_loss"):
        victim.weights.step()  # nothing recorded
    state = victim.weights.state_dict()
    other_mode = "optimistic" if mode == "descent-ascent" else "descent-ascent"
    others = [also_fused.GroupWeights(5, batch_size=8, mode=mode),
              also_fused.GroupWeights(4, batch_size=8, mode=other_mode),
              also_fused.GroupWeights(4, batch_size=8, mode=mode, group_reduction="mean")]
    for other in others:
        with pytest.raises(ValueError, match="n_groups, mode, group_reduction"):
            victim.weights.load_state_dict(other.state_dict())
    for broken, match in ((dict(state, pi=torch.ones(3)), "'pi' must be a tensor"),
                          ({k: v for k, v in state.items() if k != "pi_lr"}, "pi_lr"),
                          (dict(state, pi_mid=[0.25] * 4), "'pi_mid' must be a tensor")):
        with pytest.raises(ValueError, match=match):
            victim.weights.load_state_dict(broken)
    with pytest.raises(TypeError, match="dict"):
        victim.weights.load_state_dict([state])
    assert_same(victim.snapshot(), before)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_groups=0, batch_size=4), "n_groups"),
    (dict(n_groups=True, batch_size=4), "n_groups"),
    (dict(n_groups=3), "batch_size"),
    (dict(n_groups=3, batch_size=0), "batch_size"),
    (dict(n_groups=3, batch_size=4, mode="sgd"), "mode"),
    (dict(n_groups=3, batch_size=4, group_reduction="median"), "group_reduction"),
    (dict(n_groups=3, batch_size=4, pi_lr=-1.0), "pi_lr"),
    (dict(n_groups=3, batch_size=4, pi_temperature=0.0), "temperature"),
    (dict(n_groups=3, batch_size=4, eps=-1.0), "epsilon"),
    (dict(n_groups=3, batch_size=4, pi_reg=[1.0, 2.0]), "pi_reg has"),
    (dict(n_groups=3, batch_size=4, pi_init=[1.0, -2.0, 1.0]), "pi_init must be finite"),
    (dict(n_groups=3, batch_size=4, backend="cuda"), "backend"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        also_fused.GroupWeights(**kwargs)


def test_defaults():
    weights = also_fused.GroupWeights(10, batch_size=4)
    assert weights.mode == "descent-ascent" and weights.group_reduction == "sum"
    assert (weights.pi_lr, weights.pi_decay, weights.pi_temperature, weights.eps) == (1e-3, 1e-2, 1.0, F.FLOAT32_EPS)
    assert weights.loss_scale == pytest.approx(2.5) and weights.device == torch.device("cpu")
    assert torch.equal(weights.pi, torch.full((10,), 0.1)) and torch.equal(weights.pi_reg, weights.pi)
    assert weights.pi_mid is weights.pi


@pytest.mark.skipif(not triton_importable(), reason="the device checks run in the Triton kernels")
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
@pytest.mark.parametrize("bad_ids", [True, False], ids=["ids", "nan"])
def test_device_rejected_step_is_a_noop_and_raises_later(bad_ids, mode, reduction, monkeypatch):
    """Deferred errors (as on CUDA): the rejected step and those queued after it change nothing; the
    first call that can read the device's word raises and drops the batches recorded since."""
    victim = GWRun("triton", mode, reduction)
    victim.weights._errors.deferred = True
    before, k_before = victim.snapshot(), victim.k
    losses, ids = good_batch(victim.k)
    monkeypatch.setattr(victim.weights._errors, "_in_flight", lambda event: True)
    victim.weights.weighted_loss(*((losses, ids + 4) if bad_ids else (losses * NAN, ids)))
    victim.weights.step()  # no error yet: the device has not been read
    victim.good_step()
    victim.weights.weighted_loss(*good_batch(victim.k))  # recorded, then dropped with the rejected steps
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"step 3 was not taken.*the 1 step\(s\) queued after it"):
        victim.weights.check_errors()
    assert_same(victim.snapshot(), before)
    victim.k = k_before
    twin = GWRun("triton", mode, reduction)
    victim.good_step()
    twin.good_step()
    assert_same(victim.snapshot(), twin.snapshot())


# ------------------------------------------------------------------- sampling by pi
def test_select_batch_and_sampler_work_from_group_weights():
    pi = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2])
    weights = also_fused.GroupWeights(5, batch_size=2, pi_init=pi)
    opt = also_fused.ALSO([torch.nn.Parameter(torch.randn(2))], n_groups=5, batch_size=2, pi_init=pi)
    for strategy in ("pi", "uniform"):
        mine = weights.select_batch(0.5, strategy, generator=torch.Generator().manual_seed(0))
        theirs = opt.select_batch(0.5, strategy, generator=torch.Generator().manual_seed(0))
        assert mine[0] == theirs[0] == 3 and torch.equal(mine[1], theirs[1])
    sampler = also_fused.PiBatchSampler(weights, threshold=0.5, num_batches=4,
                                        generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(5) * 10), batch_sampler=sampler)
    seen = [batch[0] for batch in loader]
    assert len(seen) == 4 and all(len(b) == 3 and len(set(b.tolist())) == 3 for b in seen)
    with pytest.raises(TypeError, match="GroupWeights"):
        also_fused.PiBatchSampler(torch.optim.SGD([torch.nn.Parameter(torch.randn(2))], lr=0.1), 0.5, 1)


# ------------------------------------------------------------------ a real training run
def test_torch_fused_adamw_with_group_weights_trains_the_digits_demo():
    """torch.optim.AdamW(fused=True) on the demo's MLP, GroupWeights (group means) on the classes: the
    model learns, pi moves to the rare classes, and the worst class does better than without pi."""
    if SHORT:
        pytest.skip("the accuracy claims need the demo's 30 epochs, which ALSO_FUSED_SHORT_TESTS shortens")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import demo_digits

    X_tr, y_tr, X_te, y_te = (t.to(DEVICE) for t in demo_digits.long_tailed_digits())
    results = {}
    for reweighted in (False, True):
        torch.manual_seed(0)
        model = demo_digits.mlp().to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        weights = also_fused.GroupWeights(10, group_reduction="mean", pi_lr=0.1, device=DEVICE)
        gen = torch.Generator().manual_seed(0)
        for _ in range(30):
            for idx in torch.randperm(len(y_tr), generator=gen).to(DEVICE).split(32):
                losses = torch.nn.functional.cross_entropy(model(X_tr[idx]), y_tr[idx], reduction="none")
                opt.zero_grad()
                (weights.weighted_loss(losses, y_tr[idx]) if reweighted else losses.mean()).backward()
                opt.step()
                if reweighted:
                    weights.step()
        results[reweighted] = demo_digits.evaluate(model, X_te, y_te)
    acc, worst = results[True]
    assert acc > 85.0, results
    assert worst > results[False][1], results
    counts = torch.bincount(y_tr, minlength=10)
    assert float(weights.pi[counts.argmin()]) > 1.5 * float(weights.pi[counts.argmax()])


@pytest.mark.skipif(not ON_GPU, reason="host syncs are a CUDA matter")
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
def test_no_host_sync_with_torch_fused_adamw(mode, reduction):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    weights = also_fused.GroupWeights(4, batch_size=16, mode=mode, group_reduction=reduction, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 8, generator=gen).to(DEVICE), torch.randint(0, 3, (16,), generator=gen).to(DEVICE),
             torch.randint(0, 4, (16,), generator=gen).to(DEVICE)) for _ in range(6)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for X, y, ids in data:
            opt.zero_grad(set_to_none=True)
            losses = torch.nn.functional.cross_entropy(model(X), y, reduction="none")
            weights.weighted_loss(losses, ids).backward()
            opt.step()
            weights.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    weights.check_errors()
    assert torch.isfinite(weights.pi).all()


@pytest.mark.skipif(not triton_importable(), reason="the device checks run in the Triton kernels")
def test_more_steps_in_flight_than_report_slots(monkeypatch):
    """Each step's report has a slot in a ring; a host further ahead of the device than the ring is long
    waits for the device (here: reads the reports already written) instead of reusing a slot, and a bad
    step past the wrap is still named and undone."""
    from also_fused._input_errors import RING

    victim = GWRun("triton", "descent-ascent", warm=0)
    victim.weights._errors.deferred = True
    monkeypatch.setattr(victim.weights._errors, "_in_flight", lambda value: True)  # never finished, unless waited for
    for _ in range(RING + 3):
        victim.good_step()
    assert len(victim.weights._errors._pending) < RING
    before, k_before = victim.snapshot(), victim.k
    losses, ids = good_batch(victim.k)
    victim.weights.weighted_loss(losses, ids + 4)
    victim.weights.step()
    victim.good_step()
    monkeypatch.undo()
    with pytest.raises(ValueError, match=rf"step {RING + 4} was not taken.*the 1 step\(s\) queued after it"):
        victim.weights.check_errors()
    assert_same(victim.snapshot(), before)
    victim.k = k_before
    twin = GWRun("triton", "descent-ascent", warm=RING + 3)
    victim.good_step()
    twin.good_step()
    assert_same(victim.snapshot(), twin.snapshot())


@pytest.mark.skipif(not triton_importable(), reason="the device checks run in the Triton kernels")
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
def test_deferred_error_of_the_multi_launch_pi_step(mode, monkeypatch):
    """n_groups above the single-program pi kernel's limit: the pi step takes several launches and the
    step's error report is copied into its slot instead of written by a kernel; a bad step is still
    named, undone and followed exactly like a twin that never saw it."""
    from also_fused.kernels.group_pi import SMALL_MAX

    n = SMALL_MAX + 44

    def build():
        return also_fused.GroupWeights(n, batch_size=8, mode=mode, pi_lr=0.3, device=DEVICE, backend="triton")

    def batch(k):
        gen = torch.Generator().manual_seed(200 + k)
        return torch.rand(8, generator=gen).to(DEVICE), torch.randint(0, n, (8,), generator=gen).to(DEVICE)

    victim, twin = build(), build()
    victim._errors.deferred = True
    for k in range(2):
        for w in (victim, twin):
            w.weighted_loss(*batch(k))
            w.step()
    before = copy.deepcopy(victim.state_dict())
    monkeypatch.setattr(victim._errors, "_in_flight", lambda value: True)
    losses, ids = batch(2)
    victim.weighted_loss(losses, ids + n)
    victim.step()  # not read yet
    monkeypatch.undo()
    with pytest.raises(ValueError, match="must lie in.*step 3 was not taken"):
        victim.check_errors()
    assert_same(copy.deepcopy(victim.state_dict()), before)
    for w in (victim, twin):
        w.weighted_loss(*batch(3))
        w.step()
    assert_same(victim.state_dict(), twin.state_dict())
