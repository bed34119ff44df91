"""The outputs of every public optimizer path over a grid of configurations, as digests of their bits.

A restructuring of the library must not change a bit of any result. This module runs a grid of
short, deterministic training runs through the public API only (Adam/AdamW x param dtype x state
precision x amsgrad x weight decay under an lr schedule with two param groups; ALSO in both modes,
both APIs, both reductions, amsgrad and 8-bit theta state; GroupWeights in both modes and reductions;
rgd_loss) and reduces each run's params, optimizer state, pi and returned losses to one SHA-256.

``tests/data/same_bits.json`` holds the digests recorded from the code before a change, per machine
signature (torch, CPU instruction set or GPU, Triton) and path; ``test_same_bits.py`` recomputes them.
Recording (run it from a checkout of the code whose results are to be kept)::

    python tests/support/same_bits.py --record tests/data/same_bits.json [--paths reference,cpu,triton]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import also_fused  # noqa: E402

STEPS = 4
N_GROUPS, BATCH, D_IN, D_OUT = 4, 8, 5, 3


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[str, str], dict[str, Any]]  # (device, backend) -> outputs
    paths: tuple[str, ...] = ("reference", "cpu", "triton", "cuda-reference", "cuda")
    extra: dict = field(default_factory=dict)


def _path_device_backend(path: str) -> tuple[str, str]:
    return {"reference": ("cpu", "reference"), "cpu": ("cpu", "auto"), "triton": ("cpu", "triton"),
            "cuda-reference": ("cuda", "reference"), "cuda": ("cuda", "auto")}[path]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- drop-ins
def _dropin_params(dtype: torch.dtype, device: str) -> list[torch.nn.Parameter]:
    gen = _generator(0)
    # 1320 elements: two blocks of the 8-bit state (1024 each), the second one partial
    shapes = [(40, 33), (7,)]
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(device=device, dtype=dtype)) for s in shapes]


def _run_dropin(cls_name: str, dtype: torch.dtype, precision: str, amsgrad: bool, weight_decay: float,
                device: str, backend: str, **options: Any) -> dict[str, Any]:
    params = _dropin_params(dtype, device)
    cls = getattr(also_fused, cls_name)
    groups = [dict(params=[params[0]], lr=1e-2), dict(params=[params[1]], lr=3e-3, weight_decay=weight_decay / 2)]
    opt = cls(groups, weight_decay=weight_decay, amsgrad=amsgrad, backend=backend, state_precision=precision,
              **options)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    gen = _generator(1)
    for k in range(STEPS):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen) * (1.0 + k)
            # the bias has no gradient on the third step: skipped, its state untouched
            p.grad = None if (i == 1 and k == 2) else g.to(device=device, dtype=dtype)
        opt.step()
        sched.step()
    return dict(params=[p.detach() for p in params], state=opt.state_dict())


def _dropin_cases() -> Iterator[Case]:
    for cls_name in ("Adam", "AdamW"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for precision in ("param", "float32", "bfloat16", "int8"):
                for amsgrad in ((False,) if precision == "int8" else (False, True)):
                    for wd in (0.0, 0.1):
                        name = f"{cls_name}-{str(dtype)[6:]}-{precision}-ams{int(amsgrad)}-wd{wd}"
                        yield Case(name, lambda device, backend, a=(cls_name, dtype, precision, amsgrad, wd):
                                   _run_dropin(*a, device, backend))
    yield Case("Adam-float32-param-maximize", lambda device, backend: _run_dropin(
        "Adam", torch.float32, "param", False, 0.1, device, backend, maximize=True))
    yield Case("Adam-float32-param-decoupled", lambda device, backend: _run_dropin(
        "Adam", torch.float32, "param", False, 0.1, device, backend, decoupled_weight_decay=True))


# ----------------------------------------------------------------------------- ALSO
def _batches(n_groups: int, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = _generator(seed)
    out = []
    for _ in range(STEPS + 1):
        X = torch.randn(BATCH, D_IN, generator=gen)
        ids = torch.randint(0, n_groups, (BATCH,), generator=gen)
        Y = torch.randn(BATCH, D_OUT, generator=gen) + (ids.float() % 3).unsqueeze(1)
        out.append((X, Y, ids))
    return out


def _model(device: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    gen = _generator(0)
    W = torch.nn.Parameter((torch.randn(D_IN, D_OUT, generator=gen) * 0.5).to(device=device, dtype=dtype))
    b = torch.nn.Parameter((torch.randn(D_OUT, generator=gen) * 0.5).to(device=device, dtype=dtype))
    return W, b


def _losses(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, use_bias: bool) -> torch.Tensor:
    out = X.to(W.dtype) @ W
    if use_bias:
        out = out + b
    return ((out - Y.to(W.dtype)) ** 2).mean(dim=1)


def _run_also(mode: str, api: str, reduction: str, amsgrad: bool, device: str, backend: str,
              precision: str = "float32", n_groups: int = N_GROUPS, pi_reg: bool = False) -> dict[str, Any]:
    W, b = _model(device)
    reg = torch.linspace(1.0, 2.0, n_groups).tolist() if pi_reg else None
    opt = also_fused.ALSO([dict(params=[W], lr=1e-2), dict(params=[b], lr=3e-3)], n_groups, batch_size=BATCH,
                          mode=mode, pi_lr=0.05, pi_decay=0.1, amsgrad=amsgrad, backend=backend,
                          group_reduction=reduction, state_precision=precision, pi_reg=reg)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    means = []
    for k, (X, Y, ids) in enumerate(_batches(n_groups)):
        Xd, Yd, idsd = X.to(device), Y.to(device), ids.to(device)
        use_bias = k != 2  # the bias loses its gradient on one step
        if api == "closure":
            def closure(pi_selected: torch.Tensor, scale: float) -> tuple[torch.Tensor, None]:
                opt.zero_grad(set_to_none=True)
                losses = _losses(W, b, Xd, Yd, use_bias)
                (scale * (pi_selected * losses).sum()).backward()
                return losses.detach(), None

            means.append(opt.step(closure, idsd))
        else:
            opt.zero_grad(set_to_none=True)
            opt.weighted_loss(_losses(W, b, Xd, Yd, use_bias), idsd).backward()
            means.append(opt.step())
        sched.step()
    out = dict(params=[W.detach().clone(), b.detach().clone()], state=opt.state_dict(), pi=opt.pi,
               means=torch.stack([m.float().reshape(()) for m in means]))
    opt.eval()  # the iterate x (optimistic loop API: the params held the extrapolated point)
    out["iterate"] = [W.detach(), b.detach()]
    return out


def _also_cases() -> Iterator[Case]:
    for mode in ("optimistic", "descent-ascent"):
        for api in ("closure", "loop"):
            for reduction in ("sum", "mean"):
                for amsgrad in (False, True):
                    yield Case(f"ALSO-{mode}-{api}-{reduction}-ams{int(amsgrad)}",
                               lambda device, backend, a=(mode, api, reduction, amsgrad): _run_also(*a, device, backend))
            yield Case(f"ALSO-{mode}-{api}-sum-int8",
                       lambda device, backend, a=(mode, api): _run_also(*a, "sum", False, device, backend, "int8"))
            yield Case(f"ALSO-{mode}-{api}-sum-pi_reg",
                       lambda device, backend, a=(mode, api): _run_also(*a, "sum", False, device, backend,
                                                                         pi_reg=True))
        # more groups than the single-program pi step takes
        yield Case(f"ALSO-{mode}-loop-sum-1500groups",
                   lambda device, backend, m=mode: _run_also(m, "loop", "sum", False, device, backend, n_groups=1500))


# ----------------------------------------------------------------------------- GroupWeights, RGD
def _run_group_weights(mode: str, reduction: str, micro_batches: int, device: str, backend: str) -> dict[str, Any]:
    W, b = _model(device)
    opt = also_fused.AdamW([W, b], lr=1e-2, backend=backend)
    weights = also_fused.GroupWeights(N_GROUPS, batch_size=BATCH, mode=mode, pi_lr=0.05, pi_decay=0.1,
                                      group_reduction=reduction, device=device, backend=backend)
    means = []
    for X, Y, ids in _batches(N_GROUPS, seed=3):
        opt.zero_grad(set_to_none=True)
        for part in range(micro_batches):
            rows = slice(part * BATCH // micro_batches, (part + 1) * BATCH // micro_batches)
            loss = weights.weighted_loss(_losses(W, b, X[rows].to(device), Y[rows].to(device), True),
                                         ids[rows].to(device))
            loss.backward()
        opt.step()
        means.append(weights.step())
    return dict(params=[W.detach(), b.detach()], state=opt.state_dict(), weights=weights.state_dict(),
                means=torch.stack([m.float().reshape(()) for m in means]))


def _run_rgd(device: str, backend: str) -> dict[str, Any]:
    gen = _generator(4)
    losses = (torch.rand(300, generator=gen) * 3.0).to(device).requires_grad_()
    value = also_fused.rgd_loss(losses, 1.5, backend=backend)
    value.backward()
    return dict(value=value.detach(), grad=losses.grad)


def _other_cases() -> Iterator[Case]:
    for mode in ("optimistic", "descent-ascent"):
        for reduction in ("sum", "mean"):
            for micro in (1, 2):
                yield Case(f"GroupWeights-{mode}-{reduction}-micro{micro}",
                           lambda device, backend, a=(mode, reduction, micro): _run_group_weights(*a, device, backend))
    yield Case("rgd_loss", _run_rgd)


def cases() -> list[Case]:
    return [*_dropin_cases(), *_also_cases(), *_other_cases()]


# ----------------------------------------------------------------------------- digests
def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _leaves(value[key], f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, value


def digest(outputs: dict[str, Any]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, and of every other leaf's repr."""
    h = hashlib.sha256()
    for name, leaf in _leaves(outputs):
        h.update(name.encode())
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()


