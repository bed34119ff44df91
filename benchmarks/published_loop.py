"""An unfused, per-tensor implementation of ALSO written straight from docs/algorithm.md (sec. 3-6).

It has the structure of the published single-file optimizer (a Python loop over tensors, one
torch op at a time, pi on a dense scatter, ``.item()`` on the returned loss) and serves as the
baseline the benchmarks compare against. It is not part of the library.
"""
from __future__ import annotations

import math

import torch


class PublishedStyleALSO:
    def __init__(self, params, n_groups, loss_scale, mode="optimistic", lr=1e-3, betas=(0.9, 0.999),
                 eps=1.1920928955078125e-07, weight_decay=1e-3, alpha=1.0, pi_lr=1e-3, pi_decay=1e-2,
                 pi_temperature=1.0):
        self.params = list(params)
        self.n_groups, self.loss_scale, self.mode = n_groups, loss_scale, mode
        self.lr, self.betas, self.eps, self.wd, self.alpha = lr, betas, eps, weight_decay, alpha
        self.pi_lr, self.pi_decay, self.temperature = pi_lr, pi_decay, pi_temperature
        device = self.params[0].device
        self.pi = torch.full((n_groups,), 1.0 / n_groups, device=device)
        self.pi_reg = torch.full((n_groups,), 1.0 / n_groups, device=device)
        self.state = [dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in self.params]
        self.d_prev = [None] * len(self.params)
        self.G_prev = None

    def _adam_step(self, i, x, d):
        s = self.state[i]
        b1, b2 = self.betas
        s["t"] += 1
        d = d.add(x, alpha=self.wd)
        s["m"].mul_(b1).add_(d, alpha=1 - b1)
        s["v"].mul_(b2).addcmul_(d, d, value=1 - b2)
        step_size = self.lr * math.sqrt(1 - b2 ** s["t"]) / (1 - b1 ** s["t"])
        return -step_size * s["m"] / (s["v"].sqrt() + self.eps)

    def _pi_update(self, pi, G):
        c = self.pi_decay * self.pi_lr
        z = (torch.log(pi + self.eps) + c * torch.log(self.pi_reg) - self.pi_lr * G) / (1 + c)
        return torch.softmax(z / self.temperature, dim=0)

    @torch.no_grad()
    def step(self, closure, group_ids):
        x = None
        if self.mode == "optimistic":
            x = [p.detach().clone() for p in self.params]
            for i, p in enumerate(self.params):
                if self.d_prev[i] is not None:
                    p.copy_(x[i] + self._adam_step(i, x[i], self.alpha * self.d_prev[i]))
            pi_sel = (self.pi if self.G_prev is None else self._pi_update(self.pi, self.G_prev))[group_ids]
        else:
            pi_sel = self.pi[group_ids]
        with torch.enable_grad():
            losses, _ = closure(pi_sel, self.loss_scale)
        for i, p in enumerate(self.params):
            if p.grad is None:
                self.d_prev[i] = None
                if x is not None:
                    p.copy_(x[i])
                continue
            start = x[i] if x is not None else p.detach()
            if x is not None:
                self.d_prev[i] = p.grad.clone()
            p.copy_(start + self._adam_step(i, start, p.grad))
        G = torch.zeros(self.n_groups, device=losses.device).scatter_add_(0, group_ids, -losses.float())
        if self.mode == "optimistic":
            self.G_prev = G
        self.pi = self._pi_update(self.pi, G)
        return losses.mean().item()
