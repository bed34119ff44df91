"""Tests of the one-launch multi-tensor Adam kernel against a float64 model written here, and against torch.

Runs on CUDA when available, else on CPU tensors through the Triton interpreter (small sizes).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

from also_fused.kernels.multi_tensor_adam import KERNEL_CONFIG, hyper_table, multi_tensor_adam_  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
# Relative rounding of one stored value (the interpreter truncates fp32 -> bf16/fp16, the GPU rounds).
ULP = {torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
# Rows: (lr, beta1, beta2, eps, weight_decay). A large eps makes the two eps placements differ visibly.
HYPER_ROWS = [
    (1e-3, 0.9, 0.999, 1e-8, 0.0),
    (5e-2, 0.8, 0.99, 1e-2, 0.1),
    (2e-2, 0.9, 0.999, 1e-3, 0.01),
]
HALF_HYPER_ROWS = [  # half precision: steps several ulps of the parameter
    (0.5, 0.9, 0.999, 1e-8, 0.0),
    (1.0, 0.8, 0.99, 1e-2, 0.1),
    (0.75, 0.9, 0.999, 1e-3, 0.01),
]
CHUNK = KERNEL_CONFIG[4][0] * KERNEL_CONFIG[4][1]
SIZES = [1, 7, 1000, 4099, 0, CHUNK + 3]  # several blocks, a tail, an empty tensor, a tensor over one chunk


def _hyper(rows):
    return hyper_table(rows, DEVICE)


def ref_adam(x, d, m, v, vmax, t, h, eps_mode, decoupled, amsgrad):
    """Float64 model of one Adam step; d already scaled (and negated for maximize)."""
    h = [float(u) for u in h]
    if len(h) == 5:  # a (lr, beta1, beta2, eps, wd) row: the table's extra columns in float64
        h += [1 - h[1], 1 - h[2], math.log(h[1]), math.log(h[2]), 1 - h[0] * h[4]]
    lr, b1, b2, eps, wd, omb1, omb2, log_b1, log_b2, decay = h
    if decoupled:
        x = x * decay
    else:
        d = d + wd * x
    m = b1 * m + omb1 * d
    v = b2 * v + omb2 * d * d
    if amsgrad:
        vmax = torch.maximum(vmax, v)
    vd = vmax if amsgrad else v
    bc1, bc2 = -math.expm1(t * log_b1), -math.expm1(t * log_b2)
    if eps_mode == "also":
        x = x - lr * math.sqrt(bc2) / bc1 * m / (vd.sqrt() + eps)
    else:
        x = x - lr / bc1 * m / (vd.sqrt() / math.sqrt(bc2) + eps)
    return x, m, v, vmax


class Problem:
    """Tensors of one kernel call plus float64 copies of its inputs."""

    def __init__(self, sizes, dtype, rows, *, amsgrad=False, separate_dst=False, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.hyper = _hyper(rows)
        self.rows = [i % len(rows) for i in range(len(sizes))]
        self.params = [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in sizes]
        self.m = [(0.1 * torch.randn(s, generator=gen)).to(DEVICE) for s in sizes]
        self.v = [(0.01 * torch.rand(s, generator=gen) + 1e-4).to(DEVICE) for s in sizes]
        self.vmax = [v + 0.01 * torch.rand(v.shape, generator=gen).to(DEVICE) for v in self.v] if amsgrad else None
        self.steps = [torch.tensor(float(3 + i), device=DEVICE) for i in range(len(sizes))]
        self.dst = [torch.full_like(p, float("nan")) for p in self.params] if separate_dst else self.params
        self.gen = gen

    def new_grads(self, scale=1.0):
        return [(scale * torch.randn(p.shape, generator=self.gen)).to(DEVICE, self.dtype) for p in self.params]

    def snapshot(self):
        f = lambda ts: [t.detach().double().cpu() for t in ts] if ts is not None else None  # noqa: E731
        return dict(x=f(self.params), m=f(self.m), v=f(self.v), vmax=f(self.vmax),
                    t=[float(s) for s in self.steps], h=self.hyper.double().cpu())


def _assert_close(out, ref, rtol, atol, what):
    out = out.detach().double().cpu()
    assert not torch.isnan(out).any(), f"{what}: NaN (unwritten element?)"
    err = (out - ref).abs()
    tol = atol + rtol * ref.abs()
    bad = err > tol
    assert not bad.any(), (f"{what}: max err {err.max().item():.3g}, {int(bad.sum())} bad of {out.numel()}, "
                           f"at ref {ref[bad][:3].tolist()}")


def _check_step(out_x, snap_x, ref_x, dtype, what):
    # One rounding of the stored result, plus fp32 arithmetic on the update itself.
    step = (ref_x - snap_x).abs()
    _assert_close(out_x, ref_x, ULP[dtype], 1e-5 * step + 1e-30, what)
    if dtype != torch.float32 and step.numel() >= 100:
        assert (step > 2 * ULP[dtype] * ref_x.abs()).float().mean() > 0.5, "test too weak: steps below one ulp"


def _run_and_check(pb, grads, *, eps_mode, decoupled, maximize, grad_scale, cache=None, n_steps=1):
    amsgrad = pb.vmax is not None
    for _ in range(n_steps):
        snap = pb.snapshot()
        g64 = [g.double().cpu() for g in grads]
        multi_tensor_adam_(pb.params, grads, pb.m, pb.v, pb.steps, pb.dst, pb.hyper, pb.rows,
                           max_exp_avg_sqs=pb.vmax, eps_mode=eps_mode, decoupled_weight_decay=decoupled,
                           maximize=maximize, grad_scale=grad_scale, cache=cache)
        for i in range(len(pb.params)):
            d = g64[i] * grad_scale * (-1 if maximize else 1)
            vmax0 = snap["vmax"][i] if amsgrad else None
            rx, rm, rv, rvmax = ref_adam(snap["x"][i], d, snap["m"][i], snap["v"][i], vmax0, snap["t"][i] + 1,
                                         snap["h"][pb.rows[i]], eps_mode, decoupled, amsgrad)
            assert float(pb.steps[i]) == snap["t"][i] + 1, "the kernel advances each step count once"
            _check_step(pb.dst[i], snap["x"][i], rx, pb.dtype, f"x[{i}]")
            _assert_close(pb.m[i], rm, 1e-6, 1e-6, f"m[{i}]")
            _assert_close(pb.v[i], rv, 1e-6, 1e-12, f"v[{i}]")
            if amsgrad:
                _assert_close(pb.vmax[i], rvmax, 1e-6, 1e-14, f"vmax[{i}]")
            if pb.dst is not pb.params:
                assert torch.equal(pb.params[i].double().cpu(), snap["x"][i]), "source modified"
        if pb.dst is not pb.params:  # next step starts from the result; poison the destinations again
            for p, d in zip(pb.params, pb.dst):
                p.copy_(d)
                d.fill_(float("nan"))
        grads = pb.new_grads()


FLAG_COMBOS = list(itertools.product(["also", "torch"], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("eps_mode,decoupled,amsgrad,maximize", FLAG_COMBOS)
def test_fp32_matches_float64_model(eps_mode, decoupled, amsgrad, maximize):
    idx = FLAG_COMBOS.index((eps_mode, decoupled, amsgrad, maximize))
    pb = Problem(SIZES, torch.float32, HYPER_ROWS, amsgrad=amsgrad, separate_dst=idx % 2 == 1, seed=idx)
    _run_and_check(pb, pb.new_grads(), eps_mode=eps_mode, decoupled=decoupled, maximize=maximize,
                   grad_scale=0.5 if idx % 3 == 0 else 1.0, n_steps=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps_mode,decoupled,amsgrad,maximize,separate",
                         [("also", False, False, False, False), ("torch", True, True, True, True),
                          ("also", False, True, True, True)])
def test_half_matches_float64_model(dtype, eps_mode, decoupled, amsgrad, maximize, separate):
    pb = Problem(SIZES, dtype, HALF_HYPER_ROWS, amsgrad=amsgrad, separate_dst=separate, seed=7)
    _run_and_check(pb, pb.new_grads(), eps_mode=eps_mode, decoupled=decoupled, maximize=maximize,
                   grad_scale=2.0, n_steps=2)


def test_free_running_trajectory_fp32():
    """Ten steps with the kernel's own state fed back, compared with a float64 trajectory."""
    pb = Problem([1000, 5, 4099], torch.float32, HYPER_ROWS, amsgrad=True, seed=3)
    x = [p.double().cpu() for p in pb.params]
    m = [t.double().cpu() for t in pb.m]
    v = [t.double().cpu() for t in pb.v]
    vmax = [t.double().cpu() for t in pb.vmax]
    h = pb.hyper.double().cpu()
    cache = {}
    for _ in range(10):
        grads = pb.new_grads()
        multi_tensor_adam_(pb.params, grads, pb.m, pb.v, pb.steps, pb.params, pb.hyper, pb.rows,
                           max_exp_avg_sqs=pb.vmax, cache=cache)
        for i in range(3):
            x[i], m[i], v[i], vmax[i] = ref_adam(x[i], grads[i].double().cpu(), m[i], v[i], vmax[i],
                                                 float(pb.steps[i]), h[pb.rows[i]], "also", False, True)
    for i in range(3):
        _assert_close(pb.params[i], x[i], 1e-6, 1e-6, f"x[{i}]")
        _assert_close(pb.m[i], m[i], 1e-5, 1e-6, f"m[{i}]")


