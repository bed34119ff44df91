"""Whole training loops of real models on synthetic data, several optimizers side by side in one process.

GPT-2 124M (eager, torch.compile'd) and ResNet-50 (channels_last, NCHW) under bf16 autocast, a host-bound fp32 MLP;
torch AdamW fused, also_fused AdamW, ALSO (both modes, loop API) and GroupWeights beside also_fused AdamW, each on
its own model copy with a cosine lr. ``--precision fp16``: fp16 autocast with a torch.amp.GradScaler per
implementation (``scaler.step``; GroupWeights gets the scaler's found_inf), and a check that the optimizer's part
of each step (weighted loss, scaler.step, the group weights' step, scaler.update) makes no host sync.
ms/step: blocks of --steps steps between synchronizes, impls interleaved, order rotated each round (median/min/max).
Per round: the ratio to torch AdamW fused (speed) and to also_fused AdamW (time) within each round, median/min/max
over the rounds (the implementations of a round ran back to back, so the host's drift between rounds cancels).
Then 20 steps each: host time of opt.step() and opt.weighted_loss() after a synchronize, GPU time of opt.step().
Run: ``python3 benchmarks/training/bench_training.py --workloads gpt2 --rounds 30`` (CUDA), then
``python3 benchmarks/training/plot_training.py benchmarks/results/training_<gpu>.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import also_fused

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
sys.path.insert(0, BENCH)  # results_io.py
from results_io import source_digest  # noqa: E402

WORKLOAD_NAMES = ("gpt2", "gpt2_compiled", "resnet50", "resnet50_nchw", "mlp")
TORCH_FUSED = "torch AdamW fused"
GROUP_WEIGHTS = "GroupWeights + also_fused AdamW"
IMPL_NAMES = (TORCH_FUSED, "also_fused AdamW", "ALSO descent-ascent", "ALSO optimistic", GROUP_WEIGHTS)
PRECISIONS = ("bf16", "fp16")
SYNC_CHECK_STEPS = 3
LR = 1e-4
WEIGHT_DECAY = 0.01
COSINE_T_MAX = 10_000
N_SYNTHETIC_BATCHES = 4
COMPILED_WARMUP_FACTOR = 2
RESULTS_DIR = os.path.join(BENCH, "results")

ALSO_ADAMW = "also_fused AdamW"
FAILED_METRICS = dict(ms_per_step=None, ms_min=None, ms_max=None, ms_per_round=[], ratio_vs_torch_fused=None,
                      paired_ratio_vs_torch_fused=None, paired_time_vs_also_adamw=None,
                      host_us_step=None, host_us_weighted_loss=None, gpu_us_step=None, optimizer_part_host_sync=None)

Batch = tuple[Tensor, Tensor, Tensor]
PerSampleLoss = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class Workload:
    name: str
    model: nn.Module
    batches: list[Batch]
    per_sample_loss: PerSampleLoss
    n_groups: int
    batch: int
    input_shape: list[int]
    use_autocast: bool
    compile_model: bool
    library_versions: dict[str, str] = field(default_factory=dict)
    autocast_dtype: torch.dtype = torch.bfloat16


@dataclass
class Implementation:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    uses_weighted_loss: bool
    steps_taken: int = 0
    weights: Optional[also_fused.GroupWeights] = None  # stepped after the optimizer
    scaler: Optional[torch.amp.GradScaler] = None  # fp16: each implementation's own


def optional_import(module_name: str) -> Optional[Any]:
    """The module, or None when it is missing or fails to import (torchvision built for another torch: RuntimeError)."""
    try:
        return __import__(module_name, fromlist=["__name__"])
    except Exception as exc:  # noqa: BLE001
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        print(f"  ({module_name} unavailable: {type(exc).__name__}: {first_line})")
        return None


def device_slug(device_name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100', 'NVIDIA GeForce RTX 4090' -> 'rtx4090'."""
    vendor_words = {"nvidia", "geforce", "tesla", "amd", "instinct", "radeon"}
    tokens = [t for t in re.findall(r"[a-z0-9]+", device_name.lower()) if t not in vendor_words]
    kept = []
    for token in tokens:
        kept.append(token)
        if any(c.isdigit() for c in token):
            break
    return "".join(kept) or "device"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_context(workload: Workload, device: torch.device) -> ContextManager:
    if workload.use_autocast and device.type == "cuda":
        return torch.autocast("cuda", dtype=workload.autocast_dtype)
    return contextlib.nullcontext()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def git_commit() -> Optional[str]:
    repo = os.path.dirname(BENCH)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{'-dirty' if dirty else ''}" if commit else None


