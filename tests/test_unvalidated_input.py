"""validate=False: one behaviour on every path (docs/semantics.md). An id outside [0, n_groups) takes no part:
the loss, pi and the params follow the twin that never saw those samples; a NaN or inf loss is not caught
and makes the weighted loss and pi non-finite."""
from __future__ import annotations

import pytest
import torch

import also_fused
from also_fused import cpu_fused
from support import DEVICE, triton_importable

N_GROUPS, B = 4, 12
# every path that runs here: the reference, the CPU extension (CPU tensors), the kernels (CUDA, or the
# interpreter on CPU tensors)
BACKENDS = ["reference"] + (["auto"] if DEVICE == "cpu" and cpu_fused.available()[0] else []) + (
    ["triton"] if triton_importable() else [])
BAD_IDS = torch.tensor([-1, N_GROUPS, 7])


def batches(n: int, seed: int = 0):
    """(losses, ids) with the bad ids appended, and the same batch without them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, N_GROUPS, (B,), generator=gen)
        losses = torch.rand(B, generator=gen) * (1 + ids.float())
        bad_losses = torch.rand(len(BAD_IDS), generator=gen) * 5
        out.append(((torch.cat([losses, bad_losses]).to(DEVICE), torch.cat([ids, BAD_IDS]).to(DEVICE)),
                    (losses.to(DEVICE), ids.to(DEVICE))))
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # the two runs add the same terms, the masked samples' zeros aside, so they differ at most by the order
    # of float32 additions (a few ulps)
    return torch.allclose(a.float(), b.float(), rtol=4e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
def test_group_weights_ignore_out_of_range_ids(backend, reduction, mode):
    make = lambda: also_fused.GroupWeights(N_GROUPS, batch_size=B, mode=mode, pi_lr=0.3, group_reduction=reduction,
                                           device=DEVICE, validate=False, backend=backend)
    dirty, clean = make(), make()
    for (losses, ids), (clean_losses, clean_ids) in batches(4):
        assert close(dirty.weighted_loss(losses, ids), clean.weighted_loss(clean_losses, clean_ids))
        dirty.step(), clean.step()
        assert close(dirty.pi, clean.pi) and close(dirty.pi_mid, clean.pi_mid)
    assert not torch.allclose(clean.pi, torch.full_like(clean.pi, 1 / N_GROUPS), rtol=1e-2)  # pi moved


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("api", ["closure", "loop"])
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
def test_also_ignores_out_of_range_ids(backend, api, mode):
    def make():
        torch.manual_seed(0)
        W = torch.nn.Parameter(torch.randn(3, device=DEVICE))
        return W, also_fused.ALSO([W], N_GROUPS, batch_size=B, mode=mode, pi_lr=0.3, lr=0.05, validate=False,
                                  backend=backend)

    (W, dirty), (V, clean) = make(), make()
    gen = torch.Generator().manual_seed(1)
    for (losses, ids), (clean_losses, clean_ids) in batches(4):
        features = torch.randn(len(ids), 3, generator=gen).to(DEVICE)
        for param, opt, rows, group_ids in ((W, dirty, slice(None), ids), (V, clean, slice(0, B), clean_ids)):
            def per_sample():
                return (features[rows] @ param) ** 2 + losses[rows]

            if api == "closure":
                def closure(pi_selected, scale):
                    opt.zero_grad()
                    sample_losses = per_sample()
                    (scale * (pi_selected * sample_losses).sum()).backward()
                    return sample_losses.detach(), None

                opt.step(closure, group_ids)
            else:
                opt.zero_grad()
                opt.weighted_loss(per_sample(), group_ids).backward()
                opt.step()
        assert close(W.detach(), V.detach()) and close(dirty.pi, clean.pi)
    assert not torch.allclose(clean.pi, torch.full_like(clean.pi, 1 / N_GROUPS), rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_non_finite_losses_are_not_caught(backend, bad, reduction):
    weights = also_fused.GroupWeights(N_GROUPS, batch_size=B, group_reduction=reduction, device=DEVICE,
                                      validate=False, backend=backend)
    (_, _), (losses, ids) = batches(1)[0]
    losses = losses.clone()
    losses[3] = bad
    loss = weights.weighted_loss(losses, ids)  # no error: nothing is checked
    weights.step()
    assert not torch.isfinite(loss) and not torch.isfinite(weights.pi).all()