@pytest.mark.parametrize("eps_mode", ["also", "torch"])
def test_bias_correction_precision(eps_mode):
    """First step from zero state, eps = 0: the result isolates 1 - beta**t (no cancellation allowed)."""
    ts = [1.0, 2.0, 10.0, 1000.0, 1e6]
    rows = [(1.0, 0.9, 0.999, 0.0, 0.0), (1.0, 0.5, 0.9999, 0.0, 0.0)]
    hyper = _hyper(rows)
    for row in range(2):
        b1, b2 = rows[row][1], rows[row][2]  # the betas as given, in float64
        params = [torch.zeros(3, device=DEVICE) for _ in ts]
        grads = [torch.tensor([1.0, -2.0, 0.5], device=DEVICE) for _ in ts]
        m = [torch.zeros(3, device=DEVICE) for _ in ts]
        v = [torch.zeros(3, device=DEVICE) for _ in ts]
        steps = [torch.tensor(t - 1, device=DEVICE) for t in ts]  # the counts before the step
        multi_tensor_adam_(params, grads, m, v, steps, params, hyper, [row] * len(ts), eps_mode=eps_mode)
        for p, t in zip(params, ts):
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            # m = (1-b1) d, sqrt(v) = sqrt(1-b2) |d|
            ratio = (1 - b1) / math.sqrt(1 - b2) * math.sqrt(bc2) / bc1  # the same in both eps modes when eps = 0
            expect = -ratio * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
            _assert_close(p, expect, 2e-6, 0.0, f"t={t}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps_mode,amsgrad", [("also", False), ("torch", True)])
