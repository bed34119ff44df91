"""The step inside the backward pass (also_fused.StepInBackward): the same bits as the plain step, gradients
freed bucket by bucket, the refusals."""
from __future__ import annotations

import pytest
import torch

import also_fused
from support import DEVICE

BACKENDS = ["reference", "auto"] + (["triton"] if DEVICE == "cpu" else [])
# the grid's interpreter runs (seconds each) go to the slow tier; the other tests here run the interpreter too
GRID_BACKENDS = ["reference", "auto"] + ([pytest.param("triton", marks=pytest.mark.slow)] if DEVICE == "cpu" else [])


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 8)).to(DEVICE, dtype)


OPTIMIZERS = {
    "AdamW": lambda params, b: also_fused.AdamW(params, lr=1e-2, backend=b),
    "Adam-amsgrad-maximize": lambda params, b: also_fused.Adam(params, lr=1e-2, amsgrad=True, maximize=True,
                                                               weight_decay=0.1, backend=b),
    "AdamW-int8": lambda params, b: also_fused.AdamW(params, lr=1e-2, state_precision="int8", backend=b),
    "AdamW-bf16-stochastic": lambda params, b: also_fused.AdamW(params, lr=1e-2, stochastic_rounding=True,
                                                                rounding_seed=1, backend=b),
}


def _train(model, opt, sched, steps, in_backward: bool):
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 32, generator=gen).to(DEVICE, dtype)
        model(x).float().square().mean().backward()
        if in_backward:
            assert all(p.grad is None for p in model.parameters())
        opt.step()
        opt.zero_grad()
        sched.step()


