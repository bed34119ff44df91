"""The fast CPU path (backend="auto" on CPU tensors, also_fused.cpu_fused).

Checked the way the reference path is: ALSO trajectories against the float64 golden model (same
tolerances, 200 steps, both modes and APIs), one update per step count and param group against a
float64 AdamStep, the drop-ins against torch.optim, bitwise resume, the bad-input matrix, and
every flag of the update against ``functional.adam_update_reference``.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import also_fused
from also_fused import backends, cpu_fused
from also_fused import functional as F
from support import SHORT, bad_inputs, code_rank, dropin
from support.golden import adam_delta
from support.golden_checks import MATRIX, TOL, VARIANTS, check
from support.compare import assert_close_in_float32, assert_same_rounding
from support.harness import Config, rel, resume_is_bitwise, run

CPU = torch.device("cpu")
needs_extension = pytest.mark.skipif(not cpu_fused.available()[0], reason=cpu_fused.available()[1])


def check_cpu(cfg: Config, tol: float = TOL):
    """The golden check of test_also_golden (``support.golden_checks.check``) on CPU tensors with backend
    "auto", which must be the fast path."""
    golden, opt = check(cfg, backend="auto", device="cpu", tol=tol)
    assert opt._backend_for(CPU) == "cpu"
    return golden, opt


# ------------------------------------------------------------------------------ selection
@needs_extension
def test_auto_on_cpu_is_the_fast_path_and_reference_stays_selectable():
    p = torch.nn.Parameter(torch.randn(3))
    for make in (lambda b: also_fused.Adam([p], backend=b), lambda b: also_fused.AdamW([p], backend=b),
                 lambda b: also_fused.ALSO([p], n_groups=2, batch_size=2, backend=b)):
        assert make("auto")._backend_for(CPU) == "cpu"
        assert make("reference")._backend_for(CPU) == "reference"


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["closure", "loop"])
def test_fast_path_never_falls_back_to_the_reference(monkeypatch, api, mode, dtype):
    """Every Adam update of a run (fresh params, lost gradients, amsgrad) runs a compiled kernel."""
    def refuse(*args, **kwargs):
        raise AssertionError("the CPU path fell back to the reference update")

    monkeypatch.setattr(F, "adam_step", refuse)
    monkeypatch.setattr(F, "pi_update_reference", refuse)
    run(Config(mode=mode, api=api, dtype=dtype, amsgrad=True, lose_grad_every=3, steps=12), "cpu", "auto")
    p = torch.nn.Parameter(torch.randn(7, dtype=dtype))
    for cls in (also_fused.Adam, also_fused.AdamW):
        opt = cls([p], amsgrad=True, weight_decay=0.1)
        for _ in range(3):
            p.grad = torch.randn(7, dtype=dtype)
            opt.step()


# ------------------------------------------------------------------ the group weights' side
@needs_extension
@pytest.mark.parametrize("n_groups,batch", [(1, 3), (5, 17), (300, 1000), (40000, 4096)])
@pytest.mark.parametrize("with_reg", [False, True])
@pytest.mark.parametrize("temperature,pi_lr", [(1.0, 0.01), (0.5, 1.0), (3.0, 0.3)])
def test_pi_step_matches_the_reference(n_groups, batch, with_reg, temperature, pi_lr):
    """The extension's PiUpdate (both updates of the optimistic loop step, in place) against the reference's
    float64 softmax rounded to float32: within one float32 ulp; the mean within rounding of the exact one."""
    gen = torch.Generator().manual_seed(n_groups + batch)
    pi = torch.softmax(torch.randn(n_groups, generator=gen), 0)
    ids = torch.randint(0, n_groups, (batch,), generator=gen)
    losses = torch.rand(batch, generator=gen) * 4
    log_pi_reg = torch.log(torch.softmax(torch.randn(n_groups, generator=gen), 0)) if with_reg else None
    hyper = dict(pi_lr=pi_lr, pi_decay=0.1, temperature=temperature, eps=F.FLOAT32_EPS, log_pi_reg=log_pi_reg)
    first = F.pi_update_reference(pi, ids, losses, **hyper)
    second = F.pi_update_reference(first, ids, losses, **hyper)
    out, second_out, mean = pi.clone(), torch.empty_like(pi), torch.empty(())
    assert cpu_fused.pi_update(out, ids, losses, out=out, second_out=second_out, mean_out=mean, **hyper)
    torch.testing.assert_close(out, first, rtol=2.0 ** -23, atol=0.0)
    torch.testing.assert_close(second_out, second, rtol=2.0 ** -23, atol=0.0)
    torch.testing.assert_close(mean, losses.double().mean().float(), rtol=2.0 ** -23, atol=0.0)


@needs_extension
@pytest.mark.skipif(not cpu_fused._HAS_PI_SCRATCH, reason="the extension's pi_step takes no scratch (older build)")
def test_pi_step_with_kept_scratch_gives_the_same_bits_and_leaves_the_sums_zero():
    """The pi step's kept scratch (float64 logits, float32 group sums): the same bits as with scratch of its own
    on every call, over steps whose batches repeat ids and hold ids outside [0, n); the sums are all zero again
    after each call (only the batch's entries were written), and a new size of pi gets new scratch."""
    gen = torch.Generator().manual_seed(11)
    n = 2 * F.PI_BLOCK + 77
    pi = torch.softmax(torch.randn(n, generator=gen), 0)
    hyper = dict(pi_lr=0.7, pi_decay=0.1, temperature=0.9, eps=F.FLOAT32_EPS, log_pi_reg=None)
    scratch: dict = {}
    kept = fresh = pi
    for step in range(4):
        ids = torch.cat([torch.randint(0, n, (300,), generator=gen), torch.tensor([3, 3, 3, -1, n, n + 5])])
        losses = torch.rand(ids.numel(), generator=gen) * 4
        out_kept, second_kept = torch.empty_like(pi), torch.empty_like(pi)
        out_fresh, second_fresh = torch.empty_like(pi), torch.empty_like(pi)
        assert cpu_fused.pi_update(kept, ids, losses, out=out_kept, second_out=second_kept, scratch=scratch, **hyper)
        assert cpu_fused.pi_update(fresh, ids, losses, out=out_fresh, second_out=second_fresh, **hyper)
        assert torch.equal(out_kept, out_fresh) and torch.equal(second_kept, second_fresh), step
        z, sums = scratch["cpu_pi_step"]
        assert z.numel() == n and sums.numel() == n and not sums.any(), step
        kept, fresh = second_kept, second_fresh
    smaller = torch.softmax(torch.randn(100, generator=gen), 0)
    ids = torch.randint(0, 100, (50,), generator=gen)
    assert cpu_fused.pi_update(smaller, ids, torch.rand(50, generator=gen), out=torch.empty(100), scratch=scratch,
                               **hyper)
    assert scratch["cpu_pi_step"][0].numel() == 100 and not scratch["cpu_pi_step"][1].any()


PI_MATH = getattr(cpu_fused._cpu_adam, "pi_math", None)
needs_pi_math = pytest.mark.skipif(PI_MATH is None, reason="the extension has no pi_math (not built, or older)")


def _pi_math(x: torch.Tensor, fn: str, instruction_set: str) -> torch.Tensor:
    try:
        return PI_MATH(x, fn, instruction_set)
    except RuntimeError as exc:
        if "no " + instruction_set + " loops" in str(exc):
            pytest.skip(f"this CPU has no {instruction_set}")
        raise


def _math_inputs(fn: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    if fn == "log":  # positive values over the whole float64 range, subnormals, the float32 pi values, specials
        spread = torch.exp(torch.empty(20000, dtype=torch.float64).uniform_(-740.0, 709.0, generator=gen))
        pis = torch.rand(5000, generator=gen).double()
        specials = [0.0, -0.0, 1.0, 5e-324, 2.2250738585072014e-308, 1e-310, 0.7071067811865476, 1.4142135623730951,
                    math.inf, -1.0, -math.inf, math.nan, 1.7976931348623157e308]
    else:  # x <= 0 down past the subnormal results, and specials
        spread = -torch.empty(20000, dtype=torch.float64).uniform_(0.0, 760.0, generator=gen)
        pis = -torch.rand(5000, generator=gen).double()
        specials = [0.0, -0.0, -1e-300, -708.39, -708.4, -744.4, -745.1, -745.2, -745.6, -1000.0, -math.inf, math.nan]
    return torch.cat([spread, pis, torch.tensor(specials, dtype=torch.float64)])


@needs_pi_math
@pytest.mark.parametrize("fn", ["log", "exp"])
@pytest.mark.parametrize("instruction_set", ["baseline", "avx2", "avx512"])
def test_the_pi_steps_float64_log_and_exp_are_within_one_ulp(fn, instruction_set):
    """The pi step's own float64 log and exp (vectorised loops, no libm call per entry) against Python's math
    module: within one float64 ulp of it everywhere (subnormal results included), the special values exact."""
    x = _math_inputs(fn)
    got = _pi_math(x, fn, instruction_set).tolist()
    ref_fn = math.log if fn == "log" else math.exp
    for value, result in zip(x.tolist(), got):
        if math.isnan(value) or (fn == "log" and value < 0):
            assert math.isnan(result), (value, result)
            continue
        ref = -math.inf if fn == "log" and value == 0 else ref_fn(value)
        if math.isinf(ref) or ref == 0.0:
            assert result == ref or (ref == 0.0 and abs(result) <= 5e-324), (value, result, ref)
            continue
        assert abs(result - ref) <= math.ulp(ref), (value, result, ref)


@needs_pi_math
@pytest.mark.parametrize("instruction_set", ["avx2", "avx512"])
def test_the_pi_steps_log_and_exp_give_the_same_bits_on_every_instruction_set(instruction_set):
    """The wider loops compute what the baseline ones do, bit for bit (no FMA, no approximations), so that the
    pi step's result does not depend on the CPU it ran on; the step itself runs the widest this CPU has."""
    for fn in ("log", "exp"):
        x = _math_inputs(fn)
        wide, base = _pi_math(x, fn, instruction_set), _pi_math(x, fn, "baseline")
        assert torch.equal(wide.view(torch.int64), base.view(torch.int64)), fn
    assert cpu_fused._cpu_adam.pi_instruction_set() in ("baseline", "avx2", "avx512")


@needs_extension
def test_pi_step_bits_do_not_depend_on_the_thread_count():
    """The extension's pi passes run in parallel over chunks of pi: each entry and each block partial is computed
    alike on one thread and on several (three blocks and a tail here), for both updates and the three phases."""
    gen = torch.Generator().manual_seed(7)
    n = 3 * F.PI_BLOCK + 123
    pi = torch.softmax(torch.randn(n, generator=gen), 0)
    ids = torch.randint(0, n, (500,), generator=gen)
    losses = torch.rand(500, generator=gen) * 4
    hyper = dict(pi_lr=0.5, pi_decay=0.1, temperature=0.8, eps=F.FLOAT32_EPS, log_pi_reg=None)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, second = torch.empty_like(pi), torch.empty_like(pi)
            assert cpu_fused.pi_update(pi, ids, losses, out=out, second_out=second, **hyper)
            results.append((out, second))
    finally:
        torch.set_num_threads(before)
    for out, second in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(second, results[0][1])


@needs_extension
def test_sample_weights_and_their_fallbacks():
    pi = torch.softmax(torch.randn(6), 0)
    ids = torch.tensor([0, 5, 3, 3, -1, 6, 2])
    w = cpu_fused.sample_weights(pi, ids, 0.75)
    expected = torch.where((ids >= 0) & (ids < 6), 0.75 * pi[ids.clamp(0, 5)], torch.zeros(()))
    assert torch.equal(w, expected)
    assert cpu_fused.sample_weights(pi, ids.int(), 0.75) is None  # other id dtypes: the reference
    assert cpu_fused.sample_weights(pi, ids[::2], 0.75) is None
    assert not cpu_fused.pi_update(pi, ids.int(), torch.rand(7), out=pi.clone(), pi_lr=0.1, pi_decay=0.0,
                                   temperature=1.0, eps=1e-8)


@needs_extension
def test_value_range_is_torch_aminmax():
    """The host-side value checks' (min, max) from the extension: what torch.aminmax gives, NaN propagated."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(-3, 40, (97,), generator=gen)
    assert cpu_fused.value_range(ids) == tuple(v.item() for v in torch.aminmax(ids))
    assert cpu_fused.value_range(torch.tensor([7])) == (7, 7)
    losses = torch.randn(97, generator=gen) * 1e3
    for special in (None, float("inf"), float("-inf"), float("nan")):
        x = losses.clone()
        if special is not None:
            x[41] = special
        got, want = cpu_fused.value_range(x), tuple(v.item() for v in torch.aminmax(x))
        if special is not None and special != special:
            assert all(v != v for v in got) and all(v != v for v in want)
        else:
            assert got == want
    for other in (ids.int(), losses.double(), losses[::2], losses[:0], losses.view(1, -1)):
        assert cpu_fused.value_range(other) is None  # torch.aminmax then


@needs_extension
def test_value_checks_without_the_extension_ranges(monkeypatch):
    """An extension built before id_range / loss_range: the value checks take torch.aminmax, same errors."""
    monkeypatch.setattr(cpu_fused, "_HAS_RANGES", False)
    assert cpu_fused.value_range(torch.tensor([0, 1])) is None
    W = torch.nn.Parameter(torch.randn(3))
    opt = also_fused.ALSO([W], n_groups=4, batch_size=2, mode="descent-ascent")
    with pytest.raises(ValueError, match=r"got values in \[0, 4\]"):
        opt.weighted_loss(torch.rand(2), torch.tensor([0, 4]))
    (W.sum() * opt.weighted_loss(torch.tensor([1.0, float("nan")]), torch.tensor([0, 1]))).backward()
    before = W.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        opt.step()
    assert torch.equal(W.detach(), before)


def test_reference_backend_checks_values_with_torch_ops_only(monkeypatch):
    """backend="reference" stays plain torch: its value checks never call the extension."""
    def refuse(values):
        raise AssertionError("the reference path called the extension")

    monkeypatch.setattr(cpu_fused, "value_range", refuse)
    W = torch.nn.Parameter(torch.randn(3))
    opt = also_fused.ALSO([W], n_groups=4, batch_size=2, mode="optimistic", backend="reference")
    with pytest.raises(ValueError, match="group_ids must lie"):
        opt.weighted_loss(torch.rand(2), torch.tensor([0, 9]))
    (W.sum() * opt.weighted_loss(torch.rand(2), torch.tensor([0, 3]))).backward()
    opt.step()


@needs_extension
def test_an_extension_without_the_pi_step_leaves_it_to_torch_ops(monkeypatch):
    """An extension built from older sources (no pi_step): the group weights' side runs as torch ops."""
    monkeypatch.setattr(cpu_fused, "_HAS_PI_STEP", False)
    pi, ids = torch.full((4,), 0.25), torch.tensor([0, 3, 1])
    assert cpu_fused.sample_weights(pi, ids, 1.0) is None
    assert not cpu_fused.pi_update(pi, ids, torch.rand(3), out=pi.clone(), pi_lr=0.1, pi_decay=0.0,
                                   temperature=1.0, eps=1e-8)
    for api in ("loop", "closure"):
        check_cpu(Config(mode="optimistic", api=api, steps=20))


# -------------------------------------------------------------------- ALSO vs float64
@needs_extension
@pytest.mark.parametrize("cfg", MATRIX, ids=lambda c: f"{c.mode}-{c.api}-ams{int(c.amsgrad)}-wd{c.weight_decay}")
def test_matrix(cfg):
    check_cpu(cfg)


@needs_extension
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["closure", "loop"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants(name, mode, api):
    check_cpu(Config(mode=mode, api=api, **VARIANTS[name]))


@needs_extension
@pytest.mark.parametrize("mode,api", [("optimistic", "closure"), ("descent-ascent", "closure"),
                                      ("descent-ascent", "loop")])
def test_lr_scheduler_and_group_lrs(mode, api):
    """Two param groups with their own lr under a StepLR schedule (the harness's default groups)."""
    cfg = Config(mode=mode, api=api, scheduler_gamma=0.99, lose_grad_every=4, amsgrad=True)
    _, opt = check_cpu(cfg)
    assert opt.param_groups[0]["lr"] < 1e-2 * 0.99 ** (cfg.steps - 1)
    assert opt.param_groups[0]["lr"] != opt.param_groups[1]["lr"]


@needs_extension
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["closure", "loop"])
def test_group_mean_reduction(mode, api):
    check_cpu(Config(mode=mode, api=api, group_reduction="mean", pi_lr=0.3, lose_grad_every=3))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["closure", "loop"])
def test_low_precision_params(dtype, mode, api):
    """bf16/fp16 params, fp32 state: as near the float64 model as the reference path is (the
    rounding of the stored params dominates; test_also_golden's bound 2e-2 for optimistic mode)."""
    cfg = Config(mode=mode, api=api, dtype=dtype, steps=50)
    golden, x, opt, _ = run(cfg, "cpu", "auto")
    assert opt._backend_for(CPU) == "cpu"
    _, x_ref, _, _ = run(cfg, "cpu", "reference")
    for got, ref, want in zip(x, x_ref, golden.params):
        bound = 2e-2 if mode == "optimistic" else max(2e-2, 1.1 * rel(ref, want))
        assert rel(got, want) <= bound
        assert rel(got, ref) <= 2e-2
    for state in opt.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
        for key in ("iterate", "prev_grad"):
            if key in state:
                assert state[key].dtype == dtype


# --------------------------------------------- one update per step count and param group
STEP_COUNTS = [1, 2, 3, 10, 100, 1000, 10**4, 10**5]
ROWS = [(1e-2, 0.9, 0.999, 1.1920928955078125e-07, 1e-3),
        (3e-3, 0.8, 0.99, 1e-2, 0.0),      # eps comparable to sqrt(v): its placement matters
        (1e-3, 0.3, 0.9, 1e-6, 5e-2)]      # beta1 < 0.5: torch.lerp's other branch


def float64_update(x, g, m, v, t, row, eps_mode):
    """AdamStep of docs/algorithm.md sec. 3 ("also") or torch.optim.Adam's step ("torch") in float64."""
    lr, beta1, beta2, eps, wd = row
    state = dict(t=t - 1, m=m.double(), v=v.double(), vmax=torch.zeros_like(v, dtype=torch.float64))
    if eps_mode == "also":
        return x.double() + adam_delta(state, x.double(), g.double(), lr, (beta1, beta2), eps, wd, False)
    d = g.double() + wd * x.double()
    m1 = beta1 * m.double() + (1 - beta1) * d
    v1 = beta2 * v.double() + (1 - beta2) * d * d
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    return x.double() - lr / bc1 * m1 / (v1.sqrt() / math.sqrt(bc2) + eps)


@pytest.mark.parametrize("eps_mode", ["also", "torch"])
def test_each_step_count_and_param_group_against_float64(eps_mode):
    """One call updates tensors of different step counts and hyper-parameter rows; each update
    agrees to float32 rounding with the float64 step for its own t and row."""
    gen = torch.Generator().manual_seed(3)
    cases = [(t, r) for t in STEP_COUNTS for r in range(len(ROWS))]
    # small |x|: the float32 rounding of x + delta stays far below the tolerance on delta
    xs = [torch.randn(300, generator=gen) * 1e-3 for _ in cases]
    gs = [torch.randn(300, generator=gen) * 1e-2 for _ in cases]
    ms = [torch.randn(300, generator=gen) * 1e-3 for _ in cases]
    vs = [torch.rand(300, generator=gen) * 1e-4 for _ in cases]
    want = [float64_update(x, g, m, v, t, ROWS[r], eps_mode) for x, g, m, v, (t, r) in zip(xs, gs, ms, vs, cases)]
    params = [x.clone() for x in xs]
    steps = [torch.tensor(float(t - 1)) for t, _ in cases]  # the counts before the update
    cpu_fused.adam_update(params, gs, [m.clone() for m in ms], [v.clone() for v in vs], steps, params, ROWS,
                          [r for _, r in cases], eps_mode=eps_mode)
    assert [float(s) for s in steps] == [float(t) for t, _ in cases]
    for got, w, x, case in zip(params, want, xs, cases):
        # the step itself (not just x + step) agrees to a few float32 roundings
        assert rel(got.double() - x.double(), w - x.double()) <= 1e-5, case


# ------------------------------------------------------- every flag against the reference
SIZES = [1, 7, 255, 256, 257, 1000, 100_003]  # block tails, and more than one parallel task
FLAG_SETS = {
    "plain": dict(),
    "torch_eps": dict(eps_mode="torch"),
    "adamw_maximize": dict(eps_mode="torch", decoupled_weight_decay=True, maximize=True),
    "also_decoupled": dict(decoupled_weight_decay=True),
    "scaled_uncommitted": dict(grad_scale=0.5, commit_state=False, save_sources="copy"),
    "extrapolate": dict(extrapolate=True, extrapolation_scale=0.7),
    "extrapolate_in_place": dict(extrapolate=True, in_place=True),
    "prior_saves": dict(prior=True, prior_scale=1.3, save_grads="prior", new_dst=True),
    "saves": dict(save_sources="copy", save_grads="prior"),
    "new_dst_scaled": dict(new_dst=True, grad_scale=0.7),
    "prior_scaled_maximize": dict(prior=True, prior_scale=0.5, grad_scale=2.0, maximize=True),
}


def update_inputs(dtype, amsgrad, spec, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def params():
        return [(torch.randn(n, generator=gen) * 0.5).to(dtype) for n in SIZES]

    x, g, prior = params(), params(), params()
    state = dict(m=[torch.randn(n, generator=gen) * 0.1 for n in SIZES],
                 v=[torch.rand(n, generator=gen) * 0.01 for n in SIZES])
    state["vmax"] = [v * torch.rand(v.shape, generator=gen) * 2 for v in state["v"]] if amsgrad else None
    steps = [torch.tensor(float(5 + i)) for i in range(len(SIZES))]
    return x, g, prior, state, steps


def run_update(fn, dtype, amsgrad, spec):
    """Apply ``fn`` (the reference or cpu_fused.adam_update) to fresh copies; return every output."""
    x, g, prior, state, steps = update_inputs(dtype, amsgrad, spec)
    spec = dict(spec)
    in_place = spec.pop("in_place", False)
    kw = {k: v for k, v in spec.items() if k not in ("extrapolate", "prior", "save_sources", "save_grads", "new_dst")}
    out = dict(x=x, m=state["m"], v=state["v"], vmax=state["vmax"], steps=steps)
    dst = x  # sources updated in place
    if spec.get("extrapolate"):
        if in_place:  # the optimistic loop API's first step: the params are source and target
            dst = out["dst"] = [torch.empty_like(t) for t in x]
            kw["extrapolate_to"] = x
        else:  # later steps: the iterate is updated in place, the params receive the extrapolation
            kw["extrapolate_to"] = out["y"] = [torch.empty_like(t) for t in x]
    elif spec.get("new_dst"):  # the closure API's main step: from the saved x into the params
        dst = out["dst"] = [torch.empty_like(t) for t in x]
    if spec.get("prior"):
        kw["prior_grads"] = prior
        out["prior"] = prior
    if spec.get("save_sources"):
        kw["save_sources_to"] = out["saved_x"] = [torch.empty_like(t) for t in x]
    if spec.get("save_grads") == "prior":
        kw["save_grads_to"] = prior  # aliasing, as the closure API's main step uses it
    hyper = [(1e-2, 0.9, 0.999, 1e-6, 1e-2), (3e-3, 0.8, 0.99, 1e-3, 0.0)]
    rows = [i % 2 for i in range(len(SIZES))]
    fn(x, g, state["m"], state["v"], steps, dst, hyper, rows, max_exp_avg_sqs=state["vmax"], **kw)
    return {k: v for k, v in out.items() if v is not None}


@needs_extension
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(FLAG_SETS))
def test_every_flag_matches_the_reference(name, dtype, amsgrad):
    spec = FLAG_SETS[name]
    want = run_update(F.adam_update_reference, dtype, amsgrad, spec)
    got = run_update(cpu_fused.adam_update, dtype, amsgrad, spec)
    assert got.keys() == want.keys()
    for key in want:
        for a, b in zip(got[key], want[key]):
            assert a.dtype == b.dtype and a.shape == b.shape
            if key in ("saved_x", "prior", "steps"):
                assert torch.equal(a, b), key  # copies and step counts are exact
            elif a.dtype == torch.float32:  # the same float32 formula, some operations rounded differently
                assert_close_in_float32(a, b, key)
            else:  # 16-bit params rounded from those float32 results
                assert_same_rounding(a, b, key)


def run_update_stored(fn, dtype, storage, spec):
    """``run_update`` with the moments stored as ``storage`` (bf16/fp16, or "int8" codes with block scales)."""
    def stored_fn(x, g, m, v, steps, dst, hyper, rows, max_exp_avg_sqs=None, **kw):
        if storage == "int8":
            codes = []
            for values, signed in ((m, True), (v, False)):
                q = [torch.empty(t.shape, dtype=F.QUANT_DTYPES[signed]) for t in values]
                a = [torch.empty(F.quant_blocks(t.numel())) for t in values]
                for t, qt, at in zip(values, q, a):
                    F.quantize_moment_(t, qt, at, signed)
                codes.append((q, a))
            (qm, am), (qv, av) = codes
            fn(x, g, qm, qv, steps, dst, hyper, rows, exp_avg_scales=am, exp_avg_sq_scales=av, **kw)
            stored_out.update(m=qm, v=qv, m_scale=am, v_scale=av)
        else:
            sm, sv = [t.to(storage) for t in m], [t.to(storage) for t in v]
            fn(x, g, sm, sv, steps, dst, hyper, rows, **kw)
            stored_out.update(m=sm, v=sv)

    stored_out: dict = {}
    out = run_update(stored_fn, dtype, False, spec)
    out.update(stored_out)
    return out


@needs_extension
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, "int8"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(FLAG_SETS))
def test_stored_moments_match_the_reference(monkeypatch, name, dtype, storage):
    """Moments stored in 16 bits or as 8-bit codes run the compiled update too (never the reference),
    one float32 rounding from the reference: params and scales within it, 16-bit moments within one
    rounding of their dtype, codes equal but for a rare neighbouring code at a rounding boundary."""
    spec = FLAG_SETS[name]
    want = run_update_stored(F.adam_update_reference, dtype, storage, spec)

    def refuse(*args, **kwargs):
        raise AssertionError("the CPU path fell back to the reference update")

    monkeypatch.setattr(F, "adam_step", refuse)
    got = run_update_stored(cpu_fused.adam_update, dtype, storage, spec)
    assert got.keys() == want.keys()
    for key in want:
        for a, b in zip(got[key], want[key]):
            assert a.dtype == b.dtype and a.shape == b.shape
            if key in ("saved_x", "prior", "steps"):
                assert torch.equal(a, b), key
            elif a.dtype in (torch.int8, torch.uint8):
                diff = (code_rank(a) - code_rank(b)).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01, key
            elif a.dtype == torch.float32:
                assert_close_in_float32(a, b, key)
            else:  # 16-bit params and moments, rounded from float32 results a few ulps apart
                assert_same_rounding(a, b, key)