def test_extrapolate_two_steps(dtype, eps_mode, amsgrad):
    rows = HYPER_ROWS if dtype == torch.float32 else HALF_HYPER_ROWS
    pb = Problem(SIZES, dtype, rows, amsgrad=amsgrad, separate_dst=True, seed=11)
    ext = [torch.full_like(p, float("nan")) for p in pb.params]
    grads = pb.new_grads()
    snap = pb.snapshot()
    gs, es = 0.5, 1.5
    multi_tensor_adam_(pb.params, grads, pb.m, pb.v, pb.steps, pb.dst, pb.hyper, pb.rows, max_exp_avg_sqs=pb.vmax,
                       eps_mode=eps_mode, grad_scale=gs, extrapolate_to=ext, extrapolation_scale=es)
    for i in range(len(SIZES)):
        g = grads[i].double().cpu()
        t = snap["t"][i]
        vm = snap["vmax"][i] if amsgrad else None
        h = snap["h"][pb.rows[i]]
        x1, m, v, vm = ref_adam(snap["x"][i], gs * g, snap["m"][i], snap["v"][i], vm, t + 1, h, eps_mode, False,
                                amsgrad)
        _check_step(pb.dst[i], snap["x"][i], x1, dtype, f"x1[{i}]")
        x1_stored = pb.dst[i].double().cpu()  # the second step starts from the stored iterate
        y, m, v, vm = ref_adam(x1_stored, es * g, m, v, vm, t + 2, h, eps_mode, False, amsgrad)
        assert float(pb.steps[i]) == t + 2
        _check_step(ext[i], x1_stored, y, dtype, f"y[{i}]")
        _assert_close(pb.m[i], m, 1e-6, 1e-6, f"m[{i}]")
        _assert_close(pb.v[i], v, 1e-6, 1e-12, f"v[{i}]")
        if amsgrad:
            _assert_close(pb.vmax[i], vm, 1e-6, 1e-14, f"vmax[{i}]")
        assert torch.equal(pb.params[i].double().cpu(), snap["x"][i])


