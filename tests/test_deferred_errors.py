"""Bad input found on the device: the step is a no-op there and the error surfaces later, without a sync.

On a GPU the error word is read once the GPU has finished the step; on a CPU it is read at once,
so here the deferral is switched on by hand (``_errors.deferred``) and "the GPU has not finished
yet" is simulated by ``_in_flight``. Checked: the error names the step, the optimizer's state is
bitwise what it was before the rejected step (and the steps queued after it), and the run then
continues exactly like a twin that never saw the bad input.
"""
from __future__ import annotations

import pytest

from support import DEVICE, triton_importable
from support.bad_inputs import N_GROUPS, Run, batch
from support.harness import assert_same

pytestmark = pytest.mark.skipif(not triton_importable(), reason="the device checks run in the Triton kernels")

NAN = float("nan")


def bad_step(r: Run, bad_ids: bool) -> None:
    X, Y, ids = batch(r.k, r.device)
    if bad_ids:
        ids = ids + N_GROUPS
    if r.api == "closure":
        closure = r.closure_for(X, Y, lambda l: (l, None) if bad_ids else (l * NAN, None))
        r.opt.step(closure, ids)
    else:
        r.opt.zero_grad(set_to_none=True)
        losses = r.losses(X, Y)
        r.opt.weighted_loss(losses if bad_ids else losses * NAN, ids).backward()
        r.opt.step()


def deferred_run(mode: str, api: str, state_precision: str = "float32") -> Run:
    r = Run("triton", mode, api, state_precision=state_precision)
    r.opt._errors.deferred = True
    return r


@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["closure", "loop"])
@pytest.mark.parametrize("bad_ids", [True, False], ids=["ids", "nan"])
@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_rejected_step_is_a_noop_and_raises_later(mode, api, bad_ids, precision):
    victim = deferred_run(mode, api, precision)
    before = victim.snapshot()
    bad_step(victim, bad_ids)  # no error yet: the device has not been read
    with pytest.raises(ValueError, match=("must lie in" if bad_ids else "NaN or inf") + r".*step 3 was not taken"):
        victim.opt.check_errors()
    assert_same(victim.snapshot(), before)
    twin = Run("triton", mode, api, state_precision=precision)
    victim.good_step()
    twin.good_step()
    assert_same(victim.snapshot(), twin.snapshot())


@pytest.mark.parametrize("mode", ["optimistic", "descent-ascent"])
@pytest.mark.parametrize("api", ["closure", "loop"])
def test_steps_queued_after_a_rejected_one_are_undone_too(mode, api, monkeypatch):
    """While the GPU has not finished the bad step, later steps run as no-ops; the first call that can
    read the word raises and puts the host-side state back to before the bad step."""
    victim = deferred_run(mode, api)
    before, k_before = victim.snapshot(), victim.k
    monkeypatch.setattr(victim.opt._errors, "_in_flight", lambda event: True)
    bad_step(victim, bad_ids=True)
    victim.good_step()
    victim.good_step()
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"step 3 was not taken.*the 2 step\(s\) queued after it"):
        victim.opt.step() if api == "loop" else victim.good_step()
    assert_same(victim.snapshot(), before)
    victim.k = k_before  # the user runs the rejected batches again
    twin = Run("triton", mode, api)
    victim.good_step()
    twin.good_step()
    assert_same(victim.snapshot(), twin.snapshot())


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_first_step_rejected_leaves_no_state(precision):
    """Lazily created state (moments and 8-bit scales, the iterate, d_prev) of a rejected first step is removed again."""
    for mode in ("optimistic", "descent-ascent"):
        for api in ("closure", "loop"):
            victim = Run("triton", mode, api, warm=0, state_precision=precision)
            victim.opt._errors.deferred = True
            bad_step(victim, bad_ids=False)
            with pytest.raises(ValueError, match="step 1 was not taken"):
                victim.opt.state_dict()  # waits for the device's verdict before saving
            assert len(victim.opt.state) == 0
            twin = Run("triton", mode, api, warm=0, state_precision=precision)
            victim.good_step()
            twin.good_step()
            assert_same(victim.snapshot(), twin.snapshot())


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA the check is deferred")
def test_cpu_raises_in_the_call_itself():
    """Without deferral (any CPU run) the error is raised by the call that was given the bad input."""
    r = Run("triton", "optimistic", "loop")
    before = r.snapshot()
    X, Y, ids = batch(r.k, r.device)
    r.opt.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="must lie in.*this weighted_loss"):
        r.opt.weighted_loss(r.losses(X, Y), ids - N_GROUPS)
    assert_same(r.snapshot(), before)
    assert int(r.opt._errors.word) == 0


@pytest.mark.skipif(DEVICE != "cuda", reason="the deferral is the default on CUDA only")
def test_cuda_defers_by_default():
    r = Run("triton", "descent-ascent", "loop")
    assert r.opt._errors.deferred
    before = r.snapshot()
    bad_step(r, bad_ids=True)
    with pytest.raises(ValueError, match="must lie in"):
        r.opt.check_errors()
    assert_same(r.snapshot(), before)


@pytest.mark.parametrize("api", ["closure", "loop"])
def test_capture_with_device_checks_is_refused_and_changes_nothing(api, monkeypatch):
    """validate=True reports each step to the host; a CUDA-graph capture (simulated: the capture query
    answers yes) is refused with a RuntimeError by the first call of the step, before anything changes."""
    victim = deferred_run("optimistic", api)
    before, recorded = victim.snapshot(), len(victim.opt.weights._recorded)
    monkeypatch.setattr(victim.opt._errors, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="capture with validate=False"):
        bad_step(victim, bad_ids=False)
    monkeypatch.undo()
    assert_same(victim.snapshot(), before)
    assert len(victim.opt.weights._recorded) == recorded
    twin = Run("triton", "optimistic", api)
    victim.good_step()
    twin.good_step()
    assert_same(victim.snapshot(), twin.snapshot())