@needs_extension
@pytest.mark.parametrize("amsgrad", [False, True])
def test_in_memory_and_staged_loops_give_the_same_bits(amsgrad):
    """The optimistic update with the iterate updated in place (the single in-memory loop) and with
    the params as source and extrapolation target (staged through local arrays): same bits."""
    steady = run_update(cpu_fused.adam_update, torch.float32, amsgrad, FLAG_SETS["extrapolate"])
    first = run_update(cpu_fused.adam_update, torch.float32, amsgrad,
                       dict(FLAG_SETS["extrapolate"], in_place=True))
    for key, other in (("x", "dst"), ("y", "x"), ("m", "m"), ("v", "v")) + ((("vmax", "vmax"),) if amsgrad else ()):
        for a, b in zip(steady[key], first[other]):
            assert torch.equal(a, b), key


@needs_extension
def test_uncommitted_update_leaves_the_state_alone():
    x, g, _, state, steps = update_inputs(torch.float32, True, {})
    before = copy.deepcopy(state)
    dst = [torch.empty_like(t) for t in x]
    cpu_fused.adam_update(x, g, state["m"], state["v"], steps, dst, [(1e-2, 0.9, 0.999, 1e-6, 0.0)], [0] * len(x),
                          max_exp_avg_sqs=state["vmax"], commit_state=False)
    for key in before:
        for a, b in zip(state[key], before[key]):
            assert torch.equal(a, b)