def test_extrapolate_equals_two_calls_fp32():
    a = Problem(SIZES, torch.float32, HYPER_ROWS, separate_dst=True, seed=5)
    b = Problem(SIZES, torch.float32, HYPER_ROWS, seed=5)
    grads = a.new_grads()
    ext = [torch.full_like(p, float("nan")) for p in a.params]
    multi_tensor_adam_(a.params, grads, a.m, a.v, a.steps, a.dst, a.hyper, a.rows, extrapolate_to=ext)
    multi_tensor_adam_(b.params, grads, b.m, b.v, b.steps, b.params, b.hyper, b.rows)
    x1 = [p.clone() for p in b.params]
    multi_tensor_adam_(b.params, grads, b.m, b.v, b.steps, b.params, b.hyper, b.rows)
    assert [float(t) for t in a.steps] == [float(t) for t in b.steps]
    for i in range(len(SIZES)):
        torch.testing.assert_close(a.dst[i], x1[i], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ext[i], b.params[i], rtol=1e-6, atol=1e-7)
        # one kernel vs two may contract multiply-adds differently: a few ulps where m nearly cancels
        torch.testing.assert_close(a.m[i], b.m[i], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_sources_and_grads(dtype):
    rows = HYPER_ROWS if dtype == torch.float32 else HALF_HYPER_ROWS
    pb = Problem(SIZES, dtype, rows, separate_dst=True, seed=13)
    grads = pb.new_grads()
    saved_x = [torch.full_like(p, float("nan")) for p in pb.params]
    saved_g = [torch.full_like(p, float("nan")) for p in pb.params]
    snap = pb.snapshot()
    multi_tensor_adam_(pb.params, grads, pb.m, pb.v, pb.steps, pb.dst, pb.hyper, pb.rows, maximize=True,
                       grad_scale=0.25, save_sources_to=saved_x, save_grads_to=saved_g)
    for i in range(len(SIZES)):
        assert torch.equal(saved_x[i], pb.params[i])
        assert torch.equal(saved_g[i], grads[i])  # raw gradient: before grad_scale and maximize
        d = -0.25 * grads[i].double().cpu()
        rx, _, _, _ = ref_adam(snap["x"][i], d, snap["m"][i], snap["v"][i], None, snap["t"][i] + 1,
                               snap["h"][pb.rows[i]], "also", False, False)
        _check_step(pb.dst[i], snap["x"][i], rx, dtype, f"x[{i}]")


@pytest.mark.parametrize("decoupled,amsgrad,maximize,wd", [(False, False, False, 0.0), (False, True, True, 0.05),
                                                           (True, False, False, 0.1), (True, True, True, 0.01)])
def test_torch_mode_matches_torch_optim(decoupled, amsgrad, maximize, wd):
    gen = torch.Generator().manual_seed(17)
    sizes = [7, 1000, 257]
    lr, betas, eps = 3e-3, (0.85, 0.995), 1e-6
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in sizes]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(ref, lr=lr, betas=betas, eps=eps, weight_decay=wd, amsgrad=amsgrad, maximize=maximize,
              foreach=False)
    params = [p.detach().clone() for p in ref]
    init = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params] if amsgrad else None
    steps = [torch.zeros((), device=DEVICE) for _ in params]
    hyper = _hyper([(lr, betas[0], betas[1], eps, wd)])
    cache = {}
    for _ in range(20):
        grads = [torch.randn(s, generator=gen).to(DEVICE) for s in sizes]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        multi_tensor_adam_(params, grads, m, v, steps, params, hyper, [0] * len(params), max_exp_avg_sqs=vmax,
                           eps_mode="torch", decoupled_weight_decay=decoupled, maximize=maximize, cache=cache)
    for p, r, p0 in zip(params, ref, init):
        scale = r.detach().abs().max()
        rel = ((p - r.detach()).abs().max() / scale).item()
        assert rel <= 1e-6, rel
        assert (r.detach() - p0).abs().max() > 1e-3 * scale  # the parameters moved far beyond the tolerance


