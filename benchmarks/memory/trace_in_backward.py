"""Where the memory of a step inside the backward pass goes: GPT-2 (fp32 params, bf16 autocast, gradient
checkpointing) with also_fused.AdamW under StepInBackward; at every bucket update the allocated bytes, the
bytes of the gradients alive, and the peak so far, over the second step (state already built). Prints
a summary (CUDA only).

Run: ``python3 benchmarks/memory/trace_in_backward.py --n-layer 48``"""
from __future__ import annotations

import argparse

import torch
import transformers

import also_fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=48)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    args = parser.parse_args()
    config = transformers.GPT2Config(n_layer=args.n_layer, n_embd=1600, n_head=25, n_positions=512)
    with torch.device("cuda"):
        model = transformers.GPT2LMHeadModel(config)
    model.gradient_checkpointing_enable()
    params = list(model.parameters())
    opt = also_fused.AdamW(params, lr=1e-4)
    also_fused.StepInBackward(opt, bucket_mb=args.bucket_mb)
    trace = []
    update = opt.update_params

    def traced(items, grads=None):
        alive = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        trace.append((torch.cuda.memory_allocated(), alive, torch.cuda.max_memory_allocated()))
        return update(items, grads)

    opt.update_params = traced
    tokens = torch.randint(0, config.vocab_size, (2, 512), device="cuda")
    for step in range(2):
        if step == 1:
            trace.clear()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
            inside_autocast = torch.cuda.memory_allocated()  # with autocast's cache of bf16 weight copies
        after_forward = torch.cuda.memory_allocated()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    gib = 2 ** 30
    n = sum(p.numel() for p in params)
    print(f"params {n / 1e9:.2f} B; before the step {base / gib:.2f} GiB, after forward {inside_autocast / gib:.2f} GiB inside "
          f"autocast and {after_forward / gib:.2f} GiB after it, "
          f"peak {torch.cuda.max_memory_allocated() / gib:.2f} GiB; {len(trace)} bucket updates")
    worst = max(range(len(trace)), key=lambda i: trace[i][0])
    for i in sorted({0, 1, len(trace) // 2, worst, len(trace) - 1}):
        allocated, alive, peak = trace[i]
        print(f"  update {i}: allocated {allocated / gib:.2f} GiB, grads alive {alive / gib:.3f} GiB, "
              f"peak so far {peak / gib:.2f} GiB")


if __name__ == "__main__":
    main()
