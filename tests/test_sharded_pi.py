"""Sharded pi (``shard_pi=True``): each rank holds a run of whole blocks of pi, and the pi step, from the max and
the block partials of every rank, gives bitwise the pi of the unsharded step (docs/semantics.md).

Single-process tests split one pi into shards by hand and check the phases of each path against its whole step;
spawned gloo ranks (2 and 4) run the sharded and the unsharded GroupWeights side by side on the same batches."""
from __future__ import annotations

import copy
import datetime
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import also_fused
from also_fused import _collectives, cpu_fused
from also_fused import functional as F

HYPER = dict(pi_lr=0.3, pi_decay=0.05, temperature=0.9, eps=F.FLOAT32_EPS)
needs_dist = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


# ------------------------------------------------------------------ one process: the blocked normaliser
def _problem(n: int, batch: int, seed: int = 0, with_reg: bool = False):
    gen = torch.Generator().manual_seed(seed)
    pi = torch.softmax(torch.randn(n, generator=gen) * 2, 0)
    ids = torch.randint(0, n, (batch,), generator=gen)
    ids[: batch // 4] = ids[batch // 4: batch // 2]  # repeated ids add up
    losses = torch.rand(batch, generator=gen) * 4
    log_pi_reg = F.blockwise_log(torch.softmax(torch.randn(n, generator=gen), 0)) if with_reg else None
    return pi, ids, losses, log_pi_reg


def _by_hand(phases, pi, ids, losses, log_pi_reg, bounds):
    """The sharded step of ``bounds`` ranks in one process: each slice's phases, the max and the partials of all."""
    parts = []
    for start, stop in bounds:
        mine = (ids >= start) & (ids < stop)
        reg = None if log_pi_reg is None else log_pi_reg[start:stop]
        parts.append(phases.logits(pi[start:stop], ids[mine] - start, losses[mine], None, log_pi_reg=reg, **HYPER))
    zmax = torch.stack([m for _, m in parts]).max()
    partials = torch.cat([phases.exp_blocks(z, zmax) for z, _ in parts])
    total = F.combine_block_sums(partials)
    return torch.cat([phases.scale(z, total, torch.empty(z.shape)) for z, _ in parts])


PATHS = ["reference"] + (["cpu"] if cpu_fused.available()[0] and cpu_fused._HAS_PI_STEP else [])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n, world", [(3 * F.PI_BLOCK + 777, 2), (3 * F.PI_BLOCK + 777, 4), (5 * F.PI_BLOCK, 3),
                                      (1000, 2)])
@pytest.mark.parametrize("with_reg", [False, True])
def test_shards_of_one_step_give_its_bits(path, n, world, with_reg):
    """Each path's pi step equals, bitwise, its phases run on the shards of any number of ranks, and follows a
    float64 softmax within float32 rounding."""
    pi, ids, losses, log_pi_reg = _problem(n, 300, seed=n + world, with_reg=with_reg)
    bounds = [_collectives.shard_bounds(n, world, r) for r in range(world)]
    if path == "cpu":
        whole = torch.empty_like(pi)
        assert cpu_fused.pi_update(pi, ids, losses, out=whole, log_pi_reg=log_pi_reg, **HYPER)
        phases = cpu_fused.CpuPiPhases
    else:
        whole = F.pi_update_reference(pi, ids, losses, log_pi_reg=log_pi_reg, **HYPER)
        phases = F.ReferencePiPhases
    assert torch.equal(_by_hand(phases, pi, ids, losses, log_pi_reg, bounds), whole)
    c = HYPER["pi_decay"] * HYPER["pi_lr"]
    z = torch.log(pi.double() + HYPER["eps"]) + HYPER["pi_lr"] * F.scatter_group_losses(losses, ids, n).double()
    if log_pi_reg is not None:
        z = z + c * log_pi_reg.double()
    model = torch.softmax(z / ((1 + c) * HYPER["temperature"]), 0)
    torch.testing.assert_close(whole.double(), model, rtol=2e-6, atol=1e-12)


