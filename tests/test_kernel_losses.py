"""Tests of the fused loss kernels against float64 models written here:

    weighted_loss = s * sum_i pi[g_i] l_i             (ids outside [0, n) contribute 0)
    rgd_loss      = mean_i(w_i l_i), w_i = exp(min(l_i, T) / (T + 1)) held constant
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from also_fused.kernels.losses import rgd_loss, weighted_loss  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def model_weighted(pi: torch.Tensor, ids: torch.Tensor, l64: torch.Tensor, s: float):
    n = pi.numel()
    ok = (ids >= 0) & (ids < n)
    w = torch.where(ok, pi.double().cpu()[ids.clamp(0, max(n - 1, 0))], torch.zeros(()).double())
    return s * (w * l64).sum()


def model_rgd(l64: torch.Tensor, T: float):
    w = torch.exp(torch.clamp(l64.detach(), max=T) / (T + 1.0))
    return (w * l64).mean()


def grads(kernel_fn, model_fn, losses: torch.Tensor, upstream: float = 1.0):
    x = losses.clone().to(DEV).requires_grad_(True)
    out = kernel_fn(x)
    (out * upstream).backward()
    x64 = losses.detach().double().cpu().requires_grad_(True)
    ref = model_fn(x64)
    (ref * upstream).backward()
    return out, ref, x.grad, x64.grad


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a = a.detach().double().cpu()
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-30)
    return float((a - b).abs().max()) <= tol * scale if b.numel() else True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,B,kind", [(1, 5, "rand"), (10, 257, "rand"), (1000, 300, "rand"),
                                      (10, 64, "equal"), (50, 1, "rand"), (10, 0, "rand")])
def test_weighted_matches_model(dtype: torch.dtype, n: int, B: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(n + B)
    pi = torch.rand(n, generator=gen)
    pi /= pi.sum()
    ids = torch.randint(0, n, (B,), generator=gen) if kind == "rand" else torch.full((B,), n - 1)
    losses = (torch.rand(B, generator=gen) * 4).to(dtype)
    s = n / max(B, 1)
    out, ref, g, g64 = grads(lambda x: weighted_loss(pi.to(DEV), ids.to(DEV), x, s),
                             lambda x: model_weighted(pi, ids, x, s), losses, upstream=1.7)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert g.dtype == dtype and g.shape == losses.shape
    assert abs(float(out.detach()) - float(ref.detach())) <= 1e-5 * max(abs(float(ref.detach())), 1e-6)
    assert close(g, g64, TOL[dtype])


def test_weighted_split_batch_and_determinism() -> None:
    """Several programs and the ticket reduction (forced small chunk in the interpreter)."""
    gen = torch.Generator().manual_seed(2)
    n, B = 37, 5000
    pi = torch.rand(n, generator=gen)
    ids = torch.randint(0, n, (B,), generator=gen)
    losses = torch.rand(B, generator=gen) * 9
    kw = {} if CUDA else {"_chunk": 1024}
    if CUDA:
        B = 1 << 20
        ids = torch.randint(0, n, (B,), generator=gen)
        losses = torch.rand(B, generator=gen) * 9
    a = weighted_loss(pi.to(DEV), ids.to(DEV), losses.to(DEV), 0.5, **kw)
    b = weighted_loss(pi.to(DEV), ids.to(DEV), losses.to(DEV), 0.5, **kw)
    assert torch.equal(a, b)
    ref = model_weighted(pi, ids, losses.double(), 0.5)
    assert abs(float(a) - float(ref.detach())) <= 1e-5 * float(ref.detach())
    r1 = rgd_loss(losses.to(DEV), 2.0, **kw)
    r2 = rgd_loss(losses.to(DEV), 2.0, **kw)
    assert torch.equal(r1, r2)
    assert abs(float(r1) - float(model_rgd(losses.double(), 2.0))) <= 1e-5 * float(r1)


def test_weighted_bad_ids_read_nothing_outside() -> None:
    gen = torch.Generator().manual_seed(3)
    n, pad = 20, 16
    big = torch.full((n + 2 * pad,), 1e30)
    big[pad:pad + n] = torch.rand(n, generator=gen)
    pi = big[pad:pad + n].to(DEV)
    pi_big = big.to(DEV)
    pi = pi_big[pad:pad + n]
    ids = torch.tensor([0, -1, n, 5, -pad, n + pad - 1, 2**40, 19])
    losses = torch.rand(8, generator=gen) + 0.5
    out, ref, g, g64 = grads(lambda x: weighted_loss(pi, ids.to(DEV), x, 2.0),
                             lambda x: model_weighted(pi.cpu(), ids, x, 2.0), losses)
    assert abs(float(out.detach()) - float(ref.detach())) <= 1e-5 * float(ref.detach())  # a read of the guard gives ~1e30
    assert close(g, g64, 1e-6)
    bad = (ids < 0) | (ids >= n)
    assert torch.all(g.cpu()[bad] == 0)


def test_weighted_accumulates_two_calls() -> None:
    gen = torch.Generator().manual_seed(4)
    n, B = 10, 100
    pi1, pi2 = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    ids = torch.randint(0, n, (B,), generator=gen)
    losses = torch.rand(B, generator=gen)

    def both(x):
        return weighted_loss(pi1.to(DEV), ids.to(DEV), x, 0.3) + weighted_loss(
            pi2.to(DEV), ids.to(DEV), x * 2.0, 1.1)

    def model(x):
        return model_weighted(pi1, ids, x, 0.3) + model_weighted(pi2, ids, x * 2.0, 1.1)

    out, ref, g, g64 = grads(both, model, losses)
    assert abs(float(out.detach()) - float(ref.detach())) <= 1e-5 * float(ref.detach())
    assert close(g, g64, 1e-6)
    # and gradients accumulate over two backward passes into one leaf
    x = losses.clone().to(DEV).requires_grad_(True)
    weighted_loss(pi1.to(DEV), ids.to(DEV), x, 0.3).backward()
    weighted_loss(pi1.to(DEV), ids.to(DEV), x, 0.3).backward()
    x64 = losses.double().requires_grad_(True)
    (2 * model_weighted(pi1, ids, x64, 0.3)).backward()
    assert close(x.grad, x64.grad, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [0.5, 3.0])
@pytest.mark.parametrize("B", [1, 7, 300])
def test_rgd_matches_model(dtype: torch.dtype, T: float, B: int) -> None:
    gen = torch.Generator().manual_seed(B)
    losses = (torch.rand(B, generator=gen) * 6 - 1).to(dtype)  # below and above T, some < 0
    out, ref, g, g64 = grads(lambda x: rgd_loss(x, T), lambda x: model_rgd(x, T), losses, 0.6)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert g.dtype == dtype
    assert abs(float(out.detach()) - float(ref.detach())) <= 1e-5 * max(abs(float(ref.detach())), 1e-3)
    assert close(g, g64, TOL[dtype])


def test_rgd_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rgd_loss needs a non-empty batch"):
        rgd_loss(torch.zeros(0, device=DEV), 1.0)
    with pytest.raises(ValueError, match="losses must be a 1-D floating tensor"):
        rgd_loss(torch.zeros(2, 2, device=DEV), 1.0)
    with pytest.raises(ValueError, match="losses must be a 1-D floating tensor"):
        rgd_loss(torch.zeros(3, dtype=torch.int64, device=DEV), 1.0)
    with pytest.raises(ValueError, match="group_ids must be 1-D with one id per loss"):
        weighted_loss(torch.ones(3, device=DEV), torch.zeros(2, dtype=torch.int64, device=DEV),
                      torch.ones(3, device=DEV), 1.0)
