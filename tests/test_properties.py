"""Property tests (hypothesis) of the Triton kernels against the pure-torch reference functions.

* ``multi_tensor_adam_``  vs ``functional.adam_update_reference``
* ``group_pi.pi_update``  vs ``functional.pi_update_reference``
* ``losses.weighted_loss`` / ``losses.rgd_loss`` vs ``functional.weighted_loss_reference`` /
  ``rgd_loss_reference``, forward and backward (and against float64 sums of the same inputs)

Without CUDA the kernels run on CPU tensors in Triton's interpreter with small sizes and few
examples; on CUDA the sizes and the example counts are larger. Every tolerance is an element-wise
error bound derived in the comment next to it from the float32 (or 16-bit) roundings that the two
implementations may do differently; none is a fitted constant.
"""
from __future__ import annotations

import math

import pytest
import torch

from support import DEVICE, SHORT

pytest.importorskip("triton")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from also_fused import functional as F  # noqa: E402
from also_fused.kernels import group_pi  # noqa: E402
from also_fused.kernels.losses import rgd_loss, weighted_loss  # noqa: E402
from also_fused.kernels.multi_tensor_adam import hyper_table, multi_tensor_adam_  # noqa: E402

pytestmark = pytest.mark.slow  # hundreds of hypothesis examples through the interpreter

ON_GPU = DEVICE == "cuda"

# examples per property: small in the interpreter (CI, 2 CPU cores), more on the GPU
N_ADAM = 300 if ON_GPU else 200
N_PI = 400 if ON_GPU else 250
N_LOSS = 300 if ON_GPU else 150
if SHORT:
    N_ADAM = N_PI = N_LOSS = 20
MAX_NUMEL = 100_000 if ON_GPU else 5000  # elements of one Adam tensor
MAX_GROUPS = 300_000 if ON_GPU else 2000
MAX_PI_BATCH = 5000 if ON_GPU else 300
MAX_LOSS_BATCH = 100_000 if ON_GPU else 5000

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

U32 = 2.0 ** -24  # unit roundoff of float32 (round to nearest)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MANT = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}  # explicit mantissa bits
# smallest spacing of each dtype (its subnormal step): the absolute floor of a one-spacing bound
TINY = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}
# How many spacings of the stored dtype two correct results may differ by. float32: both sides
# round the same float32 arithmetic to nearest, so one spacing. 16-bit: the interpreter's
# float32 -> bfloat16 cast truncates where torch rounds to nearest (up to one spacing apart), and
# a float32 value within the float32 error of a rounding boundary may go either way (one more).
N_SPACINGS = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}