def test_cache_reuse_with_new_grads():
    pb = Problem(SIZES, torch.float32, HYPER_ROWS, amsgrad=True, seed=19)
    cache = {}
    _run_and_check(pb, pb.new_grads(), eps_mode="also", decoupled=False, maximize=False, grad_scale=1.0,
                   cache=cache, n_steps=1)
    meta, chunks = cache["meta"], cache["chunks"]
    for _ in range(2):  # new gradient tensors each step: only the gradient table is rebuilt
        _run_and_check(pb, pb.new_grads(), eps_mode="also", decoupled=False, maximize=False, grad_scale=1.0,
                       cache=cache, n_steps=1)
        assert cache["meta"] is meta and cache["chunks"] is chunks
    # same gradient tensors with new values: the cached table still points at them
    grads = pb.new_grads()
    _run_and_check(pb, grads, eps_mode="also", decoupled=False, maximize=False, grad_scale=1.0, cache=cache)
    table = cache["grad_table"]
    for g in grads:
        g.copy_(torch.randn(g.shape, generator=pb.gen).to(DEVICE))
    _run_and_check(pb, grads, eps_mode="also", decoupled=False, maximize=False, grad_scale=1.0, cache=cache)
    assert cache["grad_table"] is table
    # new parameter tensors: the tables are rebuilt
    pb.params = [p.clone() for p in pb.params]
    pb.dst = pb.params
    _run_and_check(pb, pb.new_grads(), eps_mode="also", decoupled=False, maximize=False, grad_scale=1.0,
                   cache=cache)
    assert cache["meta"] is not meta


def test_misaligned_views():
    """Parameters that are views at odd element offsets (not 16-byte aligned) take the unaligned path."""
    gen = torch.Generator().manual_seed(23)
    base = [torch.randn(s + 1, generator=gen).to(DEVICE) for s in (1000, 4099)]
    pb = Problem([1000, 4099], torch.float32, HYPER_ROWS, seed=23)
    heads = [b[0].item() for b in base]
    pb.params = [b[1:] for b in base]
    pb.dst = pb.params
    cache = {}
    _run_and_check(pb, pb.new_grads(), eps_mode="torch", decoupled=True, maximize=False, grad_scale=1.0,
                   cache=cache, n_steps=2)
    assert not cache["aligned"]
    assert [b[0].item() for b in base] == heads  # nothing written before the views


def test_empty_and_zero_sized():
    hyper = _hyper(HYPER_ROWS)
    multi_tensor_adam_([], [], [], [], [], [], hyper, [])
    z = [torch.zeros(0, device=DEVICE) for _ in range(6)]
    step = [torch.ones((), device=DEVICE)]
    cache = {}
    multi_tensor_adam_(z[:1], z[1:2], z[2:3], z[3:4], step, z[:1], hyper, [0], cache=cache)
    assert cache["total"] == 1 and float(step[0]) == 2.0  # one program, which advances the step count
    with pytest.raises(ValueError, match="all tensor lists and hyper_rows must have the same length"):
        multi_tensor_adam_(z[:2], z[1:2], z[2:3], z[3:4], step, z[:1], hyper, [0])
    with pytest.raises(ValueError, match="eps_mode must be 'also' or 'torch'"):
        multi_tensor_adam_(z[:1], z[1:2], z[2:3], z[3:4], step, z[:1], hyper, [0], eps_mode="adam")


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_matches_eager():
    pb = Problem([5000, 3, 70000], torch.float32, HYPER_ROWS, amsgrad=True, seed=29)
    grads = pb.new_grads()
    ext = [torch.empty_like(p) for p in pb.params]
    saved = [torch.empty_like(p) for p in pb.params]
    cache = {}

    def call():
        multi_tensor_adam_(pb.params, grads, pb.m, pb.v, pb.steps, pb.params, pb.hyper, pb.rows,
                           max_exp_avg_sqs=pb.vmax, extrapolate_to=ext, save_grads_to=saved, cache=cache)

    state = lambda: [t.clone() for t in pb.params + pb.m + pb.v + pb.vmax + pb.steps]  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # warm-up: compile and build the tables
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    before = state()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for t, b in zip(pb.params + pb.m + pb.v + pb.vmax + pb.steps, before):
        t.copy_(b)
    graph.replay()
    torch.cuda.synchronize()
    replayed, ext_r = state(), [e.clone() for e in ext]
    for t, b in zip(pb.params + pb.m + pb.v + pb.vmax + pb.steps, before):
        t.copy_(b)
    call()
    torch.cuda.synchronize()
    for a, b in zip(replayed, state()):
        assert torch.equal(a, b)
    for a, b in zip(ext_r, ext):
        assert torch.equal(a, b)
    assert not torch.equal(replayed[0], before[0])


