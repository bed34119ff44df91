"""Where the host time of ``opt.step()`` goes: cProfile around the optimizer calls of a training loop.

``--model mlp``: MLP 512-1024-1024-10 at batch 256 (the host-bound case of training/bench_training.py);
``--model gpt2``: HuggingFace GPT-2 124M from its config (148 tensors), batch 4 x 128 tokens.
A cosine lr schedule runs; the forward and backward run outside the profiler. Prints the host us per
call (without and with cProfile) and the top entries by total and cumulative time.

``--methods``: instead, ``weighted_loss()`` + ``step()`` in a tight loop (the model's gradients fixed, no
forward or backward) with a wall-clock timer around each of the optimizers' internal methods named in
``TIMED_METHODS``: host us per step spent in each (nested timers overlap), far less distorted than cProfile.
``--methods --in-loop``: the same timers in a training loop (forward and backward between the calls), where
the host's caches are cold for the optimizer's code and every call costs more.

Run: ``python3 benchmarks/host/profile_step_host.py --model mlp|gpt2 [--methods [--in-loop]]`` (CUDA); prints, writes
no file.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

import also_fused

NAMES = ("torch AdamW fused", "also_fused AdamW", "ALSO descent-ascent", "ALSO optimistic")


def build_model(kind: str, device: str):
    if kind == "gpt2":
        import transformers

        model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).to(device)
        tokens = torch.randint(0, 50257, (4, 129), device=device)
        groups = torch.randint(0, 4, (4,), device=device)

        def per_sample(m):
            logits = m(tokens[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
            return loss.view(4, -1).mean(1), groups

        return model, per_sample, 4, 4
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                torch.nn.ReLU(), torch.nn.Linear(1024, 10)).to(device)
    x = torch.randn(256, 512, device=device)
    y = torch.randint(0, 10, (256,), device=device)
    return model, lambda m: (torch.nn.functional.cross_entropy(m(x), y, reduction="none"), y), 10, 256


def build_opt(name: str, model: torch.nn.Module, n_groups: int, batch: int):
    if name == "torch AdamW fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if name == "also_fused AdamW":
        return also_fused.AdamW(model.parameters(), lr=1e-4)
    mode = "descent-ascent" if "descent" in name else "optimistic"
    return also_fused.ALSO(model.parameters(), n_groups, batch_size=batch, mode=mode, lr=1e-4)


def run(name: str, args, profile: bool) -> tuple[float, float, str]:
    torch.manual_seed(0)
    model, per_sample, n_groups, batch = build_model(args.model, args.device)
    opt = build_opt(name, model, n_groups, batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
    prof = cProfile.Profile() if profile else None
    step_us, loss_us, backward_us = [], [], []
    for k in range(args.steps + 20):
        losses, ids = per_sample(model)
        synchronize(args.device)
        timed = k >= 20
        if timed and prof:
            prof.enable()
        t0 = time.perf_counter()
        loss = opt.weighted_loss(losses, ids) if isinstance(opt, also_fused.ALSO) else losses.mean()
        t1 = time.perf_counter()
        if timed and prof:
            prof.disable()
        loss.backward()
        t1b = time.perf_counter()
        synchronize(args.device)
        if timed and prof:
            prof.enable()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if timed:
            if prof:
                prof.disable()
            step_us.append((t3 - t2) * 1e6)
            loss_us.append((t1 - t0) * 1e6)
            backward_us.append((t1b - t1) * 1e6)
        sched.step()
        opt.zero_grad(set_to_none=True)
    synchronize(args.device)
    text = ""
    if prof:
        for key in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(key).print_stats(args.top)
            text += f"--- by {key}\n" + "\n".join(out.getvalue().splitlines()[6:]) + "\n"
    return statistics.median(step_us), statistics.median(loss_us), statistics.median(backward_us), text


# (module path, attribute holding the method, method) timed by --methods
TIMED_METHODS = [
    ("also_fused.also", "ALSO", "_step_loop"), ("also_fused.group_weights", "GroupWeights", "_weighted_loss"),
    ("also_fused.group_weights", "GroupWeights", "_weighted_loss_staged"),
    ("also_fused.group_weights", "GroupWeights", "_plain_batch"),
    ("also_fused.group_weights", "GroupWeights", "_take_recorded"),
    ("also_fused.group_weights", "GroupWeights", "_ascend"), ("also_fused.group_weights", "GroupWeights", "_pi_apply"),
    ("also_fused.theta", "ThetaAdam", "_update"), ("also_fused._plans", "StepPlanner", "reused"),
    ("also_fused._adam_family", "AdamFamily", "_run_plan"), ("also_fused.backends.triton", "TritonBackend", "adam_update"),
    ("also_fused.backends.triton", "TritonBackend", "pi_update"),
    ("also_fused.backends.triton", "TritonBackend", "weighted_loss"),
    ("also_fused.kernels.group_pi", "StagedPiStep", "step"), ("also_fused.kernels.launch", "PreparedLaunch", "__call__"),
    ("also_fused.backends.triton", "HyperTable", "get"), ("also_fused.kernels.launch", "Launcher", "__call__"),
    ("also_fused._input_errors", "DeviceInputErrors", "poll"),
    ("also_fused._input_errors", "DeviceInputErrors", "after_step"), ("also_fused.adam", "AdamW", "step"),
]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(args) -> None:
    import collections
    import functools
    import importlib

    spent: dict[str, float] = collections.defaultdict(float)
    for module_path, owner_name, method in TIMED_METHODS:
        module = importlib.import_module(module_path)
        owner = getattr(module, owner_name) if owner_name else module
        label = f"{getattr(owner, '__name__', module_path)}.{method}"

        def timed(fn, label=label):
            @functools.wraps(fn)
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    spent[label] += time.perf_counter() - t0
            return wrapper
        setattr(owner, method, timed(getattr(owner, method)))
    for name in args.impls.split(","):
        if name == "torch AdamW fused":
            continue
        torch.manual_seed(0)
        model, per_sample, n_groups, batch = build_model(args.model, args.device)
        losses, ids = per_sample(model)
        losses.sum().backward()
        opt = build_opt(name, model, n_groups, batch)
        losses = losses.detach().requires_grad_()

        def step():
            if args.in_loop:  # the model's forward and backward between the optimizer's calls
                model_losses, model_ids = per_sample(model)
                if isinstance(opt, also_fused.ALSO):
                    opt.weighted_loss(model_losses, model_ids).backward()
                else:
                    model_losses.mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return
            if isinstance(opt, also_fused.ALSO):
                opt.weighted_loss(losses, ids)
            opt.step()

        for _ in range(50):
            step()
        synchronize(args.device)
        spent.clear()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        total = (time.perf_counter() - t0) / args.steps * 1e6
        synchronize(args.device)
        what = "training step" if args.in_loop else "weighted_loss() + step()"
        print(f"=== {args.model} / {name}: {total:.1f} host us per {what}")
        for label in sorted(spent, key=lambda k: -spent[k]):
            print(f"   {label:45s} {spent[label] / args.steps * 1e6:7.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "gpt2"), default="mlp")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--impls", default=",".join(NAMES))
    parser.add_argument("--methods", action="store_true", help="time the optimizers' methods in a tight loop instead")
    parser.add_argument("--in-loop", action="store_true",
                        help="with --methods: the model's forward and backward run between the steps (a training "
                             "loop; each method then costs about twice what it costs in the tight loop)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.methods:
        return time_methods(args)
    for name in args.impls.split(","):
        step, loss, backward, _ = run(name, args, profile=False)
        pstep, ploss, _, text = run(name, args, profile=True)
        print(f"=== {args.model} / {name}: host us median step() {step:.0f}, loss {loss:.0f}, backward {backward:.0f} "
              f"(under cProfile: step {pstep:.0f} / loss {ploss:.0f})")
        print(text, flush=True)


if __name__ == "__main__":
    main()
