"""Drive ``also_fused.ALSO`` and the float64 golden model on the same small regression problem."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch

import also_fused
from support import DEVICE, SHORT
from support.golden import GoldenALSO, eight_bit_code, rounded_to

D_IN, D_OUT = 5, 3


@dataclass
class Config:
    mode: str = "optimistic"
    api: str = "closure"
    n_groups: int = 4
    batch: int = 8
    steps: int = 20 if SHORT else 200
    amsgrad: bool = False
    weight_decay: float = 1e-3
    alpha: float = 1.0
    # a KL pull (c = pi_decay * pi_lr = 0.1) that keeps pi inside the simplex (0.08 <= pi_j <= 0.69 over the
    # 200 steps): every entry of pi is then compared relative to its own size, and a wrong pi step (eps
    # dropped from log(pi + eps), pi_lr or the temperature misapplied) shows in the small entries too
    pi_lr: float = 0.02
    pi_decay: float = 5.0
    temperature: float = 1.0
    eps: float = 1.1920928955078125e-07
    pi_init: Optional[list] = None
    pi_reg: Optional[list] = None
    lrs: tuple = (1e-2, 3e-3)
    lose_grad_every: int = 0  # the bias loses its gradient on every k-th step (0: never)
    ids: str = "random"  # "random" | "same" | "distinct"
    seed: int = 0
    dtype: torch.dtype = torch.float32
    scheduler_gamma: Optional[float] = None  # StepLR(step_size=1, gamma) on every group
    group_reduction: str = "sum"
    extra: dict = field(default_factory=dict)


def batches(cfg: Config):
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for k in range(cfg.steps):
        X = torch.randn(cfg.batch, D_IN, generator=gen, dtype=torch.float64)
        Y = torch.randn(cfg.batch, D_OUT, generator=gen, dtype=torch.float64)
        if cfg.ids == "same":
            ids = torch.full((cfg.batch,), cfg.n_groups - 1, dtype=torch.int64)
        elif cfg.ids == "distinct":
            ids = torch.randperm(cfg.n_groups, generator=gen)[: cfg.batch]
        else:
            ids = torch.randint(0, cfg.n_groups, (cfg.batch,), generator=gen)
        # spread the losses of groups apart so that pi moves
        Y = Y + (ids.double() % 3).unsqueeze(1)
        use_bias = not (cfg.lose_grad_every and k % cfg.lose_grad_every == cfg.lose_grad_every - 1)
        yield X, Y, ids, use_bias


def per_sample_losses(W, b, X, Y, use_bias):
    out = X @ W
    if use_bias:
        out = out + b
    return ((out - Y) ** 2).mean(dim=1)


def init_params(cfg: Config):
    gen = torch.Generator().manual_seed(cfg.seed)
    W = torch.randn(D_IN, D_OUT, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(D_OUT, generator=gen, dtype=torch.float64) * 0.5
    return W, b


def storages(cfg: Config) -> dict:
    """The golden model's storage of the params and moments, as the package keeps them for ``cfg``: params in
    their dtype, moments at ALSO's state precision (float32, which the float64 model stands for, by default)."""
    out = {}
    if cfg.dtype != torch.float32:
        out["store_params"] = rounded_to(cfg.dtype)
    precision = cfg.extra.get("state_precision", "float32")
    moment_dtype = {"bfloat16": torch.bfloat16, "param": cfg.dtype}.get(precision, torch.float32)
    if precision == "int8":
        # (exponent bits, mantissa bits): m's beside its sign bit, v's (docs/algorithm.md sec. 13)
        out["store_moments"] = (eight_bit_code(True, 3, 4), eight_bit_code(False, 5, 3))
    elif moment_dtype != torch.float32:
        out["store_moments"] = (rounded_to(moment_dtype), rounded_to(moment_dtype))
    # the optimistic loop API's update call takes the main step and then the extrapolation
    out["moments_stored_after"] = "extrapolation" if cfg.mode == "optimistic" and cfg.api == "loop" else "main"
    return out


def make_golden(cfg: Config, loss_scale: float) -> GoldenALSO:
    W, b = init_params(cfg)
    return GoldenALSO([W, b], cfg.n_groups, loss_scale=loss_scale, mode=cfg.mode, lrs=cfg.lrs,
                      weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad, alpha=cfg.alpha, pi_lr=cfg.pi_lr,
                      pi_decay=cfg.pi_decay, temperature=cfg.temperature, eps=cfg.eps, pi_init=cfg.pi_init,
                      pi_reg=cfg.pi_reg, group_reduction=cfg.group_reduction, **storages(cfg))


def golden_forward(X, Y, use_bias):
    def forward(params, weights, scale):
        W, b = [p.detach().clone().requires_grad_() for p in params]
        losses = per_sample_losses(W, b, X, Y, use_bias)
        (scale * (weights * losses).sum()).backward()
        return losses.detach(), [W.grad, b.grad if use_bias else None]

    return forward


