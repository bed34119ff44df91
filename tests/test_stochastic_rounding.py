"""Stochastic rounding of bfloat16 and float16 params (docs/algorithm.md sec. 14).

The golden values are computed here: the hash in plain Python integers from the formula the docs state, the
two 16-bit neighbours of a float32 value and its probability of rounding away from zero in float64, and
Adam's float64 trajectory under a constant gradient.
"""
from __future__ import annotations

import math

import pytest
import torch

import also_fused
from also_fused import rounding
from also_fused.backends import triton_available
from support import DEVICE

BACKENDS = ["reference", "auto"] + (["triton"] if DEVICE == "cpu" else [])
MASK = 2 ** 32 - 1


def golden_mix(h: int) -> int:
    """The mixer as docs/algorithm.md sec. 14 states it, on Python ints modulo 2^32."""
    h ^= h >> 16
    h = (h * 0x7FEB352D) % 2 ** 32
    h ^= h >> 15
    h = (h * 0x1B873593) % 2 ** 32
    return h ^ (h >> 16)


def golden_bits(seed: int, step: int, index: int) -> int:
    key = golden_mix(seed ^ golden_mix(step))
    return golden_mix(golden_mix(key ^ (index & MASK)) ^ (index >> 32)) & 0xFFFF


def neighbours(x: float) -> tuple[float, float]:
    """The bfloat16 values next to float32 x toward zero and away from zero (float64)."""
    bits = torch.tensor([x], dtype=torch.float32).view(torch.int32).item() & MASK
    low = bits & 0xFFFF0000
    as_float = lambda b: torch.tensor([b - 2 ** 32 if b >= 2 ** 31 else b], dtype=torch.int32).view(torch.float32).item()
    return as_float(low), as_float(low + 0x10000)


def test_hash_matches_the_stated_formula():
    gen = torch.Generator().manual_seed(0)
    for seed, step in [(0, 1), (12345, 7), (2 ** 31 - 1, 10 ** 6)]:
        key = rounding.stream_key(seed, step)
        got = rounding.random_bits(key, 4096, torch.device("cpu")) & 0xFFFF
        for i in torch.randint(0, 4096, (64,), generator=gen).tolist():
            assert int(got[i]) == golden_bits(seed, step, i)
    # elements past 2^32 (a tensor of more than 4G elements): the high word enters the hash
    start = 2 ** 32 - 3
    high = rounding.random_bits(rounding.stream_key(5, 3), 8, torch.device("cpu"), start=start) & 0xFFFF
    assert high.tolist() == [golden_bits(5, 3, start + i) for i in range(8)]
    assert golden_bits(5, 3, 2 ** 32 + 7) != golden_bits(5, 3, 7)


def f16_neighbours(x: float) -> tuple[float, float, float]:
    """(lo, hi, ulp): the float16 grid points next to |x| toward and away from zero, in float64 (sec. 14)."""
    a = abs(x)
    ulp = 2.0 ** (max(math.floor(math.log2(a)), -14) - 10) if a > 0 else 2.0 ** -24
    lo = math.floor(a / ulp) * ulp
    return lo, lo + ulp, ulp


def test_rounds_to_a_float16_neighbour_with_the_right_probability():
    n = 20000
    for x in [1.0 + 2 ** -12, -3.14159, 3e-6, 65000.0, 0.3, -1e-7]:
        x32 = torch.tensor([x], dtype=torch.float32).item()
        lo, hi, ulp = f16_neighbours(x32)
        # the docs' rule: away with probability f / 2^16, f the first 16 bits of the fraction
        p_away = math.floor((abs(x32) - lo) / ulp * 65536) / 65536
        out = rounding.stochastic_round_fp16(torch.full((n,), x32), rounding.stream_key(3, 11)).double()
        assert set(out.abs().unique().tolist()) <= {lo, hi} and bool((torch.sign(out) * math.copysign(1, x32) >= 0).all())
        frac = (out.abs() == hi).double().mean().item()
        assert abs(frac - p_away) < 5 * math.sqrt(p_away * (1 - p_away) / n) + 1e-12, (x, frac, p_away)
    special = torch.tensor([1.0, -2.0, 0.0, -0.0, 65504.0, float("inf"), -float("inf"), 1e6, float("nan")])
    out = rounding.stochastic_round_fp16(special, 99)
    assert torch.equal(out[:7].float(), special[:7]) and torch.equal(torch.signbit(out[:4].float()),
                                                                      torch.signbit(special[:4]))
    assert out[7].item() == float("inf") and out[8].view(torch.int16).item() == 0x7E00


