"""Moment storage precision of the drop-ins: torch's layout by default, float32 or bfloat16 on request.

Memory and state_dict dtypes are compared with torch.optim's; trajectories with torch's fused AdamW
(the same single rounding of the moments per step) and between the paths that run here.
"""
from __future__ import annotations

import copy

import pytest
import torch

import also_fused
from conftest import DEVICE, triton_importable

BACKENDS = ["reference", "auto"] + (["triton"] if triton_importable() else [])
SHAPES = [(33, 7), (130,), (1,), (4, 3, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype)) for s in SHAPES]


def train(opt, params, steps, seed=1, start=0):
    gen = torch.Generator().manual_seed(seed)
    for k in range(start + steps):
        grads = [torch.randn(p.shape, generator=gen).to(DEVICE, p.dtype) for p in params]
        if k < start:
            continue
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_default_state_has_torchs_memory_and_dtypes(dtype, amsgrad):
    ours, theirs = make_params(dtype), make_params(dtype)
    opt_a = also_fused.AdamW(ours, amsgrad=amsgrad)
    opt_b = torch.optim.AdamW(theirs, amsgrad=amsgrad, foreach=False)
    train(opt_a, ours, 2), train(opt_b, theirs, 2)
    assert state_bytes(opt_a) == state_bytes(opt_b)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for i in sb:
        assert {k: v.dtype for k, v in sa[i].items() if k != "step"} == \
               {k: v.dtype for k, v in sb[i].items() if k != "step"}


