"""ALSO under torch.distributed: 2 CPU processes (gloo) with DDP against one process on the concatenated batch.

Each rank trains on its half of every batch with ``batch_size`` = the per-rank batch. pi must be
bitwise equal across ranks after every step, and params and pi must follow the single-process run
on the whole batch within float32 tolerance. Both modes, both APIs, both pi collectives (dense
all-reduce for few groups, all-gather of (id, loss) pairs for many), both group reductions (group
means count the samples of every rank).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import also_fused
from support.distributed import (D_IN, D_OUT, ON_GPUS, OPT_BACKEND, PER_RANK, STEPS, WORLD, data, joined, run_ranks,
                                 same_on_all_ranks, save_rank)

pytestmark = pytest.mark.slow  # two- and four-process DDP runs (spawned processes)

CASES = [
    dict(mode="optimistic", api="closure", n_groups=4),
    dict(mode="optimistic", api="loop", n_groups=4),
    dict(mode="descent-ascent", api="closure", n_groups=4),
    dict(mode="descent-ascent", api="loop", n_groups=4),
    dict(mode="optimistic", api="loop", n_groups=1000),  # all-gather path
    dict(mode="descent-ascent", api="closure", n_groups=1000),
    dict(mode="optimistic", api="closure", n_groups=4, group_reduction="mean"),
    dict(mode="descent-ascent", api="loop", n_groups=1000, group_reduction="mean"),
    # the theta side's moments stored at lower precision: every rank holds the same (replicated) state
    dict(mode="descent-ascent", api="loop", n_groups=4, state_precision="int8"),
    dict(mode="optimistic", api="closure", n_groups=4, state_precision="bfloat16"),
]


def build(case, batch_size, device, wrap=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(D_IN, D_OUT).to(device)
    net = wrap(model) if wrap else model
    opt = also_fused.ALSO(model.parameters(), case["n_groups"], batch_size=batch_size, mode=case["mode"],
                          pi_lr=0.2, backend=OPT_BACKEND, group_reduction=case.get("group_reduction", "sum"),
                          state_precision=case.get("state_precision", "float32"))
    return model, net, opt


def train_step(net, opt, api, X, Y, ids):
    def per_sample(out):
        return ((out - Y) ** 2).mean(1)

    if api == "closure":
        def closure(weights, scale):
            opt.zero_grad()
            losses = per_sample(net(X))
            (scale * (weights * losses).sum()).backward()
            return losses.detach(), None
        opt.step(closure, ids)
    else:
        opt.zero_grad()
        opt.weighted_loss(per_sample(net(X)), ids).backward()
        opt.step()


def worker(rank, init_file, out_dir, case):
    with joined(rank, init_file) as device:
        model, net, opt = build(case, PER_RANK, device, wrap=torch.nn.parallel.DistributedDataParallel)
        same_pi = []
        for X, Y, ids in data(case):
            part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            train_step(net, opt, case["api"], X[part].to(device), Y[part].to(device), ids[part].to(device))
            same_pi.append(same_on_all_ranks(opt.pi))
        opt.eval()
        state = [{k: v.detach().cpu().clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                 for p in model.parameters()]
        save_rank(out_dir, rank, dict(params=[p.detach().cpu().clone() for p in model.parameters()],
                                      pi=opt.pi.cpu().clone(), same_pi=same_pi, state=state))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_ddp_matches_single_process_on_the_concatenated_batch(case):
    ranks = run_ranks(worker, case)
    device = torch.device("cuda:0" if ON_GPUS else "cpu")
    model, net, opt = build(case, WORLD * PER_RANK, device)
    for X, Y, ids in data(case):
        train_step(net, opt, case["api"], X.to(device), Y.to(device), ids.to(device))
    opt.eval()
    model, pi = model.cpu(), opt.pi.cpu()
    for r in ranks:
        assert all(r["same_pi"]) and len(r["same_pi"]) == STEPS, "pi differs between ranks"
        for got, want in zip(r["params"], model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["pi"], pi, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(pi, torch.full_like(pi, 1.0 / case["n_groups"]), atol=1e-4)
    for r in ranks[1:]:
        assert torch.equal(r["pi"], ranks[0]["pi"])
        for a, b in zip(r["params"], ranks[0]["params"]):
            assert torch.equal(a, b)
        for a, b in zip(r["state"], ranks[0]["state"]):  # codes and scales too, at every precision
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if "state_precision" in case:
        moments = ranks[0]["state"][0]["exp_avg"]
        assert moments.dtype == {"int8": torch.int8, "bfloat16": torch.bfloat16}[case["state_precision"]]
