"""What the 2-process tests share: start the ranks, join a process group, compare pi across ranks; the
data of the DDP tests of ALSO and of GroupWeights.

Two GPUs: NCCL and the Triton kernels; otherwise gloo on the CPU."""
from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
ON_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= WORLD
DIST_BACKEND = "nccl" if ON_GPUS else "gloo"


def run_ranks(worker: Callable[..., None], *args: Any) -> list[dict]:
    """Run ``worker(rank, init_file, out_dir, *args)`` on WORLD processes; each saves ``rank{r}.pt``
    with ``save_rank``; returns what they saved, in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        files = [os.path.join(tmp, f"rank{r}.pt") for r in range(WORLD)]
        try:
            mp.spawn(worker, args=(os.path.join(tmp, "init"), tmp) + args, nprocs=WORLD, join=True)
        except mp.ProcessExitedException as exc:
            # gloo can abort a process while it tears its group down, after the work is done and
            # saved; a rank that died before saving its result still fails the test
            if not all(os.path.exists(f) for f in files):
                raise
            warnings.warn(f"a rank died after saving its result: {exc}")
        return [torch.load(f, weights_only=False) for f in files]


def save_rank(out_dir: str, rank: int, result: dict) -> None:
    path = os.path.join(out_dir, f"rank{rank}.pt")
    torch.save(result, path + ".part")
    os.replace(path + ".part", path)  # the file exists only once it is whole


@contextlib.contextmanager
def joined(rank: int, init_file: str) -> Iterator[torch.device]:
    """This process as rank ``rank`` of the group; yields its device. The process ends when the block
    has run without error (save the result inside it): letting Python free the worker's DDP model
    afterwards can deadlock inside torch (the reducer's destructor joins gloo's worker thread, which
    waits for the GIL to drop a tensor), and it hung whole test runs here."""
    # a bounded timeout: a rank stuck in a collective or in the teardown fails in minutes, not after
    # the default half hour (a rank that dies after saving its result is tolerated by run_ranks)
    dist.init_process_group(DIST_BACKEND, init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        device = torch.device(f"cuda:{rank}" if ON_GPUS else "cpu")
        if ON_GPUS:
            torch.cuda.set_device(device)
        yield device
        dist.barrier()  # no rank tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # only after a block without error: an exception still reaches mp.spawn


def same_on_all_ranks(t: torch.Tensor) -> bool:
    """Whether every rank holds bitwise the same tensor."""
    gathered = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(gathered, t)
    return all(torch.equal(gathered[0], g) for g in gathered)


# ---------------------------------------------------------------- the DDP tests' problem
# (test_distributed, test_group_weights_distributed): Linear(D_IN, D_OUT), WORLD * PER_RANK samples a step

# two GPUs: NCCL and the Triton kernels; otherwise gloo on the CPU with the reference path
OPT_BACKEND = "triton" if ON_GPUS else "reference"
PER_RANK = 6
STEPS = 12
D_IN, D_OUT = 5, 3


def data(case):
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(STEPS):
        X = torch.randn(WORLD * PER_RANK, D_IN, generator=gen)
        ids = torch.randint(0, min(case["n_groups"], 7), (WORLD * PER_RANK,), generator=gen)
        Y = torch.randn(WORLD * PER_RANK, D_OUT, generator=gen) + (ids % 3).float().unsqueeze(1)
        out.append((X, Y, ids))
    return out