@pytest.mark.parametrize("precision,expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_precision_sets_the_moment_dtype(precision, expected, dtype):
    params = make_params(dtype)
    opt = also_fused.Adam(params, state_precision=precision, amsgrad=True)
    train(opt, params, 1)
    for s in opt.state.values():
        assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == s["max_exp_avg_sq"].dtype == expected
    assert state_bytes(opt) == sum(3 * p.numel() * expected.itemsize + 4 for p in params)


def test_unknown_precision_refused():
    with pytest.raises(ValueError, match="state_precision"):
        also_fused.AdamW(make_params(torch.float32), state_precision="int4")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_follow_torch_fused(backend, dtype):
    """Default state (the param dtype): the trajectory of torch.optim.AdamW(fused=True); bitwise where the
    path runs torch's own fused kernel (the CPU path), within a few roundings elsewhere."""
    ours, theirs = make_params(dtype), make_params(dtype)
    opt_a = also_fused.AdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    opt_b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, fused=True)
    train(opt_a, ours, 20), train(opt_b, theirs, 20)
    for a, b, start in zip(ours, theirs, make_params(dtype)):
        if backend == "auto" and DEVICE == "cpu":
            assert torch.equal(a, b)
        else:
            moved = float((b.detach().float() - start.detach().float()).norm())
            assert float((a.detach().float() - b.detach().float()).norm()) <= 0.02 * moved


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paths_agree_at_each_precision(precision, dtype):
    """The kernels (and the CPU path) against the reference at the same state precision."""
    runs = {}
    for backend in BACKENDS:
        params = make_params(dtype)
        opt = also_fused.AdamW(params, lr=1e-2, state_precision=precision, amsgrad=True, backend=backend)
        train(opt, params, 15)
        runs[backend] = (params, opt)
    ref_params, ref_opt = runs["reference"]
    for backend, (params, opt) in runs.items():
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p.float(), q.float(), rtol=2e-2 if dtype != torch.float32 else 1e-5,
                                       atol=1e-2 if dtype != torch.float32 else 1e-6)
        for p, q in zip(params, ref_params):
            m, mr = opt.state[p]["exp_avg"].float(), ref_opt.state[q]["exp_avg"].float()
            torch.testing.assert_close(m, mr, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", ["param", "bfloat16", "int8"])
def test_resume_is_bitwise(backend, precision):
    dtype = torch.bfloat16 if precision == "param" else torch.float32
    params = make_params(dtype)
    opt = also_fused.AdamW(params, lr=1e-2, state_precision=precision, backend=backend)
    train(opt, params, 4)
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    train(opt, params, 5, start=4)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt2 = also_fused.AdamW(resumed, lr=1e-2, state_precision=precision, backend=backend)
    opt2.load_state_dict(saved)
    train(opt2, resumed, 5, start=4)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    for sa, sb in zip(opt.state.values(), opt2.state.values()):
        assert sa["exp_avg"].dtype == sb["exp_avg"].dtype
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


# ------------------------------------------------------------------- 8-bit moments
def test_int8_state_is_about_two_bytes_per_param():
    params = [torch.nn.Parameter(torch.randn(300, 100, device=DEVICE)), torch.nn.Parameter(torch.randn(70, device=DEVICE))]
    opt = also_fused.AdamW(params, state_precision="int8")
    train(opt, params, 1)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert moments / sum(p.numel() for p in params) <= 2.1
    s = opt.state[params[0]]
    assert (s["exp_avg"].dtype, s["exp_avg_sq"].dtype, s["exp_avg_scale"].dtype) == (torch.int8, torch.uint8, torch.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_quantisation_error_within_its_derived_bound(signed):
    """|x - decode(encode(x))| <= a ((c + 1/2)^k - c^k) / C^k, c = C (|x|/a)^(1/k) the exact code, k = 2 (m) or 4 (v)."""
    from also_fused import functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=gen) * torch.logspace(-8, 0, 5000)
    x = x if signed else x * x
    codes = torch.empty(5000, dtype=F.QUANT_DTYPES[signed])
    scales = torch.empty(F.quant_blocks(5000))
    F.quantize_moment_(x, codes, scales, signed)
    back = F.dequantize_moment(codes, scales, signed)
    a = scales.double().repeat_interleave(F.QUANT_BLOCK)[:5000]
    k, top = (2, 127.0) if signed else (4, 255.0)
    c = top * (x.double().abs() / a) ** (1.0 / k)
    bound = a * ((c + 0.5) ** k - c ** k) / top ** k
    assert torch.all((x.double() - back.double()).abs() <= bound * (1 + 1e-4) + a * 1e-7)
    assert torch.equal(scales[:4], x.abs()[:4096].view(4, 1024).amax(1))


@pytest.mark.parametrize("signed", [True, False])
def test_quantisation_of_zero_and_subnormal_blocks(signed):
    """A block of zeros, or one whose largest |value| is below float32's smallest normal number, is stored as
    zeros (scale 0, codes 0) and decodes to zeros; its neighbours keep their own scales."""
    from also_fused import functional as F

    tiny = torch.finfo(torch.float32).tiny
    x = torch.cat([torch.zeros(1024), torch.full((1024,), tiny / 4), torch.linspace(-1.0, 1.0, 1000).abs() + 0.5])
    x = x if not signed else x * torch.where(torch.arange(x.numel()) % 2 == 0, 1.0, -1.0)
    codes = torch.empty(x.numel(), dtype=F.QUANT_DTYPES[signed])
    scales = torch.empty(F.quant_blocks(x.numel()))
    F.quantize_moment_(x, codes, scales, signed)
    assert scales[0] == 0 and scales[1] == 0 and scales[2] == x[2048:].abs().max()
    assert torch.all(codes[:2048] == 0)
    back = F.dequantize_moment(codes, scales, signed)
    assert torch.all(back[:2048] == 0) and torch.isfinite(back).all()


def test_int8_paths_agree():
    """The kernels and the CPU path against the reference: codes equal up to one step where float32 rounding
    of the update differs, scales and params within rounding."""
    runs = {}
    for backend in BACKENDS:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in [(3000,), (40, 50), (7,)]]
        opt = also_fused.AdamW(params, lr=1e-2, state_precision="int8", backend=backend)
        train(opt, params, 6)
        runs[backend] = (params, opt)
    ref_params, ref_opt = runs["reference"]
    for params, opt in runs.values():
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            for key in ("exp_avg", "exp_avg_sq"):
                diff = (opt.state[p][key].int() - ref_opt.state[q][key].int()).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
            torch.testing.assert_close(opt.state[p]["exp_avg_scale"], ref_opt.state[q]["exp_avg_scale"], rtol=1e-5,
                                       atol=0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton kernels")
@pytest.mark.parametrize("iterations", [2, 4])
def test_int8_kernel_with_several_blocks_per_program(monkeypatch, iterations):
    """Programs that cover several 1024-element blocks (each with its own scale) agree with the reference."""
    from also_fused.kernels import multi_tensor_adam as mta

    monkeypatch.setitem(mta.STATE_CONFIG, (4, 1), (1024, iterations, 4, 0))
    runs = {}
    for backend in ("reference", "triton"):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s, generator=gen) * torch.logspace(-3, 0, s[0]).unsqueeze(-1))
                                     .to(DEVICE)) for s in [(3000, 1), (5000, 1)]]
        opt = also_fused.AdamW(params, lr=1e-2, state_precision="int8", backend=backend)
        train(opt, params, 3)
        runs[backend] = (params, opt)
    (ref_params, ref_opt), (params, opt) = runs["reference"], runs["triton"]
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg_scale", "exp_avg_sq_scale"):
            torch.testing.assert_close(opt.state[p][key], ref_opt.state[q][key], rtol=1e-5, atol=0)
        diff = (opt.state[p]["exp_avg_sq"].int() - ref_opt.state[q]["exp_avg_sq"].int()).abs()
        assert int(diff.max()) <= 1