def test_commit_state_false_with_extrapolation_is_refused_like_the_reference():
    x, g, prior, state, steps = update_inputs(torch.float32, False, {})
    for fn in (F.adam_update_reference, cpu_fused.adam_update):
        with pytest.raises(ValueError, match="commit_state"):
            fn(x, g, state["m"], state["v"], steps, x, [(1e-2, 0.9, 0.999, 1e-6, 0.0)], [0] * len(x),
               prior_grads=prior, commit_state=False)


@needs_extension
def test_unsupported_inputs_run_the_reference():
    """A layout the kernel does not take (a non-contiguous moment) leaves it untouched and the
    update to the reference: the result is bitwise the reference's."""
    def inputs():
        gen = torch.Generator().manual_seed(0)
        x = [torch.randn(6, 4, generator=gen)]
        g = [torch.randn(6, 4, generator=gen)]
        m = [torch.randn(4, 6, generator=gen).t()]  # strided view
        v = [torch.rand(6, 4, generator=gen)]
        return x, g, m, v, [torch.tensor(3.0)]

    hyper, rows = [(1e-2, 0.9, 0.999, 1e-6, 1e-2)], [0]
    for eps_mode in ("also", "torch"):
        x1, g1, m1, v1, s1 = inputs()
        F.adam_update_reference(x1, g1, m1, v1, s1, x1, hyper, rows, eps_mode=eps_mode)
        x2, g2, m2, v2, s2 = inputs()
        before = [t.clone() for t in x2 + m2 + v2]
        args = (x2, g2, m2, v2, [], s2, x2, hyper, rows, eps_mode == "also", False, False, 1.0, [], [], [], 1.0, [],
                1.0, True, [], [], [])
        if getattr(also_fused._cpu_adam, "stochastic_rounding", False):
            args += ([],)  # no rounding seeds
        assert also_fused._cpu_adam.adam_update(*args) is False
        assert all(torch.equal(a, b) for a, b in zip(x2 + m2 + v2, before))
        cpu_fused.adam_update(x2, g2, m2, v2, s2, x2, hyper, rows, eps_mode=eps_mode)
        assert torch.equal(x2[0], x1[0]) and torch.equal(m2[0], m1[0]) and torch.equal(v2[0], v1[0]), eps_mode
        assert torch.equal(s2[0], s1[0]), eps_mode