@pytest.mark.slow
@pytest.mark.skipif(not ON_CUDA or torch.cuda.get_device_properties(0).total_memory < 48 * 2 ** 30,
                    reason="needs a GPU of 48 GB or more (the tensors take about 30 GB)")
def test_tensor_over_2_pow_31_elements():
    n = 2 ** 31 + 4099
    x = torch.ones(n, dtype=torch.bfloat16, device=DEVICE)
    g = torch.full((n,), -1.0, dtype=torch.bfloat16, device=DEVICE)
    g[-5:] = torch.tensor([1.0, 2.0, -3.0, 0.5, 4.0])
    m = torch.zeros(n, device=DEVICE)
    v = torch.zeros(n, device=DEVICE)
    hyper = _hyper([(0.25, 0.9, 0.999, 1e-8, 0.0)])
    multi_tensor_adam_([x], [g], [m], [v], [torch.zeros((), device=DEVICE)], [x], hyper, [0])
    # first step: x - lr * sign(g) (up to eps); the last elements sit beyond 2**31
    expect = 1 - 0.25 * torch.sign(g[-4101:].float())
    torch.testing.assert_close(x[-4101:].float(), expect, rtol=0, atol=1e-3)
    torch.testing.assert_close(m[-5:], 0.1 * g[-5:].float())
    assert x[: 2 ** 20].float().eq(1.25).all()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_uncommitted_then_prior_equals_two_committed_steps(amsgrad):
    """The optimistic closure pair: an extrapolation with commit_state=False leaves the moments as they
    were; the main step with prior_grads advances them with the previous gradient first (at t-1) and
    then with the new one (at t), equal to the float64 model of two sequential steps."""
    gen = torch.Generator().manual_seed(11)
    sizes = [7, 1000, 4099]
    xs = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
    prev = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
    new = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
    ms = [(torch.randn(n, generator=gen) * 0.1).to(DEVICE) for n in sizes]
    vs = [(torch.rand(n, generator=gen) * 0.1).to(DEVICE) for n in sizes]
    vmaxs = [v * 1.5 for v in vs] if amsgrad else None
    rows = [1, 2, 0]
    hyper = _hyper(HYPER_ROWS)
    alpha, t0 = 0.5, 4.0
    snap_m, snap_v = [m.clone() for m in ms], [v.clone() for v in vs]
    steps = [torch.tensor(t0, device=DEVICE) for _ in sizes]
    y = [torch.full_like(x, float("nan")) for x in xs]
    saved = [torch.full_like(x, float("nan")) for x in xs]
    multi_tensor_adam_(xs, prev, ms, vs, steps, y, hyper, rows, max_exp_avg_sqs=vmaxs, grad_scale=alpha,
                       save_sources_to=saved, commit_state=False)
    for i in range(len(sizes)):
        assert torch.equal(ms[i], snap_m[i]) and torch.equal(vs[i], snap_v[i]) and float(steps[i]) == t0
        assert torch.equal(saved[i], xs[i])
        ref_y, *_ = ref_adam(xs[i].double().cpu(), alpha * prev[i].double().cpu(), ms[i].double().cpu(),
                             vs[i].double().cpu(), None if vmaxs is None else vmaxs[i].double().cpu(), t0 + 1, HYPER_ROWS[rows[i]], "also",
                             False, amsgrad)
        _assert_close(y[i], ref_y, 1e-5, 1e-7, "extrapolated point")
    prev_buf = [p.clone() for p in prev]  # save_grads_to aliases prior_grads, as in the optimizer
    out = [torch.full_like(x, float("nan")) for x in xs]
    vmax_before = None if vmaxs is None else [v.clone() for v in vmaxs]
    multi_tensor_adam_(saved, new, ms, vs, steps, out, hyper, rows, max_exp_avg_sqs=vmaxs, prior_grads=prev_buf,
                       prior_scale=alpha, save_grads_to=prev_buf)
    for i in range(len(sizes)):
        h = HYPER_ROWS[rows[i]]
        x64 = xs[i].double().cpu()
        _, m1, v1, vm1 = ref_adam(x64, alpha * prev[i].double().cpu(), snap_m[i].double().cpu(),
                                  snap_v[i].double().cpu(), None if vmaxs is None else vmax_before[i].double().cpu(),
                                  t0 + 1, h, "also", False, amsgrad)
        ref_x, m2, v2, _ = ref_adam(x64, new[i].double().cpu(), m1, v1, vm1, t0 + 2, h, "also", False, amsgrad)
        _assert_close(out[i], ref_x, 1e-5, 1e-7, "main step")
        _assert_close(ms[i], m2, 1e-5, 2e-7, "m")
        _assert_close(vs[i], v2, 1e-5, 1e-8, "v")
        assert torch.equal(prev_buf[i], new[i]) and float(steps[i]) == t0 + 2