# the kernels' agreement with the reference is tested above; the interpreter is too slow for 300 steps
@pytest.mark.parametrize("backend", ["auto"])
def test_int8_trains_like_float32(backend):
    """A small regression: the loss after 150 steps with 8-bit moments within 5% of float32 AdamW's."""
    finals = {}
    for precision in ("float32", "int8"):
        gen = torch.Generator().manual_seed(0)
        w_true = torch.randn(64, 8, generator=gen)
        x = torch.randn(512, 64, generator=gen)
        y = (x @ w_true + 0.1 * torch.randn(512, 8, generator=gen)).to(DEVICE)
        x = x.to(DEVICE)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.1, generator=gen.manual_seed(p.numel()))
        model = model.to(DEVICE)
        opt = also_fused.AdamW(model.parameters(), lr=3e-3, state_precision=precision, backend=backend)
        for _ in range(150):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            finals[precision] = float(torch.nn.functional.mse_loss(model(x), y))
    assert finals["int8"] <= 1.05 * finals["float32"] + 1e-3, finals


def test_int8_refuses_amsgrad():
    with pytest.raises(ValueError, match="amsgrad"):
        also_fused.Adam(make_params(torch.float32), amsgrad=True, state_precision="int8")


@pytest.mark.parametrize("direction", ["float_to_int8", "int8_to_float"])
def test_state_dict_converts_between_precisions(direction):
    source, target = ("float32", "int8") if direction == "float_to_int8" else ("int8", "float32")
    params = make_params(torch.float32)
    opt = also_fused.AdamW(params, lr=1e-2, state_precision=source)
    train(opt, params, 3)
    other = also_fused.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, state_precision=target)
    other.load_state_dict(opt.state_dict())
    from also_fused import functional as F

    def as_float(o, p, key, signed):
        s = o.state[p]
        return F.dequantize_moment(s[key], s[key + "_scale"], signed) if key + "_scale" in s else s[key].float()

    for p, q in zip(params, other.param_groups[0]["params"]):
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            a, b = as_float(opt, p, key, signed), as_float(other, q, key, signed)
            scale = float(a.abs().max()) + 1e-30
            assert float((a - b).abs().max()) <= 0.02 * scale
    train(other, other.param_groups[0]["params"], 2, start=3)  # and it steps on