# ------------------------------------------------------------------ Adam / AdamW drop-ins
def run_against(ours_cls, theirs, kwargs, steps=100, grouped=False, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in dropin.shapes() + [(300, 257)]]
    ours = [torch.nn.Parameter(t.clone().to(dtype)) for t in init]
    ref = [torch.nn.Parameter(t.clone().to(dtype)) for t in init]

    def groups(ps):
        if not grouped:
            return ps
        return [dict(params=ps[:2], lr=1e-2), dict(params=ps[2:], lr=1e-3, weight_decay=0.2)]

    opt_a = ours_cls(groups(ours), backend="auto", **kwargs)
    opt_b = theirs(groups(ref), **kwargs)
    assert opt_a._backend_for(CPU) == "cpu"
    for _ in range(steps):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    return ours, ref, opt_a, opt_b


@needs_extension
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("kwargs", dropin.CASES, ids=str)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_dropins_match_torch(name, kwargs, grouped):
    """Against torch.optim's single-tensor path (test_adam_dropin's tolerance), and bitwise against
    its fused CPU path, whose kernel the float32 drop-ins call."""
    ours, ref, _, _ = run_against(getattr(also_fused, name),
                                  lambda ps, **kw: getattr(torch.optim, name)(ps, foreach=False, **kw), kwargs,
                                  grouped=grouped)
    dropin.assert_close(ours, ref)
    if cpu_fused.torch_fused_available():
        ours, fused, _, _ = run_against(getattr(also_fused, name),
                                        lambda ps, **kw: getattr(torch.optim, name)(ps, fused=True, **kw), kwargs,
                                        grouped=grouped)
        for a, b in zip(ours, fused):
            assert torch.equal(a, b)


