"""What a training loop needs beyond the update itself: no host syncs, torch.compile, tensor lr and betas.

* Under ``torch.cuda.set_sync_debug_mode("error")`` every optimizer's ``step()`` and ALSO's
  ``weighted_loss()`` run with their default settings and an lr schedule (GPU only).
* ``torch.compile(opt.step)`` gives the eager results (the step itself runs eagerly: a graph
  break around one fused launch), and ``torch.compile(model)`` trains like the eager model.
* A tensor ``lr`` and tensor ``betas`` give the float results, follow a scheduler, and are refused
  where torch.optim refuses them, with its exception types.
"""
from __future__ import annotations

import copy

import pytest
import torch

import also_fused
from support import DEVICE
from support.harness import assert_same

ON_CUDA = DEVICE == "cuda"
N_GROUPS, BATCH = 4, 16


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(DEVICE)


def data(k: int):
    gen = torch.Generator().manual_seed(1000 + k)
    X = torch.randn(BATCH, 8, generator=gen)
    y = torch.randint(0, 3, (BATCH,), generator=gen)
    ids = torch.randint(0, N_GROUPS, (BATCH,), generator=gen)
    return X.to(DEVICE), y.to(DEVICE), ids.to(DEVICE)


OPTIMIZERS = {
    "Adam": lambda ps: also_fused.Adam(ps, lr=1e-2, weight_decay=1e-3),
    "AdamW": lambda ps: also_fused.AdamW(ps, lr=1e-2),
    "ALSO descent-ascent": lambda ps: also_fused.ALSO(ps, N_GROUPS, batch_size=BATCH, mode="descent-ascent", lr=1e-2),
    "ALSO optimistic": lambda ps: also_fused.ALSO(ps, N_GROUPS, batch_size=BATCH, lr=1e-2),
}


def train_step(model, opt, k: int, api: str = "loop"):
    X, y, ids = data(k)
    if isinstance(opt, also_fused.ALSO) and api == "closure":
        def closure(pi_sel, scale):
            opt.zero_grad(set_to_none=True)
            losses = torch.nn.functional.cross_entropy(model(X), y, reduction="none")
            (scale * (pi_sel * losses).sum()).backward()
            return losses.detach(), None
        return opt.step(closure, ids)
    opt.zero_grad(set_to_none=True)
    losses = torch.nn.functional.cross_entropy(model(X), y, reduction="none")
    loss = opt.weighted_loss(losses, ids) if isinstance(opt, also_fused.ALSO) else losses.mean()
    loss.backward()
    opt.step()
    return loss.detach()