def token_cross_entropy_per_sample(model: nn.Module, tokens: Tensor, next_tokens: Tensor) -> Tensor:
    logits = model(input_ids=tokens, use_cache=False).logits
    token_losses = F.cross_entropy(logits.flatten(0, 1), next_tokens.flatten(), reduction="none")
    return token_losses.view(tokens.shape[0], -1).float().mean(dim=1)


def classification_per_sample(model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(model(inputs), labels, reduction="none").float()


def build_gpt2(device: torch.device, tiny: bool, compiled: bool, generator: torch.Generator) -> Optional[Workload]:
    transformers = optional_import("transformers")
    if transformers is None:
        return None
    if tiny:
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64)
        batch, seq_len = 8, 32
    else:
        config = transformers.GPT2Config()
        batch, seq_len = 8, 512
    n_groups = 4
    model = transformers.GPT2LMHeadModel(config).to(device).train()
    batches = []
    for _ in range(N_SYNTHETIC_BATCHES):
        stream = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device, generator=generator)
        source_ids = torch.randint(0, n_groups, (batch,), device=device, generator=generator)
        batches.append((stream[:, :-1].contiguous(), stream[:, 1:].contiguous(), source_ids))
    return Workload("gpt2_compiled" if compiled else "gpt2", model, batches, token_cross_entropy_per_sample,
                    n_groups, batch, [batch, seq_len], use_autocast=True, compile_model=compiled,
                    library_versions={"transformers": transformers.__version__})


def build_resnet50(device: torch.device, tiny: bool, channels_last: bool,
                   generator: torch.Generator) -> Optional[Workload]:
    n_classes = 1000
    torchvision = optional_import("torchvision")
    if torchvision is not None:
        model = torchvision.models.resnet50(num_classes=n_classes)
        versions = {"torchvision": torchvision.__version__}
    else:
        timm = optional_import("timm")
        if timm is None:
            return None
        model = timm.create_model("resnet50", pretrained=False, num_classes=n_classes)
        versions = {"timm": timm.__version__}
    batch, image_size = (4, 32) if tiny else (64, 224)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format).train()
    batches = []
    for _ in range(N_SYNTHETIC_BATCHES):
        images = torch.randn(batch, 3, image_size, image_size, device=device, generator=generator)
        labels = torch.randint(0, n_classes, (batch,), device=device, generator=generator)
        batches.append((images.contiguous(memory_format=memory_format), labels, labels))
    return Workload("resnet50" if channels_last else "resnet50_nchw", model, batches, classification_per_sample,
                    n_classes, batch, [batch, 3, image_size, image_size], use_autocast=True, compile_model=False,
                    library_versions=versions)


def build_mlp(device: torch.device, tiny: bool, generator: torch.Generator) -> Workload:
    n_classes, in_features = 10, 512
    batch = 16 if tiny else 256
    model = nn.Sequential(nn.Linear(in_features, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, n_classes)).to(device).train()
    batches = []
    for _ in range(N_SYNTHETIC_BATCHES):
        inputs = torch.randn(batch, in_features, device=device, generator=generator)
        labels = torch.randint(0, n_classes, (batch,), device=device, generator=generator)
        batches.append((inputs, labels, labels))
    return Workload("mlp", model, batches, classification_per_sample, n_classes, batch, [batch, in_features],
                    use_autocast=False, compile_model=False)


def build_workload(name: str, device: torch.device, tiny: bool) -> Optional[Workload]:
    torch.manual_seed(0)
    generator = torch.Generator(device=device).manual_seed(0)
    if name in ("gpt2", "gpt2_compiled"):
        return build_gpt2(device, tiny, compiled=name == "gpt2_compiled", generator=generator)
    if name in ("resnet50", "resnet50_nchw"):
        return build_resnet50(device, tiny, channels_last=name == "resnet50", generator=generator)
    return build_mlp(device, tiny, generator)


def make_optimizer(impl_name: str, params: list[nn.Parameter], workload: Workload) -> torch.optim.Optimizer:
    if impl_name == TORCH_FUSED:
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    if impl_name in ("also_fused AdamW", GROUP_WEIGHTS):
        return also_fused.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    mode = {"ALSO descent-ascent": "descent-ascent", "ALSO optimistic": "optimistic"}[impl_name]
    return also_fused.ALSO(params, n_groups=workload.n_groups, batch_size=workload.batch, mode=mode, lr=LR)