@needs_extension
@pytest.mark.parametrize("kwargs", dropin.CASES, ids=str)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_dropins_without_torch_fused_kernel(monkeypatch, name, kwargs):
    """A torch without the fused CPU kernel: the extension computes torch's formula instead."""
    monkeypatch.setattr(cpu_fused, "_torch_fused_ok", False)
    ours, ref, _, _ = run_against(getattr(also_fused, name),
                                  lambda ps, **kw: getattr(torch.optim, name)(ps, foreach=False, **kw), kwargs)
    dropin.assert_close(ours, ref)


@needs_extension
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_dropins_bf16_params_follow_the_reference(name):
    """bf16 params with float32 state (the extension) stay with the reference path's trajectory."""
    ours, ref, _, _ = run_against(getattr(also_fused, name),
                                  lambda ps, **kw: getattr(also_fused, name)(ps, backend="reference", **kw),
                                  dict(weight_decay=0.05, amsgrad=True), dtype=torch.bfloat16)
    for a, b in zip(ours, ref):
        assert rel(a.detach().float(), b.detach().float()) <= 2e-2


# ----------------------------------------------------------------------- bitwise resume
@needs_extension
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["closure", "loop"])
def test_resume_is_bitwise(api, mode, amsgrad):
    resume_is_bitwise(api, mode, amsgrad, backend="auto", device="cpu")


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_dropin_resume_is_bitwise(name, dtype):
    k, more = 20, 30
    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=gen).to(dtype) for s in dropin.shapes()]
    grads = [[torch.randn(t.shape, generator=gen).to(dtype) for t in init] for _ in range(k + more)]

    def stepped(params, opt, rounds):
        for gs in rounds:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    kw = dict(amsgrad=True, weight_decay=0.05)
    full = [torch.nn.Parameter(t.clone()) for t in init]
    opt = getattr(also_fused, name)(full, **kw)
    stepped(full, opt, grads)
    half = [torch.nn.Parameter(t.clone()) for t in init]
    opt2 = getattr(also_fused, name)(half, **kw)
    stepped(half, opt2, grads[:k])
    saved = copy.deepcopy(opt2.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in half]
    opt3 = getattr(also_fused, name)(resumed, **kw)
    opt3.load_state_dict(saved)
    stepped(resumed, opt3, grads[k:])
    for a, b in zip(resumed, full):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------- bad input
