"""The optimizer classes on backend="triton" (CUDA, or Triton's interpreter on the CPU).

Same checks as the reference path: trajectories against the float64 golden model, the drop-ins
against torch.optim, bitwise resume, bad input. Fewer steps on the interpreter, which is slow.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import also_fused
from support import DEVICE, triton_importable
from support.dropin import CASES, assert_close, run_pair
from support.golden_checks import check
from support.harness import Config, assert_same, batches, make_package, package_step, rel, resume_is_bitwise, run

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")
ON_GPU = DEVICE == "cuda"
STEPS = 200 if ON_GPU else 25


@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["closure", "loop"])
@pytest.mark.parametrize("variant", [dict(), dict(amsgrad=True, weight_decay=0.0, alpha=0.5),
                                     dict(lose_grad_every=3, pi_reg=[1.0, 2.0, 3.0, 4.0], temperature=2.0),
                                     dict(eps=3e-2, ids="same", batch=1),
                                     dict(group_reduction="mean", pi_lr=0.3, lose_grad_every=4)],
                         ids=["default", "amsgrad", "lost_grad", "eps_one_sample", "group_mean"])
def test_also_matches_golden(mode, api, variant):
    check(Config(mode=mode, api=api, steps=STEPS, **variant), backend="triton", device=DEVICE)


@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["closure", "loop"])
def test_triton_follows_reference(mode, api):
    """The kernels and the reference path agree closely step by step (not only at the end)."""
    cfg = Config(mode=mode, api=api, steps=10, lose_grad_every=4, n_groups=1000, batch=16)
    data = list(batches(cfg))
    Wr, br, ref = make_package(cfg, DEVICE, "reference")
    Wt, bt, tri = make_package(cfg, DEVICE, "triton")
    for X, Y, ids, use_bias in data:
        lr_ = package_step(ref, Wr, br, api, X, Y, ids, use_bias, DEVICE, cfg.dtype)
        lt_ = package_step(tri, Wt, bt, api, X, Y, ids, use_bias, DEVICE, cfg.dtype)
        assert torch.allclose(lr_, lt_, rtol=1e-6)
        assert rel(Wt.detach(), Wr.detach()) <= 1e-6 and rel(bt.detach(), br.detach()) <= 1e-6
        assert rel(tri.pi, ref.pi) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
def test_low_precision_params(dtype, mode):
    """The kernels on 16-bit params against the float64 model fed the package's own losses and gradients,
    holding its params in the same dtype: the same params (or a neighbouring value) and pi."""
    check(Config(mode=mode, api="loop", dtype=dtype, steps=STEPS // 2), backend="triton", device=DEVICE)


@pytest.mark.parametrize("kwargs", CASES[:4] if not ON_GPU else CASES, ids=str)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_dropins_match_torch(name, kwargs):
    steps = 100 if ON_GPU else 20
    ours, theirs, _, _ = run_pair(getattr(also_fused, name), getattr(torch.optim, name), kwargs,
                                  steps=steps, backend="triton")
    assert_close(ours, theirs, tol=1e-6)


@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["closure", "loop"])
def test_resume_bitwise_triton(mode, api):
    k, more = (37, 100) if ON_GPU else (6, 8)
    resume_is_bitwise(api, mode, amsgrad=True, backend="triton", device=DEVICE, k=k, more=more)


@pytest.mark.parametrize("api", ["closure", "loop"])
def test_bad_ids_leave_state_unchanged(api):
    cfg = Config(api=api, steps=3)
    W, b, opt = make_package(cfg, DEVICE, "triton")
    for X, Y, ids, use_bias in batches(cfg):
        package_step(opt, W, b, api, X, Y, ids, use_bias, DEVICE, cfg.dtype)
    before = (copy.deepcopy(opt.state_dict()), [W.detach().clone(), b.detach().clone()])
    X, Y, ids, _ = next(iter(batches(dataclasses.replace(cfg, seed=3))))
    for bad in (ids + cfg.n_groups, ids - cfg.n_groups):
        with pytest.raises(ValueError, match="group_ids"):
            package_step(opt, W, b, api, X, Y, bad, True, DEVICE, cfg.dtype)
            opt.check_errors()  # on CUDA the kernels' check surfaces here
    opt.zero_grad()
    after = (opt.state_dict(), [W.detach().clone(), b.detach().clone()])
    assert_same(after, before)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
def test_cuda_graph_capture_of_a_training_step(mode):
    """A whole loop-API step (forward, weighted loss, backward, ALSO step) replays like eager."""
    torch.manual_seed(0)

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5)).cuda()
        opt = also_fused.ALSO(model.parameters(), n_groups=5, batch_size=16, mode=mode, validate=False,
                              pi_lr=0.05, backend="triton")
        return model, opt

    xs = [torch.randn(16, 32, device="cuda") for _ in range(8)]
    ys = [torch.randint(0, 5, (16,), device="cuda") for _ in range(8)]

    def train_step(model, opt, x, y):
        opt.zero_grad(set_to_none=False)
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        opt.weighted_loss(losses, y).backward()
        return opt.step()

    eager_model, eager_opt = build()
    for x, y in zip(xs, ys):
        train_step(eager_model, eager_opt, x, y)

    model, opt = build()
    static_x, static_y = xs[0].clone(), ys[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x, y in zip(xs[:3], ys[:3]):  # warm-up: caches and grads allocated before the capture
            static_x.copy_(x), static_y.copy_(y)
            train_step(model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt, static_x, static_y)
    for x, y in zip(xs[3:], ys[3:]):
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert torch.allclose(opt.pi, eager_opt.pi, rtol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("n_groups", [3000, 200_000], ids=["dense_sums", "sparse"])
def test_cuda_graph_replays_of_many_groups_weights_are_bitwise_eager(mode, n_groups):
    """One weight per sample (the many-groups kernels, both variants) captured with its weighted loss and
    backward: each replay gives the eager iteration's pi, pi_mid, mean and gradient, bitwise."""
    batch = 64
    gen = torch.Generator("cuda").manual_seed(n_groups)
    data = [(torch.randint(0, n_groups, (batch,), device="cuda", generator=gen),
             torch.rand(batch, device="cuda", generator=gen) * 3) for _ in range(6)]

    def make():
        return also_fused.GroupWeights(n_groups, batch_size=batch, mode=mode, pi_lr=0.5, validate=False,
                                       device="cuda", backend="triton")

    def iteration(weights, ids, losses):
        losses.grad = None
        weights.weighted_loss(losses, ids).backward()
        return weights.step()

    eager = make()
    expected = []
    for ids, values in data:
        losses = values.clone().requires_grad_()
        mean = iteration(eager, ids, losses)
        expected.append((eager.pi.clone(), eager.pi_mid.clone(), mean.clone(), losses.grad.clone()))

    weights = make()
    static_ids, static_losses = data[0][0].clone(), data[0][1].clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the kernels compiled and the workspace allocated before capture
        iteration(weights, static_ids, static_losses)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_mean = iteration(weights, static_ids, static_losses)
    for (ids, values), (pi, pi_mid, mean, grad) in zip(data[1:], expected[1:]):
        static_ids.copy_(ids)
        with torch.no_grad():
            static_losses.copy_(values)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(weights.pi, pi) and torch.equal(weights.pi_mid, pi_mid)
        assert torch.equal(static_mean, mean) and torch.equal(static_losses.grad, grad)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_with_validate_is_refused():
    """validate=True (the default) reports each step to the host, which a replayed graph cannot do: the
    capture fails with a RuntimeError raised before the step changes anything, and eager steps go on."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3).cuda()
    opt = also_fused.ALSO(model.parameters(), n_groups=3, batch_size=4, backend="triton")
    x, y = torch.randn(4, 8, device="cuda"), torch.randint(0, 3, (4,), device="cuda")

    def train_step():
        opt.zero_grad(set_to_none=False)
        opt.weighted_loss(torch.nn.functional.cross_entropy(model(x), y, reduction="none"), y).backward()
        opt.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        train_step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    params = [p.detach().clone() for p in model.parameters()]
    pi = opt.pi.clone()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="validate=False"):
        with torch.cuda.graph(graph):
            train_step()
    torch.cuda.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert torch.equal(opt.pi, pi)
    train_step()
    opt.check_errors()
    assert not torch.equal(opt.pi, pi)
