"""A matrix of bad inputs against ALSO's public API, on every backend that runs here.

Each case is one bad input (or a combination that must either work or raise clearly), tried in
both modes on the "reference" backend and on "triton" (CUDA, or Triton's interpreter on CPU
tensors with the tiny sizes used here). A case that must raise checks the exception type and a
fragment of its message, then that the optimizer state is exactly as before the call (every tensor
of ``copy.deepcopy(opt.state_dict())`` and the params, bitwise), and then that one good step
afterwards gives bitwise the same result as a twin optimizer that never saw the bad input (state
outside the state_dict, e.g. the closure API's saved x, is covered that way).

On CUDA the Triton path checks ids and losses on the device without a host sync: the step is a no-op
there and the error is raised later (here by ``check_errors()``); the promise is the same.

The cases and the check of one case are in ``support/bad_inputs.py``; ``N_BAD_INPUTS`` counts the
cases, and every test id starts with ``badKKofN``.
"""
from __future__ import annotations

import pytest

from support import DEVICE
from support.bad_inputs import BACKENDS, CASES, MODES, N_BAD_INPUTS, ON_GPU, Case, Run, check_bad_input
from support.harness import assert_same


def _params():
    out = []
    for i, case in enumerate(CASES, 1):
        label = f"bad{i:02d}of{N_BAD_INPUTS}-{case.name}" + (f"-{case.api}" if case.api else "")
        for backend in BACKENDS:
            for mode in MODES:
                marks = []
                if backend not in case.backends or (case.cuda_only and not ON_GPU):
                    why = "CUDA only" if case.cuda_only and not ON_GPU else f"not on backend {backend}"
                    marks.append(pytest.mark.skip(reason=why))
                elif case.xfail and case.xfail_if(backend, mode):
                    marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
                out.append(pytest.param(case, backend, mode, id=f"{label}-{backend}-{mode}", marks=marks))
    return out


@pytest.mark.parametrize("case,backend,mode", _params())
def test_bad_input(case: Case, backend: str, mode: str):
    check_bad_input(case, backend, mode)


def _int8_params():
    """The cases on a warm optimizer again, with 8-bit Adam moments (codes and block scales in the state)."""
    return [p for p in _params() if p.values[0].kind == "step" and not p.marks]


@pytest.mark.parametrize("case,backend,mode", _int8_params())
def test_bad_input_with_8bit_moments(case: Case, backend: str, mode: str):
    device = case.device or DEVICE
    victim = Run(backend, mode, case.api, device, warm=case.warm, state_precision="int8")
    before = victim.snapshot()
    with pytest.raises(case.exc, match=case.match):
        case.fn(victim)
        victim.opt.check_errors()
    assert_same(victim.snapshot(), before)
    twin = Run(backend, mode, case.api, device, warm=case.warm, state_precision="int8")
    victim.good_step()
    twin.good_step()
    assert_same(victim.snapshot(), twin.snapshot())