def test_rounds_to_a_neighbour_with_the_right_probability():
    values = [1.0 + 2 ** -10, -3.14159, 1e-30, 7.5e4, 0.3]
    n = 20000
    for x in values:
        lo, hi = neighbours(x)
        x32 = torch.tensor([x], dtype=torch.float32).item()
        p_away = (abs(x32) - abs(lo)) / (abs(hi) - abs(lo))
        out = rounding.stochastic_round_bf16(torch.full((n,), x32), rounding.stream_key(3, 11)).double()
        assert set(out.unique().tolist()) <= {lo, hi}
        frac = (out == hi).double().mean().item()
        assert abs(frac - p_away) < 5 * math.sqrt(p_away * (1 - p_away) / n) + 1e-12, (x, frac, p_away)
    # exact bfloat16 values, zeros, infinities and NaN pass through
    special = torch.tensor([1.0, -2.0, 0.0, -0.0, float("inf"), -float("inf"), float("nan")])
    out = rounding.stochastic_round_bf16(special, 99)
    assert torch.equal(out[:6].float(), special[:6]) and torch.isnan(out[6])
    assert torch.equal(torch.signbit(out[:4].float()), torch.signbit(special[:4]))


if triton_available()[0]:
    import triton
    import triton.language as tl

    from also_fused.kernels.multi_tensor_adam import _stochastic_round

    @triton.jit
    def round_kernel(x_ptr, out_ptr, key, base, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        # the Adam kernel's rounding of x, for elements base .. base + n - 1 of a tensor
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, _stochastic_round(x, key.to(tl.uint32), base + offs.to(tl.int64), DTYPE), mask=mask)


@pytest.mark.skipif(not triton_available()[0], reason="triton is not installed")
def test_kernel_rounding_bits_equal_the_reference():
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(3000, generator=gen) * 10.0 ** torch.randint(-30, 30, (3000,), generator=gen),
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.3e38, -1e-40])]).to(DEVICE)
    for key, base in [(rounding.stream_key(17, 2), 0), (rounding.stream_key(2 ** 31 - 5, 10 ** 7), 2 ** 32 - 1000)]:
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
        round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, key, base, x.numel(), DTYPE=tl.bfloat16, BLOCK=1024)
        bits = rounding.random_bits(key, x.numel(), torch.device(DEVICE), start=base) & 0xFFFF
        words = x.view(torch.int32).to(torch.int64) & MASK
        expected = torch.where(torch.isnan(x), 0x7FC0, (words + bits) >> 16)  # the docs' statement, on the bits
        expected = torch.where(expected >= 2 ** 15, expected - 2 ** 16, expected).to(torch.int16)
        assert torch.equal(out.view(torch.int16), expected), key
        if base == 0:
            assert torch.equal(out.view(torch.int16), rounding.stochastic_round_bf16(x, key).view(torch.int16))


