"""Moment storage precision of the drop-ins: torch's layout by default, float32 or bfloat16 on request.

Memory and state_dict dtypes are compared with torch.optim's; trajectories with torch's fused AdamW
(the same single rounding of the moments per step) and between the paths that run here.
"""
from __future__ import annotations

import copy

import pytest
import torch

import also_fused
from support import DEVICE, code_rank, triton_importable
from support.compare import assert_close_in_float32, assert_same_rounding

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
        # the same float32 formula, some operations rounded differently, every step; stored in 16 bits,
        # rounded from float32 values that close (support/compare.py)
        for p, q in zip(params, ref_params):
            for key in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                a, b = (p.detach(), q.detach()) if key == "param" else (opt.state[p][key], ref_opt.state[q][key])
                if a.dtype == torch.float32:
                    assert_close_in_float32(a, b, (backend, key))
                else:
                    assert_same_rounding(a, b, (backend, key))


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


def _code_model(x: torch.Tensor, signed: bool) -> tuple:
    """float64 model of functional's 8-bit code: (scale s per element, zero offset o, mantissa bits M, the
    largest t the code holds) with s the smallest power of two above the block's max |x|."""
    from also_fused import functional as F
    from also_fused.storage import QUANT_M_BITS, QUANT_V_BITS

    exp_bits, mant_bits = QUANT_M_BITS if signed else QUANT_V_BITS
    a = torch.nn.functional.pad(x.double().abs(), (0, F.quant_blocks(x.numel()) * F.QUANT_BLOCK - x.numel()))
    a = a.view(-1, F.QUANT_BLOCK).amax(1)
    k = torch.floor(torch.log2(a.clamp_min(2.0 ** -200))) + 1
    s = torch.exp2(k.clamp(2 ** exp_bits - 126, 127)).repeat_interleave(F.QUANT_BLOCK)[:x.numel()]
    o = s / 2.0 ** (2 ** exp_bits)
    top = s * (1 - 2.0 ** -(mant_bits + 1))  # the largest t = |x| + o a code holds: (2 - 2^-M) s / 2
    return s, o, mant_bits, top


@pytest.mark.parametrize("signed", [True, False])
def test_quantisation_error_within_its_derived_bound(signed):
    """|x - decode(encode(x))| <= 2^-(M+1) t / (1 - 2^-(M+1)) + 2^-23 t (+ o where t lies above the largest
    code), t = |x| + o: t rounded to M significant bits, the float32 roundings of t and of the decoded t - o,
    and the top code's clamp; the scales are the float64 model's powers of two."""
    from also_fused import functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=gen) * torch.logspace(-8, 0, 5000)
    x = x if signed else x * x
    codes = torch.empty(5000, dtype=F.QUANT_DTYPES[signed])
    scales = torch.empty(F.quant_blocks(5000))
    F.quantize_moment_(x, codes, scales, signed)
    back = F.dequantize_moment(codes, scales, signed)
    s, o, mant_bits, top = _code_model(x, signed)
    assert torch.equal(scales.double(), s[::F.QUANT_BLOCK])
    t = x.double().abs() + o
    half = 2.0 ** -(mant_bits + 1)
    bound = half * t / (1 - half) + 2.0 ** -23 * t + torch.where(t > top, o, torch.zeros_like(o))
    err = (x.double() - back.double()).abs()
    assert torch.all(err <= bound)
    assert torch.equal(torch.signbit(back), torch.signbit(x))  # -0 included
    # the bound is not loose: the largest error reaches a third of it
    assert float((err / bound).max()) > 0.3


@pytest.mark.parametrize("signed", [True, False])
def test_quantisation_round_trip_is_exact_on_decoded_values(signed):
    """Encoding decoded values gives back the same codes and scales (every decoded value is a code point)."""
    from also_fused import functional as F

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3000, generator=gen) * torch.logspace(-30, 2, 3000)
    x = x if signed else x * x
    codes, scales = torch.empty(3000, dtype=F.QUANT_DTYPES[signed]), torch.empty(F.quant_blocks(3000))
    F.quantize_moment_(x, codes, scales, signed)
    codes2, scales2 = torch.empty_like(codes), torch.empty_like(scales)
    F.quantize_moment_(F.dequantize_moment(codes, scales, signed), codes2, scales2, signed)
    assert torch.equal(codes, codes2) and torch.equal(scales, scales2)


@pytest.mark.parametrize("signed", [True, False])
def test_quantisation_of_zero_and_tiny_blocks(signed):
    """A block of zeros takes the code's smallest scale and codes 0, and decodes to exact (signed) zeros; a block of
    values far below float32's normal range is held relative to that scale (within the bound above);
    its neighbours keep their own scales."""
    from also_fused import functional as F
    from also_fused.storage import QUANT_M_BITS, QUANT_V_BITS

    exp_bits = (QUANT_M_BITS if signed else QUANT_V_BITS)[0]
    tiny = torch.finfo(torch.float32).tiny
    x = torch.cat([torch.zeros(1024), torch.full((1024,), tiny / 4), torch.linspace(-1.0, 1.0, 1000).abs() + 0.5])
    x = x if not signed else x * torch.where(torch.arange(x.numel()) % 2 == 0, 1.0, -1.0)
    codes = torch.empty(x.numel(), dtype=F.QUANT_DTYPES[signed])
    scales = torch.empty(F.quant_blocks(x.numel()))
    F.quantize_moment_(x, codes, scales, signed)
    smallest = 2.0 ** (2 ** exp_bits - 126)
    assert float(scales[0]) == smallest and float(scales[1]) == smallest and float(scales[2]) == 2.0
    assert torch.all((codes[:1024].int() & 0x7F) == 0)  # m's -0 keeps its sign bit
    back = F.dequantize_moment(codes, scales, signed)
    assert torch.all(back[:1024] == 0) and torch.equal(torch.signbit(back[:1024]), torch.signbit(x[:1024]))
    assert torch.isfinite(back).all()
    s, o, mant_bits, _ = _code_model(x, signed)
    t = x.double().abs() + o
    assert torch.all((back.double() - x.double()).abs()[1024:2048] <= 2.0 ** -mant_bits * t[1024:2048])


