"""The bad-input matrix's cases and what runs them: ``CASES`` (each one bad input to ALSO's public API,
or a combination that must either work or raise clearly), the small model ``Run`` they are tried on,
its good ``batch``es, and ``check_bad_input``, the check of one case on one backend and mode.

test_bad_input_matrix runs the matrix on every backend that runs here, test_cpu_fused on the fast CPU
path; test_copy and test_deferred_errors build on ``Run`` and ``batch``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

import also_fused
from support import DEVICE, triton_importable
from support.harness import assert_same

ON_GPU = DEVICE == "cuda"
MODES = ("optimistic", "descent-ascent")
BACKENDS = ("reference", "triton") if triton_importable() else ("reference",)
N_GROUPS, B, D_IN, D_OUT = 4, 8, 5, 3
WARM_STEPS = 2  # the optimistic state (previous gradient, iterate, pi_mid) exists after two steps
NAN = float("nan")


# ------------------------------------------------------------------------------ helpers
def batch(k: int, device=DEVICE):
    gen = torch.Generator().manual_seed(100 + k)
    X = torch.randn(B, D_IN, generator=gen)
    ids = torch.randint(0, N_GROUPS, (B,), generator=gen)
    Y = torch.randn(B, D_OUT, generator=gen) + ids.float().unsqueeze(1)
    return X.to(device), Y.to(device), ids.to(device)


class Run:
    """A small regression model and its ALSO, stepped ``warm`` times with good batches."""

    def __init__(self, backend: str, mode: str, api: str, device=DEVICE, warm: int = WARM_STEPS,
                 state_precision: str = "float32") -> None:
        gen = torch.Generator().manual_seed(0)
        self.device, self.api = device, api
        self.W = torch.nn.Parameter(torch.randn(D_IN, D_OUT, generator=gen).to(device))
        self.b = torch.nn.Parameter(torch.randn(D_OUT, generator=gen).to(device))
        # an embedding table used only by the sparse-gradient case: no gradient, no state otherwise
        self.E = torch.nn.Parameter(torch.randn(N_GROUPS, D_OUT, generator=gen).to(device))
        self.params = [self.W, self.b, self.E]
        self.opt = also_fused.ALSO(self.params, n_groups=N_GROUPS, batch_size=B, mode=mode, backend=backend,
                                   pi_lr=0.1, lr=1e-2, state_precision=state_precision)
        self.k = 0
        for _ in range(warm):
            self.good_step()

    def losses(self, X, Y, sparse_ids=None):
        out = X @ self.W + self.b
        if sparse_ids is not None:
            out = out + torch.nn.functional.embedding(sparse_ids, self.E, sparse=True)
        return ((out - Y) ** 2).mean(1)

    def closure_for(self, X, Y, result: Callable = lambda l: (l, None), sparse_ids=None):
        def closure(pi_sel, scale):
            self.opt.zero_grad(set_to_none=True)
            losses = self.losses(X, Y, sparse_ids)
            n = min(len(pi_sel), len(losses))
            (scale * (pi_sel[:n] * losses[:n]).sum()).backward()
            return result(losses.detach())
        return closure

    def good_step(self):
        X, Y, ids = batch(self.k, self.device)
        self.k += 1
        if self.api == "closure":
            return self.opt.step(self.closure_for(X, Y), ids)
        self.opt.zero_grad(set_to_none=True)
        self.opt.weighted_loss(self.losses(X, Y), ids).backward()
        return self.opt.step()

    def snapshot(self):
        return copy.deepcopy(self.opt.state_dict()), [p.detach().clone() for p in self.params]


# ----------------------------------------------------------------------- the bad inputs
def ids_case(transform):
    """Bad group ids given to the call that takes them (step() or weighted_loss())."""
    def run(r: Run):
        X, Y, ids = batch(r.k, r.device)
        bad = transform(ids)
        if r.api == "closure":
            r.opt.step(r.closure_for(X, Y), bad)
        else:
            r.opt.zero_grad(set_to_none=True)
            r.opt.weighted_loss(r.losses(X, Y), bad).backward()
            r.opt.step()
    return run


def losses_case(transform):
    """Bad per-sample losses: returned by the closure, or given to weighted_loss() then step()."""
    def run(r: Run):
        X, Y, ids = batch(r.k, r.device)
        if r.api == "closure":
            r.opt.step(r.closure_for(X, Y, lambda l: (transform(l), None)), ids)
        else:
            r.opt.zero_grad(set_to_none=True)
            loss = r.opt.weighted_loss(transform(r.losses(X, Y)), ids)
            loss.backward()
            r.opt.step()
    return run


def closure_result_case(make):
    def run(r: Run):
        X, Y, ids = batch(r.k, r.device)
        r.opt.step(r.closure_for(X, Y, make), ids)
    return run


def sparse_gradient(r: Run):
    X, Y, ids = batch(r.k, r.device)
    if r.api == "closure":
        r.opt.step(r.closure_for(X, Y, sparse_ids=ids), ids)
    else:
        r.opt.zero_grad(set_to_none=True)
        r.opt.weighted_loss(r.losses(X, Y, sparse_ids=ids), ids).backward()
        r.opt.step()


def closure_raises(r: Run):
    X, Y, ids = batch(r.k, r.device)

    def closure(pi_sel, scale):
        r.opt.zero_grad(set_to_none=True)
        (scale * (pi_sel * r.losses(X, Y)).sum()).backward()  # gradients exist, then the user code fails
        raise KeyError("user code failed")

    r.opt.step(closure, ids)


def step_without_ids(r: Run):
    X, Y, _ = batch(r.k, r.device)
    r.opt.step(r.closure_for(X, Y))


def step_with_nothing_recorded(r: Run):
    X, Y, ids = batch(r.k, r.device)
    r.opt.zero_grad(set_to_none=True)
    (r.losses(X, Y).mean()).backward()  # gradients, but no weighted_loss() call
    r.opt.step()


def step_loop_with_ids(r: Run):
    X, Y, ids = batch(r.k, r.device)
    r.opt.zero_grad(set_to_none=True)
    r.opt.weighted_loss(r.losses(X, Y), ids).backward()
    r.opt.step(group_ids=ids)


def weighted_loss_of_a_list(r: Run):
    X, Y, ids = batch(r.k, r.device)
    r.opt.weighted_loss(r.losses(X, Y).tolist(), ids)


def construct(**overrides):
    def run(params, backend, mode):
        kw = dict(n_groups=N_GROUPS, batch_size=B, mode=mode, backend=backend)
        kw.update(overrides)
        also_fused.ALSO(params, **kw)
    return run


def construct_with(param):
    def run(params, backend, mode):
        also_fused.ALSO(params + [torch.nn.Parameter(param())], n_groups=N_GROUPS, batch_size=B, mode=mode,
                        backend=backend)
    return run


# ------------------------------------------------- cases that must work or raise clearly
def mixed_dtypes_work(backend, mode):
    """fp32, bf16 and fp16 params in one ALSO step exactly like one ALSO per param (loop API)."""
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(D_IN, D_OUT, generator=gen), torch.randn(D_OUT, generator=gen),
            torch.randn(D_OUT, generator=gen)]
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def make():
        return [torch.nn.Parameter(t.to(DEVICE, dt, copy=True)) for t, dt in zip(init, dtypes)]

    def losses(ps, X, Y):
        return ((X @ ps[0] + ps[1].float() + ps[2].float() - Y) ** 2).mean(1)

    kw = dict(n_groups=N_GROUPS, batch_size=B, mode=mode, backend=backend, pi_lr=0.1, lr=1e-2)
    mixed = make()
    opt = also_fused.ALSO(mixed, **kw)
    split = make()
    opts = [also_fused.ALSO([p], **kw) for p in split]
    for k in range(3):
        X, Y, ids = batch(k)
        opt.zero_grad(set_to_none=True)
        opt.weighted_loss(losses(mixed, X, Y), ids).backward()
        opt.step()
        for o in opts:
            o.zero_grad(set_to_none=True)
        ls = losses(split, X, Y)
        opts[0].weighted_loss(ls, ids).backward()
        for o in opts[1:]:
            o.weighted_loss(ls.detach(), ids)
        for o in opts:
            o.step()
    opt.eval()
    for o in opts:
        o.eval()
    for p, q, t, dt in zip(mixed, split, init, dtypes):
        assert p.dtype == dt and torch.isfinite(p).all()
        assert not torch.equal(p.detach().float().cpu(), t.to(dt).float()), "a param did not move"
        assert torch.equal(p.detach(), q.detach()), f"{dt} param differs from its own optimizer's"
        assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt.pi, opts[0].pi) and torch.equal(opt.pi, opts[2].pi)


def several_devices_refused(backend, mode):
    """A CUDA and a CPU param in one ALSO are refused when it is built: a step the device rejects must leave
    every param as it was, and only the params on pi's device read its error word."""
    gen = torch.Generator().manual_seed(2)
    W = torch.nn.Parameter(torch.randn(D_IN, D_OUT, generator=gen).to("cuda"))
    b = torch.nn.Parameter(torch.randn(D_OUT, generator=gen))
    with pytest.raises(ValueError, match=r"ALSO's params must share one device.*cpu.*cuda:0"):
        also_fused.ALSO([W, b], n_groups=N_GROUPS, batch_size=B, mode=mode, backend=backend)