@pytest.mark.parametrize("backend", GRID_BACKENDS)
@pytest.mark.parametrize("bucket_mb", [0.02, 100.0])  # a few buckets; one at the end of the pass
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_same_bits_as_the_plain_step(name, bucket_mb, backend):
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    plain, inside = _model(dtype), _model(dtype)
    opt_a, opt_b = OPTIMIZERS[name](plain.parameters(), backend), OPTIMIZERS[name](inside.parameters(), backend)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, 2, 0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, 2, 0.5)
    also_fused.StepInBackward(opt_b, bucket_mb=bucket_mb)
    _train(plain, opt_a, sched_a, 5, in_backward=False)
    _train(inside, opt_b, sched_b, 5, in_backward=True)
    for p, q in zip(plain.parameters(), inside.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(plain.parameters(), inside.parameters()):
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key


def test_gradients_are_freed_bucket_by_bucket():
    """With one param per bucket, the last layer's gradient is gone (its update done) before backward reaches
    the first layer."""
    model = _model()
    opt = also_fused.AdamW(model.parameters(), lr=1e-2)
    also_fused.StepInBackward(opt, bucket_mb=1e-6)
    last_weight, first_weight = model[4].weight, model[0].weight
    before = last_weight.detach().clone()
    seen = {}

    def when_first_layer_done(p):
        seen["last layer grad"] = last_weight.grad
        seen["last layer moved"] = not torch.equal(last_weight, before)

    first_weight.register_post_accumulate_grad_hook(when_first_layer_done)
    model(torch.randn(4, 32, device=DEVICE)).sum().backward()
    assert seen == {"last layer grad": None, "last layer moved": True}


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_a_checkpoint(backend):
    reference, model = _model(), _model()
    opt_ref = also_fused.AdamW(reference.parameters(), lr=1e-2, backend=backend)
    sched_ref = torch.optim.lr_scheduler.StepLR(opt_ref, 2, 0.5)
    _train(reference, opt_ref, sched_ref, 6, in_backward=False)
    opt = also_fused.AdamW(model.parameters(), lr=1e-2, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    stepper = also_fused.StepInBackward(opt, bucket_mb=0.01)
    _train(model, opt, sched, 3, in_backward=True)
    saved, saved_sched = opt.state_dict(), sched.state_dict()
    stepper.remove()
    resumed = also_fused.AdamW(model.parameters(), lr=1e-2, backend=backend)
    resumed.load_state_dict(saved)
    resumed_sched = torch.optim.lr_scheduler.StepLR(resumed, 2, 0.5)
    resumed_sched.load_state_dict(saved_sched)
    also_fused.StepInBackward(resumed, bucket_mb=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # the batches the first three steps used
        torch.randn(16, 32, generator=gen)
    for _ in range(3):
        model(torch.randn(16, 32, generator=gen).to(DEVICE)).square().mean().backward()
        resumed.step()
        resumed_sched.step()
    for p, q in zip(reference.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_refusals_change_nothing():
    model = _model()
    opt = also_fused.AdamW(model.parameters(), lr=1e-2)
    stepper = also_fused.StepInBackward(opt, bucket_mb=0.01)
    x = torch.randn(4, 32, device=DEVICE)
    model(x).sum().backward()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    with pytest.raises(RuntimeError, match="gradient accumulation over micro-batches is not possible"):
        model(x).sum().backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(v, opt.state[model[0].weight][k]) for k, v in state.items())
    opt.step()
    opt.zero_grad()
    model(x).sum().backward()  # after step() the next pass steps again
    assert not torch.equal(model[0].weight, params[0])
    stepper.remove()
    model(x).sum().backward()  # hooks gone: gradients stay for a plain step
    assert all(p.grad is not None for p in model.parameters())

    with pytest.raises(TypeError, match="takes also_fused.Adam, AdamW, ThetaAdam or ALSO"):
        also_fused.StepInBackward(torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="bucket_mb must be > 0"):
        also_fused.StepInBackward(opt, bucket_mb=0)
    with pytest.raises(TypeError, match="ddp_model must be a DistributedDataParallel module, got Sequential"):
        also_fused.StepInBackward(opt, ddp_model=model)

    embedding = torch.nn.Embedding(10, 4, sparse=True).to(DEVICE)
    also_fused.StepInBackward(also_fused.Adam(embedding.parameters()))
    weight = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients are not supported"):
        embedding(torch.tensor([1, 2], device=DEVICE)).sum().backward()
    assert torch.equal(embedding.weight, weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
def test_also_loop_api_same_bits(mode, backend):
    """ALSO: weighted_loss, backward (the theta update inside it), step() (pi's step); a param without a
    gradient in optimistic mode goes back to x as in the plain step."""
    def run(in_backward):
        model = _model()
        opt = also_fused.ALSO(model.parameters(), n_groups=3, loss_scale=1.0, lr=1e-2, pi_lr=0.1, mode=mode,
                              backend=backend)
        if in_backward:
            also_fused.StepInBackward(opt, bucket_mb=0.01)
        gen = torch.Generator().manual_seed(2)
        for i in range(5):
            x = torch.randn(16, 32, generator=gen).to(DEVICE)
            ids = torch.randint(0, 3, (16,), generator=gen).to(DEVICE)
            head = model if i != 3 else model[:3]  # step 3: the last layer gets no gradient
            losses = head(x).square().mean(dim=1)
            opt.weighted_loss(losses, ids).backward()
            opt.step()
            opt.zero_grad()
        opt.eval()
        return [p.detach().clone() for p in model.parameters()] + [opt.pi.clone()]

    plain, inside = run(False), run(True)
    for a, b in zip(plain, inside):
        assert torch.equal(a, b)


def test_grad_scaler_is_refused_at_its_step():
    """The update ran during backward from the scaled gradients: GradScaler's step says so instead of
    stepping (bf16 autocast needs no scaler)."""
    model = _model()
    opt = also_fused.AdamW(model.parameters(), lr=1e-2)
    also_fused.StepInBackward(opt, bucket_mb=0.01)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=4.0)
    scaler.scale(model(torch.randn(4, 32, device=DEVICE)).sum()).backward()
    with pytest.raises(RuntimeError, match="GradScaler cannot drive the step inside the backward pass"):
        scaler.step(opt)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_fsdp2_params_are_refused(tmp_path):
    """DTensor params (FSDP2's shards) are refused at construction, naming the plain step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh))
        with pytest.raises(TypeError, match="FSDP2 .DTensor. params are not supported"):
            also_fused.StepInBackward(also_fused.AdamW([param]))
    finally:
        dist.destroy_process_group()