def spacing(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An upper bound of the distance between neighbouring values of ``dtype`` around |a| (float64)."""
    return torch.clamp(a.abs() * 2.0 ** -MANT[dtype], min=TINY[dtype])


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)  # stays on its device: the bounds are computed there


def assert_within(out: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    out, ref = f64(out), f64(ref)
    assert out.shape == ref.shape, what
    assert not torch.isnan(out).any(), f"{what}: NaN (an element left unwritten?)"
    err = (out - ref).abs()
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {out.numel()} outside the bound, worst "
                           f"err/tol {float((err / tol.clamp_min(1e-300)).max()):.3g}, out "
                           f"{out[bad][:3].tolist()} ref {ref[bad][:3].tolist()}")


# =========================================================================== multi-tensor Adam
SHAPES = st.one_of(
    st.just(()),  # 0-d
    st.just((1,)),
    st.integers(0, MAX_NUMEL).map(lambda n: (n,)),
    st.sampled_from([1023, 1024, 1025, 2047, 2049, 4097]).map(lambda n: (n,)),  # around the 1024 block
    st.tuples(st.integers(1, 30), st.integers(1, 70)),
)
STRUCTURES = ("plain", "no_commit", "prior", "extrapolate", "prior+extrapolate")


def hyper_rows(draw, dtype):
    # 16-bit params need steps of several spacings to see anything: larger lr there. A large eps
    # makes the two eps placements differ visibly; beta1 = 0 has log(beta1) = -inf in the table.
    lrs = [1e-3, 1e-2, 0.1] if dtype == torch.float32 else [0.05, 0.3, 1.0]
    row = st.tuples(st.sampled_from(lrs), st.sampled_from([0.0, 0.5, 0.9]),
                    st.sampled_from([0.9, 0.99, 0.999]), st.sampled_from([1e-8, F.FLOAT32_EPS, 1e-3, 0.1]),
                    st.sampled_from([0.0, 1e-2, 0.1]))
    return draw(st.lists(row, min_size=1, max_size=3))


def _moments64(x, d, m, v, vmax, b1, b2, wd, decoupled):
    if not decoupled:
        d = d + wd * x
    m = b1 * m + (1 - b1) * d
    v = b2 * v + (1 - b2) * d * d
    return m, v, None if vmax is None else torch.maximum(vmax, v)


def _step_scalars64(lr, b1, b2, eps, t, eps_mode, vd):
    bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    if eps_mode == "also":
        return lr * math.sqrt(bc2) / bc1, vd.sqrt() + eps, 1.0
    return lr / bc1, vd.sqrt() / math.sqrt(bc2) + eps, math.sqrt(bc2)


def adam_tolerances(x, advances, m0, v0, vmax0, row, t, flags, dtype, out_ref, out_k):
    """Element-wise bound of |kernel - reference| for the result of the LAST advance in ``advances``.

    ``advances``: list of (x_k, d_k) in float64 (x_k the point where the decay term is taken, d_k
    the scaled raw gradient). Returns (tol_x, tol_m, tol_v). Derivation, u = 2^-24:
      * one moment advance: d' = d + wd x (error <= 2u D, D = |d| + wd |x|), m via lerp (error
        <= 4u (|m| + D)), v = b2 v + (1-b2) d'^2 (error <= 3u v + (1-b2) 6u D^2); the betas
        contract earlier errors, so n advances give tol_m = 8u n (|m0| + sum D),
        tol_v = 8u n (v0 + (1-b2) sum D^2) (vmax = max(vmax0, v) keeps the v bound);
      * the update u_x = ss * m / denom: m's error gives ss tol_m / denom, the denominator's
        (from sqrt of v +- tol_v, at most min(tol_v / (2 sqrt v), sqrt tol_v)) ss |m| dden / denom^2,
        and the step scalars (float32 expm1, sqrt, division in the kernel; float64 then float32 in
        torch) at most 4e-6 |u_x| (~64 ulps);
      * the float32 roundings of x (decay factor, subtraction): 4u |x|;
      * the stored result: N_SPACINGS spacings of the param dtype.
    """
    lr, b1, b2, eps, wd = row
    decoupled, amsgrad, eps_mode = flags["decoupled_weight_decay"], flags["amsgrad"], flags["eps_mode"]
    n = len(advances)
    m, v, vmax = m0, v0, vmax0
    d_sum = torch.zeros_like(x)
    d2_sum = torch.zeros_like(x)
    for xk, dk in advances:
        D = dk.abs() + (0.0 if decoupled else wd * xk.abs())
        d_sum, d2_sum = d_sum + D, d2_sum + D * D
        m, v, vmax = _moments64(xk, dk, m, v, vmax, b1, b2, wd, decoupled)
    tol_m = 8 * U32 * n * (m0.abs() + d_sum)
    tol_v = 8 * U32 * n * (v0 + (1 - b2) * d2_sum)
    vd = vmax if amsgrad else v
    ss, denom, div = _step_scalars64(lr, b1, b2, eps, t, eps_mode, vd)
    dsq = torch.minimum(tol_v / (2 * vd.sqrt()).clamp_min(1e-300), tol_v.sqrt())
    dden = dsq / div + 2 * U32 * denom
    upd = ss * m / denom
    e_upd = ss * (tol_m / denom + m.abs() * dden / denom ** 2) + 4e-6 * upd.abs()
    x_last = advances[-1][0]
    tol_x = (e_upd + 4 * U32 * x_last.abs()
             + N_SPACINGS[dtype] * spacing(torch.maximum(f64(out_ref).abs(), f64(out_k).abs()), dtype))
    return tol_x, tol_m, tol_v


@settings(max_examples=N_ADAM, **SETTINGS)
@given(data=st.data())
def test_multi_tensor_adam_matches_reference(data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES), label="dtype")
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=6), label="shapes")
    rows = hyper_rows(draw, dtype)
    structure = draw(st.sampled_from(STRUCTURES), label="structure")
    prior = "prior" in structure
    extrap = "extrapolate" in structure
    flags = dict(eps_mode=draw(st.sampled_from(["also", "torch"]), label="eps_mode"),
                 decoupled_weight_decay=draw(st.booleans(), label="decoupled"),
                 maximize=draw(st.booleans(), label="maximize"),
                 grad_scale=draw(st.sampled_from([1.0, 0.5, 3.0, 2.0 ** -10]), label="grad_scale"),
                 commit_state=structure != "no_commit")
    amsgrad = draw(st.booleans(), label="amsgrad")
    if prior:
        flags["prior_scale"] = draw(st.sampled_from([1.0, 0.7]), label="prior_scale")
    if extrap:
        flags["extrapolation_scale"] = draw(st.sampled_from([1.0, 0.5, 2.0]), label="extrapolation_scale")
    save_src = draw(st.booleans(), label="save_sources_to")
    save_grad = draw(st.booleans(), label="save_grads_to")
    alias = prior and save_grad and draw(st.booleans(), label="save_grads_to is prior_grads")
    separate_dst = draw(st.booleans(), label="separate destinations")
    fresh = draw(st.booleans(), label="zero moments")
    gmag = draw(st.sampled_from([1e-3, 1.0, 100.0]), label="grad magnitude")
    n_calls = draw(st.integers(1, 3), label="calls")
    static = draw(st.booleans(), label="static_lists")
    seed = draw(st.integers(0, 2 ** 31 - 1), label="seed")

    numel = sum(math.prod(s) for s in shapes)
    event(f"adam: {dtype}, {structure}, {numel // 1024 * 1024}+ elements")
    gen = torch.Generator().manual_seed(seed)
    nt = len(shapes)
    n_adv = 1 + prior + extrap
    hrows = [int(torch.randint(0, len(rows), (), generator=gen)) for _ in range(nt)]

    def rnd(shape, scale=1.0, kind="n"):
        t = torch.randn(shape, generator=gen) if kind == "n" else torch.rand(shape, generator=gen)
        return (t * scale).to(DEVICE)

    def pdt(t):
        return t.to(dtype)

    x_k = [pdt(rnd(s)) for s in shapes]
    m_k = [torch.zeros(s, device=DEVICE) if fresh else rnd(s, 0.1) for s in shapes]
    v_k = [torch.zeros(s, device=DEVICE) if fresh else rnd(s, 0.01, "u") for s in shapes]
    vmax_k = [v + (0.0 if fresh else rnd(v.shape, 0.01, "u")) for v in v_k] if amsgrad else None
    steps = [torch.tensor(float(n_adv + (0 if fresh else int(torch.randint(0, 1000, (), generator=gen)))),
                          device=DEVICE) for _ in shapes]
    prior_k = [pdt(rnd(s, gmag)) for s in shapes] if prior else None

    def side():
        """The reference's own tensors (the list objects stay the same across calls, as the optimizer's)."""
        return dict(x=[t.clone() for t in x_k], m=[t.clone() for t in m_k], v=[t.clone() for t in v_k],
                    vmax=[t.clone() for t in vmax_k] if amsgrad else None,
                    prior=[t.clone() for t in prior_k] if prior else None)

    ref = side()
    kern = dict(x=x_k, m=m_k, v=v_k, vmax=vmax_k, prior=prior_k)
    for s in (ref, kern):
        s["dst"] = [torch.empty_like(t) for t in s["x"]] if separate_dst else s["x"]
        s["ext"] = [torch.empty_like(t) for t in s["x"]] if extrap else None
        s["ssrc"] = [torch.empty_like(t) for t in s["x"]] if save_src else None
        s["sgrad"] = (s["prior"] if alias else [torch.empty_like(t) for t in s["x"]]) if save_grad else None
    table = hyper_table(rows, DEVICE)
    cache: dict = {}

    def lists(s):
        return dict(max_exp_avg_sqs=s["vmax"], save_sources_to=s["ssrc"], save_grads_to=s["sgrad"],
                    extrapolate_to=s["ext"], prior_grads=s["prior"])

    for call in range(n_calls):
        # the reference starts every call from the kernel's state: each call is checked on its own
        for name in ("x", "m", "v", "vmax", "prior"):
            if ref[name] is not None:
                for a, b in zip(ref[name], kern[name]):
                    a.copy_(b)
        if prior and call > 0 and not alias:
            for a, b in zip(kern["prior"], ref["prior"]):
                a.copy_(pdt(rnd(a.shape, gmag)))
                b.copy_(a)
        for s in (ref, kern):
            for name in ("ext", "ssrc") + (() if alias else ("sgrad",)) + (("dst",) if separate_dst else ()):
                for t in s[name] or ():
                    t.fill_(float("nan"))
        grads = [pdt(rnd(s, gmag)) for s in shapes]  # new gradient tensors on every call
        snap = {k: [f64(t) for t in kern[k]] if kern[k] is not None else None for k in ("x", "m", "v", "vmax", "prior")}
        g64 = [f64(g) for g in grads]

        # both paths advance the counts they are given (when committing): the reference gets copies
        t_before = [float(s) for s in steps]
        ref_steps = [s.clone() for s in steps]
        F.adam_update_reference(ref["x"], grads, ref["m"], ref["v"], ref_steps, ref["dst"], rows, hrows,
                                **lists(ref), **flags)
        multi_tensor_adam_(kern["x"], grads, kern["m"], kern["v"], steps, kern["dst"], table, hrows,
                           **lists(kern), **flags, cache=cache, static_lists=static)
        advanced = n_adv if flags["commit_state"] else 0
        assert [float(s) for s in steps] == [float(s) for s in ref_steps] == [t + advanced for t in t_before]

        y_half = half = None
        if extrap:
            # The reference re-run as its two halves: the main update (from the counts before the
            # call), then the extrapolation (from one count more) from the KERNEL's stored x1,
            # so that y is compared from the same rounded input; its moments then match the
            # kernel's final ones as well.
            half = dict(m=[s.to(DEVICE, torch.float32) for s in snap["m"]],
                        v=[s.to(DEVICE, torch.float32) for s in snap["v"]],
                        vmax=[s.to(DEVICE, torch.float32) for s in snap["vmax"]] if amsgrad else None)
            main_flags = {k: v for k, v in flags.items() if k != "extrapolation_scale"}
            x_tmp = [s.to(DEVICE, dtype) for s in snap["x"]]
            F.adam_update_reference(x_tmp, grads, half["m"], half["v"], [torch.tensor(t) for t in t_before],
                                    [torch.empty_like(t) for t in x_tmp], rows, hrows, max_exp_avg_sqs=half["vmax"],
                                    prior_grads=[s.to(DEVICE, dtype) for s in snap["prior"]] if prior else None,
                                    **main_flags)
            second = {k: v for k, v in flags.items() if k not in ("extrapolation_scale", "prior_scale")}
            second["grad_scale"] = flags["extrapolation_scale"]
            y_half = [torch.empty_like(t) for t in x_tmp]
            F.adam_update_reference([t.clone() for t in kern["dst"]], grads, half["m"], half["v"],
                                    [torch.tensor(t + n_adv - 1) for t in t_before], y_half,
                                    rows, hrows, max_exp_avg_sqs=half["vmax"], **second)

        tflags = dict(flags, amsgrad=amsgrad)
        sign = -1.0 if flags["maximize"] else 1.0
        for i in range(nt):
            row = rows[hrows[i]]
            t = t_before[i] + n_adv  # the count of the last moment advance
            x0 = snap["x"][i]
            adv = []
            if prior:
                adv.append((x0, sign * flags["prior_scale"] * snap["prior"][i]))
            adv.append((x0, sign * flags["grad_scale"] * g64[i]))
            vmax0 = snap["vmax"][i] if amsgrad else None
            t_main = t - 1 if extrap else t
            tol_x, tol_m, tol_v = adam_tolerances(x0, adv, snap["m"][i], snap["v"][i], vmax0, row, t_main,
                                                  tflags, dtype, ref["dst"][i], kern["dst"][i])
            what = f"call {call} tensor {i} shape {tuple(shapes[i])}"
            assert_within(kern["dst"][i], ref["dst"][i], tol_x, f"x1 {what}")
            if separate_dst:
                assert torch.equal(f64(kern["x"][i]), x0), f"source modified, {what}"
            if save_src:
                assert torch.equal(f64(kern["ssrc"][i]), x0), f"save_sources_to, {what}"
            if save_grad:
                assert torch.equal(f64(kern["sgrad"][i]), g64[i]), f"save_grads_to, {what}"
            if extrap:
                x1 = f64(kern["dst"][i])
                adv.append((x1, sign * flags["extrapolation_scale"] * g64[i]))
                tol_y, tol_m, tol_v = adam_tolerances(x0, adv, snap["m"][i], snap["v"][i], vmax0, row, t,
                                                      tflags, dtype, y_half[i], kern["ext"][i])
                assert_within(kern["ext"][i], y_half[i], tol_y, f"extrapolated y {what}")
                # where both x1 agree bitwise, the one-call reference is the same computation
                same = x1 == f64(ref["dst"][i])
                assert_within(f64(kern["ext"][i])[same], f64(ref["ext"][i])[same], tol_y[same],
                              f"extrapolated y vs one-call reference {what}")
                for name, tol in (("m", tol_m), ("v", tol_v)) + ((("vmax", tol_v),) if amsgrad else ()):
                    assert_within(f64(kern[name][i])[same], f64(ref[name][i])[same], tol[same],
                                  f"{name} vs one-call reference {what}")
            if flags["commit_state"]:
                mine = half if extrap else ref
                assert_within(kern["m"][i], mine["m"][i], tol_m, f"exp_avg {what}")
                assert_within(kern["v"][i], mine["v"][i], tol_v, f"exp_avg_sq {what}")
                if amsgrad:
                    assert_within(kern["vmax"][i], mine["vmax"][i], tol_v, f"max_exp_avg_sq {what}")
            else:
                assert torch.equal(f64(kern["m"][i]), snap["m"][i]), f"exp_avg written, {what}"
                assert torch.equal(f64(kern["v"][i]), snap["v"][i]), f"exp_avg_sq written, {what}"
                if amsgrad:
                    assert torch.equal(f64(kern["vmax"][i]), snap["vmax"][i]), f"max_exp_avg_sq written, {what}"
        for s in steps:  # the caller advances t before every call
            s += n_adv


# ================================================================================== pi step
def rand_simplex(n, gen, spread):
    return torch.softmax(spread * torch.randn(n, generator=gen, dtype=torch.float64), 0).float()


def pi_tolerance(pi, ids, losses, hp, log_pi_reg, ref):
    """Element-wise bound of |kernel - reference| for PiUpdate (the reference works in float64).

    With L_j = |log(pi_j + eps)| + c |log pi_reg_j| + pi_lr |S_j| and a = 1 / ((1 + c) T), the
    kernel's float32 logit y_j = a (log(pi_j + eps) + c log pi_reg_j + pi_lr S_j) carries an
    absolute error of a few u (1 + a L_j), and so does y_j - M (|M| <= a max L). exp turns that
    absolute error into a relative one of r_j; the normaliser Z adds the r-weighted mean of those
    relative errors; storing the float64 reference as float32 one u more. 8u per term covers the
    float32 log/exp/sum roundings (S_j is a float32 sum of at most a few hundred terms, whose
    error u * sum |l_i| <= u |S|-scale is also inside pi_lr L_j at the same order). Entries below
    1e-37 may be flushed or subnormal on either side.
    """
    n = pi.numel()
    c = hp["pi_decay"] * hp["pi_lr"]
    a = 1.0 / ((1.0 + c) * hp["temperature"])
    S = torch.zeros(n, dtype=torch.float64, device=pi.device)
    S_abs = torch.zeros(n, dtype=torch.float64, device=pi.device)
    ids_c = ids.long()
    S.index_add_(0, ids_c, f64(losses))
    S_abs.index_add_(0, ids_c, f64(losses).abs())
    L = (torch.log(f64(pi) + hp["eps"]).abs() + hp["pi_lr"] * S_abs
         + (0.0 if log_pi_reg is None else c * f64(log_pi_reg).abs()))
    rel = 8 * U32 * (1 + a * (L + L.max()))
    r = f64(ref)
    zrel = float((r * rel).sum())
    return r * (rel + zrel + U32) + 1e-37


@settings(max_examples=N_PI, **SETTINGS)
@given(data=st.data())
def test_pi_update_matches_reference(data):
    draw = data.draw
    # half the examples on the single-program path (n <= SMALL_MAX), half on the large ones
    large = draw(st.booleans(), label="n_groups > SMALL_MAX")
    n = draw(st.integers(group_pi.SMALL_MAX + 1, MAX_GROUPS) if large else st.integers(1, group_pi.SMALL_MAX),
             label="n_groups")
    B = draw(st.one_of(st.integers(0, 2), st.integers(0, MAX_PI_BATCH)), label="batch")
    pool = draw(st.sampled_from(["one id", "few ids", "any id"]), label="ids")
    hp = dict(pi_lr=draw(st.sampled_from([1e-3, 0.1, 1.0]), label="pi_lr"),
              pi_decay=draw(st.sampled_from([0.0, 1e-2, 1.0]), label="pi_decay"),
              temperature=draw(st.sampled_from([0.25, 0.5, 1.0, 3.0]), label="temperature"),
              eps=draw(st.sampled_from([F.FLOAT32_EPS, 1e-3]), label="eps"))
    loss_max = draw(st.sampled_from([0.0, 1.0, 10.0]), label="loss scale")
    signed = draw(st.booleans(), label="signed losses")
    ldtype = draw(st.sampled_from(DTYPES), label="loss dtype")
    idtype = draw(st.sampled_from([torch.int64, torch.int32]), label="id dtype")
    spread = draw(st.sampled_from([0.0, 1.0, 4.0]), label="pi spread")
    second = draw(st.booleans(), label="second_out")
    in_place = draw(st.booleans(), label="out is pi")
    path = None
    if n > group_pi.SMALL_MAX:
        path = draw(st.sampled_from(["sparse", "dense", None]), label="path")
    # the sparse variant assumes a uniform pi_reg (the launcher never picks it otherwise)
    reg_kind = "uniform" if path == "sparse" else draw(st.sampled_from(["uniform", "non-uniform"]), label="pi_reg")
    seed = draw(st.integers(0, 2 ** 31 - 1), label="seed")

    gen = torch.Generator().manual_seed(seed)
    pi = rand_simplex(n, gen, spread).to(DEVICE)
    k = {"one id": 1, "few ids": min(n, 7), "any id": n}[pool]
    chosen = torch.randperm(n, generator=gen)[:k]
    ids = chosen[torch.randint(0, k, (B,), generator=gen)].to(DEVICE, idtype)
    lo = -loss_max if signed else 0.0
    losses = (lo + (loss_max - lo) * torch.rand(B, generator=gen)).to(DEVICE, ldtype)
    log_pi_reg = None
    if reg_kind == "non-uniform":
        log_pi_reg = torch.log(rand_simplex(n, gen, 1.0)).to(DEVICE)
    a = 1.0 / ((1.0 + hp["pi_decay"] * hp["pi_lr"]) * hp["temperature"])
    if path == "sparse" and (log_pi_reg is not None or not group_pi._sparse_is_exact(n, B, a, hp["eps"])):
        path = None  # the sparse variant is only exact under the bound the launcher checks itself

    event(f"pi: {'small' if n <= group_pi.SMALL_MAX else 'large'} n, path {path}, batch {'>=10' if B >= 10 else B}")
    ref = F.pi_update_reference(pi, ids, losses, log_pi_reg=log_pi_reg, **hp)
    pi_in = pi.clone()
    out = pi if in_place else torch.full_like(pi, float("nan"))
    out2 = torch.full_like(pi, float("nan")) if second else None
    got = group_pi.pi_update(pi, ids, losses, log_pi_reg=log_pi_reg, out=out, second_out=out2, _path=path, **hp)
    assert got is out
    if not in_place:
        assert torch.equal(pi, pi_in), "pi modified"
    assert torch.isfinite(out).all() and bool((out >= 0).all())
    assert_within(out, ref, pi_tolerance(pi_in, ids, losses, hp, log_pi_reg, ref), "PiUpdate")
    if second:
        # the second update starts from the kernel's own stored first result
        ref2 = F.pi_update_reference(out, ids, losses, log_pi_reg=log_pi_reg, **hp)
        assert_within(out2, ref2, pi_tolerance(out, ids, losses, hp, log_pi_reg, ref2), "second_out")


# ================================================================================== losses
def sum_bound(B: int) -> float:
    """Relative (to sum |terms|) error bound of a float32 sum of B terms done as a blocked/tree
    reduction: the kernels add at most B/1024 + 16 values serially per lane, then a tree of depth
    <= 10 over the lanes and <= 7 over the programs; torch's sums are cascaded/tree reductions
    too. gamma_k ~ k u, k = 64 + B/256 covers both with room."""
    return (64 + B / 256) * U32


@settings(max_examples=N_LOSS, **SETTINGS)
@given(data=st.data())
def test_weighted_loss_matches_reference(data):
    draw = data.draw
    n = draw(st.integers(1, 2000), label="n_groups")
    B = draw(st.one_of(st.integers(0, 3), st.integers(0, MAX_LOSS_BATCH), st.integers(1025, MAX_LOSS_BATCH)),
             label="batch")
    dtype = draw(st.sampled_from(DTYPES), label="loss dtype")
    idtype = draw(st.sampled_from([torch.int64, torch.int32]), label="id dtype")
    scale = draw(st.sampled_from([1.0, 0.37, float(n) / max(B, 1)]), label="loss_scale")
    chunk = draw(st.sampled_from([None, 1024, 4096]), label="chunk")  # small chunks: several programs
    upstream = draw(st.sampled_from([1.0, -0.5, 3.0]), label="upstream gradient")
    seed = draw(st.integers(0, 2 ** 31 - 1), label="seed")

    gen = torch.Generator().manual_seed(seed)
    pi = torch.rand(n, generator=gen).to(DEVICE)
    ids = torch.randint(0, n, (B,), generator=gen).to(DEVICE, idtype)
    l0 = (torch.rand(B, generator=gen) * 5).to(DEVICE, dtype)
    kw = {} if chunk is None else {"_chunk": chunk}
    event(f"weighted_loss: {'one program' if B <= (chunk or 1 << 16) else 'several programs'}")

    lk = l0.clone().requires_grad_(True)
    out = weighted_loss(pi, ids, lk, scale, **kw)
    (out * upstream).backward()
    lr_ = l0.clone().requires_grad_(True)
    ref = F.weighted_loss_reference(pi, ids.long(), lr_, scale)
    (ref * upstream).backward()
    assert out.dtype == torch.float32 and out.dim() == 0 and lk.grad.dtype == dtype

    terms = scale * f64(pi)[ids.long()] * f64(l0)
    t_abs = float(terms.abs().sum())
    exact = float(terms.sum())
    # the kernel sums float32 products of the exact inputs: sum_bound, plus u for the product and
    # for the scale
    assert abs(float(out.detach()) - exact) <= (sum_bound(B) + 2 * U32) * t_abs + 1e-30
    # the reference rounds pi to the losses' dtype, the products and the sum to that dtype too
    # (2^-mant relative per term for two roundings to nearest, 2^-mant of the result once more)
    q = 0.0 if dtype == torch.float32 else 2.0 ** -MANT[dtype]
    tol = (2 * sum_bound(B) + 4 * U32 + q) * t_abs + (q + U32) * abs(float(ref.detach())) + 1e-30
    assert abs(float(out.detach()) - float(ref.detach())) <= tol
    # d/dl_i = upstream * scale * pi[g_i]: the reference rounds upstream*scale, pi and the product
    # to the dtype (three roundings), the kernel the float32 product once (truncated in the
    # interpreter for bfloat16): 3 + 1 spacings bound both apart
    n_sp = 2 if dtype == torch.float32 else 4
    big = torch.maximum(f64(lk.grad).abs(), f64(lr_.grad).abs())
    tol_g = n_sp * spacing(big, dtype) + 4 * U32 * big
    assert_within(lk.grad, lr_.grad, tol_g, "weighted_loss gradient")


@settings(max_examples=N_LOSS, **SETTINGS)
@given(data=st.data())
def test_rgd_loss_matches_reference(data):
    draw = data.draw
    B = draw(st.one_of(st.integers(1, 3), st.integers(1, MAX_LOSS_BATCH), st.integers(1025, MAX_LOSS_BATCH)),
             label="batch")
    dtype = draw(st.sampled_from(DTYPES), label="loss dtype")
    T = draw(st.sampled_from([0.1, 0.5, 1.0, 2.0, 10.0]), label="temperature")
    lo, hi = draw(st.sampled_from([(0.0, 0.5), (0.0, 5.0), (-1.0, 30.0)]), label="loss range")
    chunk = draw(st.sampled_from([None, 1024, 4096]), label="chunk")
    upstream = draw(st.sampled_from([1.0, -0.5, 3.0]), label="upstream gradient")
    seed = draw(st.integers(0, 2 ** 31 - 1), label="seed")

    gen = torch.Generator().manual_seed(seed)
    l0 = (lo + (hi - lo) * torch.rand(B, generator=gen)).to(DEVICE, dtype)
    kw = {} if chunk is None else {"_chunk": chunk}
    event(f"rgd_loss: {'one program' if B <= (chunk or 1 << 16) else 'several programs'}")
    lk = l0.clone().requires_grad_(True)
    out = rgd_loss(lk, T, **kw)
    (out * upstream).backward()
    lr_ = l0.clone().requires_grad_(True)
    ref = F.rgd_loss_reference(lr_, T)
    (ref * upstream).backward()
    assert out.dtype == torch.float32 and out.dim() == 0 and lk.grad.dtype == dtype

    l64 = f64(l0)
    w = torch.exp(l64.clamp(max=T) / (T + 1.0))
    terms = w * l64
    t_abs = float(terms.abs().sum()) / B
    # per term: exp of an argument < 1 with a float32 argument (1/(T+1) rounded, the product
    # rounded): <= 4u relative, the product with l one more; then the sum and the mean
    bound = (sum_bound(B) + 8 * U32) * t_abs + 1e-30
    assert abs(float(out.detach()) - float(terms.mean())) <= bound
    assert abs(float(out.detach()) - float(ref.detach())) <= 2 * bound
    # d/dl_i = upstream * w_i / B in float32 on both sides (different order, <= 8u apart), then
    # stored in the losses' dtype (to nearest in torch, truncated by the interpreter for bf16)
    n_sp = 0 if dtype == torch.float32 else 2
    big = torch.maximum(f64(lk.grad).abs(), f64(lr_.grad).abs())
    tol_g = n_sp * spacing(big, dtype) + 8 * U32 * big
    assert_within(lk.grad, lr_.grad, tol_g, "rgd_loss gradient")
