"""One DDP or FSDP2 training step of a GPT-2-124M-shaped model on every GPU of the host: ALSO vs torch Adam fused.

The model has GPT-2 124M's parameter shapes (tied 50257x768 embedding, 12 blocks of 768->2304,
768->768, 768->3072, 3072->768 linears with layer norms) applied as a residual MLP stack (no
attention), so forward, backward, the DDP all-reduce and the optimizer step are all real. Times
the whole step (zero_grad, forward, per-sample loss, backward, step) with CUDA events, median of
many steps after warm-up, on rank 0, and the optimizer step alone (GPU time between events, and
the host time of the ``step()`` call). With ``--wrap fsdp2`` every
block and the root are ``fully_shard``-ed (DTensor params, sharded state).
Run: torchrun --nproc-per-node=N benchmarks/distributed/bench_ddp.py [--wrap ddp|fsdp2]
(writes benchmarks/results/<wrap>_step.json unless --out names another path)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton

import also_fused
import also_fused._dtensor

VOCAB, D, LAYERS, CTX = 50257, 768, 12, 1024


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
        self.qkv, self.proj = torch.nn.Linear(D, 3 * D), torch.nn.Linear(D, D)
        self.fc, self.out = torch.nn.Linear(D, 4 * D), torch.nn.Linear(4 * D, D)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.proj(torch.tanh(q) * k + v)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT2Shaped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(VOCAB, D), torch.nn.Embedding(CTX, D)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = torch.nn.LayerNorm(D)

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200) * 1e-3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--wrap", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--out", default=None, help="default: results/<wrap>_step.json")
    args = parser.parse_args()
    out = args.out or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results",
                                    f"{args.wrap}_step.json")
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    gen = torch.Generator(device="cuda").manual_seed(rank)
    n_groups = 10
    # copy bandwidth of this GPU, for the optimizer step's share of it (bytes per local param element:
    # Adam reads p, g, m, v and writes p, m, v; the optimistic loop API also reads and writes x)
    copy_bw = copy_bandwidth()
    records = []
    for name in ("torch Adam fused", "also_fused Adam", "ALSO descent-ascent (loop API)",
                 "ALSO optimistic (loop API)", "ALSO optimistic (loop API, validate=False)"):
        torch.manual_seed(0)
        model = GPT2Shaped().cuda()
        if args.wrap == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            ddp = fully_shard(model)
        else:
            ddp = torch.nn.parallel.DistributedDataParallel(model)
        if name == "torch Adam fused":
            opt = torch.optim.Adam(model.parameters(), weight_decay=1e-3, fused=True)
        elif name == "also_fused Adam":
            opt = also_fused.Adam(model.parameters(), weight_decay=1e-3)
        else:
            mode = "optimistic" if "optimistic" in name else "descent-ascent"
            opt = also_fused.ALSO(model.parameters(), n_groups, batch_size=args.batch, mode=mode,
                                  validate="validate=False" not in name)
        start, before_step, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        times, step_times, host_times = [], [], []
        for k in range(10 + args.iters):
            tokens = torch.randint(0, VOCAB, (args.batch, args.seq), device="cuda", generator=gen)
            ids = torch.randint(0, n_groups, (args.batch,), device="cuda", generator=gen)
            torch.cuda.synchronize()
            start.record()
            opt.zero_grad(set_to_none=True)
            logits = ddp(tokens[:, :-1])
            per_token = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
            losses = per_token.view(args.batch, -1).mean(1)
            if isinstance(opt, also_fused.ALSO):
                opt.weighted_loss(losses, ids).backward()
            else:
                losses.mean().backward()
            before_step.record()
            host_start = time.perf_counter()
            opt.step()
            host_end = time.perf_counter()
            end.record()
            end.synchronize()
            if k >= 10:
                times.append(start.elapsed_time(end))
                step_times.append(before_step.elapsed_time(end))
                host_times.append((host_end - host_start) * 1e3)
        local_numel = sum(also_fused._dtensor.local_tensor(p).numel() for p in model.parameters())
        step_bytes = (36 if "optimistic" in name else 28) * local_numel
        step_ms = statistics.median(step_times)
        records.append(dict(step_bytes_per_rank=step_bytes, copy_bandwidth_tb_s=copy_bw / 1e12,
                            step_pct_of_copy_bandwidth=100 * step_bytes / (step_ms * 1e-3) / copy_bw,
                            workload=f"{args.wrap.upper()} x{world}, GPT-2-124M-shaped residual MLP stack, "
                                     f"{args.batch}x{args.seq} tokens per rank, fp32", impl=name,
                            median_ms=statistics.median(times), step_median_ms=step_ms,
                            step_host_median_ms=statistics.median(host_times),
                            world_size=world, device=torch.cuda.get_device_name(), torch=torch.__version__,
                            triton=triton.__version__, date=datetime.date.today().isoformat()))
        del ddp, model, opt
        torch.cuda.empty_cache()
    if rank == 0:
        base = records[0]["median_ms"]
        for r in records:
            r["ratio_vs_torch_fused"] = r["median_ms"] / base
            print(f"{r['impl']:35s} {r['median_ms']:8.2f} ms  x{r['ratio_vs_torch_fused']:.2f}   "
                  f"optimizer step {r['step_median_ms']:6.2f} ms = {r['step_pct_of_copy_bandwidth']:.0f}% of copy "
                  f"bandwidth ({r['copy_bandwidth_tb_s']:.2f} TB/s), host {r['step_host_median_ms']:.2f} ms",
                  flush=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(records, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