def cpu_vendor() -> str:
    """The CPU's vendor string (GenuineIntel, AuthenticAMD, ...; "unknown" where the OS does not say)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def signature(path: str) -> str:
    """The machine and versions whose bits a record holds (other machines may round differently)."""
    parts = [f"torch={torch.__version__}"]
    if path.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        # the many-groups pi step splits pi by the number of SMs: the order of its sums follows it
        parts.append(f"gpu=sm{props.major}{props.minor}x{props.multi_processor_count}")
    else:
        # torch's CPU results differ between Intel and AMD CPUs of one instruction set (likely MKL's vendor-specific
        # code paths)
        parts.append(f"cpu={torch.backends.cpu.get_cpu_capability()},vendor={cpu_vendor()}")
    if path in ("triton", "cuda"):
        import numpy
        import triton

        parts.append(f"triton={triton.__version__}")
        if path == "triton":
            parts.append(f"numpy={numpy.__version__}")
    return ",".join(parts)


def available_paths() -> list[str]:
    from also_fused import cpu_fused

    paths = ["reference", "triton"]
    if cpu_fused.available()[0]:
        paths.insert(1, "cpu")
    if torch.cuda.is_available():
        paths = ["cuda-reference", "cuda"]
    return paths


def run_case(case: Case, path: str) -> str:
    device, backend = _path_device_backend(path)
    torch.manual_seed(0)
    return digest(case.run(device, backend))


def record(out_path: str, paths: list[str]) -> None:
    try:
        with open(out_path) as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {}
    for path in paths:
        entry = {case.name: run_case(case, path) for case in cases() if path in case.paths}
        data.setdefault(signature(path), {})[path] = entry
        print(f"{path}: {len(entry)} cases under {signature(path)}", flush=True)
    with open(out_path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", required=True, help="JSON file to add this machine's digests to")
    parser.add_argument("--paths", default=",".join(available_paths()))
    args = parser.parse_args()
    record(args.record, args.paths.split(","))


if __name__ == "__main__":
    sys.exit(main())