@pytest.mark.parametrize("separate_dst", [False, True])
def test_set_error_word_changes_nothing_but_restoring_the_params(separate_dst):
    """A rejected step: moments, step counts, saved gradients and the extrapolation stay as they were;
    a destination apart from its source takes the source (the params go back to x)."""
    pb = Problem(SIZES, torch.float32, HYPER_ROWS, amsgrad=True, separate_dst=separate_dst, seed=31)
    grads = pb.new_grads()
    ext = [torch.full_like(p, 7.0) for p in pb.params]
    saved_g = [torch.full_like(p, 5.0) for p in pb.params]
    snap = pb.snapshot()
    word = torch.tensor(2, dtype=torch.int32, device=DEVICE)
    cache = {}
    multi_tensor_adam_(pb.params, grads, pb.m, pb.v, pb.steps, pb.dst, pb.hyper, pb.rows, max_exp_avg_sqs=pb.vmax,
                       extrapolate_to=ext, save_grads_to=saved_g, error_word=word, cache=cache)
    after = pb.snapshot()
    for key in ("x", "m", "v", "vmax"):
        for a, b in zip(after[key], snap[key]):
            assert torch.equal(a, b), key
    assert after["t"] == snap["t"]
    for i in range(len(SIZES)):
        assert torch.equal(pb.dst[i], pb.params[i])
        assert ext[i].eq(7.0).all() and saved_g[i].eq(5.0).all()
    word.zero_()  # the same call, accepted now, advances everything once
    multi_tensor_adam_(pb.params, grads, pb.m, pb.v, pb.steps, pb.dst, pb.hyper, pb.rows, max_exp_avg_sqs=pb.vmax,
                       extrapolate_to=ext, save_grads_to=saved_g, error_word=word, cache=cache)
    assert [float(t) for t in pb.steps] == [t + 2 for t in snap["t"]]
    assert all(torch.equal(g, s) for g, s in zip(grads, saved_g))