def build_implementations(workload: Workload, impl_names: list[str], device: torch.device,
                          precision: str = "bf16") -> list[Implementation]:
    implementations = []
    for impl_name in impl_names:
        model = copy.deepcopy(workload.model)
        opt = make_optimizer(impl_name, list(model.parameters()), workload)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=COSINE_T_MAX)
        if workload.compile_model:
            model = torch.compile(model)
        weights = None
        if impl_name == GROUP_WEIGHTS:
            weights = also_fused.GroupWeights(workload.n_groups, batch_size=workload.batch, device=device)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        implementations.append(Implementation(impl_name, model, opt, sched,
                                              uses_weighted_loss=isinstance(opt, also_fused.ALSO), weights=weights,
                                              scaler=scaler))
    return implementations


def forward_per_sample(impl: Implementation, workload: Workload, device: torch.device) -> tuple[Tensor, Tensor]:
    inputs, targets, group_ids = workload.batches[impl.steps_taken % len(workload.batches)]
    impl.steps_taken += 1
    with autocast_context(workload, device):
        per_sample = workload.per_sample_loss(impl.model, inputs, targets)
    return per_sample, group_ids


def training_objective(impl: Implementation, per_sample: Tensor, group_ids: Tensor) -> Tensor:
    if impl.uses_weighted_loss:
        return impl.opt.weighted_loss(per_sample, group_ids)
    if impl.weights is not None:
        return impl.weights.weighted_loss(per_sample, group_ids)
    return per_sample.mean()


def backward(impl: Implementation, loss: Tensor) -> None:
    (loss if impl.scaler is None else impl.scaler.scale(loss)).backward()


def optimizer_step(impl: Implementation) -> None:
    """opt.step() (through the scaler with fp16), then the group weights' step (with the scaler's found_inf)."""
    if impl.scaler is None:
        impl.opt.step()
        if impl.weights is not None:
            impl.weights.step()
        return
    impl.scaler.step(impl.opt)
    if impl.weights is not None:
        impl.weights.step(found_inf=also_fused.amp.found_inf(impl.scaler, impl.opt))
    impl.scaler.update()


def finish_step(impl: Implementation) -> None:
    impl.sched.step()
    impl.opt.zero_grad(set_to_none=True)


def train_step(impl: Implementation, workload: Workload, device: torch.device) -> None:
    per_sample, group_ids = forward_per_sample(impl, workload, device)
    backward(impl, training_objective(impl, per_sample, group_ids))
    optimizer_step(impl)
    finish_step(impl)


def optimizer_part_syncs(impl: Implementation, workload: Workload, device: torch.device) -> Optional[str]:
    """None when the optimizer's part of SYNC_CHECK_STEPS steps (weighted loss, step, group weights, scaler
    update) runs under torch.cuda.set_sync_debug_mode("error"), else the error it raised."""
    if device.type != "cuda":
        return "not checked (no GPU)"
    for _ in range(SYNC_CHECK_STEPS):
        per_sample, group_ids = forward_per_sample(impl, workload, device)
        synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = training_objective(impl, per_sample, group_ids)
            scaled = loss if impl.scaler is None else impl.scaler.scale(loss)
            torch.cuda.set_sync_debug_mode(0)
            scaled.backward()
            torch.cuda.set_sync_debug_mode("error")
            optimizer_step(impl)
        except RuntimeError as exc:
            return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
        finish_step(impl)
    return None


def timed_block_ms_per_step(impl: Implementation, workload: Workload, device: torch.device, n_steps: int) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        train_step(impl, workload, device)
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / n_steps


