"""Peak GPU memory and time of one training step of GPT-2, per optimizer setup, and the largest model that fits.

Setups (the model's params and optimizer):
  torch-fp32       fp32 params, torch AdamW fused                           (the baseline)
  torch-bf16       bf16 params, torch AdamW fused
  ours-fp32-int8   fp32 params, also_fused AdamW with 8-bit moments
  ours-fp32-bwd    fp32 params, also_fused AdamW stepped inside the backward pass (StepInBackward)
  ours-fp32-int8-bwd  fp32 params, also_fused AdamW with 8-bit moments, inside the backward pass
  ours-bf16-small  bf16 params, also_fused AdamW, stochastic rounding, 8-bit moments, inside the backward pass
Every setup: transformers' GPT2LMHeadModel from a config (random init), gradient checkpointing, bf16 autocast
for fp32 params, a fixed batch of random tokens. Per model size: peak ``torch.cuda.max_memory_allocated()``
over --steps steps (each setup alone on the GPU), and ms per step from blocks of --steps steps with one
synchronize per block, the setups interleaved over --rounds rounds when they fit together, one after the
other otherwise. ``--search``: the largest depth (width fixed) whose step fits, per setup, by doubling then
bisection on OOM.

Run: ``python3 benchmarks/memory/bench_memory.py --sizes 124M,1.5B --search`` (CUDA); ``--tiny`` runs a tiny
config on any device (a smoke test: no memory numbers on a CPU).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, Optional

import torch

import also_fused

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BENCH)
from results_io import RESULTS_DIR, source_digest  # noqa: E402

SETUPS = ("torch-fp32", "torch-bf16", "ours-fp32-int8", "ours-fp32-bwd", "ours-fp32-int8-bwd", "ours-bf16-small")
SIZES = {  # name -> (n_layer, n_embd, n_head)
    "tiny": (2, 64, 2),
    "124M": (12, 768, 12),
    "1.5B": (48, 1600, 25),
}
LR = 1e-4
BUCKET_MB = 25.0


def build(setup: str, size: tuple[int, int, int], device: torch.device, seq_len: int) -> tuple[Any, Any, Any]:
    """(model, optimizer, the in-backward stepper or None) of one setup."""
    import transformers

    n_layer, n_embd, n_head = size
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=max(seq_len, 64))
    torch.manual_seed(0)
    # built on the device in its final dtype: a model near the memory limit never exists in fp32 on the host
    dtype = torch.bfloat16 if setup.endswith(("bf16", "bf16-small")) else torch.float32
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = transformers.GPT2LMHeadModel(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.train()
    model.gradient_checkpointing_enable()
    params = list(model.parameters())
    stepper = None
    if setup.startswith("torch"):
        opt = torch.optim.AdamW(params, lr=LR, fused=device.type == "cuda")
    elif setup == "ours-fp32-int8":
        opt = also_fused.AdamW(params, lr=LR, state_precision="int8")
    elif setup in ("ours-fp32-bwd", "ours-fp32-int8-bwd"):
        opt = also_fused.AdamW(params, lr=LR, state_precision="int8" if "int8" in setup else "param")
        stepper = also_fused.StepInBackward(opt, bucket_mb=BUCKET_MB)
    else:
        opt = also_fused.AdamW(params, lr=LR, state_precision="int8", stochastic_rounding=True, rounding_seed=0)
        stepper = also_fused.StepInBackward(opt, bucket_mb=BUCKET_MB)
    return model, opt, stepper


def train_step(model: Any, opt: Any, tokens: torch.Tensor, device: torch.device) -> None:
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if next(model.parameters()).dtype == torch.float32
                and device.type == "cuda" else torch.autocast(device.type, enabled=False))
    with autocast:
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_of(setup: str, size: tuple[int, int, int], device: torch.device, batch: int, seq_len: int,
            steps: int) -> dict[str, Any]:
    """Peak memory of ``steps`` training steps of one setup alone (raises torch.OutOfMemoryError if it does not fit)."""
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, opt, stepper = build(setup, size, device, seq_len)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    try:
        for _ in range(steps):
            train_step(model, opt, tokens, device)
        sync(device)
        n_params = sum(p.numel() for p in model.parameters())
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        return dict(setup=setup, n_params=n_params, peak_bytes=peak,
                    bytes_per_param=None if peak is None else peak / n_params)
    finally:
        if stepper is not None:
            stepper.remove()
        del model, opt, stepper
        release(device)


def fits(setup: str, n_layer: int, width: tuple[int, int], device: torch.device, batch: int, seq_len: int) -> Optional[dict]:
    try:
        return peak_of(setup, (n_layer, *width), device, batch, seq_len, steps=2)
    except torch.OutOfMemoryError:
        pass
    release(device)  # outside the handler: the traceback's frames no longer hold the failed step's tensors
    return None


def largest_depth(setup: str, width: tuple[int, int], device: torch.device, batch: int, seq_len: int,
                  start: int, max_depth: int, tolerance: float) -> dict[str, Any]:
    """The largest n_layer up to ``max_depth`` that fits: doubling from ``start``, then bisection until the
    bracket is within ``tolerance`` (relative) of the depth found."""
    good, bad, depth = None, None, start
    record = None
    while bad is None:
        if depth > max_depth:
            return dict(setup=setup, n_layer=good, n_embd=width[0], capped_at=max_depth,
                        n_params=record["n_params"] if record else None,
                        peak_bytes=record["peak_bytes"] if record else None)
        result = fits(setup, depth, width, device, batch, seq_len)
        print(f"    {setup}: {depth} layers {'fit' if result else 'OOM'}", flush=True)
        if result is None:
            bad = depth
        else:
            good, record, depth = depth, result, depth * 2
    lo = good or 0
    while bad - lo > max(1, int(lo * tolerance)):
        mid = (lo + bad) // 2
        result = fits(setup, mid, width, device, batch, seq_len)
        print(f"    {setup}: {mid} layers {'fit' if result else 'OOM'}", flush=True)
        if result is None:
            bad = mid
        else:
            lo, record = mid, result
    return dict(setup=setup, n_layer=lo, first_oom_n_layer=bad, n_embd=width[0], **({} if record is None else
                                                               dict(n_params=record["n_params"],
                                                                    peak_bytes=record["peak_bytes"])))


def timing(together: list[str], alone: list[str], size: tuple[int, int, int], device: torch.device, batch: int,
           seq_len: int, steps: int, rounds: int) -> dict[str, list[float]]:
    """ms per step per setup: blocks of ``steps`` steps between synchronizes, over ``rounds`` rounds; the setups
    in ``together`` live on the GPU at once and take turns (A B C A B C ...), those in ``alone`` run one after
    the other."""
    times: dict[str, list[float]] = {s: [] for s in together + alone}

    def block(model, opt, tokens):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(model, opt, tokens, device)
        sync(device)
        return (time.perf_counter() - t0) * 1e3 / steps

    if together:
        built = {s: build(s, size, device, seq_len) for s in together}
        tokens = torch.randint(0, built[together[0]][0].config.vocab_size, (batch, seq_len), device=device)
        for model, opt, _ in built.values():
            train_step(model, opt, tokens, device)  # warm-up
        for r in range(rounds):
            for s in together[r % len(together):] + together[:r % len(together)]:
                times[s].append(block(built[s][0], built[s][1], tokens))
        for _, _, stepper in built.values():
            if stepper is not None:
                stepper.remove()
        del built
        release(device)
    for s in alone:
        model, opt, stepper = build(s, size, device, seq_len)
        tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
        train_step(model, opt, tokens, device)
        times[s] = [block(model, opt, tokens) for _ in range(rounds)]
        if stepper is not None:
            stepper.remove()
        del model, opt, stepper
        release(device)
    return times


def split_by_memory(peaks: list[dict[str, Any]], device: torch.device) -> tuple[list[str], list[str]]:
    """(setups timed together, setups timed alone): in SETUPS order, a setup joins the interleaved set while the
    sum of the set's peaks stays under 90% of the GPU (an overestimate: activations are not held between steps)."""
    budget = 0.9 * torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else float("inf")
    together, alone, used = [], [], 0.0
    for p in peaks:
        if p.get("error") is not None:
            continue
        if used + (p["peak_bytes"] or 0) <= budget:
            together.append(p["setup"])
            used += p["peak_bytes"] or 0
        else:
            alone.append(p["setup"])
    return together, alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="124M,1.5B", help=f"comma-separated of {tuple(SIZES)}")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="steps per memory run and per timed block")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--search", action="store_true", help="the largest depth that fits, per setup")
    parser.add_argument("--search-width", default="1600,25", help="n_embd,n_head of the depth search")
    parser.add_argument("--max-depth", type=int, default=1024, help="the depth search stops there")
    parser.add_argument("--search-setups", default="torch-fp32,ours-bf16-small", help="the setups searched")
    parser.add_argument("--search-tolerance", type=float, default=0.03,
                        help="the search stops when the first depth that fails is within this fraction of the last that fits")
    parser.add_argument("--tiny", action="store_true", help="the tiny config only (a smoke test on any device)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = ["tiny"] if args.tiny else args.sizes.split(",")
    setups = args.setups.split(",")
    unknown = [s for s in setups if s not in SETUPS] + [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown setups or sizes: {unknown}")
    if args.tiny:
        args.batch, args.seq_len = 2, 32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = args.out or os.path.join(RESULTS_DIR, f"memory_{name.split()[-1].lower()}{'_tiny' if args.tiny else ''}.json")
    import transformers
    record: dict[str, Any] = dict(
        device=name, torch=torch.__version__, transformers=transformers.__version__, also_fused_source=source_digest(),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        cuda_alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), batch=args.batch, seq_len=args.seq_len,
        steps=args.steps, rounds=args.rounds, bucket_mb=BUCKET_MB, sizes={}, search=None)
    for size_name in sizes:
        size = SIZES[size_name]
        print(f"== GPT-2 {size_name} {size}", flush=True)
        peaks = []
        for s in setups:
            try:
                peaks.append(peak_of(s, size, device, args.batch, args.seq_len, args.steps))
            except torch.OutOfMemoryError:
                release(device)
                peaks.append(dict(setup=s, n_params=None, peak_bytes=None, bytes_per_param=None, error="OOM"))
            print(f"  {peaks[-1]}", flush=True)
        base = next((p["peak_bytes"] for p in peaks if p["setup"] == "torch-fp32"), None)
        for p in peaks:
            p["peak_vs_torch_fp32"] = None if base is None or p["peak_bytes"] is None else p["peak_bytes"] / base
        together, alone = split_by_memory(peaks, device)
        times = timing(together, alone, size, device, args.batch, args.seq_len, args.steps, args.rounds)
        for p in peaks:
            t = times.get(p["setup"])
            p.update(ms_per_step=statistics.median(t) if t else None, ms_min=min(t) if t else None,
                     ms_max=max(t) if t else None, ms_per_round=t or [], interleaved=p["setup"] in together)
        record["sizes"][size_name] = peaks
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
    if args.search:
        n_embd, n_head = map(int, args.search_width.split(","))
        start = 2 if args.tiny else 48
        max_depth = 4 if args.tiny else args.max_depth
        record["search"] = [largest_depth(s, (n_embd, n_head), device, args.batch, args.seq_len, start, max_depth,
                                          args.search_tolerance) for s in args.search_setups.split(",")]
        base = next((r for r in record["search"] if r["setup"] == "torch-fp32"), None)
        for r in record["search"]:
            r["params_vs_torch_fp32"] = (r["n_params"] / base["n_params"] if base and base.get("n_params")
                                         and r.get("n_params") else None)
        print(record["search"], flush=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {out}")
    for size_name, peaks in record["sizes"].items():
        print(f"\n| GPT-2 {size_name} | peak GiB | x torch fp32 | bytes/param | ms/step (min-max) |\n|---|---|---|---|---|")
        for p in peaks:
            gib = "" if p["peak_bytes"] is None else f"{p['peak_bytes'] / 2 ** 30:.2f}"
            ratio = "" if p["peak_vs_torch_fp32"] is None else f"{p['peak_vs_torch_fp32']:.3f}"
            bpp = "" if p["bytes_per_param"] is None else f"{p['bytes_per_param']:.2f}"
            ms = "" if p["ms_per_step"] is None else f"{p['ms_per_step']:.1f} ({p['ms_min']:.1f}-{p['ms_max']:.1f})"
            print(f"| {p['setup']} | {gib} | {ratio} | {bpp} | {ms} |")


if __name__ == "__main__":
    main()
