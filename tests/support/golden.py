"""A float64 model of docs/algorithm.md sections 3-6, written independently of the package.

The tests drive it and the package with the same data and compare trajectories.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

f64 = torch.float64
Store = Callable[[torch.Tensor], torch.Tensor]  # float64 values -> the float64 values a storage keeps


def rounded_to(dtype: torch.dtype) -> Store:
    """Storage in ``dtype``: each value rounded to the nearest representable one (ties to even)."""
    return lambda t: t.to(dtype).to(f64)


def eight_bit_code(signed: bool, exp_bits: int, mant_bits: int, block: int = 1024) -> Store:
    """Storage as the 8-bit moment code of docs/algorithm.md sec. 13, in float64: per block of ``block``
    elements a scale s, the smallest power of two above the block's largest |x| (within [2^(2^E - 126),
    2^127]); per element t = |x| + o, o = s / 2^(2^E), rounded half up to ``mant_bits`` significant bits
    and clamped to the largest code, (2 - 2^-M) s / 2; the value is t - o with x's sign (m's code only)."""
    def store(t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1).to(f64)
        n = flat.numel()
        padded = torch.nn.functional.pad(flat.abs(), (0, -(-n // block) * block - n))
        a = padded.view(-1, block).amax(1)
        k = torch.floor(torch.log2(a.clamp_min(2.0 ** -300))) + 1
        s = torch.exp2(k.clamp(2 ** exp_bits - 126, 127)).repeat_interleave(block)[:n]
        o = s / 2.0 ** (2 ** exp_bits)
        u = flat.abs() + o
        quantum = torch.exp2(torch.floor(torch.log2(u)) - mant_bits)
        u = torch.minimum(torch.floor(u / quantum + 0.5) * quantum, s * (1 - 2.0 ** -(mant_bits + 1)))
        value = u - o
        if signed:
            value = torch.where(flat < 0, -value, value)
        return value.reshape(t.shape)
    return store


def adam_delta(state: dict, x: torch.Tensor, d: torch.Tensor, lr: float, betas, eps: float, wd: float,
               amsgrad: bool) -> torch.Tensor:
    """AdamStep (sec. 3): advances (t, m, v[, vmax]) in ``state`` and returns delta."""
    b1, b2 = betas
    state["t"] += 1
    t = state["t"]
    d = d + wd * x
    state["m"] = b1 * state["m"] + (1 - b1) * d
    state["v"] = b2 * state["v"] + (1 - b2) * d * d
    v = state["v"]
    if amsgrad:
        state["vmax"] = torch.maximum(state["vmax"], state["v"])
        v = state["vmax"]
    step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
    return -step_size * state["m"] / (torch.sqrt(v) + eps)


def pi_update(pi: torch.Tensor, G: torch.Tensor, pi_lr: float, pi_decay: float, temperature: float,
              eps: float, pi_reg: torch.Tensor) -> torch.Tensor:
    """PiUpdate (sec. 4) with a dense gradient G over groups."""
    c = pi_decay * pi_lr
    z = (torch.log(pi + eps) + c * torch.log(pi_reg) - pi_lr * G) / (1 + c)
    return torch.softmax(z / temperature, dim=0)


def group_gradient(losses: torch.Tensor, ids: torch.Tensor, n_groups: int, reduction: str = "sum") -> torch.Tensor:
    """G_j = -sum (or -mean, for reduction "mean") of the batch's losses of group j; 0 for absent groups."""
    G = torch.zeros(n_groups, dtype=f64)
    counts = torch.zeros(n_groups, dtype=f64)
    for l, g in zip(losses.tolist(), ids.tolist()):
        G[g] -= l
        counts[g] += 1
    if reduction == "mean":
        G = torch.where(counts > 0, G / counts.clamp_min(1), G)
    return G


