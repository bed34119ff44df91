"""The step inside the backward pass under DDP (``StepInBackward(opt, ddp_model=ddp)``): 2 processes, each
training one model with DDP and the plain step and one with the update in DDP's communication hook, on the
same batches. The two must hold the same params and optimizer state, bit for bit, on every rank; and
StepInBackward without ``ddp_model`` is refused while a process group runs. Gloo on the CPU; NCCL and the
Triton kernels on two GPUs."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import also_fused
from support.distributed import OPT_BACKEND, WORLD, joined, run_ranks, save_rank

# in the fast tier despite its spawned processes (about 6 s): the only test of the DDP hook's averaging

PER_RANK = 8
STEPS = 6
CASES = [
    dict(opt="AdamW", bucket_view=False),
    dict(opt="AdamW-int8", bucket_view=True),
    dict(opt="ALSO-optimistic", bucket_view=False),
    dict(opt="ALSO-descent-ascent", bucket_view=True),
]


def _model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 4)).to(device)


def _optimizer(name, params):
    if name == "AdamW":
        return also_fused.AdamW(params, lr=1e-2, weight_decay=0.1, backend=OPT_BACKEND)
    if name == "AdamW-int8":
        return also_fused.AdamW(params, lr=1e-2, state_precision="int8", backend=OPT_BACKEND)
    mode = name.split("-", 1)[1]
    return also_fused.ALSO(params, 5, batch_size=PER_RANK, mode=mode, lr=1e-2, pi_lr=0.2, backend=OPT_BACKEND)


def _train(case, rank, device, in_backward):
    model = _model(device)
    # a 1-byte cap: DDP gives every param its own bucket after the first step, so the hook runs several times
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1e-6,
                                                    gradient_as_bucket_view=case["bucket_view"])
    opt = _optimizer(case["opt"], model.parameters())
    if in_backward:
        also_fused.StepInBackward(opt, ddp_model=ddp)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    gen = torch.Generator().manual_seed(7)
    moved_in_backward = []  # per step: did every param change during backward (before step())?
    for _ in range(STEPS):
        x = torch.randn(WORLD * PER_RANK, 16, generator=gen)
        ids = torch.randint(0, 5, (WORLD * PER_RANK,), generator=gen)
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        losses = ddp(x[part].to(device)).square().mean(1)
        before = [p.detach().clone() for p in model.parameters()]
        if case["opt"].startswith("ALSO"):
            opt.weighted_loss(losses, ids[part].to(device)).backward()
        else:
            losses.mean().backward()
        moved_in_backward.append(all(not torch.equal(p, q) for p, q in zip(model.parameters(), before)))
        opt.step()
        opt.zero_grad()
        sched.step()
    state = [{k: v.detach().cpu().clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
             for p in model.parameters()]
    return dict(params=[p.detach().cpu().clone() for p in model.parameters()], state=state, moved=moved_in_backward,
                pi=opt.pi.cpu().clone() if hasattr(opt, "pi") else None)


def worker(rank, init_file, out_dir):
    with joined(rank, init_file) as device:
        results = {}
        for case in CASES:
            key = f"{case['opt']}-{case['bucket_view']}"
            results[key] = (_train(case, rank, device, False), _train(case, rank, device, True))
        try:
            also_fused.StepInBackward(also_fused.AdamW(_model(device).parameters()))
            refusal = None
        except RuntimeError as exc:
            refusal = str(exc)
        save_rank(out_dir, rank, dict(results=results, refusal=refusal))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_hook_gives_the_bits_of_the_plain_step():
    ranks = run_ranks(worker)
    for r in ranks:
        assert r["refusal"] is not None and "ddp_model" in r["refusal"]
        assert set(r["results"]) == {f"{c['opt']}-{c['bucket_view']}" for c in CASES}
        for key, (plain, inside) in r["results"].items():
            assert inside["moved"] == [True] * STEPS and plain["moved"] == [False] * STEPS, key
            for a, b in zip(plain["params"], inside["params"]):
                assert torch.equal(a, b), key
            for a, b in zip(plain["state"], inside["state"]):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
            if plain["pi"] is not None:
                assert torch.equal(plain["pi"], inside["pi"]), key
                assert not torch.allclose(plain["pi"], torch.full_like(plain["pi"], 0.2)), key
            initial = [p.detach().cpu() for p in _model("cpu").parameters()]
            assert all(not torch.equal(a, b) for a, b in zip(plain["params"], initial)), key
    for key in ranks[0]["results"]:  # DDP keeps the ranks in step
        for a, b in zip(ranks[0]["results"][key][1]["params"], ranks[1]["results"][key][1]["params"]):
            assert torch.equal(a, b), key