if ON_CUDA:
    import triton
    import triton.language as tl

    from also_fused.kernels import multi_tensor_adam as _mta

    @triton.jit
    def _root_mismatch_kernel(count_ptr, first_ptr, divisor, ITERS: tl.constexpr, BLOCK: tl.constexpr,
                              WHAT: tl.constexpr):
        # every float32 bit pattern from +0 up, ITERS * BLOCK per program: count where the kernels' value
        # differs in any bit from the one built on tl.sqrt_rn / tl.div_rn, and keep the smallest such pattern.
        # WHAT 0: the square root; 1: the root over a per-program divisor (torch's sqrt(v) / sqrt(1 - b2^t)).
        base = tl.program_id(0).to(tl.int64) * (ITERS * BLOCK)
        recip = _mta._reciprocal(divisor, False)
        for i in range(ITERS):
            bits = (base + i * BLOCK + tl.arange(0, BLOCK)).to(tl.int32)
            x = bits.to(tl.float32, bitcast=True)
            if WHAT == 0:
                ours = _mta._sqrt_rn(x, False).to(tl.int32, bitcast=True)
                exact = tl.sqrt_rn(x).to(tl.int32, bitcast=True)
            else:  # a NaN may come back with another payload (the kernel's next addition quietens it)
                ours = _mta._sqrt_div(x, divisor, recip, False).to(tl.int32, bitcast=True)
                exact = tl.div_rn(tl.sqrt_rn(x), divisor).to(tl.int32, bitcast=True)
                ours = tl.where((ours & 0x7FFFFFFF) > 0x7F800000, 0x7FFFFFFF, ours)
                exact = tl.where((exact & 0x7FFFFFFF) > 0x7F800000, 0x7FFFFFFF, exact)
            bad = ours != exact
            tl.atomic_add(count_ptr, tl.sum(bad.to(tl.int32), axis=0))
            tl.atomic_min(first_ptr, tl.min(tl.where(bad, bits, 0x7FFFFFFF), axis=0))


def _root_mismatches(what: int, n_patterns: int, divisor: float = 1.0) -> tuple[int, int]:
    count = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    first = torch.full((1,), 0x7FFFFFFF, dtype=torch.int32, device=DEVICE)
    iters, block = 64, 1024
    _root_mismatch_kernel[(triton.cdiv(n_patterns, iters * block),)](count, first, divisor, ITERS=iters, BLOCK=block,
                                                                       WHAT=what)
    return int(count), int(first)


@pytest.mark.skipif(not ON_CUDA, reason="the GPU's reciprocal root (the interpreter takes tl.sqrt_rn itself)")
def test_branch_free_sqrt_is_sqrt_rn_on_every_non_negative_float():
    """The kernels' square root without a slow-path branch gives tl.sqrt_rn's bits for each of the 2^31
    float32 patterns with the sign bit clear: +0, subnormals, normals, +inf and every positive NaN."""
    count, first = _root_mismatches(0, 2 ** 31)
    assert count == 0, f"{count} mismatches, the first at bits {first:#010x}"


def _bias_correction_roots() -> list[float]:
    """sqrt(1 - b2^t) as the kernel computes it, float32: one random mantissa in each binade from 2^-27
    (b2 just below 1 in float64, t = 1) up to 1, the extremes and common (b2, t) pairs."""
    gen = torch.Generator().manual_seed(0)
    values = [1.0, float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))), 2.0 ** -27]
    values += [float(2.0 ** -k * (1 + torch.rand(1, generator=gen))) for k in range(1, 28)]
    for beta2 in (0.999, 0.95, 0.9999):
        values += [float(torch.tensor(math.sqrt(1 - beta2 ** t), dtype=torch.float32)) for t in (1, 2, 10, 1000)]
    return values


@pytest.mark.skipif(not ON_CUDA, reason="the GPU's approximate reciprocal (the interpreter takes tl.div_rn)")
def test_root_over_divisor_is_div_rn_of_sqrt_rn_on_every_non_negative_float():
    """torch's denominator sqrt(v) / sqrt(1 - b2^t) without div.rn's per-element check and slow-path branch
    gives tl.div_rn(tl.sqrt_rn(v), b)'s bits for each of the 2^31 float32 patterns of v with the sign bit
    clear (a NaN as any NaN), for divisors b in every binade the bias correction takes (2^-27 to 1)."""
    for divisor in _bias_correction_roots():
        count, first = _root_mismatches(1, 2 ** 31, divisor)
        assert count == 0, f"divisor {divisor!r}: {count} mismatches, the first at bits {first:#010x}"