@pytest.mark.skipif(not triton_available()[0], reason="triton is not installed")
def test_kernel_float16_rounding_bits_equal_the_reference_and_the_docs_rule():
    gen = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(3000, generator=gen) * 2.0 ** torch.randint(-30, 20, (3000,), generator=gen),
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 65504.0, 65530.0, 1e6,
                                 -6.1e-5, 1e-40])]).to(DEVICE)
    for key, base in [(rounding.stream_key(17, 2), 0), (rounding.stream_key(2 ** 31 - 5, 10 ** 7), 2 ** 32 - 1000)]:
        out = torch.empty(x.shape, dtype=torch.float16, device=DEVICE)
        round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, key, base, x.numel(), DTYPE=tl.float16, BLOCK=1024)
        bits = (rounding.random_bits(key, x.numel(), torch.device(DEVICE), start=base) & 0xFFFF).tolist()
        for i, (value, got) in enumerate(zip(x.tolist(), out.float().tolist())):
            if math.isnan(value):
                assert math.isnan(got)
                continue
            if math.isinf(value) or abs(value) >= 65536:
                assert got == math.copysign(float("inf"), value)
                continue
            lo, hi, ulp = f16_neighbours(value)
            away = bits[i] + math.floor((abs(value) - lo) / ulp * 65536) >= 65536
            want = math.copysign(hi if away else lo, value)
            want = float(torch.tensor(want, dtype=torch.float64).to(torch.float16))  # exact, or inf past 65504
            assert got == want and math.copysign(1, got) == math.copysign(1, value), (i, value, got, want)
        if base == 0:
            assert torch.equal(out.view(torch.int16), rounding.stochastic_round_fp16(x, key).view(torch.int16))


def _constant_gradient_run(make, backend, steps=300, n=4096, dtype=torch.bfloat16):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(n, dtype=dtype, device=DEVICE))
    opt = make([w], backend)
    for _ in range(steps):
        w.grad = torch.full_like(w, 1.0)
        opt.step()
    return w.detach().double(), opt


def _golden_adamw_constant_gradient(steps, lr, wd, beta1=0.9, beta2=0.999, eps=1e-8):
    """float64 AdamW from w = 1 under g = 1 (torch's formula), without any rounding of w."""
    w, m, v = 1.0, 0.0, 0.0
    for t in range(1, steps + 1):
        w *= 1 - lr * wd
        m = beta1 * m + (1 - beta1)
        v = beta2 * v + (1 - beta2)
        w -= lr / (1 - beta1 ** t) * m / (math.sqrt(v) / math.sqrt(1 - beta2 ** t) + eps)
    return w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in BACKENDS])
def test_small_updates_survive_in_16_bits(backend, dtype):
    """Below half an ulp at 1.0 (bfloat16 2^-8, float16 2^-10; lr 1e-4 and 2e-5 per step): round to nearest
    never moves w, stochastic rounding follows the float64 trajectory on average."""
    lr, steps, n = (1e-4 if dtype == torch.bfloat16 else 2e-5), 100, 4096
    ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -10
    golden = _golden_adamw_constant_gradient(steps, lr, 0.01)
    sr, _ = _constant_gradient_run(lambda p, b: also_fused.AdamW(p, lr=lr, stochastic_rounding=True, rounding_seed=3,
                                                                  backend=b), backend, steps, n, dtype)
    nearest, _ = _constant_gradient_run(lambda p, b: also_fused.AdamW(p, lr=lr, backend=b), backend, steps, n, dtype)
    assert torch.equal(nearest, torch.ones_like(nearest))
    # each element's error is a sum of rounding errors of at most one ulp with mean zero
    bound = 5 * ulp * math.sqrt(steps / n)
    assert abs(sr.mean().item() - golden) < bound, (sr.mean().item(), golden, bound)
    assert sr.max().item() - sr.min().item() > 0  # elements draw different bits


def _makers():
    return {
        "AdamW": lambda p, b: also_fused.AdamW(p, lr=3e-3, stochastic_rounding=True, rounding_seed=11, backend=b),
        "Adam-amsgrad": lambda p, b: also_fused.Adam(p, lr=3e-3, amsgrad=True, stochastic_rounding=True,
                                                     rounding_seed=11, backend=b),
        "ThetaAdam-optimistic": lambda p, b: also_fused.theta.ThetaAdam(p, lr=3e-3, mode="optimistic",
                                                                        stochastic_rounding=True, rounding_seed=11,
                                                                        backend=b),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(_makers()))
