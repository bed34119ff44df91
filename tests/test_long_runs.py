"""Long runs of ``also_fused.ALSO``: pi stays a distribution, GPU memory stays flat, runs repeat bitwise.

(a) ``test_pi_long_run_stays_on_simplex``: descent-ascent pi steps with per-sample losses up to 1e4
    (random, one group dominating, all samples in one group, tiny, zero; blocks of each in turn),
    a temperature of 0.5 and a non-uniform pi_reg. A 1-element param whose closure never produces a
    gradient makes every step a pure pi step. After every step pi must be finite, non-negative and
    sum to 1 within 1e-5 (checked on the device, no host sync per step).
      * backend "reference" on the CPU: 10^5 steps, always;
      * backend "triton" on CUDA: 10^5 steps with 64 groups (single-program kernel) and 10^5 with
        3000 groups (the large-n_groups kernels);
      * backend "triton" without CUDA, i.e. the kernels in Triton's interpreter: 2000 steps with 64
        groups and 200 with 1000 groups (about 16 s on a 2-core CPU).
(b) ``test_gpu_memory_flat_over_training_run`` (CUDA only): 10^4 loop-API steps of a small MLP on
    backend "triton", each mode; ``torch.cuda.memory_allocated()`` after every 1000 steps equals its
    value after the warm-up.
(c) ``test_gpu_runs_are_bitwise_deterministic`` (CUDA only): two 1000-step runs with the same seed,
    each mode and API, give bitwise identical params, pi and optimizer state.
"""
from __future__ import annotations

import pytest
import torch

import also_fused
from support import DEVICE, SHORT

pytestmark = pytest.mark.slow  # thousands of steps per test

ON_GPU = DEVICE == "cuda"
MODES = ("optimistic", "descent-ascent")
LOSS_MAX = 1e4


def _pi_block(regime: int, block: int, n: int, B: int, rotate: int, gen: torch.Generator):
    """ids [block, B] and losses [block, B] of one regime."""
    ids = torch.randint(0, n, (block, B), generator=gen)
    if regime == 0:  # random losses over the whole range
        losses = torch.rand(block, B, generator=gen) * LOSS_MAX
    elif regime == 1:  # one group (a different one each time) takes the largest loss, the others none
        g = (rotate * 7919) % n
        ids[:, 0] = g
        losses = torch.zeros(block, B)
        losses[:, 0] = LOSS_MAX
    elif regime == 2:  # every sample in one group, every loss the largest: S_j = B * 1e4
        ids[:] = (rotate * 104729 + 1) % n
        losses = torch.full((block, B), LOSS_MAX)
    elif regime == 3:  # tiny losses: the KL pull towards pi_reg dominates
        losses = torch.rand(block, B, generator=gen) * 1e-6
    else:  # no loss at all
        losses = torch.zeros(block, B)
    return ids, losses


def run_pi_steps(backend: str, device: str, n: int, steps: int, block: int, B: int = 16) -> dict:
    gen = torch.Generator().manual_seed(n + steps)
    pi_reg = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    p = torch.nn.Parameter(torch.zeros(1, device=device))
    opt = also_fused.ALSO([p], n_groups=n, batch_size=B, mode="descent-ascent", backend=backend, pi_lr=1e-2,
                          pi_decay=1.0, pi_temperature=0.5, pi_reg=pi_reg)
    worst = torch.zeros((), dtype=torch.float64, device=device)  # max |sum(pi) - 1|, NaN propagates
    low = torch.ones((), device=device)  # min entry of pi seen
    peak = torch.zeros((), device=device)  # max entry of pi seen
    done = 0
    while done < steps:
        k = done // block
        ids, losses = _pi_block(k % 5, min(block, steps - done), n, B, k, gen)
        ids, losses = ids.to(device), losses.to(device)
        for i in range(ids.shape[0]):
            opt.step(lambda pi_sel, scale, l=losses[i]: (l, None), ids[i])
            pi = opt.pi
            torch.maximum(worst, (pi.double().sum() - 1.0).abs(), out=worst)
            torch.minimum(low, pi.min(), out=low)
            torch.maximum(peak, pi.max(), out=peak)
        done += ids.shape[0]
    assert p.grad is None and torch.equal(p.detach(), torch.zeros_like(p)), "pure pi steps expected"
    return dict(pi=opt.pi.cpu(), worst=float(worst), low=float(low), peak=float(peak), steps=done)


def _pi_runs():
    runs = [pytest.param("reference", "cpu", 64, 100_000, 1000, id="reference-cpu-64groups-100000steps")]
    if ON_GPU:
        steps = 2000 if SHORT else 100_000
        runs += [pytest.param("triton", DEVICE, 64, steps, 1000, id=f"triton-cuda-64groups-{steps}steps"),
                 pytest.param("triton", DEVICE, 3000, steps, 1000, id=f"triton-cuda-3000groups-{steps}steps")]
    else:
        runs += [pytest.param("triton", "cpu", 64, 2000, 100, id="triton-interpreter-64groups-2000steps"),
                 pytest.param("triton", "cpu", 1000, 200, 10, id="triton-interpreter-1000groups-200steps")]
    return runs


