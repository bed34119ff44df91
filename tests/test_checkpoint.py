"""also_fused.checkpoint in one process (plain tensors): DCP round trip, and what it refuses."""
from __future__ import annotations

import pytest
import torch

import also_fused

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint import state_dict as dsd  # noqa: E402

from also_fused import checkpoint  # noqa: E402
from support import DEVICE  # noqa: E402
from support.harness import assert_same  # noqa: E402

N_GROUPS = 4
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def make(mode="optimistic", n_groups=N_GROUPS, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(DEVICE)
    opt = also_fused.ALSO(model.parameters(), n_groups, batch_size=8, mode=mode, lr=0.05, pi_lr=0.3,
                          backend="reference")
    return model, opt


def batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, generator=gen).to(DEVICE), torch.randn(8, 1, generator=gen).to(DEVICE),
             torch.randint(0, N_GROUPS, (8,), generator=gen).to(DEVICE)) for _ in range(n)]


def step(model, opt, api, X, Y, ids):
    if api == "closure":
        def closure(weights, scale):
            opt.zero_grad()
            losses = ((model(X) - Y) ** 2).mean(1)
            (scale * (weights * losses).sum()).backward()
            return losses.detach(), None
        opt.step(closure, ids)
    else:
        opt.zero_grad()
        opt.weighted_loss(((model(X) - Y) ** 2).mean(1), ids).backward()
        opt.step()


@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["closure", "loop"])
def test_dcp_round_trip_continues_bitwise(tmp_path, mode, api):
    data = batches(7)
    model, opt = make(mode)
    for k, b in enumerate(data):
        step(model, opt, api, *b)
        if k == 2:
            dcp.save({"model": dsd.get_model_state_dict(model),
                      "optim": checkpoint.get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    model2, opt2 = make(mode, seed=5)
    sd = {"model": dsd.get_model_state_dict(model2), "optim": checkpoint.get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=str(tmp_path))
    dsd.set_model_state_dict(model2, sd["model"])
    checkpoint.set_optimizer_state_dict(model2, opt2, sd["optim"])
    for b in data[3:]:
        step(model2, opt2, api, *b)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.pi, opt2.pi)
    assert_same(opt2.state_dict(), opt.state_dict())


def test_refuses_mismatch_and_changes_nothing():
    model, opt = make()
    for b in batches(2):
        step(model, opt, "loop", *b)
    saved = checkpoint.get_optimizer_state_dict(model, opt)
    other_model, other = make(n_groups=N_GROUPS + 1)
    for b in batches(1):
        step(other_model, other, "loop", *b)
    before = other.state_dict()
    with pytest.raises(ValueError, match="n_groups"):
        checkpoint.set_optimizer_state_dict(other_model, other, saved)
    assert_same(other.state_dict(), before)
    without_also = {k: v for k, v in saved.items() if k != "also"}
    with pytest.raises(ValueError, match="'also' entry"):
        checkpoint.set_optimizer_state_dict(model, opt, without_also)
    with pytest.raises(ValueError, match="flatten"):
        checkpoint.get_optimizer_state_dict(model, opt, options=dsd.StateDictOptions(flatten_optimizer_state_dict=True))


def test_eval_mode_and_other_optimizers_pass_through():
    model, opt = make()
    for b in batches(2):
        step(model, opt, "loop", *b)
    opt.eval()
    osd = checkpoint.get_optimizer_state_dict(model, opt)
    holds = {entries["optimistic_buffer_holds"] for entries in osd["state"].values()}
    assert holds == {"extrapolated"}
    # the optimizer's own state is not renamed by the export
    assert all("extrapolated" in s and "optimistic_buffer" not in s for s in opt.state.values())
    adam_model = torch.nn.Linear(3, 1).to(DEVICE)
    adam = also_fused.Adam(adam_model.parameters())
    assert "also" not in checkpoint.get_optimizer_state_dict(adam_model, adam)


def _adam_run(precision, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 1)).to(DEVICE)
    return model, also_fused.AdamW(model.parameters(), lr=0.01, state_precision=precision)


def _adam_steps(model, opt, data):
    for X, Y in data:
        opt.zero_grad()
        ((model(X) - Y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("template", ["int8", "float32"])
def test_dcp_int8_state_resumes_bitwise_and_refuses_another_precision(tmp_path, template):
    """8-bit moments go through torch.distributed.checkpoint as codes under their own keys and block scales:
    loaded into 8-bit state the run continues bit for bit; a template of another state precision finds no
    match and DCP refuses it (rather than casting codes to numbers)."""
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 40, generator=gen).to(DEVICE), torch.randn(16, 1, generator=gen).to(DEVICE))
            for _ in range(6)]
    model, opt = _adam_run("int8")
    _adam_steps(model, opt, data[:3])
    saved = checkpoint.get_optimizer_state_dict(model, opt)
    assert all("exp_avg_codes" in e and "exp_avg" not in e for e in saved["state"].values())
    dcp.save({"model": dsd.get_model_state_dict(model), "optim": saved}, checkpoint_id=str(tmp_path))
    model2, opt2 = _adam_run(template, seed=5)
    _adam_steps(model2, opt2, data[:1])  # state exists, so the template lists it
    sd = {"model": dsd.get_model_state_dict(model2), "optim": checkpoint.get_optimizer_state_dict(model2, opt2)}
    if template != "int8":
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        with pytest.raises(CheckpointException) as refused:
            dcp.load(sd, checkpoint_id=str(tmp_path))
        why = repr(refused.value.failures)  # DCP gathers the ranks' exceptions
        assert "Missing key" in why and "exp_avg" in why, why
        return
    dcp.load(sd, checkpoint_id=str(tmp_path))
    dsd.set_model_state_dict(model2, sd["model"])
    checkpoint.set_optimizer_state_dict(model2, opt2, sd["optim"])
    _adam_steps(model, opt, data[3:])
    _adam_steps(model2, opt2, data[3:])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert_same(opt2.state_dict(), opt.state_dict())
