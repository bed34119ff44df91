"""ALSO and Adam under FSDP2 (``fully_shard``, DTensor params): 2 processes against one process.

Each rank holds a shard of every param (uneven, and empty on one rank for a 1-row weight) and
trains on its half of every batch with ``batch_size`` = the per-rank batch. Checked: pi bitwise
equal across ranks after every step; params and pi follow the single-process run on the
concatenated batch; the state is sharded like the params; a checkpoint saved with
torch.distributed.checkpoint in the middle of the run and loaded into a fresh model and optimizer
continues bit-identically. On the CPU with gloo and the reference path; on two GPUs with NCCL and
the Triton kernels.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import also_fused
from support.distributed import ON_GPUS, WORLD, joined, run_ranks, same_on_all_ranks, save_rank
from support.harness import assert_same

fsdp = pytest.importorskip("torch.distributed.fsdp")
dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint import state_dict as dsd  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from also_fused import checkpoint  # noqa: E402
from also_fused.backends import interpreter_enabled  # noqa: E402

pytestmark = pytest.mark.slow  # two-process FSDP2 runs (spawned processes)

PER_RANK = 6
STEPS = 9
SAVE_AFTER = 4
N_GROUPS = 5

CASES = [
    dict(opt="also", mode="optimistic", api="closure"),
    dict(opt="also", mode="optimistic", api="loop"),
    dict(opt="also", mode="descent-ascent", api="closure", group_reduction="mean"),
    dict(opt="also", mode="descent-ascent", api="loop", amsgrad=True),
    dict(opt="adam"),
    # 8-bit moments: each rank quantises its own shard (other blocks than one process's: close, not equal)
    dict(opt="adam", state_precision="int8"),
    dict(opt="also", mode="optimistic", api="loop", state_precision="int8"),
]
if ON_GPUS:
    CASES = [dict(c, backend="triton") for c in CASES]
else:  # the reference path, and (without a GPU) the Triton kernels on the local shards through the interpreter
    CASES = [dict(c, backend="reference") for c in CASES]
    if interpreter_enabled():
        CASES += [dict(c, backend="triton") for c in CASES if c.get("api") != "closure" or c["mode"] == "optimistic"]


def data():
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(STEPS):
        X = torch.randn(WORLD * PER_RANK, 5, generator=gen)
        ids = torch.randint(0, N_GROUPS, (WORLD * PER_RANK,), generator=gen)
        Y = torch.randn(WORLD * PER_RANK, 1, generator=gen) + ids.float().unsqueeze(1) / 2
        out.append((X, Y, ids))
    return out


def build(case, batch_size, device, mesh=None, seed=0):
    """Linear(5, 7) -> tanh -> Linear(7, 1): 7 rows shard 4 + 3, the 1-row weight 1 + 0."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1)).to(device)
    if mesh is not None:
        for layer in (model[0], model[2]):
            fsdp.fully_shard(layer, mesh=mesh)
        fsdp.fully_shard(model, mesh=mesh)
    precision = case.get("state_precision")
    if case["opt"] == "adam":
        opt = also_fused.Adam(model.parameters(), lr=0.05, weight_decay=0.01, backend=case["backend"],
                              state_precision=precision or "param")
    else:
        opt = also_fused.ALSO(model.parameters(), N_GROUPS, batch_size=batch_size, mode=case["mode"], lr=0.05,
                              pi_lr=0.2, amsgrad=case.get("amsgrad", False), backend=case["backend"],
                              group_reduction=case.get("group_reduction", "sum"), state_precision=precision or "float32")
    return model, opt


def train_step(model, opt, case, X, Y, ids):
    def per_sample():
        return ((model(X) - Y) ** 2).mean(1)

    if case["opt"] == "adam":
        opt.zero_grad()
        per_sample().mean().backward()
        opt.step()
    elif case["api"] == "closure":
        def closure(weights, scale):
            opt.zero_grad()
            losses = per_sample()
            (scale * (weights * losses).sum()).backward()
            return losses.detach(), None
        opt.step(closure, ids)
    else:
        opt.zero_grad()
        opt.weighted_loss(per_sample(), ids).backward()
        opt.step()


def local_state(model, opt):
    """This rank's view of the whole optimizer state: local shards, host copies."""
    osd = checkpoint.get_optimizer_state_dict(model, opt)
    flat = {}
    for fqn, entries in osd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                value = value.to_local() if isinstance(value, DTensor) else value
                flat[f"{fqn}.{key}"] = value.detach().cpu().clone()
            else:
                flat[f"{fqn}.{key}"] = value
    if "also" in osd:
        flat["also"] = checkpoint._unpack(osd["also"])
    return flat