def _bad_input_params():
    out = []
    for case in bad_inputs.CASES:
        if "reference" not in case.backends or case.cuda_only:
            continue
        for mode in bad_inputs.MODES:
            label = case.name + (f"-{case.api}" if case.api else "")
            marks = [needs_extension]
            if case.xfail and case.xfail_if("reference", mode):
                marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
            out.append(pytest.param(case, mode, id=f"{label}-{mode}", marks=marks))
    return out


@pytest.mark.skipif(bad_inputs.DEVICE != "cpu", reason="the matrix builds its tensors on the test device")
@pytest.mark.parametrize("case,mode", _bad_input_params())
def test_bad_input(case, mode):
    """test_bad_input_matrix on the fast path: clear errors, the optimizer unchanged, then bitwise
    the twin that never saw the bad input."""
    bad_inputs.check_bad_input(case, "auto", mode)


# ----------------------------------------------------------------------------- fallback
def test_missing_extension_falls_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpu_fused, "_cpu_adam", None)
    monkeypatch.setattr(cpu_fused, "_IMPORT_ERROR", "ImportError: not built")
    monkeypatch.setattr(backends.FALLBACK_WARNINGS, "warned", set())
    with pytest.warns(UserWarning, match="fast CPU path unavailable.*not built"):
        opt = also_fused.ALSO([torch.nn.Parameter(torch.randn(3))], n_groups=2, batch_size=2)
    assert opt._backend_for(CPU) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adam = also_fused.Adam([torch.nn.Parameter(torch.randn(3))])
    assert adam._backend_for(CPU) == "reference"
    # and the reference path runs: the same trajectory as backend="reference"
    cfg = Config(mode="optimistic", api="loop", steps=20 if SHORT else 40, lose_grad_every=3)
    _, x_auto, o_auto, _ = run(cfg, "cpu", "auto")
    _, x_ref, o_ref, _ = run(cfg, "cpu", "reference")
    for a, b in zip(x_auto, x_ref):
        assert torch.equal(a, b)
    assert torch.equal(o_auto.pi, o_ref.pi)