def test_dense_sums_phases_match_pi_update_from_sums():
    pi, ids, losses, _ = _problem(2 * F.PI_BLOCK + 5, 200)
    sums = F.scatter_group_losses(losses, ids, pi.numel())
    whole = F.pi_update_from_sums(pi, sums, **HYPER)
    parts = [F.ReferencePiPhases.logits(pi[a:b], None, None, sums[a:b], **HYPER)
             for a, b in ((0, F.PI_BLOCK), (F.PI_BLOCK, pi.numel()))]
    zmax = torch.stack([m for _, m in parts]).max()
    total = F.combine_block_sums(torch.cat([F.pi_exp_blocks(z, zmax) for z, _ in parts]))
    assert torch.equal(torch.cat([F.pi_scale(z, total, torch.empty(z.shape)) for z, _ in parts]), whole)


@pytest.mark.parametrize("n", [1, 100, F.PI_BLOCK, F.PI_BLOCK + 1, 10 * F.PI_BLOCK + 3])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_layout(n, world):
    """The shards cover [0, n) in rank order, start on block boundaries and differ by at most one block."""
    bounds = [_collectives.shard_bounds(n, world, r) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(start % F.PI_BLOCK == 0 or start == n for start, _ in bounds)
    per_rank = -(-(-(-n // F.PI_BLOCK)) // world) * F.PI_BLOCK  # ceil(blocks / world) blocks
    assert max(stop - start for start, stop in bounds) <= per_rank


def test_shard_pi_without_a_group_and_bad_options():
    """One process: shard_pi=True holds the whole of pi (nothing to shard over); a flag of another type and the
    mean reduction are refused."""
    weights = also_fused.GroupWeights(50, batch_size=4, shard_pi=True)
    assert not weights.sharded and weights.shard_range == (0, 50) and weights.pi.shape == (50,)
    with pytest.raises(TypeError, match="shard_pi"):
        also_fused.GroupWeights(50, batch_size=4, shard_pi=1)
    with pytest.raises(ValueError, match="sum"):
        also_fused.GroupWeights(50, batch_size=4, shard_pi=True, group_reduction="mean")


# ------------------------------------------------------------------ spawned ranks
def _spawn(world: int, worker, *args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        files = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
        try:
            mp.spawn(_entry, args=(world, os.path.join(tmp, "init"), tmp, worker) + args, nprocs=world, join=True)
        except mp.ProcessExitedException as exc:  # gloo may abort a process in its teardown, after saving
            if not all(os.path.exists(f) for f in files):
                raise
            warnings.warn(f"a rank died after saving its result: {exc}")
        return [torch.load(f, weights_only=False) for f in files]


def _entry(rank, world, init_file, out_dir, worker, *args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        result = worker(rank, world, out_dir, *args)
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(result, path + ".part")
        os.replace(path + ".part", path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see tests/support/distributed.joined: freeing the group's objects at exit can hang


def _batch(step: int, rank: int, n: int, batch: int):
    gen = torch.Generator().manual_seed(7919 * step + rank)
    ids = torch.randint(0, n, (batch,), generator=gen)
    ids[:4] = ids[4:8]  # repeated ids within a rank; ids of other ranks collide as they fall
    return ids, torch.rand(batch, generator=gen) * 3


def _pair(n: int, mode: str, backend: str, batch: int, **options):
    make = dict(batch_size=batch, mode=mode, pi_lr=0.5, pi_decay=0.05, backend=backend, **options)
    return also_fused.GroupWeights(n, **make), also_fused.GroupWeights(n, shard_pi=True, **make)


def _same(whole: also_fused.GroupWeights, shard: also_fused.GroupWeights) -> bool:
    a, b = shard.shard_range
    return torch.equal(whole.pi[a:b], shard.pi) and torch.equal(whole.pi_mid[a:b], shard.pi_mid)


def _follow(rank, n, mode, backend, steps, batch=32, resume_at=None, **options):
    """The sharded and the unsharded weights on the same batches: whether pi, pi_mid, the loss and the mean agreed
    bitwise at every step; with ``resume_at``, whether a fresh sharded weights loaded from the state_dict saved
    at that step followed bitwise to the end."""
    whole, shard = _pair(n, mode, backend, batch, **options)
    agreed, saved, resumed = [], None, None
    for step in range(steps):
        if step == resume_at:
            saved = copy.deepcopy(shard.state_dict())
            resumed = _pair(n, mode, backend, batch, **options)[1]
            resumed.load_state_dict(saved)
        ids, losses = _batch(step, rank, n, batch)
        loss = shard.weighted_loss(losses, ids)
        ok = torch.equal(whole.weighted_loss(losses, ids), loss)
        if resumed is not None:
            ok = ok and torch.equal(resumed.weighted_loss(losses, ids), loss)
        ok = ok and torch.equal(whole.step(), shard.step())
        if resumed is not None:
            resumed.step()
            ok = ok and torch.equal(resumed.pi, shard.pi) and torch.equal(resumed.pi_mid, shard.pi_mid)
        agreed.append(ok and _same(whole, shard))
    return dict(agreed=agreed, moved=not torch.equal(whole.pi, torch.full_like(whole.pi, 1.0 / n)),
                range=shard.shard_range, sizes=[t.numel() for t in (shard.pi, shard.pi_mid, shard.pi_reg)],
                saved_shape=None if saved is None else tuple(saved["pi"].shape))


def _rejects(fn) -> bool:
    try:
        fn()
    except ValueError:
        return True
    return False


def _quick_worker(rank, world, out_dir):
    n, batch = 2 * F.PI_BLOCK + 100, 16
    out = dict(follow=[_follow(rank, n, mode, "auto", 12, batch, resume_at=6) for mode in ("descent-ascent",
                                                                                            "optimistic")])
    # bad input on one rank: every rank raises, and every rank's pi and pi_mid stay as they were
    whole, shard = _pair(n, "optimistic", "auto", batch)
    for step in range(3):
        ids, losses = _batch(step, rank, n, batch)
        whole.weighted_loss(losses, ids), shard.weighted_loss(losses, ids)
        whole.step(), shard.step()
    before = (shard.pi.clone(), shard.pi_mid.clone())
    ids, losses = _batch(3, rank, n, batch)
    bad_ids = ids.clone()
    if rank == world - 1:
        bad_ids[3] = n
    out["bad_id_rejected"] = _rejects(lambda: shard.weighted_loss(losses, bad_ids))
    bad_losses = losses.clone()
    if rank == 0:
        bad_losses[2] = float("nan")
    shard.weighted_loss(bad_losses, ids)
    out["nan_rejected"] = _rejects(shard.step)
    out["kept"] = torch.equal(shard.pi, before[0]) and torch.equal(shard.pi_mid, before[1])
    ids, losses = _batch(4, rank, n, batch)
    whole.weighted_loss(losses, ids), shard.weighted_loss(losses, ids)
    whole.step(), shard.step()
    out["after_rejection"] = _same(whole, shard)
    # a whole state (the unsharded weights') loads into the shards
    fresh = _pair(n, "optimistic", "auto", batch)[1]
    fresh.load_state_dict(whole.state_dict())
    ids, losses = _batch(5, rank, n, batch)
    for w in (whole, fresh):
        w.weighted_loss(losses, ids)
        w.step()
    out["whole_state_loaded"] = _same(whole, fresh)
    out["gathered"] = torch.equal(fresh.gather_pi(), whole.pi)
    # select_batch: up to SORTED_CUTOFF_MAX_GROUPS the unsharded draw itself; beyond, one draw on every rank
    init = torch.softmax(torch.randn(3000, generator=torch.Generator().manual_seed(1)) * 3, 0)
    small = [also_fused.GroupWeights(3000, batch_size=8, pi_init=init, shard_pi=s) for s in (False, True)]
    picks = [w.select_batch(0.6, generator=torch.Generator().manual_seed(2)) for w in small]
    out["small_select"] = picks[0][0] == picks[1][0] and torch.equal(picks[0][1], picks[1][1])
    big_n = F.SORTED_CUTOFF_MAX_GROUPS + 5000
    init = torch.softmax(torch.randn(big_n, generator=torch.Generator().manual_seed(3)) * 3, 0)
    big = [also_fused.GroupWeights(big_n, batch_size=8, pi_init=init, shard_pi=s) for s in (False, True)]
    out["big_k"] = [w.select_batch(0.9, generator=torch.Generator().manual_seed(rank))[0] for w in big]
    out["big_ids"] = {strategy: big[1].select_batch(0.9, strategy, generator=torch.Generator().manual_seed(rank))[1]
                      for strategy in ("pi", "uniform")}
    out["sampler"] = list(also_fused.PiBatchSampler(big[1], 0.99999, 2, generator=torch.Generator().manual_seed(4)))
    return out


@needs_dist
def test_two_ranks_quick():
    """2 gloo ranks, pi of 3 blocks (2 + 1): 12 steps of both modes bitwise with the unsharded weights and a
    resume from the state_dict at step 6; a bad id or a NaN loss on one rank raises on both and keeps pi; a whole
    state loads into the shards; select_batch and PiBatchSampler draw the same ids on every rank."""
    n = 2 * F.PI_BLOCK + 100
    ranks = _spawn(2, _quick_worker)
    for rank, r in enumerate(ranks):
        for followed in r["follow"]:
            assert followed["moved"] and all(followed["agreed"]), followed["agreed"]
            start, stop = followed["range"]
            assert followed["sizes"] == [stop - start] * 3 and followed["saved_shape"] == (stop - start,)
        assert r["bad_id_rejected"] and r["nan_rejected"] and r["kept"] and r["after_rejection"]
        assert r["whole_state_loaded"] and r["gathered"] and r["small_select"]
        assert r["big_k"][0] == r["big_k"][1] > 1
        for strategy, ids in r["big_ids"].items():
            assert torch.equal(ids, ranks[0]["big_ids"][strategy]), "ranks drew different ids"
            assert ids.numel() == r["big_k"][1] and ids.unique().numel() == ids.numel()
            assert 0 <= int(ids.min()) and int(ids.max()) < F.SORTED_CUTOFF_MAX_GROUPS + 5000
        assert r["sampler"] == ranks[0]["sampler"] and len(r["sampler"]) == 2
    assert [r["follow"][0]["range"] for r in ranks] == [(0, 2 * F.PI_BLOCK), (2 * F.PI_BLOCK, n)]


def _long_worker(rank, world, out_dir, steps):
    n_many = 4 * F.PI_BLOCK + 1234  # (id, loss) pairs gathered; 5 blocks, the last one partial
    n_few = 300  # dense sums all-reduced (fewer bytes than the pairs); one block, on the first rank
    init = torch.softmax(torch.randn(n_many, generator=torch.Generator().manual_seed(5)), 0)
    reg = torch.softmax(torch.randn(n_many, generator=torch.Generator().manual_seed(6)), 0)
    runs = {}
    for backend in ("auto", "reference"):
        for mode in ("descent-ascent", "optimistic"):
            runs[(backend, mode, "many")] = _follow(rank, n_many, mode, backend, steps, resume_at=steps // 2)
            runs[(backend, mode, "few")] = _follow(rank, n_few, mode, backend, steps // 4, batch=64,
                                                   resume_at=steps // 8)
    runs[("auto", "optimistic", "pi_reg")] = _follow(rank, n_many, "optimistic", "auto", steps // 4,
                                                     resume_at=steps // 8, pi_init=init, pi_reg=reg)
    return runs


@needs_dist
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_pi_follows_the_unsharded_bitwise(world):
    """2 and 4 gloo ranks, both modes, the CPU extension and the reference path, pairs and dense sums, a
    non-uniform pi_init and pi_reg: the sharded pi, pi_mid, weighted loss and step mean equal the unsharded ones
    bitwise at every one of 200 steps (50 for the smaller cases), a run resumed from each rank's state_dict
    midway follows bitwise, and each rank holds only its shard: at most ceil(blocks / world) blocks of pi, pi_mid
    and pi_reg, together n_groups."""
    ranks = _spawn(world, _long_worker, 200)
    for key in ranks[0]:
        n = 300 if key[2] == "few" else 4 * F.PI_BLOCK + 1234
        blocks = -(-n // F.PI_BLOCK)
        held = 0
        for r in ranks:
            run = r[key]
            assert run["moved"] and all(run["agreed"]), (key, run["agreed"].index(False))
            start, stop = run["range"]
            assert run["sizes"] == [stop - start] * 3 and run["saved_shape"] == (stop - start,)
            assert stop - start <= -(-blocks // world) * F.PI_BLOCK
            held += stop - start
        assert held == n


def _also_worker(rank, world, out_dir, api):
    """ALSO with a sharded pi against the unsharded one, and a DCP checkpoint of the sharded one resumed."""
    import torch.distributed.checkpoint as dcp

    from also_fused import checkpoint

    n, batch, steps = 2 * F.PI_BLOCK + 50, 8, 12

    def make(shard):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = also_fused.ALSO(model.parameters(), n, batch_size=batch, lr=0.05, pi_lr=0.5, mode="optimistic",
                              shard_pi=shard)
        nets[id(model)] = torch.nn.parallel.DistributedDataParallel(model)  # the params alike on every rank
        return model, opt

    nets = {}

    def train(model, opt, first, last):
        for step in range(first, last):
            gen = torch.Generator().manual_seed(31 * step + rank)
            X, ids = torch.randn(batch, 4, generator=gen), torch.randint(0, n, (batch,), generator=gen)
            if api == "loop":
                opt.zero_grad()
                opt.weighted_loss((nets[id(model)](X).squeeze(1) - ids.float() / n) ** 2, ids).backward()
                opt.step()
            else:
                def closure(pi_selected, loss_scale):
                    opt.zero_grad()
                    losses = (nets[id(model)](X).squeeze(1) - ids.float() / n) ** 2
                    (loss_scale * (pi_selected * losses).sum()).backward()
                    return losses.detach(), None
                opt.step(closure, ids)

    runs = {shard: make(shard) for shard in (False, True)}
    for model, opt in runs.values():
        train(model, opt, 0, steps // 2)
    model, opt = runs[True]
    path = os.path.join(out_dir, "dcp")
    dcp.save({"optim": checkpoint.get_optimizer_state_dict(model, opt), "model": model.state_dict()},
             checkpoint_id=path)
    for model, opt in runs.values():
        train(model, opt, steps // 2, steps)
    model2, opt2 = make(True)
    state = {"optim": checkpoint.get_optimizer_state_dict(model2, opt2), "model": model2.state_dict()}
    dcp.load(state, checkpoint_id=path)
    model2.load_state_dict(state["model"])
    checkpoint.set_optimizer_state_dict(model2, opt2, state["optim"])
    train(model2, opt2, steps // 2, steps)
    (m0, o0), (m1, o1) = runs[False], runs[True]
    a, b = o1.weights.shard_range
    return dict(pi=torch.equal(o0.pi[a:b], o1.pi),
                params=all(torch.equal(p, q) for p, q in zip(m0.parameters(), m1.parameters())),
                resumed=torch.equal(o1.pi, opt2.pi) and all(torch.equal(p, q) for p, q in
                                                            zip(m1.parameters(), model2.parameters())),
                size=o1.pi.numel(), range=(a, b))


@needs_dist
@pytest.mark.slow
@pytest.mark.parametrize("api", ["loop", "closure"])
def test_also_with_a_sharded_pi_and_dcp(api):
    """ALSO (optimistic) on 2 ranks with shard_pi=True: pi and the params bitwise those of the unsharded ALSO,
    and a torch.distributed.checkpoint save midway (also_fused.checkpoint, each rank's shard under its own key)
    resumes bitwise."""
    ranks = _spawn(2, _also_worker, api)
    for r in ranks:
        assert r["pi"] and r["params"] and r["resumed"]
    assert sum(r["size"] for r in ranks) == 2 * F.PI_BLOCK + 50