def save(path, model, opt):
    dcp.save({"model": dsd.get_model_state_dict(model), "optim": checkpoint.get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)


def load(path, model, opt):
    sd = {"model": dsd.get_model_state_dict(model), "optim": checkpoint.get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    dsd.set_model_state_dict(model, sd["model"])
    checkpoint.set_optimizer_state_dict(model, opt, sd["optim"])


def worker(rank, init_file, out_dir, case):
    with joined(rank, init_file) as device:
        mesh = init_device_mesh(device.type, (WORLD,))
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        batches = [(X[part].to(device), Y[part].to(device), ids[part].to(device)) for X, Y, ids in data()]
        is_also = case["opt"] == "also"
        loop_optimistic = is_also and case["mode"] == "optimistic" and case["api"] == "loop"
        ckpt = os.path.join(out_dir, "ckpt")

        model, opt = build(case, PER_RANK, device, mesh)
        same_pi = []
        for k, batch in enumerate(batches):
            train_step(model, opt, case, *batch)
            if is_also:
                same_pi.append(same_on_all_ranks(opt.pi))
            if k + 1 == SAVE_AFTER:
                if is_also:
                    opt.eval()  # on every rank: the iterate x into the shards, then saved in eval mode
                save(ckpt, model, opt)
                if is_also:
                    opt.train()
        sharded_like_params = all(
            isinstance(s[key], DTensor) and s[key].placements == p.placements and s[key].shape == p.shape
            for p, s in opt.state.items() for key in ("exp_avg", "exp_avg_sq", "iterate", "prev_grad") if key in s)
        # 8-bit scales: one per block of this rank's shard, checkpointed as this rank's row of a DTensor
        scale_rows = [(v.to_local().shape, local.numel())
                      for entries, local in zip(checkpoint.get_optimizer_state_dict(model, opt)["state"].values(),
                                                (p.to_local() for p in model.parameters()))
                      for k, v in entries.items() if k.endswith("_scale")]
        if is_also:
            opt.eval()
        final_state = local_state(model, opt)
        full_params = [p.full_tensor().detach().cpu().clone() for p in model.parameters()]
        local_params = [p.to_local().detach().cpu().clone() for p in model.parameters()]

        # a fresh model (other init) and optimizer, loaded from the checkpoint, run the remaining steps
        model2, opt2 = build(case, PER_RANK, device, mesh, seed=1)
        load(ckpt, model2, opt2)
        if is_also:
            assert opt2._training is False
            opt2.train()
        for batch in batches[SAVE_AFTER:]:
            train_step(model2, opt2, case, *batch)
        if is_also:
            opt2.eval()
        resumed_state = local_state(model2, opt2)
        resumed_params = [p.to_local().detach().cpu().clone() for p in model2.parameters()]
        save_rank(out_dir, rank, dict(full_params=full_params, local_params=local_params,
                                      resumed_params=resumed_params, final_state=final_state,
                                      resumed_state=resumed_state, same_pi=same_pi,
                                      sharded_like_params=sharded_like_params, loop_optimistic=loop_optimistic,
                                      scale_rows=scale_rows,
                                      pi=opt.pi.cpu().clone() if is_also else None))


def reference_run(case, device):
    model, opt = build(case, WORLD * PER_RANK, device)
    if case["opt"] == "adam":
        # the drop-in under FSDP2 against torch.optim.Adam in one process
        opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.01, foreach=False)
    for X, Y, ids in data():
        train_step(model, opt, case, X.to(device), Y.to(device), ids.to(device))
    if case["opt"] == "also":
        opt.eval()
    return [p.detach().cpu() for p in model.parameters()], (opt.pi.cpu() if case["opt"] == "also" else None)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_fsdp2_matches_single_process_and_resumes_bitwise(case):
    ranks = run_ranks(worker, case)
    device = torch.device("cuda:0" if ON_GPUS else "cpu")
    want_params, want_pi = reference_run(case, device)
    assert [p.shape[0] for p in ranks[1]["local_params"]] == [3, 3, 0, 0]  # uneven and empty shards
    int8 = case.get("state_precision") == "int8"
    for r in ranks:
        assert r["sharded_like_params"]
        if int8:  # an [1, widest shard's blocks] row per param and moment, covering this rank's shard
            assert len(r["scale_rows"]) == 2 * len(want_params)
            assert all(shape[0] == 1 and shape[1] >= -(-numel // 1024) for shape, numel in r["scale_rows"])
        for got, want in zip(r["full_params"], want_params):
            # 8-bit moments follow the float run within the code's error (a few % of a step of lr 0.05)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-2 if int8 else 1e-6)
        if want_pi is not None:
            assert all(r["same_pi"]) and len(r["same_pi"]) == STEPS, "pi differs between ranks"
            torch.testing.assert_close(r["pi"], want_pi, rtol=1e-5, atol=1e-3 if int8 else 1e-7)
            assert not torch.allclose(r["pi"], torch.full_like(r["pi"], 1 / N_GROUPS), atol=1e-4)
        # the run restored from the checkpoint is the uninterrupted run, bit for bit
        for a, b in zip(r["resumed_params"], r["local_params"]):
            assert torch.equal(a, b)
        assert_same(r["resumed_state"], r["final_state"])
        if r["loop_optimistic"]:
            assert any(k.endswith(".optimistic_buffer") for k in r["final_state"])
            assert r["final_state"]["also"]["training"] is False