def zero_pi_reg_entry_without_kl(backend, mode):
    """pi_reg with a zero entry is accepted; with pi_decay = 0 the KL term (and pi_reg) drops out,
    so pi stays a finite distribution."""
    W = torch.nn.Parameter(torch.randn(D_IN, D_OUT).to(DEVICE))
    opt = also_fused.ALSO([W], n_groups=N_GROUPS, batch_size=B, mode=mode, backend=backend, pi_decay=0.0,
                          pi_reg=[0.5, 0.5, 0.0, 0.0])
    for k in range(2):
        X, Y, ids = batch(k)
        opt.zero_grad(set_to_none=True)
        opt.weighted_loss(((X @ W - Y) ** 2).mean(1), ids).backward()
        opt.step()
        assert torch.isfinite(opt.pi).all(), f"pi = {opt.pi.tolist()} after step {k + 1}"
        assert abs(float(opt.pi.double().sum()) - 1.0) < 1e-5


# ---------------------------------------------------------------------------- the matrix
@dataclass
class Case:
    name: str
    kind: str  # "step" (on a warm optimizer), "construct" (ALSO(...) itself) or "works" (own checks)
    fn: Callable
    api: Optional[str] = None
    exc: Optional[type] = None
    match: str = ""
    cuda_only: bool = False
    device: Optional[str] = None  # run the optimizer on this device instead of DEVICE
    backends: tuple = ("reference", "triton")
    warm: int = WARM_STEPS
    xfail: Optional[str] = None  # reason: a known library bug (strict xfail)
    xfail_if: Callable = lambda backend, mode: True