def test_every_backend_draws_the_same_bits(name, dtype):
    """A constant gradient keeps every float32 value exact alike on every path, so the stored 16-bit params
    (and the ALSO extrapolated point) must be the same bits."""
    runs = [_constant_gradient_run(_makers()[name], backend, steps=40, n=3000, dtype=dtype)[0] for backend in BACKENDS]
    for other in runs[1:]:
        assert torch.equal(runs[0], other)
    assert not torch.equal(runs[0], torch.ones_like(runs[0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(_makers()))
def test_resume_continues_the_stream(name, backend):
    make = _makers()[name]
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(2, 700, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(12)]

    def fresh(seed_override=None):
        params = [torch.nn.Parameter(torch.ones(700, dtype=torch.bfloat16, device=DEVICE)) for _ in range(2)]
        opt = make(params, backend)
        if seed_override is not None:
            for group in opt.param_groups:
                group["rounding_seed"] = seed_override
        return params, opt

    def steps(params, opt, some):
        for g in some:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()

    params, opt = fresh()
    steps(params, opt, grads)
    params_b, opt_b = fresh()
    steps(params_b, opt_b, grads[:5])
    saved = opt_b.state_dict()
    params_c, opt_c = fresh(seed_override=12345)  # the loaded state's seed replaces this one
    with torch.no_grad():
        for p, q in zip(params_c, params_b):
            p.copy_(q)
    opt_c.load_state_dict(saved)
    steps(params_c, opt_c, grads[5:])
    for p, q in zip(params, params_c):
        assert torch.equal(p, q)
    other, opt_other = fresh(seed_override=12345)
    steps(other, opt_other, grads)
    assert not torch.equal(other[0], params[0])  # another seed, another stream


def test_tensors_have_their_own_streams():
    a, b = (torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16, device=DEVICE)) for _ in range(2))
    opt = also_fused.AdamW([a, b], lr=1e-4, stochastic_rounding=True)
    for _ in range(20):
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        opt.step()
    assert not torch.equal(a, b)


def test_options_checked():
    half = torch.nn.Parameter(torch.ones(4, dtype=torch.float16, device=DEVICE))
    assert also_fused.AdamW([half], stochastic_rounding=True).param_groups[0]["stochastic_rounding"]
    bf = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16, device=DEVICE))
    for bad in (-1, 2 ** 31, 1.5, True):
        with pytest.raises(ValueError, match="rounding_seed must be an int"):
            also_fused.AdamW([bf], stochastic_rounding=True, rounding_seed=bad)
    also = also_fused.ALSO([bf], n_groups=2, loss_scale=1.0, stochastic_rounding=True, rounding_seed=9)
    assert also.param_groups[0]["stochastic_rounding"] and also.param_groups[0]["rounding_seed"] == 9
    torch.manual_seed(7)
    first = also_fused.AdamW([bf], stochastic_rounding=True).param_groups[0]["rounding_seed"]
    torch.manual_seed(7)
    assert also_fused.AdamW([bf], stochastic_rounding=True).param_groups[0]["rounding_seed"] == first
    # float32 params are stored exactly as without the option
    w32 = [torch.nn.Parameter(torch.linspace(-1, 1, 100, device=DEVICE)) for _ in range(2)]
    opts = [also_fused.AdamW([w32[0]], lr=1e-2, stochastic_rounding=True), also_fused.AdamW([w32[1]], lr=1e-2)]
    for _ in range(5):
        for w, opt in zip(w32, opts):
            w.grad = torch.cos(w.detach() * 3)
            opt.step()
    assert torch.equal(w32[0], w32[1])


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU extension's own rounding")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["AdamW", "ThetaAdam-optimistic"])
def test_the_cpu_extension_rounds_itself(name, dtype, monkeypatch):
    """The C++ extension draws the bits itself (x_new and the extrapolated point), the reference's bits."""
    from also_fused import cpu_fused

    if not cpu_fused.available()[0]:
        pytest.skip("the C++ extension is not built")
    want, _ = _constant_gradient_run(_makers()[name], "reference", steps=12, n=3000, dtype=dtype)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran instead of the extension")

    monkeypatch.setattr(cpu_fused.F, "adam_step", refuse)
    got, _ = _constant_gradient_run(_makers()[name], "auto", steps=12, n=3000, dtype=dtype)
    assert torch.equal(got, want)