def sample_weights(pi: torch.Tensor, ids: torch.Tensor, loss_scale: float, reduction: str):
    """(w, scale) with the model's loss = scale * sum_i w_i l_i.

    sum: w_i = pi[g_i], scale = loss_scale.  mean: sum_{j present} pi_j mean_j / sum_{j present} pi_j.
    """
    if reduction == "sum":
        return pi[ids], loss_scale
    present = sorted(set(ids.tolist()))
    mass = float(sum(pi[j] for j in present))
    counts = {j: ids.tolist().count(j) for j in present}
    w = torch.tensor([float(pi[g]) / counts[g] / mass for g in ids.tolist()], dtype=f64)
    return w, 1.0


class GoldenALSO:
    """ALSO in float64. ``forward(params, pi_selected)`` returns (per-sample losses, grads or None)."""

    def __init__(self, params: Sequence[torch.Tensor], n_groups: int, *, loss_scale: float, mode: str,
                 lrs: Sequence[float], betas=(0.9, 0.999), eps: float = 1.1920928955078125e-07,
                 weight_decay: float = 1e-3, amsgrad: bool = False, alpha: float = 1.0, pi_lr: float = 1e-3,
                 pi_decay: float = 1e-2, temperature: float = 1.0, pi_init=None, pi_reg=None,
                 group_reduction: str = "sum", store_params: Optional[Store] = None,
                 store_moments: Optional[tuple[Store, Store]] = None, moments_stored_after: str = "main") -> None:
        """``store_params``: the params are kept in a storage (16-bit params), the iterate and the extrapolated
        point alike. ``store_moments`` (m's, v's): the moments are kept in a storage, once per update call of
        the package: after the step's main advance ("main": descent-ascent, the closure API), or after the
        extrapolation's advance ("extrapolation": the optimistic loop API, whose call takes the main step
        and then the extrapolation)."""
        self.reduction = group_reduction
        self.store_params = store_params or (lambda t: t)
        self.store_moments, self.moments_stored_after = store_moments, moments_stored_after
        self.params = [self.store_params(p.detach().to(f64).clone()) for p in params]
        self.n_groups = n_groups
        self.loss_scale = loss_scale
        self.mode = mode
        self.lrs = list(lrs)
        self.betas, self.eps, self.wd, self.amsgrad, self.alpha = betas, eps, weight_decay, amsgrad, alpha
        self.pi_lr, self.pi_decay, self.temperature = pi_lr, pi_decay, temperature
        uniform = torch.full((n_groups,), 1.0 / n_groups, dtype=f64)
        self.pi = uniform.clone() if pi_init is None else torch.as_tensor(pi_init, dtype=f64) / sum(pi_init)
        self.pi_reg = uniform if pi_reg is None else torch.as_tensor(pi_reg, dtype=f64) / sum(pi_reg)
        self.states = [dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p), vmax=torch.zeros_like(p))
                       for p in self.params]
        self.d_prev: list[Optional[torch.Tensor]] = [None] * len(self.params)
        self.G_prev: Optional[torch.Tensor] = None

    def _pi_update(self, pi: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        return pi_update(pi, G, self.pi_lr, self.pi_decay, self.temperature, self.eps, self.pi_reg)

    def _adam(self, i: int, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return adam_delta(self.states[i], x, d, self.lrs[i], self.betas, self.eps, self.wd, self.amsgrad)

    def _store(self, i: int) -> None:
        if self.store_moments is not None:
            store_m, store_v = self.store_moments
            state = self.states[i]
            state["m"], state["v"], state["vmax"] = store_m(state["m"]), store_v(state["v"]), store_v(state["vmax"])

    def step(self, forward: Callable, ids: torch.Tensor) -> torch.Tensor:
        store_p = self.store_params
        if self.mode == "descent-ascent":
            losses, grads = forward(self.params, *sample_weights(self.pi, ids, self.loss_scale, self.reduction))
            for i, d in enumerate(grads):
                if d is not None:
                    self.params[i] = store_p(self.params[i] + self._adam(i, self.params[i], d))
                    self._store(i)
            self.pi = self._pi_update(self.pi, group_gradient(losses, ids, self.n_groups, self.reduction))
            return losses
        x = [p.clone() for p in self.params]
        for i, d_prev in enumerate(self.d_prev):
            if d_prev is not None:
                self.params[i] = store_p(x[i] + self._adam(i, x[i], self.alpha * d_prev))
                if self.moments_stored_after == "extrapolation":
                    self._store(i)
        pi_mid = self.pi.clone() if self.G_prev is None else self._pi_update(self.pi, self.G_prev)
        losses, grads = forward(self.params, *sample_weights(pi_mid, ids, self.loss_scale, self.reduction))
        for i, d in enumerate(grads):
            advanced = self.d_prev[i] is not None
            if d is not None:
                self.d_prev[i] = d
                self.params[i] = store_p(x[i] + self._adam(i, x[i], d))
                advanced = True
            else:
                self.d_prev[i] = None
                self.params[i] = x[i]
            if advanced and self.moments_stored_after == "main":
                self._store(i)
        G = group_gradient(losses, ids, self.n_groups, self.reduction)
        self.G_prev = G
        self.pi = self._pi_update(self.pi, G)
        return losses


def sgd_delta(state: dict, x: torch.Tensor, d: torch.Tensor, lr: float, wd: float) -> torch.Tensor:
    """torch.optim.SGD without momentum: delta = -lr * (d + wd * x)."""
    return -lr * (d + wd * x)


def torch_adam_delta(state: dict, x: torch.Tensor, d: torch.Tensor, lr: float, betas, eps: float,
                     wd: float) -> torch.Tensor:
    """torch.optim.Adam (L2 decay coupled): -lr/(1-b1^t) m / (sqrt(v)/sqrt(1-b2^t) + eps), which is
    AdamStep of sec. 3 with eps * sqrt(1 - b2^t) in place of eps."""
    t = state["t"] + 1
    return adam_delta(state, x, d, lr, betas, eps * math.sqrt(1 - betas[1] ** t), wd, amsgrad=False)


class GoldenGroupWeights:
    """The pi side alone in float64 (sec. 4-6): the weights of the model's loss, then PiUpdate.

    ``weights(ids)`` gives (w, scale) with loss = scale * sum_i w_i l_i, from pi (descent-ascent) or
    from pi_mid = PiUpdate(pi, G_prev) (optimistic, pi before the first step); ``step`` takes the
    mirror-ascent step from pi with the batch's G."""

    def __init__(self, n_groups: int, *, loss_scale: float, mode: str = "descent-ascent", pi_lr: float = 1e-3,
                 pi_decay: float = 1e-2, temperature: float = 1.0, eps: float = 1.1920928955078125e-07,
                 reduction: str = "sum") -> None:
        self.n_groups, self.loss_scale, self.mode, self.reduction = n_groups, loss_scale, mode, reduction
        self.hyper = dict(pi_lr=pi_lr, pi_decay=pi_decay, temperature=temperature, eps=eps)
        self.pi_reg = torch.full((n_groups,), 1.0 / n_groups, dtype=f64)
        self.pi = self.pi_reg.clone()
        self.G_prev: Optional[torch.Tensor] = None

    def pi_mid(self) -> torch.Tensor:
        if self.mode == "descent-ascent" or self.G_prev is None:
            return self.pi
        return pi_update(self.pi, self.G_prev, pi_reg=self.pi_reg, **self.hyper)

    def weights(self, ids: torch.Tensor):
        return sample_weights(self.pi_mid(), ids, self.loss_scale, self.reduction)

    def step(self, losses: torch.Tensor, ids: torch.Tensor) -> None:
        self.G_prev = group_gradient(losses, ids, self.n_groups, self.reduction)
        self.pi = pi_update(self.pi, self.G_prev, pi_reg=self.pi_reg, **self.hyper)