@pytest.mark.parametrize("backend,device,n,steps,block", _pi_runs())
def test_pi_long_run_stays_on_simplex(backend, device, n, steps, block):
    if backend == "triton":
        pytest.importorskip("triton")
    out = run_pi_steps(backend, device, n, steps, block)
    assert out["steps"] == steps
    assert torch.isfinite(out["pi"]).all()
    assert out["worst"] <= 1e-5, f"|sum(pi) - 1| reached {out['worst']}"
    assert out["low"] >= 0.0, f"pi reached {out['low']}"
    # the run did push pi to the corners (one group holding almost all of the mass)
    assert out["peak"] > 0.99


# ------------------------------------------------------------------------ CUDA-only runs
class SmallMLP(torch.nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 4) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(d_in, hidden)
        self.l2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def _data(n_groups: int, B: int, count: int, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(count):
        X = torch.randn(B, 16, generator=gen)
        ids = torch.randint(0, n_groups, (B,), generator=gen)
        Y = torch.randn(B, 4, generator=gen) + (ids % 3).float().unsqueeze(1)
        out.append((X.to(DEVICE), Y.to(DEVICE), ids.to(DEVICE)))
    return out


def _setup(mode: str, seed: int, n_groups: int = 1000, B: int = 64, count: int = 64):
    torch.manual_seed(seed)
    model = SmallMLP().to(DEVICE)
    opt = also_fused.ALSO(model.parameters(), n_groups=n_groups, batch_size=B, mode=mode, backend="triton",
                          lr=3e-3, pi_lr=1e-2)
    return model, opt, _data(n_groups, B, count, seed)


def _train_step(model, opt, batch, api: str) -> None:
    X, Y, ids = batch
    if api == "loop":
        opt.zero_grad(set_to_none=True)
        losses = ((model(X) - Y) ** 2).mean(1)
        opt.weighted_loss(losses, ids).backward()
        opt.step()
        return

    def closure(pi_sel, scale):
        opt.zero_grad(set_to_none=True)
        losses = ((model(X) - Y) ** 2).mean(1)
        (scale * (pi_sel * losses).sum()).backward()
        return losses.detach(), None

    opt.step(closure, ids)


@pytest.mark.skipif(not ON_GPU, reason="CUDA only: measures torch.cuda.memory_allocated()")
@pytest.mark.parametrize("mode", MODES)
def test_gpu_memory_flat_over_training_run(mode):
    steps, warmup, every = (1000, 100, 100) if SHORT else (10_000, 200, 1000)
    model, opt, data = _setup(mode, seed=0)
    for k in range(warmup):
        _train_step(model, opt, data[k % len(data)], "loop")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    samples = []
    for k in range(warmup, steps):
        _train_step(model, opt, data[k % len(data)], "loop")
        if (k + 1) % every == 0:
            torch.cuda.synchronize()
            samples.append(torch.cuda.memory_allocated())
    assert len(samples) == steps // every
    assert all(s == base for s in samples), f"allocated bytes after warm-up {base}, then {samples}"
    assert torch.isfinite(opt.pi).all() and all(torch.isfinite(p).all() for p in model.parameters())


def _run_for_determinism(mode: str, api: str, seed: int, steps: int = 50 if SHORT else 1000):
    model, opt, data = _setup(mode, seed)
    for k in range(steps):
        _train_step(model, opt, data[k % len(data)], api)
    opt.eval()  # optimistic loop API: the iterate x into the params
    torch.cuda.synchronize()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v
             for k, v in opt.state_dict()["also"].items()}
    moments = [(s["exp_avg"].clone(), s["exp_avg_sq"].clone(), s["step"].clone())
               for s in opt.state_dict()["state"].values()]
    return params, opt.pi.clone(), state, moments


@pytest.mark.skipif(not ON_GPU, reason="CUDA only: bitwise determinism of the GPU kernels")
@pytest.mark.parametrize("api", ["loop", "closure"])
@pytest.mark.parametrize("mode", MODES)
def test_gpu_runs_are_bitwise_deterministic(mode, api):
    a = _run_for_determinism(mode, api, seed=3)
    b = _run_for_determinism(mode, api, seed=3)
    c = _run_for_determinism(mode, api, seed=4, steps=10)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y), "params differ between two identical runs"
    assert torch.equal(a[1], b[1]), "pi differs between two identical runs"
    for key, value in a[2].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[2][key]), key
    for (m1, v1, t1), (m2, v2, t2) in zip(a[3], b[3]):
        assert torch.equal(m1, m2) and torch.equal(v1, v2) and torch.equal(t1, t2)
    # the runs did train and move pi: a different seed gives different numbers
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[1], torch.full_like(a[1], 1.0 / a[1].numel()))