def measure_step_costs(impl: Implementation, workload: Workload, device: torch.device,
                       n_samples: int) -> dict[str, Optional[float]]:
    """Medians over n_samples steps: host us of the step (``optimizer_step``: opt.step(), or scaler.step(opt) and
    scaler.update(), with the group weights' step) and of the weighted loss, GPU us of the step."""
    host_step_us, host_weighted_loss_us, event_pairs = [], [], []
    use_events = device.type == "cuda"
    for _ in range(n_samples):
        per_sample, group_ids = forward_per_sample(impl, workload, device)
        synchronize(device)
        t0 = time.perf_counter()
        loss = training_objective(impl, per_sample, group_ids)
        t1 = time.perf_counter()
        if impl.uses_weighted_loss or impl.weights is not None:
            host_weighted_loss_us.append((t1 - t0) * 1e6)
        backward(impl, loss)
        synchronize(device)
        if use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        optimizer_step(impl)
        t1 = time.perf_counter()
        if use_events:
            end.record()
            event_pairs.append((start, end))
        host_step_us.append((t1 - t0) * 1e6)
        finish_step(impl)
    synchronize(device)
    gpu_step_us = [start.elapsed_time(end) * 1e3 for start, end in event_pairs]
    return dict(host_us_step=statistics.median(host_step_us),
                host_us_weighted_loss=statistics.median(host_weighted_loss_us) if host_weighted_loss_us else None,
                gpu_us_step=statistics.median(gpu_step_us) if gpu_step_us else None)


def bench_workload(workload: Workload, impl_names: list[str], device: torch.device,
                   args: argparse.Namespace, run_info: dict[str, Any]) -> list[dict[str, Any]]:
    n_params = count_params(workload.model)
    warmup = max(1, args.warmup * (COMPILED_WARMUP_FACTOR if workload.compile_model else 1))
    common = dict(workload=workload.name, steps=args.steps, rounds=args.rounds, warmup=warmup,
                  timing_steps=args.timing_steps, n_params=n_params, batch=workload.batch,
                  input_shape=workload.input_shape, n_groups=workload.n_groups,
                  autocast=args.precision if workload.use_autocast and device.type == "cuda" else None,
                  grad_scaler=args.precision == "fp16",
                  compiled=workload.compile_model, tiny=args.tiny, **workload.library_versions, **run_info)
    implementations, failed_records = [], []
    workload.autocast_dtype = torch.float16 if args.precision == "fp16" else torch.bfloat16
    for impl in build_implementations(workload, impl_names, device, args.precision):
        t0 = time.perf_counter()
        try:
            for _ in range(warmup):
                train_step(impl, workload, device)
            synchronize(device)
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
            print(f"  {impl.name} failed in warm-up, left out of {workload.name}: {error}", flush=True)
            failed_records.append(dict(impl=impl.name, error=error, **FAILED_METRICS, **common))
            continue
        implementations.append(impl)
        print(f"  warm-up {impl.name}: {warmup} steps in {time.perf_counter() - t0:.1f} s", flush=True)
    if not implementations:
        return failed_records

    ms_per_step: dict[str, list[float]] = {impl.name: [] for impl in implementations}
    for round_index in range(args.rounds):
        first = round_index % len(implementations)
        for impl in implementations[first:] + implementations[:first]:
            ms_per_step[impl.name].append(timed_block_ms_per_step(impl, workload, device, args.steps))
        print("  round " + str(round_index) + ": " + ", ".join(
            f"{name} {times[-1]:.3f}" for name, times in ms_per_step.items()) + " ms/step", flush=True)

    step_costs = {impl.name: measure_step_costs(impl, workload, device, args.timing_steps)
                  for impl in implementations}
    syncs = {impl.name: optimizer_part_syncs(impl, workload, device) for impl in implementations}
    medians = {name: statistics.median(times) for name, times in ms_per_step.items()}
    baseline = medians.get(TORCH_FUSED)
    records = []
    for impl in implementations:
        times = ms_per_step[impl.name]
        records.append(dict(
            impl=impl.name, error=None, ms_per_step=medians[impl.name], ms_min=min(times), ms_max=max(times),
            ms_per_round=times, ratio_vs_torch_fused=baseline / medians[impl.name] if baseline is not None else None,
            paired_ratio_vs_torch_fused=paired_ratio(ms_per_step.get(TORCH_FUSED), times),
            paired_time_vs_also_adamw=paired_ratio(times, ms_per_step.get(ALSO_ADAMW)),
            optimizer_part_host_sync=syncs[impl.name], **step_costs[impl.name], **common))
    return records + failed_records