CASES: list[Case] = []
for _api in ("closure", "loop"):
    CASES += [
        Case("ids_negative", "step", ids_case(lambda i: i - N_GROUPS), _api, ValueError, "must lie in"),
        Case("ids_ge_n_groups", "step", ids_case(lambda i: i + N_GROUPS), _api, ValueError, "must lie in"),
        Case("ids_float_tensor", "step", ids_case(lambda i: i.float()), _api, ValueError, "integer tensor"),
        Case("ids_bool_tensor", "step", ids_case(lambda i: i > 1), _api, ValueError, "integer tensor"),
        Case("ids_float_list", "step", ids_case(lambda i: [float(v) + 0.5 for v in i.tolist()]), _api, ValueError,
             "integer"),
        Case("ids_bool_list", "step", ids_case(lambda i: [bool(v > 1) for v in i.tolist()]), _api, ValueError,
             "integer"),
        Case("ids_wrong_length", "step", ids_case(lambda i: i[:-1]), _api, ValueError, "must have shape"),
        Case("ids_2d", "step", ids_case(lambda i: i.view(2, -1)), _api, ValueError, "1-D"),
        Case("ids_empty_batch", "step", ids_case(lambda i: i[:0]), _api, ValueError, "empty"),
        Case("ids_on_wrong_device", "step", ids_case(lambda i: i.to("cuda")), _api, ValueError, "are on",
             cuda_only=True, device="cpu", backends=("reference",)),
        Case("losses_on_wrong_device", "step", losses_case(lambda l: l.cpu()), _api, ValueError, "are on",
             cuda_only=True),
        Case("losses_nan", "step", losses_case(lambda l: l * NAN), _api, ValueError, "NaN or inf"),
        Case("losses_inf", "step", losses_case(lambda l: l + float("inf")), _api, ValueError, "NaN or inf"),
        Case("losses_one_neg_inf", "step", losses_case(lambda l: torch.cat([l[:-1], l[-1:] - float("inf")])),
             _api, ValueError, "NaN or inf"),
        Case("losses_2d", "step", losses_case(lambda l: l.unsqueeze(1)), _api, ValueError, "must have shape"),
        Case("losses_integer", "step", losses_case(lambda l: (l * 100).long()), _api, ValueError, "floating point"),
        Case("sparse_gradient", "step", sparse_gradient, _api, RuntimeError, "sparse"),
        Case("nan_on_first_step", "step", losses_case(lambda l: l * NAN), _api, ValueError, "NaN or inf", warm=0),
    ]
