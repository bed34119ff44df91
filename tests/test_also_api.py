"""ALSO's public API: resume, bad input, train/eval, accumulation, select_batch, sampler, RGD."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import also_fused
from also_fused import functional as F
from support import DEVICE, triton_importable
from support.harness import Config, assert_same, batches, make_package, package_step, resume_is_bitwise


def snapshot(opt, params):
    """Every tensor the optimizer and the params hold, cloned, for bitwise comparison."""
    sd = copy.deepcopy(opt.state_dict())
    return sd, [p.detach().clone() for p in params]


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["closure", "loop"])
def test_resume_is_bitwise(api, mode, amsgrad):
    resume_is_bitwise(api, mode, amsgrad)


def test_state_dict_stores_iterate_in_loop_api():
    cfg = Config(api="loop", steps=5)
    W, b, opt = make_package(cfg, DEVICE, "reference")
    for X, Y, ids, use_bias in batches(cfg):
        package_step(opt, W, b, "loop", X, Y, ids, use_bias, DEVICE, cfg.dtype)
    x = opt.state_dict()["state"][0]["iterate"].clone()
    y = W.detach().clone()
    assert not torch.equal(x, y)  # params hold the extrapolated point
    opt.eval()
    # the params hold x, the state y in place of x: still one extra buffer per param
    assert torch.equal(W.detach(), x)
    assert "iterate" not in opt.state_dict()["state"][0]
    assert torch.equal(opt.state_dict()["state"][0]["extrapolated"], y)
    opt.eval()  # idempotent
    assert torch.equal(W.detach(), x)
    opt.train()
    assert torch.equal(W.detach(), y) and torch.equal(opt.state_dict()["state"][0]["iterate"], x)
    assert "extrapolated" not in opt.state_dict()["state"][0]
    with pytest.raises(RuntimeError, match="train"):
        opt.eval()
        opt.weighted_loss(W.sum() * torch.ones(cfg.batch, device=DEVICE),
                          torch.zeros(cfg.batch, dtype=torch.long, device=DEVICE)).backward()
        opt.step()
    opt.train()


# -------------------------------------------------------------------------- bad input
def stepped(api="closure", mode="optimistic", steps=3):
    cfg = Config(api=api, mode=mode, steps=steps)
    W, b, opt = make_package(cfg, DEVICE, "reference")
    for X, Y, ids, use_bias in batches(cfg):
        package_step(opt, W, b, api, X, Y, ids, use_bias, DEVICE, cfg.dtype)
    return cfg, W, b, opt


def good_batch(cfg):
    X, Y, ids, _ = next(iter(batches(dataclasses.replace(cfg, seed=7))))
    return X.float().to(DEVICE), Y.float().to(DEVICE), ids.to(DEVICE)


BAD_IDS = {
    "negative": lambda ids: ids - ids.max() - 1,
    "too_large": lambda ids: ids + 100,
    "float": lambda ids: ids.float(),
    "wrong_length": lambda ids: ids[:-1],
    "two_dims": lambda ids: ids.view(1, -1),
    "empty": lambda ids: ids[:0],
}
# the start of each error message (the promise to the user)
BAD_IDS_MESSAGES = {"negative": r"group_ids must lie in \[0, 4\)", "too_large": r"group_ids must lie in \[0, 4\)",
                    "float": "group_ids must be an integer tensor", "wrong_length": "per-sample losses must have shape",
                    "two_dims": "group_ids must be 1-D", "empty": "group_ids is empty"}


@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("bad", sorted(BAD_IDS))
def test_bad_ids_closure_leave_state_unchanged(bad, mode):
    cfg, W, b, opt = stepped(mode=mode)
    X, Y, ids = good_batch(cfg)
    before = snapshot(opt, [W, b])
    called = []

    def closure(pi_sel, scale):
        called.append(1)
        opt.zero_grad()
        losses = ((X @ W + b - Y) ** 2).mean(1)
        (scale * (pi_sel * losses[: len(pi_sel)]).sum()).backward()
        return losses.detach(), None

    with pytest.raises(ValueError, match=BAD_IDS_MESSAGES[bad]):
        opt.step(closure, BAD_IDS[bad](ids))
    assert_same(snapshot(opt, [W, b]), before)


CLOSURE_RESULTS = {
    "nan_loss": lambda losses: (losses * float("nan"), None),
    "inf_loss": lambda losses: (losses + float("inf"), None),
    "wrong_shape": lambda losses: (losses[:-1], None),
    "scalar": lambda losses: (losses.mean(), None),
    "int_losses": lambda losses: (losses.long(), None),
    "not_a_tensor": lambda losses: ([1.0] * len(losses), None),
}
CLOSURE_RESULT_ERRORS = {"nan_loss": (ValueError, "NaN or inf"), "inf_loss": (ValueError, "NaN or inf"),
                         "wrong_shape": (ValueError, "per-sample losses must have shape"),
                         "scalar": (ValueError, "per-sample losses must have shape"),
                         "int_losses": (ValueError, "per-sample losses must be floating point"),
                         "not_a_tensor": (TypeError, "per-sample losses must be a tensor")}


@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("bad", sorted(CLOSURE_RESULTS))
def test_bad_closure_result_leaves_state_unchanged(bad, mode):
    cfg, W, b, opt = stepped(mode=mode)
    X, Y, ids = good_batch(cfg)
    before = snapshot(opt, [W, b])

    def closure(pi_sel, scale):
        opt.zero_grad()
        losses = ((X @ W + b - Y) ** 2).mean(1)
        (scale * (pi_sel * losses).sum()).backward()
        return CLOSURE_RESULTS[bad](losses.detach())

    error, message = CLOSURE_RESULT_ERRORS[bad]
    with pytest.raises(error, match=message):
        opt.step(closure, ids)
    # the extrapolated params were put back, the Adam state and pi were never written
    after = snapshot(opt, [W, b])
    assert_same(after[1], before[1], "params")
    assert_same(after[0]["also"]["pi"], before[0]["also"]["pi"])
    for pid, state in before[0]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert_same(after[0]["state"][pid][key], state[key], key)


def test_closure_exception_restores_params():
    cfg, W, b, opt = stepped()
    _, _, ids = good_batch(cfg)
    before = snapshot(opt, [W, b])

    def closure(pi_sel, scale):
        raise KeyError("user error")

    with pytest.raises(KeyError, match="user error"):
        opt.step(closure, ids)
    assert_same(snapshot(opt, [W, b])[1], before[1])


@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
def test_bad_loop_input_leaves_state_unchanged(mode):
    cfg, W, b, opt = stepped(api="loop", mode=mode)
    X, Y, ids = good_batch(cfg)
    before = snapshot(opt, [W, b])
    losses = ((X @ W + b - Y) ** 2).mean(1)
    with pytest.raises(ValueError, match="group_ids"):
        opt.weighted_loss(losses, ids + 100)
    with pytest.raises(ValueError, match="shape"):
        opt.weighted_loss(losses[:-1], ids)
    opt.zero_grad()
    opt.weighted_loss(losses * float("nan"), ids).backward()
    with pytest.raises(ValueError, match="NaN"):
        opt.step()
    assert_same(snapshot(opt, [W, b])[0]["also"]["pi"], before[0]["also"]["pi"])
    assert_same(snapshot(opt, [W, b])[1], before[1])
    with pytest.raises(RuntimeError, match="weighted_loss"):
        opt.step()


def test_mixing_apis_in_optimistic_mode_is_refused():
    cfg, W, b, opt = stepped(api="loop")
    X, Y, ids = good_batch(cfg)
    with pytest.raises(RuntimeError, match="API"):
        opt.step(lambda pi, s: (torch.ones(len(ids), device=DEVICE), None), ids)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_groups=0, batch_size=4), "n_groups"),
    (dict(n_groups=3), "batch_size"),
    (dict(n_groups=3, batch_size=4, mode="sgd"), "mode"),
    (dict(n_groups=3, batch_size=4, pi_reg=[1.0, 2.0]), "pi_reg"),
    (dict(n_groups=3, batch_size=4, pi_init=[1.0, -2.0, 1.0]), "pi_init"),
    (dict(n_groups=3, batch_size=4, pi_init=[0.0, 0.0, 0.0]), "pi_init"),
    (dict(n_groups=3, batch_size=4, pi_temperature=0.0), "temperature"),
    (dict(n_groups=3, batch_size=4, lr=-1.0), "learning rate"),
    (dict(n_groups=3, batch_size=4, backend="cuda"), "backend"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        also_fused.ALSO([torch.nn.Parameter(torch.randn(2))], **kwargs)


def test_loss_scale_default_and_pi_property():
    opt = also_fused.ALSO([torch.nn.Parameter(torch.randn(2))], n_groups=10, batch_size=4)
    assert opt.loss_scale == pytest.approx(2.5)
    assert opt.pi.shape == (10,) and opt.pi.dtype == torch.float32
    assert torch.allclose(opt.pi, torch.full((10,), 0.1))
    assert torch.allclose(opt.pi_reg, torch.full((10,), 0.1))


# ----------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
def test_gradient_accumulation_equals_one_big_batch(mode):
    """Two weighted_loss calls before step() act like one call on the concatenated batch."""
    cfg = Config(api="loop", mode=mode, batch=8, steps=20)
    data = list(batches(cfg))
    Wa, ba, opt_a = make_package(cfg, DEVICE, "reference")
    Wb, bb, opt_b = make_package(cfg, DEVICE, "reference")
    for X, Y, ids, _ in data:
        X, Y, ids = X.float().to(DEVICE), Y.float().to(DEVICE), ids.to(DEVICE)
        opt_a.zero_grad()
        opt_a.weighted_loss(((X @ Wa + ba - Y) ** 2).mean(1), ids).backward()
        mean_a = opt_a.step()
        opt_b.zero_grad()
        for half in (slice(0, 4), slice(4, 8)):
            opt_b.weighted_loss(((X[half] @ Wb + bb - Y[half]) ** 2).mean(1), ids[half]).backward()
        mean_b = opt_b.step()
        assert torch.allclose(mean_a, mean_b, rtol=1e-6)
    assert torch.allclose(Wa, Wb, rtol=1e-5, atol=1e-7)
    assert torch.allclose(opt_a.pi, opt_b.pi, rtol=1e-6)


def test_step_returns_0dim_tensor():
    cfg, W, b, opt = stepped(steps=1)
    X, Y, ids = good_batch(cfg)

    def closure(pi_sel, scale):
        opt.zero_grad()
        losses = ((X @ W + b - Y) ** 2).mean(1)
        (scale * (pi_sel * losses).sum()).backward()
        return losses.detach(), "extra"

    out = opt.step(closure, ids.tolist())  # a list of ids is accepted
    assert isinstance(out, torch.Tensor) and out.dim() == 0


# ---------------------------------------------------------------- select_batch, sampler
def expected_selection_size(pi, threshold, order):
    values = sorted(pi.tolist(), reverse=(order == "desc"))
    total, cutoff = 0.0, len(values)
    for i, v in enumerate(values):
        total += v
        if total >= threshold:
            cutoff = i
            break
    return max(1, len(values) - (cutoff + 1))


@pytest.mark.parametrize("order", ["desc", "asc"])
@pytest.mark.parametrize("strategy", ["pi", "uniform"])
@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.9, 1.5])
def test_select_batch(threshold, strategy, order):
    pi = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2])
    opt = also_fused.ALSO([torch.nn.Parameter(torch.randn(2))], n_groups=5, batch_size=2, pi_init=pi)
    gen = torch.Generator().manual_seed(0)
    size, ids = opt.select_batch(threshold, strategy=strategy, order=order, generator=gen)
    assert size == expected_selection_size(opt.pi, threshold, order)
    assert ids.shape == (size,) and len(set(ids.tolist())) == size
    assert int(ids.min()) >= 0 and int(ids.max()) < 5


def test_select_batch_follows_pi():
    pi = torch.tensor([0.9, 0.025, 0.025, 0.025, 0.025])
    opt = also_fused.ALSO([torch.nn.Parameter(torch.randn(2))], n_groups=5, batch_size=2, pi_init=pi)
    gen = torch.Generator().manual_seed(0)
    firsts = [int(opt.select_batch(0.1, generator=gen)[1][0]) for _ in range(200)]
    assert firsts.count(0) > 150


@pytest.mark.parametrize("max_categories", [0, F.MULTINOMIAL_MAX_CATEGORIES], ids=["race", "multinomial"])
def test_draws_without_replacement_in_proportion(max_categories):
    """The ordered pair (i, j) drawn first and second has probability p_i p_j / (1 - p_i) (float64, computed
    here), with torch.multinomial and with the exponential race used past its category limit."""
    p = [0.1, 0.2, 0.3, 0.4, 0.0]
    n_draws = 20000
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([F.draw_without_replacement(torch.tensor(p), 2, gen, max_categories=max_categories)
                         for _ in range(n_draws)])
    assert (draws[:, 0] != draws[:, 1]).all() and not (draws == 4).any()  # a zero-probability id never comes
    for i in range(4):
        for j in range(4):
            if i == j:
                continue
            want = p[i] * p[j] / (1 - p[i])
            got = ((draws[:, 0] == i) & (draws[:, 1] == j)).double().mean().item()
            assert abs(got - want) <= 5 * (want * (1 - want) / n_draws) ** 0.5, (i, j, got, want)


def _cutoff_model(pi, threshold, order):
    """1 + the first position where the float64 cumulative sum of sorted pi reaches threshold (n + 1: never)."""
    total = 0.0
    for i, v in enumerate(sorted(pi.double().tolist(), reverse=(order == "desc"))):
        total += v
        if total >= threshold:
            return i + 1
    return len(pi) + 1


@pytest.mark.parametrize("order", ["desc", "asc"])
@pytest.mark.parametrize("kind", ["uniform-random", "three-values", "equal", "half-zero"])
@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_mass_cutoff_without_a_sort_matches_the_cumulative_sum(n, kind, order):
    """The sort-free cutoff (select_batch past SORTED_CUTOFF_MAX_GROUPS groups) against the float64 model, at
    thresholds on and between partial sums, with ties and zeros."""
    gen = torch.Generator().manual_seed(n)
    pi = {"uniform-random": torch.rand(n, generator=gen), "equal": torch.ones(n),
          "three-values": torch.randint(1, 4, (n,), generator=gen).float(),
          "half-zero": torch.rand(n, generator=gen) * (torch.arange(n) % 2)}[kind]
    pi = pi / pi.sum() if pi.sum() > 0 else pi
    sums = torch.cumsum(torch.sort(pi, descending=(order == "desc"))[0].double(), 0)
    thresholds = [-1.0, 0.0, 0.1, 0.5, 0.999, 1.0, 1.5] + sums[torch.randint(0, n, (6,), generator=gen)].tolist()
    for threshold in thresholds:
        assert F.mass_cutoff(pi.to(DEVICE), threshold, order) == _cutoff_model(pi, threshold, order), threshold


def test_select_batch_without_a_sort_draws_like_the_reference(monkeypatch):
    monkeypatch.setattr(F, "SORTED_CUTOFF_MAX_GROUPS", 0)
    monkeypatch.setattr(F, "SORTED_CUTOFF_MAX_GROUPS_GPU", 0)
    pi = torch.softmax(torch.randn(500, generator=torch.Generator().manual_seed(0)), 0).to(DEVICE)
    for strategy in ("pi", "uniform"):
        fast = F.select_batch(pi, 0.9, strategy, generator=torch.Generator(DEVICE).manual_seed(1))
        reference = F.select_batch_reference(pi, 0.9, strategy, generator=torch.Generator(DEVICE).manual_seed(1))
        assert fast[0] == reference[0] and torch.equal(fast[1], reference[1])


def test_select_batch_past_the_multinomial_limit():
    """More groups than torch.multinomial takes (2^24): the draw still works, distinct ids in range."""
    n = F.MULTINOMIAL_MAX_CATEGORIES + 3
    weights = also_fused.GroupWeights(n, loss_scale=1.0, pi_init=None)
    size, ids = weights.select_batch(1.0 - 40 / n, generator=torch.Generator().manual_seed(0))
    assert size == ids.numel() and 1 <= size <= 64
    assert len(set(ids.tolist())) == size and int(ids.min()) >= 0 and int(ids.max()) < n


def test_pi_batch_sampler_feeds_a_dataloader():
    n = 12
    opt = also_fused.ALSO([torch.nn.Parameter(torch.randn(2))], n_groups=n, batch_size=4)
    sampler = also_fused.PiBatchSampler(opt, threshold=0.5, num_batches=3,
                                        generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(torch.arange(n) * 10)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    batches_seen = [b[0] for b in loader]
    assert len(batches_seen) == len(sampler) == 3
    for batch in batches_seen:
        assert len(batch) == expected_selection_size(opt.pi, 0.5, "desc")
        assert all(int(v) % 10 == 0 and 0 <= int(v) < 10 * n for v in batch)


# ---------------------------------------------------------------------------- RGD
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("backend", ["reference", "auto"] + (["triton"] if triton_importable() else []))
def test_rgd_loss_matches_float64_model(temperature, backend):
    """Every path of rgd_loss (the reference, the CPU path, the kernels) against the float64 model."""
    losses = (torch.rand(33, dtype=torch.float64) * 4).requires_grad_()
    ours_in = losses.detach().float().to(DEVICE).requires_grad_()
    ours = also_fused.rgd_loss(ours_in, temperature, backend=backend)
    w = torch.exp(torch.clamp(losses.detach(), max=temperature) / (temperature + 1))
    want = (w * losses).mean()
    want.backward()
    ours.backward()
    assert abs(float(ours) - float(want)) <= 1e-6 * float(want)
    assert torch.allclose(ours_in.grad.double().cpu(), losses.grad, rtol=1e-6)
    assert float(w.max()) > 1.0  # the weights are not all 1: the check above sees the re-weighting


def test_rgd_loss_errors():
    with pytest.raises(ValueError, match="per_sample_losses is empty"):
        also_fused.rgd_loss(torch.ones(0), 1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        also_fused.rgd_loss(torch.ones(3), 0.0)
    with pytest.raises(TypeError, match="per_sample_losses must be a floating-point tensor"):
        also_fused.rgd_loss(torch.ones(3, dtype=torch.long), 1.0)


def test_rgd_loss_on_cpu_tensors_runs_the_reference(monkeypatch):
    """backend="auto" on CPU tensors picks the CPU path, which has no loss kernel: rgd_loss must run the
    reference there, never a Triton kernel (which needs a GPU or the interpreter)."""
    from also_fused import rgd
    from also_fused.backends import CpuBackend
    from also_fused.kernels import losses as loss_kernels

    def no_kernel(*args, **kwargs):
        raise AssertionError("a Triton kernel ran for CPU tensors on the CPU path")

    monkeypatch.setattr(loss_kernels, "rgd_loss", no_kernel)
    monkeypatch.setattr(rgd, "resolve_backend", lambda backend, device: CpuBackend(device))
    losses = torch.rand(9, dtype=torch.float64).float().requires_grad_()
    want = also_fused.functional.rgd_loss_reference(losses.detach(), 0.5)
    got = also_fused.rgd_loss(losses, temperature=0.5)
    assert torch.equal(got.detach(), want)
    got.backward()


# ---------------------------------------------------------------- torch.optim's closure convention
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
def test_a_closure_without_arguments_takes_the_loop_step(mode):
    """opt.step(closure) with a closure of no arguments (as Lightning and accelerate call it) runs the closure
    with gradients on and then the loop API's step: bitwise the loop API; it returns the closure's loss."""
    cfg = Config(mode=mode, api="loop", steps=6, lose_grad_every=3)
    Wl, bl, loop = make_package(cfg, DEVICE, "auto")
    Wc, bc, conv = make_package(cfg, DEVICE, "auto")
    for X, Y, ids, use_bias in batches(cfg):
        package_step(loop, Wl, bl, "loop", X, Y, ids, use_bias, DEVICE, cfg.dtype)
        X, Y, ids = X.float().to(DEVICE), Y.float().to(DEVICE), ids.to(DEVICE)

        def closure():
            assert torch.is_grad_enabled()
            conv.zero_grad(set_to_none=True)
            out = X @ Wc + (bc if use_bias else 0.0)
            loss = conv.weighted_loss(((out - Y) ** 2).mean(1), ids)
            loss.backward()
            return loss

        with torch.no_grad():  # as a trainer calls it: the step turns gradients on for the closure
            returned = conv.step(closure)
        assert returned.requires_grad  # the closure's own loss, not the step's mean
    assert torch.equal(Wl, Wc) and torch.equal(bl, bc) and torch.equal(loop.pi, conv.pi)
    assert_same(loop.state_dict(), conv.state_dict())


def test_a_closure_that_raises_drops_its_batch():
    cfg = Config(mode="optimistic", api="loop", steps=2)
    W, b, opt = make_package(cfg, DEVICE, "auto")
    X, Y, ids, _ = next(iter(batches(cfg)))
    X, Y, ids = X.float().to(DEVICE), Y.float().to(DEVICE), ids.to(DEVICE)
    before = copy.deepcopy(opt.state_dict()), W.detach().clone()

    def closure():
        opt.weighted_loss(((X @ W + b - Y) ** 2).mean(1), ids)
        raise KeyError("user error")

    with pytest.raises(KeyError, match="user error"):
        opt.step(closure)
    assert_same((opt.state_dict(), W.detach()), before)
    with pytest.raises(RuntimeError, match="step\\(\\) needs the per-sample losses"):
        opt.step()  # the failed closure's batch was dropped with it