def state_of(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


@pytest.mark.skipif(not ON_CUDA, reason="host syncs are a CUDA matter")
@pytest.mark.parametrize("name", list(OPTIMIZERS) + ["ALSO optimistic closure", "ALSO descent-ascent closure",
                                                     "ALSO group mean"])
def test_no_host_sync_in_a_training_loop(name):
    model = make_model()
    if name == "ALSO group mean":
        opt = also_fused.ALSO(model.parameters(), N_GROUPS, group_reduction="mean", lr=1e-2)
    else:
        opt = OPTIMIZERS[name.replace(" closure", "")](model.parameters())
    api = "closure" if name.endswith("closure") else "loop"
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    batches = [data(k) for k in range(6)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(6):
            X, y, ids = batches[k]

            def closure(pi_sel, scale):
                opt.zero_grad(set_to_none=True)
                losses = torch.nn.functional.cross_entropy(model(X), y, reduction="none")
                (scale * (pi_sel * losses).sum()).backward()
                return losses.detach(), None

            if api == "closure":
                opt.step(closure, ids)
            else:
                opt.zero_grad(set_to_none=True)
                losses = torch.nn.functional.cross_entropy(model(X), y, reduction="none")
                loss = opt.weighted_loss(losses, ids) if isinstance(opt, also_fused.ALSO) else losses.mean()
                loss.backward()
                opt.step()
            sched.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if isinstance(opt, also_fused.ALSO):
        opt.check_errors()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_step_equals_eager(name):
    eager_model, compiled_model = make_model(), make_model()
    eager_opt = OPTIMIZERS[name](eager_model.parameters())
    compiled_opt = OPTIMIZERS[name](compiled_model.parameters())
    compiled_step = torch.compile(compiled_opt.step)
    for k in range(4):
        for model, opt, step in ((eager_model, eager_opt, eager_opt.step), (compiled_model, compiled_opt, compiled_step)):
            X, y, ids = data(k)
            opt.zero_grad(set_to_none=True)
            losses = torch.nn.functional.cross_entropy(model(X), y, reduction="none")
            loss = opt.weighted_loss(losses, ids) if isinstance(opt, also_fused.ALSO) else losses.mean()
            loss.backward()
            step()
    assert_same(state_of(compiled_model, compiled_opt), state_of(eager_model, eager_opt))


@pytest.mark.parametrize("name", ["AdamW", "ALSO optimistic"])
def test_compiled_model_trains_like_eager(name):
    """torch.compile(model): on the CPU through aot_eager (the same kernels as eager, so bitwise), on
    CUDA through inductor (fused kernels round differently: close, not bitwise)."""
    eager_model = make_model()
    compiled_model = make_model()
    eager_opt = OPTIMIZERS[name](eager_model.parameters())
    compiled_opt = OPTIMIZERS[name](compiled_model.parameters())
    compiled = torch.compile(compiled_model, backend="inductor" if ON_CUDA else "aot_eager")
    for k in range(5):
        train_step(eager_model, eager_opt, k)
        train_step(compiled, compiled_opt, k)
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        if ON_CUDA:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(p, q)
    if isinstance(eager_opt, also_fused.ALSO):
        torch.testing.assert_close(compiled_opt.pi, eager_opt.pi, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tensor_lr_and_betas_match_floats(name):
    """A tensor lr (driven by a scheduler, as for a captured step) and tensor betas give the float results."""
    float_model, tensor_model = make_model(), make_model()
    float_opt = OPTIMIZERS[name](float_model.parameters())
    tensor_opt = OPTIMIZERS[name](tensor_model.parameters())
    for group in tensor_opt.param_groups:
        group["lr"] = torch.tensor(group["lr"], device=DEVICE)
        group["betas"] = tuple(torch.tensor(b, dtype=torch.float64, device=DEVICE) for b in group["betas"])
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.7) for o in (float_opt, tensor_opt)]
    for k in range(4):
        train_step(float_model, float_opt, k)
        train_step(tensor_model, tensor_opt, k)
        for s in scheds:
            s.step()
    assert isinstance(tensor_opt.param_groups[0]["lr"], torch.Tensor)
    for p, q in zip(tensor_model.parameters(), float_model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs", [
    dict(lr=torch.tensor([1e-3, 2e-3])),
    dict(lr=torch.tensor(1e-3), foreach=True),
    dict(betas=(torch.tensor(0.9), 0.999)),
    dict(betas=(torch.tensor(0.9), torch.tensor([0.99, 0.999]))),
    dict(betas=(torch.tensor([0.9]), torch.tensor([0.999, 0.99]))),
    dict(betas=(torch.tensor(0.9), torch.tensor(0.999)), foreach=True),
    dict(lr=-1.0),
    dict(betas=(1.0, 0.999)),
])
def test_hyperparameters_refused_like_torch(kwargs):
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(Exception) as theirs:
        torch.optim.Adam(params, **kwargs)
    with pytest.raises(Exception) as ours:
        also_fused.Adam(params, **kwargs)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


def test_tensor_lr_accepted_where_torch_accepts_it():
    params = [torch.nn.Parameter(torch.randn(3))]
    for kwargs in (dict(lr=torch.tensor(1e-3)), dict(lr=torch.tensor([1e-3])),
                   dict(lr=torch.tensor(1e-3), foreach=True, capturable=True),
                   dict(betas=(torch.tensor(0.9), torch.tensor(0.999)))):
        torch.optim.Adam(params, **kwargs)
        opt = also_fused.Adam(params, **kwargs)
        assert all(not isinstance(v, torch.Tensor) or v.dim() == 0
                   for v in (opt.param_groups[0]["lr"], *opt.param_groups[0]["betas"]))


@pytest.mark.parametrize("name", ["AdamW", "ALSO optimistic"])
def test_channels_last_params_update_like_contiguous_ones(name):
    """A channels_last conv weight (dense, not contiguous) is updated elementwise like its contiguous twin,
    its state keeps the param's layout, and a state_dict saved from the twin loads into it."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(8, 3, 3, 3, generator=gen).to(DEVICE)
    last = torch.nn.Parameter(w0.clone().to(memory_format=torch.channels_last))
    plain = torch.nn.Parameter(w0.clone())
    assert not last.is_contiguous()
    opts = [OPTIMIZERS[name]([p]) for p in (last, plain)]
    for k in range(3):
        g = torch.randn(8, 3, 3, 3, generator=gen).to(DEVICE)
        losses = torch.rand(BATCH, generator=gen).to(DEVICE)
        ids = torch.randint(0, N_GROUPS, (BATCH,), generator=gen).to(DEVICE)
        for p, opt in zip((last, plain), opts):
            p.grad = g.clone().to(memory_format=torch.channels_last) if p is last else g.clone()
            if isinstance(opt, also_fused.ALSO):
                opt.weighted_loss(losses, ids)
            opt.step()
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(last.detach().contiguous(), plain.detach())
    assert opts[0].state[last]["exp_avg"].stride() == last.stride()
    fresh = torch.nn.Parameter(w0.clone().to(memory_format=torch.channels_last))
    reloaded = OPTIMIZERS[name]([fresh])
    reloaded.load_state_dict(opts[1].state_dict())  # contiguous state into a channels_last param
    assert reloaded.state[fresh]["exp_avg"].stride() == fresh.stride()
    assert torch.equal(reloaded.state[fresh]["exp_avg"].contiguous(), opts[1].state[plain]["exp_avg"])