CASES += [
    Case("closure_wrong_length", "step", closure_result_case(lambda l: (l[:-1], None)), "closure", ValueError,
         "must have shape"),
    Case("closure_0d_tensor", "step", closure_result_case(lambda l: (l.sum(), None)), "closure", ValueError,
         "must have shape"),
    Case("closure_returns_list", "step", closure_result_case(lambda l: (l.tolist(), None)), "closure", TypeError,
         "must be a tensor"),
    Case("closure_returns_none", "step", closure_result_case(lambda l: None), "closure", TypeError,
         "must be a tensor"),
    Case("closure_returns_float", "step", closure_result_case(lambda l: (float(l.mean()), None)), "closure",
         TypeError, "must be a tensor"),
    Case("closure_raises", "step", closure_raises, "closure", KeyError, "user code failed"),
    Case("closure_without_group_ids", "step", step_without_ids, "closure", TypeError, "needs group_ids"),
    Case("loop_step_nothing_recorded", "step", step_with_nothing_recorded, "loop", RuntimeError, "weighted_loss"),
    Case("loop_step_given_group_ids", "step", step_loop_with_ids, "loop", TypeError, "without a closure"),
    Case("loop_losses_not_a_tensor", "step", weighted_loss_of_a_list, "loop", TypeError, "must be a tensor"),
    Case("n_groups_zero", "construct", construct(n_groups=0), exc=ValueError, match="n_groups"),
    Case("pi_reg_wrong_length", "construct", construct(pi_reg=[0.5, 0.5]), exc=ValueError, match="pi_reg has"),
    Case("pi_init_wrong_length", "construct", construct(pi_init=[1.0] * (N_GROUPS + 1)), exc=ValueError,
         match="pi_init has"),
    Case("pi_reg_negative", "construct", construct(pi_reg=[0.5, 0.5, -0.1, 0.1]), exc=ValueError,
         match="pi_reg must be finite and non-negative"),
    Case("pi_init_negative", "construct", construct(pi_init=[0.5, -0.5, 0.5, 0.5]), exc=ValueError,
         match="pi_init must be finite and non-negative"),
    Case("complex_param", "construct", construct_with(lambda: torch.randn(3, dtype=torch.complex64, device=DEVICE)),
         exc=TypeError, match="complex"),
    Case("float64_param", "construct", construct_with(lambda: torch.randn(3, dtype=torch.float64, device=DEVICE)),
         exc=TypeError, match="float32, bfloat16 or float16"),
    Case("mixed_dtype_params", "works", mixed_dtypes_work),
    Case("params_on_several_devices", "works", several_devices_refused, cuda_only=True),
    Case("zero_pi_reg_entry_without_kl", "works", zero_pi_reg_entry_without_kl),
]
N_BAD_INPUTS = len(CASES)


def check_bad_input(case: Case, backend: str, mode: str):
    """One case of the matrix on one backend and mode: the error it must raise, the state unchanged, then
    bitwise the twin that never saw the bad input (a "works" case runs its own checks)."""
    if case.kind == "works":
        case.fn(backend, mode)
        return
    if case.kind == "construct":
        params = [torch.nn.Parameter(torch.randn(D_IN, D_OUT).to(DEVICE))]
        before = [p.detach().clone() for p in params]
        with pytest.raises(case.exc, match=case.match):
            case.fn(params, backend, mode)
        assert_same([p.detach() for p in params], before, "params")
        return
    device = case.device or DEVICE
    victim = Run(backend, mode, case.api, device, warm=case.warm)
    before = victim.snapshot()
    with pytest.raises(case.exc, match=case.match):
        case.fn(victim)
        victim.opt.check_errors()  # on CUDA the device's checks of ids and losses surface here
    assert_same(victim.snapshot(), before)
    # afterwards the optimizer carries on exactly like one that never saw the bad input
    twin = Run(backend, mode, case.api, device, warm=case.warm)
    victim.good_step()
    twin.good_step()
    assert_same(victim.snapshot(), twin.snapshot())
