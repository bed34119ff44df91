"""Where the time of a step inside the backward pass goes: GPT-2 (fp32 params, bf16 autocast, gradient
checkpointing), torch AdamW fused after backward against also_fused AdamW under StepInBackward, interleaved.

Per setup: ms per step over blocks of --steps steps (one synchronize per block), the host time of
``backward()`` and of ``step()``; for the stepper also the host time inside its bucket updates, the
number of plans built and of pinned rings allocated during the timed steps (both should be 0 once the
first step has built them). Then a cProfile of one stepped backward, sorted by own time (CUDA only).

Run: ``python3 benchmarks/memory/profile_in_backward.py --n-layer 12 --n-embd 768 --n-head 12``"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch
import transformers

import also_fused
from also_fused import _plans
from also_fused.kernels import staging


class Counts:
    def __init__(self) -> None:
        self.plans = self.rings = 0
        self.update_s = 0.0
        build, ring_init = _plans.StepPlanner._build, staging._Ring.__init__

        def counted_build(planner, *args, **kwargs):
            self.plans += 1
            return build(planner, *args, **kwargs)

        def counted_ring(ring, *args, **kwargs):
            self.rings += 1
            ring_init(ring, *args, **kwargs)

        _plans.StepPlanner._build = counted_build
        staging._Ring.__init__ = counted_ring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=48)
    parser.add_argument("--n-embd", type=int, default=1600)
    parser.add_argument("--n-head", type=int, default=25)
    parser.add_argument("--state-precision", default="int8")
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--batch", type=int, default=2, help="sequences of 512 tokens per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile of one step")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    counts = Counts()
    config = transformers.GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_positions=512)
    models, opts = {}, {}
    for name in ("torch", "ours-bwd"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = transformers.GPT2LMHeadModel(config)
        model.gradient_checkpointing_enable()
        if name == "torch":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        else:
            opt = also_fused.AdamW(model.parameters(), lr=1e-4, state_precision=args.state_precision)
            also_fused.StepInBackward(opt, bucket_mb=args.bucket_mb)
            update = opt.update_params

            def timed(items, grads=None, update=update):
                t0 = time.perf_counter()
                update(items, grads)
                counts.update_s += time.perf_counter() - t0

            opt.update_params = timed
        models[name], opts[name] = model, opt
    tokens = torch.randint(0, config.vocab_size, (args.batch, 512), device="cuda")

    def step(name: str, host: dict) -> None:
        model, opt = models[name], opts[name]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        t0 = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        host["backward"] += t1 - t0
        host["step"] += time.perf_counter() - t1

    for name in models:
        for _ in range(2):
            step(name, {"backward": 0.0, "step": 0.0})
    torch.cuda.synchronize()
    counts.plans = counts.rings = 0
    counts.update_s = 0.0
    ms = {name: [] for name in models}
    host = {name: {"backward": 0.0, "step": 0.0} for name in models}
    for _ in range(args.rounds):
        for name in models:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(name, host[name])
            torch.cuda.synchronize()
            ms[name].append((time.perf_counter() - t0) * 1e3 / args.steps)
    n_steps = args.rounds * args.steps
    result = dict(config=[args.n_layer, args.n_embd, args.n_head], state_precision=args.state_precision,
                  bucket_mb=args.bucket_mb, batch=[args.batch, 512], device=torch.cuda.get_device_name(), torch=torch.__version__,
                  plans_built_in_timed_steps=counts.plans, rings_allocated_in_timed_steps=counts.rings,
                  host_ms_in_bucket_updates_per_step=counts.update_s * 1e3 / n_steps)
    for name in models:
        result[name] = dict(ms_per_step=statistics.median(ms[name]), ms_per_round=ms[name],
                            host_ms_backward=host[name]["backward"] * 1e3 / n_steps,
                            host_ms_step=host[name]["step"] * 1e3 / n_steps)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.no_profile:
        return
    profiler = cProfile.Profile()
    profiler.enable()
    step("ours-bwd", {"backward": 0.0, "step": 0.0})
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())


if __name__ == "__main__":
    main()