# ------------------------------------------------------------------- ALSO's theta side
@pytest.mark.parametrize("precision,tol", [("bfloat16", 2e-2), ("int8", 5e-2)])
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["loop", "closure"])
def test_also_at_lower_precision_stays_near_its_golden_model(precision, tol, mode, api):
    """The float64 model keeps float32-exact moments; rounding (bf16) or 8-bit coding of the stored moments
    moves the trajectory by at most ``tol`` (relative) over 40 steps, params and pi."""
    from harness import Config, rel, run

    for backend in BACKENDS:
        cfg = Config(mode=mode, api=api, steps=40, extra=dict(state_precision=precision))
        golden, x, opt, _ = run(cfg, DEVICE, backend)
        for got, want in zip(x, golden.params):
            assert rel(got, want) <= tol, (backend, rel(got, want))
        assert rel(opt.pi, golden.pi) <= tol
        moments = opt.state[opt.param_groups[0]["params"][0]]["exp_avg"]
        assert moments.dtype == (torch.int8 if precision == "int8" else torch.bfloat16)


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
def test_also_resumes_bitwise_at_lower_precision(precision, mode):
    from harness import Config, batches, make_package, package_step

    cfg = Config(mode=mode, api="loop", steps=12, extra=dict(state_precision=precision))
    backend = BACKENDS[-1]
    Wp, bp, opt = make_package(cfg, DEVICE, backend)
    data = list(batches(cfg))
    for X, Y, ids, use_bias in data[:6]:
        package_step(opt, Wp, bp, "loop", X, Y, ids, use_bias, DEVICE, cfg.dtype)
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [Wp.detach().clone(), bp.detach().clone()]
    for X, Y, ids, use_bias in data[6:]:
        package_step(opt, Wp, bp, "loop", X, Y, ids, use_bias, DEVICE, cfg.dtype)
    W2, b2, opt2 = make_package(cfg, DEVICE, backend)
    with torch.no_grad():
        W2.copy_(saved_params[0]), b2.copy_(saved_params[1])
    opt2.load_state_dict(saved)
    for X, Y, ids, use_bias in data[6:]:
        package_step(opt2, W2, b2, "loop", X, Y, ids, use_bias, DEVICE, cfg.dtype)
    assert torch.equal(Wp, W2) and torch.equal(bp, b2) and torch.equal(opt.pi, opt2.pi)


@pytest.mark.skipif(DEVICE != "cuda" or not triton_importable(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("precision", ["param", "bfloat16", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_captured_step_replays_like_eager(precision, dtype):
    """opt.step() captured in a CUDA graph and replayed gives bitwise the params and state of eager steps
    (the gradients are rewritten in place between replays, as a captured training step leaves them)."""
    def build():
        params = make_params(dtype)
        for p in params:
            p.grad = torch.zeros_like(p)
        return params, also_fused.AdamW(params, lr=1e-2, state_precision=precision)

    gen = torch.Generator().manual_seed(3)
    grad_sets = [[torch.randn(s, generator=gen).to(DEVICE, dtype) for s in SHAPES] for _ in range(6)]
    eager_params, eager = build()
    params, opt = build()
    for grads in grad_sets[:2]:  # both warm up eagerly: state created, plans and tables built
        for pe, p, g in zip(eager_params, params, grads):
            pe.grad.copy_(g), p.grad.copy_(g)
        eager.step(), opt.step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for grads in grad_sets[2:]:
        for pe, p, g in zip(eager_params, params, grads):
            pe.grad.copy_(g), p.grad.copy_(g)
        eager.step()
        graph.replay()
    torch.cuda.synchronize()
    for pe, p in zip(eager_params, params):
        assert torch.equal(pe, p)
    for se, s in zip(eager.state.values(), opt.state.values()):
        for key in se:
            assert torch.equal(se[key], s[key]), key