def make_package(cfg: Config, device, backend: str):
    W, b = init_params(cfg)
    Wp = torch.nn.Parameter(W.to(device=device, dtype=cfg.dtype))
    bp = torch.nn.Parameter(b.to(device=device, dtype=cfg.dtype))
    groups = [dict(params=[Wp], lr=cfg.lrs[0]), dict(params=[bp], lr=cfg.lrs[1])]
    opt = also_fused.ALSO(groups, cfg.n_groups, batch_size=cfg.batch, mode=cfg.mode, alpha=cfg.alpha,
                          pi_reg=cfg.pi_reg, pi_init=cfg.pi_init, weight_decay=cfg.weight_decay,
                          pi_lr=cfg.pi_lr, pi_decay=cfg.pi_decay, pi_temperature=cfg.temperature,
                          amsgrad=cfg.amsgrad, eps=cfg.eps, backend=backend,
                          group_reduction=cfg.group_reduction, **cfg.extra)
    return Wp, bp, opt


def package_step(opt, Wp, bp, api, X, Y, ids, use_bias, device, dtype, seen: Optional[dict] = None):
    """One step of the package; ``seen`` (a dict) receives the per-sample losses and the gradients the step
    used, in float64 (``run``'s replay)."""
    Xd, Yd = X.to(device=device, dtype=dtype), Y.to(device=device, dtype=dtype)
    idsd = ids.to(device)

    def record(losses):
        if seen is not None:
            seen["losses"] = losses.detach().double().cpu()
            seen["grads"] = [None if p.grad is None else p.grad.double().cpu() for p in (Wp, bp)]

    if api == "closure":
        def closure(pi_sel, loss_scale):
            opt.zero_grad(set_to_none=True)
            losses = per_sample_losses(Wp, bp, Xd, Yd, use_bias)
            (loss_scale * (pi_sel.to(losses.dtype) * losses).sum()).backward()
            record(losses)
            return losses.detach(), None

        return opt.step(closure, idsd)
    opt.zero_grad(set_to_none=True)
    losses = per_sample_losses(Wp, bp, Xd, Yd, use_bias)
    opt.weighted_loss(losses, idsd).backward()
    record(losses)
    return opt.step()


def iterate_of(opt, params):
    """The iterate x of the package (the loop API's params hold the extrapolated point)."""
    opt.eval()
    x = [p.detach().double().cpu().clone() for p in params]
    opt.train()
    return x


def run(cfg: Config, device="cpu", backend="reference"):
    """Run both for cfg.steps steps; return (golden, [W, b] iterate of the package, opt, mean losses).

    With 16-bit params the package's forward and backward run in 16 bits, which no float64 model follows
    closely: the golden model then replays the package's own per-sample losses and gradients of each step
    (exact in float64), so that the two differ only by the optimizer's arithmetic and storage."""
    Wp, bp, opt = make_package(cfg, device, backend)
    golden = make_golden(cfg, opt.loss_scale)
    replay = cfg.dtype != torch.float32
    sched = None
    if cfg.scheduler_gamma is not None:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=cfg.scheduler_gamma)
    losses_seen = []
    for X, Y, ids, use_bias in batches(cfg):
        golden.lrs = [g["lr"] for g in opt.param_groups]
        if replay:
            seen: dict = {}
            mean = package_step(opt, Wp, bp, cfg.api, X, Y, ids, use_bias, device, cfg.dtype, seen)
            g_losses = golden.step(lambda params, weights, scale: (seen["losses"], seen["grads"]), ids)
        else:
            g_losses = golden.step(golden_forward(X, Y, use_bias), ids)
            mean = package_step(opt, Wp, bp, cfg.api, X, Y, ids, use_bias, device, cfg.dtype)
        losses_seen.append((float(mean), float(g_losses.mean())))
        if sched is not None:
            sched.step()
    return golden, iterate_of(opt, [Wp, bp]), opt, losses_seen


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rel_each(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |a_j - b_j| / |b_j|: every entry relative to its own size (pi's small entries too)."""
    a, b = a.double().cpu(), b.double().cpu()
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def assert_same(a, b, path="state"):
    """Bitwise equality of nested state (tensors: dtype, shape, device and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def resume_is_bitwise(api, mode, amsgrad, backend="reference", device=DEVICE, k=37, more=100):
    """k + more steps in one run, and k steps saved, loaded into a fresh optimizer and continued for
    ``more``: both end with bitwise the same params, pi and state_dict."""
    cfg = Config(mode=mode, api=api, amsgrad=amsgrad, steps=k + more, lose_grad_every=5)
    data = list(batches(cfg))
    W, b, opt = make_package(cfg, device, backend)
    for X, Y, ids, use_bias in data:
        package_step(opt, W, b, api, X, Y, ids, use_bias, device, cfg.dtype)
    W2, b2, opt2 = make_package(cfg, device, backend)
    for X, Y, ids, use_bias in data[:k]:
        package_step(opt2, W2, b2, api, X, Y, ids, use_bias, device, cfg.dtype)
    saved_opt = copy.deepcopy(opt2.state_dict())
    saved_params = [W2.detach().clone(), b2.detach().clone()]
    del W2, b2, opt2
    W3, b3, opt3 = make_package(cfg, device, backend)
    with torch.no_grad():
        W3.copy_(saved_params[0]), b3.copy_(saved_params[1])
    opt3.load_state_dict(saved_opt)
    for X, Y, ids, use_bias in data[k:]:
        package_step(opt3, W3, b3, api, X, Y, ids, use_bias, device, cfg.dtype)
    assert torch.equal(W3.detach(), W.detach()) and torch.equal(b3.detach(), b.detach())
    assert torch.equal(opt3.pi, opt.pi)
    assert_same(opt3.state_dict(), opt.state_dict())
