"""torch.optim's step hooks, profiler labels, grad mode and zero_grad, as torch.optim.AdamW gives them.

The optimizers wrap ``step`` themselves (``_step_hooks.optimizer_step``) so that the profiler label costs
nothing while no profiler records; these tests hold that wrapper to torch.optim's behaviour.
"""
from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import also_fused
from support import DEVICE


def make(kind: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "torch":
        return torch.optim.AdamW(params, lr=1e-2, foreach=False)
    if kind == "also_fused":
        return also_fused.AdamW(params, lr=1e-2, backend="reference")
    return also_fused.ALSO(params, n_groups=3, batch_size=4, lr=1e-2, backend="reference")


def params_with_grads() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen).to(DEVICE)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
    return params


def take_step(opt: torch.optim.Optimizer, kind: str, **kwargs) -> None:
    if kind == "also":
        opt.weighted_loss(torch.rand(4, device=DEVICE), torch.tensor([0, 1, 2, 0], device=DEVICE))
    opt.step(**kwargs)


def hook_log(kind: str, register_global: bool) -> list:
    log: list = []
    opt = make(kind, params_with_grads())
    handles = [
        opt.register_step_pre_hook(lambda o, args, kwargs: log.append(("pre", o is opt, len(args), dict(kwargs)))),
        opt.register_step_post_hook(lambda o, args, kwargs: log.append(("post", o is opt, len(args), dict(kwargs)))),
    ]
    if register_global:
        handles += [register_optimizer_step_pre_hook(lambda o, a, k: log.append(("global pre", o is opt))),
                    register_optimizer_step_post_hook(lambda o, a, k: log.append(("global post", o is opt)))]
    try:
        take_step(opt, kind)
        for handle in handles[:1]:
            handle.remove()
        take_step(opt, kind)
    finally:
        for handle in handles:
            handle.remove()
    return log


@pytest.mark.parametrize("kind", ["also_fused", "also"])
@pytest.mark.parametrize("register_global", [False, True])
def test_step_hooks_fire_as_in_torch_optim(kind, register_global):
    assert hook_log(kind, register_global) == hook_log("torch", register_global)


def test_pre_hook_may_replace_the_arguments():
    """A pre-hook returning (args, kwargs) replaces them: here it adds a closure whose loss step() returns."""
    opt = make("also_fused", params_with_grads())
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        return torch.tensor(7.0)

    opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": closure}))
    assert float(opt.step()) == 7.0
    assert seen == [True]  # the closure runs with gradients on, as torch.optim runs it


@pytest.mark.parametrize("kind", ["also_fused", "also"])
def test_bad_pre_hook_result_is_refused_like_torch(kind):
    opt = make(kind, params_with_grads())
    opt.register_step_pre_hook(lambda o, args, kwargs: 3)
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        take_step(opt, kind)


@pytest.mark.parametrize("kind", ["also_fused", "also"])
def test_grad_mode_is_restored(kind):
    opt = make(kind, params_with_grads())
    for mode in (True, False):
        with torch.set_grad_enabled(mode):
            take_step(opt, kind)
            assert torch.is_grad_enabled() == mode


@pytest.mark.parametrize("kind", ["also_fused", "also"])
def test_profiler_labels_appear_while_profiling(kind):
    opt = make(kind, params_with_grads())
    name = type(opt).__name__
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        take_step(opt, kind)
        opt.zero_grad()
    names = {event.name for event in prof.events()}
    assert f"Optimizer.step#{name}.step" in names
    assert f"Optimizer.zero_grad#{name}.zero_grad" in names


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_matches_torch(set_to_none):
    ours, theirs = params_with_grads(), params_with_grads()
    ours[1].grad = None
    theirs[1].grad = None
    make("also_fused", ours).zero_grad(set_to_none)
    make("torch", theirs).zero_grad(set_to_none)
    for p, q in zip(ours, theirs):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad) and not p.grad.requires_grad


def test_step_is_not_wrapped_twice():
    """torch.optim wraps a step that is not marked ``hooked``; ours are marked, so each stays as it is."""
    for cls in (also_fused.Adam, also_fused.AdamW, also_fused.ALSO):
        before = cls.step
        make("also_fused", params_with_grads())
        make("also", params_with_grads())
        assert cls.step is before and cls.step.hooked


def test_group_weights_step_runs_without_grad_and_restores_the_mode():
    """GroupWeights.step() switches gradients off inside (pi records no graph) and back to the caller's mode,
    also when it raises."""
    weights = also_fused.GroupWeights(4, batch_size=3, device=DEVICE, validate=True)
    inside = []
    ascend = weights._ascend

    def recording_ascend(*args, **kwargs):
        inside.append(torch.is_grad_enabled())
        return ascend(*args, **kwargs)

    weights._ascend = recording_ascend
    for mode in (True, False):
        losses = torch.rand(3, device=DEVICE, requires_grad=True)
        weights.weighted_loss(losses, torch.tensor([0, 1, 3], device=DEVICE)).backward()
        with torch.set_grad_enabled(mode):
            weights.step()
            assert torch.is_grad_enabled() == mode
            assert weights.pi.grad_fn is None and not weights.pi.requires_grad
    assert inside == [False, False]
    with torch.enable_grad():
        weights.weighted_loss(torch.rand(3, device=DEVICE), torch.tensor([0, 1, 3], device=DEVICE))
        with pytest.raises(TypeError):
            weights.step(found_inf="not a tensor")
        assert torch.is_grad_enabled()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_step_in_backward_updates_without_grad_even_under_create_graph():
    """The bucket updates inside backward switch gradients off for the update only: with create_graph=True
    (grad mode on inside the hooks) the in-place update of the leaf params still runs, and the caller's mode
    holds after backward."""
    model = torch.nn.Linear(4, 3).to(DEVICE)
    before = [p.detach().clone() for p in model.parameters()]
    opt = also_fused.AdamW(model.parameters(), lr=1e-2, backend="reference")
    stepper = also_fused.StepInBackward(opt, bucket_mb=1)
    with torch.enable_grad():
        model(torch.rand(2, 4, device=DEVICE)).pow(2).sum().backward(create_graph=True)
        assert torch.is_grad_enabled()
    opt.step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert all(p.grad_fn is None for p in model.parameters())
    stepper.remove()
