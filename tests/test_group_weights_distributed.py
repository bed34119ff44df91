"""GroupWeights beside torch.optim.AdamW under DDP: 2 processes against one process on the concatenated batch.

Each rank trains on its half of every batch with ``batch_size`` = the per-rank batch; pi must be
bitwise equal across ranks after every step, and params and pi must follow the single-process run
within float32 tolerance: both modes, both reductions, both pi collectives (dense all-reduce for
few groups, all-gather of (id, loss) pairs for many). gloo on the CPU; NCCL with two GPUs.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import also_fused
from support.distributed import (D_IN, D_OUT, ON_GPUS, OPT_BACKEND, PER_RANK, STEPS, WORLD, data, joined, run_ranks,
                                 same_on_all_ranks, save_rank)

pytestmark = pytest.mark.slow  # two-process DDP runs (spawned processes)

CASES = [
    dict(mode="descent-ascent", group_reduction="sum", n_groups=4),
    dict(mode="optimistic", group_reduction="sum", n_groups=1000),  # all-gather path
    dict(mode="descent-ascent", group_reduction="mean", n_groups=1000),
    dict(mode="optimistic", group_reduction="mean", n_groups=4),
]


def trained(case: dict, device: torch.device, rank: int = 0, world: int = 1, wrap=None) -> dict:
    """Train Linear(D_IN, D_OUT) with AdamW and GroupWeights on this rank's share of every batch;
    returns the params, pi and whether pi was equal on every rank after each step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(D_IN, D_OUT).to(device)
    net = wrap(model) if wrap else model
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    per_rank = PER_RANK * WORLD // world
    weights = also_fused.GroupWeights(case["n_groups"], batch_size=per_rank, mode=case["mode"], pi_lr=0.2,
                                      group_reduction=case["group_reduction"], device=device, backend=OPT_BACKEND)
    equal_pi = []
    for X, Y, ids in data(case):
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        X, Y, ids = X[mine].to(device), Y[mine].to(device), ids[mine].to(device)
        opt.zero_grad()
        weights.weighted_loss(((net(X) - Y) ** 2).mean(1), ids).backward()
        opt.step()
        weights.step()
        if world > 1:
            equal_pi.append(same_on_all_ranks(weights.pi))
    return dict(params=[p.detach().cpu().clone() for p in model.parameters()], pi=weights.pi.cpu().clone(),
                equal_pi=equal_pi)


def worker(rank, init_file, out_dir, case):
    with joined(rank, init_file) as device:
        save_rank(out_dir, rank, trained(case, device, rank, WORLD, torch.nn.parallel.DistributedDataParallel))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_ddp_follows_one_process_on_the_concatenated_batch(case):
    ranks = run_ranks(worker, case)
    want = trained(case, torch.device("cuda:0" if ON_GPUS else "cpu"))
    assert not torch.allclose(want["pi"], torch.full_like(want["pi"], 1.0 / case["n_groups"]), atol=1e-4)
    for r in ranks:
        assert len(r["equal_pi"]) == STEPS and all(r["equal_pi"]), "pi differs between ranks"
        torch.testing.assert_close(r["pi"], want["pi"], rtol=1e-5, atol=1e-7)
        for got, expected in zip(r["params"], want["params"]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(r["pi"], ranks[0]["pi"])


def pi_of_own_batches(rank: int, case: dict, device: torch.device, process_group) -> torch.Tensor:
    """GroupWeights alone (no model) stepped on this rank's share of every batch's losses."""
    weights = also_fused.GroupWeights(case["n_groups"], batch_size=PER_RANK, mode=case["mode"], pi_lr=0.2,
                                      group_reduction=case["group_reduction"], device=device, backend=OPT_BACKEND,
                                      process_group=process_group)
    for X, Y, ids in data(case):
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        weights.weighted_loss(((X[mine] - 1.0) ** 2).mean(1).to(device), ids[mine].to(device))
        weights.step()
    return weights.pi.cpu().clone()


def group_worker(rank, init_file, out_dir, case):
    with joined(rank, init_file) as device:
        everyone = dist.new_group(list(range(WORLD)))
        alone = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group, in one order
        save_rank(out_dir, rank, dict(everyone=pi_of_own_batches(rank, case, device, everyone),
                                      alone=pi_of_own_batches(rank, case, device, alone[rank]),
                                      default=pi_of_own_batches(rank, case, device, None)))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_process_group_chooses_the_ranks_that_share_pi(case):
    """process_group= is the set of ranks whose losses pi's step uses: a group of every rank gives the default
    group's pi (bitwise), a group of one rank gives that rank's pi from its own batches alone."""
    ranks = run_ranks(group_worker, case)
    device = torch.device("cuda:0" if ON_GPUS else "cpu")
    for rank, r in enumerate(ranks):
        assert torch.equal(r["everyone"], r["default"]) and torch.equal(r["everyone"], ranks[0]["everyone"])
        assert torch.equal(r["alone"], pi_of_own_batches(rank, case, device, None))
    assert not torch.equal(ranks[0]["alone"], ranks[1]["alone"])  # the ranks' batches differ, so do their pi