def test_legacy_codes_load_through_their_own_decoding():
    """A state_dict of the earlier 8-bit code (scales = block maxima, m = a q|q|/127^2, v = a q^4/255^4) loads:
    its moments are decoded by that code and re-encoded by this one."""
    from also_fused import functional as F

    p = torch.nn.Parameter(torch.randn(1500))
    opt = also_fused.AdamW([p], state_precision="int8")
    p.grad = torch.randn(1500)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    gen = torch.Generator().manual_seed(3)
    qm = torch.randint(-127, 128, (1500,), generator=gen, dtype=torch.int8)
    qv = torch.randint(0, 256, (1500,), generator=gen, dtype=torch.uint8)
    am, av = torch.tensor([0.3, 0.07]), torch.tensor([2e-3, 5e-5])
    state = saved["state"][0]
    state.update(exp_avg=qm, exp_avg_sq=qv, exp_avg_scale=am, exp_avg_sq_scale=av)
    assert F.is_legacy_scales(am) and not F.is_legacy_scales(opt.state[p]["exp_avg_scale"])
    opt.load_state_dict(saved)
    # the earlier code's decoding, in float32 as it was evaluated
    q, u = qm.float(), qv.float()
    m_legacy = (q * q.abs()) * (am * torch.tensor(1 / 127 ** 2)).repeat_interleave(1024)[:1500]
    v_legacy = ((u * u) * (u * u)) * (av * torch.tensor(1 / 255 ** 4)).repeat_interleave(1024)[:1500]
    for key, signed, want in (("exp_avg", True, m_legacy), ("exp_avg_sq", False, v_legacy)):
        codes, scales = torch.empty(1500, dtype=F.QUANT_DTYPES[signed]), torch.empty(2)
        F.quantize_moment_(want, codes, scales, signed)
        assert torch.equal(opt.state[p][key], codes) and torch.equal(opt.state[p][key + "_scale"], scales)


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
                diff = (code_rank(opt.state[p][key]) - code_rank(ref_opt.state[q][key])).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
            torch.testing.assert_close(opt.state[p]["exp_avg_scale"], ref_opt.state[q]["exp_avg_scale"], rtol=1e-5,
                                       atol=0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton kernels")
@pytest.mark.parametrize("iterations", [2, 4])
def test_int8_kernel_with_several_blocks_per_program(monkeypatch, iterations):
    """Programs that cover several 1024-element blocks (each with its own scale) agree with the reference: on a
    GPU through the software-pipelined loop (PIPELINE_STAGES) with a tail block, in the interpreter the plain loop."""
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
        diff = (code_rank(opt.state[p]["exp_avg_sq"]) - code_rank(ref_opt.state[q]["exp_avg_sq"])).abs()
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
            if direction == "int8_to_float":  # decoded values are kept exactly
                assert torch.equal(a, b)
            else:  # within the code's bound (test_quantisation_error_within_its_derived_bound)
                _, o, mant_bits, _ = _code_model(a.flatten(), signed)
                half = 2.0 ** -(mant_bits + 1)
                t = a.flatten().double().abs() + o
                assert torch.all((a.flatten().double() - b.flatten().double()).abs() <= half * t / (1 - half) + 2.0 ** -23 * t + o)
    train(other, other.param_groups[0]["params"], 2, start=3)  # and it steps on


# ------------------------------------------------------------------- ALSO's theta side
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["loop", "closure"])
def test_also_at_lower_precision_follows_its_golden_model(precision, mode, api):
    """The float64 model keeping its moments in the same storage (rounded to bf16, or the 8-bit code, once
    per update call as the package stores them): float32 arithmetic apart, the same trajectory over 40
    steps, params and every entry of pi (golden_checks.TOL)."""
    from support.golden_checks import check
    from support.harness import Config

    for backend in BACKENDS:
        cfg = Config(mode=mode, api=api, steps=40, extra=dict(state_precision=precision))
        _, opt = check(cfg, backend, DEVICE)
        moments = opt.state[opt.param_groups[0]["params"][0]]["exp_avg"]
        assert moments.dtype == (torch.int8 if precision == "int8" else torch.bfloat16)


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
def test_also_resumes_bitwise_at_lower_precision(precision, mode):
    from support.harness import Config, batches, make_package, package_step

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


@pytest.mark.parametrize("precision", ["param", "int8"])
def test_a_param_group_added_from_an_iterator_is_trained(precision):
    """add_param_group takes an iterator of params (as model.parameters() gives) at every state precision:
    the group holds them and step() updates them."""
    a, b = (torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (5, 3))
    opt = also_fused.AdamW([a], state_precision=precision)
    opt.add_param_group({"params": (p for p in [b]), "lr": 0.1})
    assert len(opt.param_groups[1]["params"]) == 1 and opt.param_groups[1]["params"][0] is b
    before = b.detach().clone()
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert not torch.equal(b.detach(), before)
    if precision == "int8":
        with pytest.raises(ValueError, match="does not support amsgrad"):
            opt.add_param_group({"params": iter([torch.nn.Parameter(torch.randn(2, device=DEVICE))]), "amsgrad": True})