def paired_ratio(numerators: Optional[list[float]], denominators: Optional[list[float]]) -> Optional[dict]:
    """Median, min and max over rounds of numerator / denominator within each round: the implementations
    of one round ran back to back, so a drift of the host between rounds cancels."""
    if not numerators or not denominators:
        return None
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_records(records: list[dict[str, Any]], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


def format_optional(value: Optional[float], fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def format_paired(paired: Optional[dict]) -> str:
    return "" if paired is None else f"{paired['median']:.3f} ({paired['min']:.2f}-{paired['max']:.2f})"


def print_table(records: list[dict[str, Any]]) -> None:
    print("| workload | impl | ms/step (min-max) | x torch fused | x torch fused, per round | time / also_fused "
          "AdamW's, per round | host us step() | GPU us step() | host sync in the optimizer's part |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if r["error"] is not None:
            print(f"| {r['workload']} | {r['impl']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        print(f"| {r['workload']} | {r['impl']} | {r['ms_per_step']:.3f} ({r['ms_min']:.3f}-{r['ms_max']:.3f}) | "
              f"{format_optional(r['ratio_vs_torch_fused'], '.3f')} | {format_paired(r['paired_ratio_vs_torch_fused'])} | "
              f"{format_paired(r['paired_time_vs_also_adamw'])} | {r['host_us_step']:.0f} | "
              f"{format_optional(r['gpu_us_step'], '.0f')} | {r['optimizer_part_host_sync'] or 'none'} |")


def parse_names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    by_lower = {name.lower(): name for name in known}
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown:
        raise SystemExit(f"unknown {what}: {unknown}; choose from {list(known)}")
    return [by_lower[n.lower()] for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOAD_NAMES),
                        help=f"comma-separated subset of {WORKLOAD_NAMES}")
    parser.add_argument("--impls", default=",".join(IMPL_NAMES),
                        help=f"comma-separated subset of {IMPL_NAMES} (case-insensitive; quote the spaces)")
    parser.add_argument("--steps", type=int, default=50, help="training steps per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of interleaved blocks")
    parser.add_argument("--warmup", type=int, default=15,
                        help=f"warm-up steps per implementation ({COMPILED_WARMUP_FACTOR}x for gpt2_compiled)")
    parser.add_argument("--timing-steps", type=int, default=20, help="steps timed one by one for host/GPU step cost")
    parser.add_argument("--tiny", action="store_true", help="tiny model configs, for a smoke test on a CPU")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16",
                        help="autocast dtype of the GPU workloads; fp16 adds a GradScaler per implementation")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/training_<gpu>.json)")
    args = parser.parse_args()
    workload_names = parse_names(args.workloads, WORKLOAD_NAMES, "workloads")
    impl_names = parse_names(args.impls, IMPL_NAMES, "impls")
    if min(args.steps, args.rounds, args.timing_steps) < 1 or args.warmup < 0:
        raise SystemExit("--steps, --rounds and --timing-steps must be >= 1, --warmup >= 0")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        import triton
        triton_version: Optional[str] = triton.__version__
    except ImportError:
        triton_version = None
    default_name = (f"training_{device_slug(device_name)}{'_fp16' if args.precision == 'fp16' else ''}"
                    f"{'_tiny' if args.tiny else ''}.json")
    out = args.out or os.path.join(RESULTS_DIR, default_name)
    kernels_found = importlib.util.find_spec("also_fused.kernels") is not None
    if device.type == "cuda" and not kernels_found:
        print("WARNING: also_fused.kernels is not importable (install the checkout: pip install -e .); "
              "also_fused falls back to its reference path on the GPU", flush=True)
    run_info = dict(device=device_name, torch=torch.__version__, triton=triton_version,
                    also_fused=also_fused.__version__, also_fused_commit=git_commit(), also_fused_source=source_digest(),
                    also_fused_kernels_found=kernels_found,
                    date=datetime.datetime.now().isoformat(timespec="seconds"))
    print(f"{device_name}, torch {torch.__version__}, triton {triton_version}; impls {impl_names}; "
          f"{args.rounds} rounds x {args.steps} steps; writing {out}", flush=True)

    records: list[dict[str, Any]] = []
    for name in workload_names:
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            workload = build_workload(name, device, args.tiny)
            if workload is None:
                print(f"  skipped {name}: its model library is missing")
            else:
                records += bench_workload(workload, impl_names, device, args, run_info)
                write_records(records, out)
        except Exception:  # noqa: BLE001
            print(f"  {name} failed:\n{traceback.format_exc()}", flush=True)
        workload = None
        if name == "gpt2_compiled":
            torch.compiler.reset()
        release_memory(device)
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    write_records(records, out)
    print(f"\nwrote {len(records)} records to {out}\n")
    print_table(records)


if __name__ == "__main__":
    main()
