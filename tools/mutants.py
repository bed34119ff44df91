"""Planted mutants: wrong variants of the reference and of each fast path that the fast test tier must catch.

Each mutant is one edit of one source file (a wrong formula, a flag ignored, a value not written). For
each, the edit is applied in the working tree, the fast tier runs (``pytest -m "not slow" -x``, the tests
``make test-fast`` runs; ``--tests`` narrows it), the first failing test is recorded, and the file is
put back. A mutant no test fails is reported as survived. Mutants of the C++ extension rebuild it in
place (``setup.py build_ext --inplace``) with the edit and again without it.

    python tools/mutants.py                      # every mutant; writes tools/mutants_report.md
    python tools/mutants.py --only lr-scaled     # some of them, by name

Run it on a clean working tree (it restores each file from a copy taken before the edit); the tests
import the package of the checkout the script lives in (run from a second checkout, that one's).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # text that occurs exactly once in the file
    new: str
    what: str  # the wrong behaviour, in words


MUTANTS = [
    # ---------------------------------------------------------------- the reference (functional.py)
    Mutant("lr-scaled", "also_fused/functional.py",
           "        step_size = lr * math.sqrt(bc2) / bc1\n", "        step_size = 1.01 * lr * math.sqrt(bc2) / bc1\n",
           "reference, ALSO's formula: the step 1% too long"),
    Mutant("bias-correction-off", "also_fused/functional.py",
           "    bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t\n", "    bc1, bc2 = 1.0, 1.0\n",
           "reference: no bias correction"),
    Mutant("eps-inside-sqrt", "also_fused/functional.py",
           "        denom = v.sqrt().add_(eps)\n", "        denom = v.add(eps).sqrt()\n",
           "reference, ALSO's formula: eps added inside the square root"),
    Mutant("torch-eps-before-correction", "also_fused/functional.py",
           "        denom = v.sqrt().div_(math.sqrt(bc2)).add_(eps)\n",
           "        denom = v.sqrt().add_(eps).div_(math.sqrt(bc2))\n",
           "reference, torch's formula: eps added before the bias correction"),
    Mutant("weight-decay-dropped", "also_fused/functional.py",
           "        d = d.add(x, alpha=weight_decay)\n", "        d = d\n",
           "reference: the coupled L2 term is not added to the gradient"),
    Mutant("amsgrad-ignored", "also_fused/functional.py",
           "        x1 = _apply_step(xf, m1, v1 if vmax1 is None else vmax1, t,",
           "        x1 = _apply_step(xf, m1, v1, t,",
           "reference: amsgrad's running max not used in the denominator"),
    Mutant("pi-lr-halved", "also_fused/functional.py",
           "        z.add_(sums.double().mul_(pi_lr))", "        z.add_(sums.double().mul_(0.5 * pi_lr))",
           "reference pi step: the losses' step half as long"),
    Mutant("pi-decay-misapplied", "also_fused/functional.py",
           "    c = pi_decay * pi_lr\n    z = pi.double().add_(eps)", "    c = pi_decay\n    z = pi.double().add_(eps)",
           "reference pi step: the KL weight c = pi_decay instead of pi_decay * pi_lr"),
    Mutant("temperature-ignored", "also_fused/functional.py",
           ".div_((1.0 + c) * temperature)", ".div_(1.0 + c)",
           "reference pi step: the temperature does not divide the logits"),
    Mutant("log-eps-dropped", "also_fused/functional.py",
           "    z = pi.double().add_(eps)\n", "    z = pi.double()\n",
           "reference pi step: log(pi) instead of log(pi + eps)"),
    Mutant("group-mean-unnormalised", "also_fused/functional.py",
           "    return per_sample / per_sample.sum()\n", "    return per_sample\n",
           "reference: the group-mean weights are not divided by the pi mass present"),
    Mutant("loss-scale-ignored", "also_fused/functional.py",
           "    return (weights * losses).sum().float() * loss_scale\n", "    return (weights * losses).sum().float()\n",
           "reference: the weighted loss without loss_scale"),
    Mutant("rgd-clip-below", "also_fused/functional.py",
           "clamp(max=temperature)", "clamp(min=temperature)",
           "reference RGD: the losses clipped from below instead of above"),
    # ---------------------------------------------------------------- the classes
    Mutant("alpha-ignored", "also_fused/theta.py",
           "            scalars = {_ALPHA_FIELD[kind]: self.alpha} if kind in _ALPHA_FIELD else {}\n",
           "            scalars = {}\n",
           "ALSO: the extrapolation uses the previous gradient unscaled (alpha ignored)"),
    Mutant("coupled-decay-decoupled", "also_fused/theta.py",
           'AdamSpec(eps_mode="also", commit_state=kind != "extrapolate",',
           'AdamSpec(eps_mode="also", decoupled_weight_decay=True, commit_state=kind != "extrapolate",',
           "ALSO: decoupled (AdamW) weight decay instead of the coupled L2"),
    Mutant("pi-mode-swapped", "also_fused/also.py",
           "n_groups, loss_scale=loss_scale, batch_size=batch_size, mode=mode,",
           'n_groups, loss_scale=loss_scale, batch_size=batch_size, '
           'mode="descent-ascent" if mode == "optimistic" else "optimistic",',
           "ALSO: the group weights run the other mode than theta"),
    # ---------------------------------------------------------------- the Triton kernels (interpreter)
    Mutant("kernel-16bit-param-not-written", "kernels/multi_tensor_adam.py",
           "    x_out = _to_storage(x, PDTYPE, INTERPRET)\n    tl.store(dst + poffs, x_out, mask=mask)\n",
           "    x_out = _to_storage(x, PDTYPE, INTERPRET)\n    if PDTYPE == tl.float32:\n"
           "        tl.store(dst + poffs, x_out, mask=mask)\n",
           "Adam kernel: a bf16/fp16 param's new value is not stored"),
    Mutant("kernel-int8-scale-off-by-one", "kernels/multi_tensor_adam.py",
           "    m_scale = m_scale + block_index\n", "    m_scale = m_scale + tl.maximum(block_index - 1, 0)\n",
           "Adam kernel: the 8-bit m of every block but the first decoded with the previous block's scale"),
    Mutant("kernel-torch-denominator", "kernels/multi_tensor_adam.py",
           "        denom = _sqrt_div(vd, sqrt_bc2, recip_bc2, INTERPRET) + eps\n",
           "        denom = _sqrt_rn(vd, INTERPRET) + eps\n",
           "Adam kernel, torch's formula: sqrt(v) not divided by sqrt(1 - beta2^t)"),
    Mutant("kernel-rejected-step-counts", "kernels/multi_tensor_adam.py",
           "    if rejected:\n        if tl.load(row + COL_SRC)",
           "    if rejected:\n        tl.store(step_ptr, t)\n        if tl.load(row + COL_SRC)",
           "Adam kernel: a step the device rejected still advances the step count"),
    Mutant("kernel-pi-log-eps-dropped", "kernels/group_pi.py",
           "    x = tl.log(p + eps)\n    if HAS_REG:\n        x = x + c * r\n    return x\n",
           "    x = tl.log(p)\n    if HAS_REG:\n        x = x + c * r\n    return x\n",
           "single-program pi kernels: log(pi) instead of log(pi + eps)"),
    Mutant("kernel-pi-second-update-swaps-patched", "kernels/group_pi.py",
           "seen = _logit(_scale(y0, M, shift, inv_z), r, 0.0,", "seen = _logit(o, r, 0.0,",
           "many-groups pi kernel: pi_mid's normaliser swaps out a present group's patched value, not the one its "
           "range sum saw"),
    Mutant("kernel-loss-scale-ignored", "kernels/losses.py",
           "    tl.store(w_ptr + i, scale * w, mask=m)\n", "    tl.store(w_ptr + i, w, mask=m)\n",
           "weighted-loss kernel: the per-sample weights without loss_scale"),
    # ---------------------------------------------------------------- the C++ extension (rebuilt)
    Mutant("cpu-lr-scaled", "also_fused/csrc/cpu_adam.cpp",
           "const double step = eps_also ? lr * std::sqrt(bc2) / bc1 : lr / bc1;",
           "const double step = eps_also ? 1.01 * lr * std::sqrt(bc2) / bc1 : lr / bc1;",
           "CPU extension, ALSO's formula: the step 1% too long"),
    Mutant("cpu-pi-log-eps-dropped", "also_fused/csrc/cpu_pi.cpp",
           "double x = std::log(static_cast<double>(src[j]) + eps);", "double x = std::log(static_cast<double>(src[j]));",
           "CPU extension pi step: log(pi) instead of log(pi + eps)"),
    # ---------------------------------------------------------------- GradScaler, stochastic rounding, in backward
    Mutant("amp-found-inf-ignored", "kernels/multi_tensor_adam.py",
           "rejected = rejected | (tl.load(found_inf_ptr) != 0.0)",
           "rejected = rejected | (tl.load(found_inf_ptr) != 1.0e30)",
           "kernel: GradScaler's found_inf never skips the step"),
    Mutant("group-weights-skip-ignored", "also_fused/group_weights.py",
           "            torch.where(skip, before, t, out=t)",
           "            pass",
           "GroupWeights: pi moves on a step the scaler skipped"),
    Mutant("kernel-f16-rounding-bits-halved", "kernels/multi_tensor_adam.py",
           "    fraction = tl.floor((q - q_low) * 65536.0).to(tl.int32)",
           "    fraction = tl.floor((q - q_low) * 32768.0).to(tl.int32)",
           "kernel, float16 stochastic rounding: 15 bits of the fraction, half the chance of rounding away"),
    Mutant("cpu-rounding-key-reused", "also_fused/csrc/cpu_adam.cpp",
           "      j.key_extrap = stream_key(rounding_seeds[i], t_main + 1);",
           "      j.key_extrap = stream_key(rounding_seeds[i], t_main);",
           "CPU extension: the extrapolated point rounded with the bits of the iterate's step"),
    Mutant("rounding-key-reused", "kernels/multi_tensor_adam.py",
           "        key_b = _stream_key(seed, t)",
           "        key_b = _stream_key(seed, t - EXTRAP)",
           "kernel: the extrapolated point rounded with the bits of the iterate's step"),
    Mutant("in-backward-gradients-kept", "also_fused/in_backward.py",
           "        for p, _ in items:\n            p.grad = None",
           "        for p, _ in items:\n            pass",
           "step inside backward: the gradients are not freed after their bucket's update"),
    Mutant("ddp-bucket-not-averaged", "also_fused/in_backward.py",
           "        buffer.div_(dist.get_world_size(self._process_group))",
           "        pass",
           "step inside backward under DDP: the bucket summed over the ranks, not averaged"),
    Mutant("cutoff-ties-ignored", "also_fused/functional.py",
           "torch.where(total >= threshold, count_before + j - 1,",
           "torch.where(total >= threshold, count_before,",
           "sort-free select_batch cutoff: the ties at v* not counted"),
]


def _run_tests(tests: list[str], timeout: float) -> tuple[str, str, float]:
    """(verdict, first failing test or reason, seconds) of one run of the fast tier."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-n", "2",
           *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timed out", f"no verdict within {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.MULTILINE)
    if failed:
        return "killed", failed[0], seconds
    if proc.returncode == 0:
        return "survived", "", seconds
    return "killed", f"pytest exit {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}", seconds


def _rebuild() -> None:
    """The C++ extension built again from the sources as they are, in place (also_fused/_cpu_adam*.so)."""
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, check=True,
                   capture_output=True)


def run_mutant(mutant: Mutant, tests: list[str], timeout: float) -> tuple[str, str, float]:
    path = os.path.join(ROOT, mutant.path)
    with open(path) as f:
        original = f.read()
    if original.count(mutant.old) != 1:
        return "not applied", f"the text to replace occurs {original.count(mutant.old)} times", 0.0
    native = mutant.path.endswith(".cpp")
    try:
        with open(path, "w") as f:
            f.write(original.replace(mutant.old, mutant.new))
        if native:
            _rebuild()
        return _run_tests(tests, timeout)
    finally:
        with open(path, "w") as f:
            f.write(original)
        if native:
            _rebuild()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--tests", nargs="*", default=["tests"], help="what pytest runs (default: the fast tier)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--report", default=os.path.join(ROOT, "tools", "mutants_report.md"))
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    chosen = [m for m in MUTANTS if not names or m.name in names]
    verdict, why, clean_seconds = _run_tests(args.tests, args.timeout)
    if verdict != "survived":
        sys.exit(f"the fast tier does not pass without mutants ({verdict}: {why})")
    print(f"unmutated fast tier: passed in {clean_seconds:.0f} s", flush=True)
    rows = []
    for mutant in chosen:
        verdict, why, seconds = run_mutant(mutant, args.tests, args.timeout)
        rows.append((mutant, verdict, why, seconds))
        print(f"{mutant.name:34s} {verdict:9s} {seconds:6.0f} s  {why}", flush=True)
    killed = sum(v == "killed" for _, v, _, _ in rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    lines = [f"# Planted mutants against the fast tier ({datetime.date.today().isoformat()}, commit {commit.strip()})",
             "",
             f"`python tools/mutants.py` (the fast tier: `pytest -m \"not slow\" -x -n 2 {' '.join(args.tests)}`): "
             f"{killed} of {len(rows)} mutants killed; the unmutated tier passed in {clean_seconds:.0f} s.", "",
             "| mutant | file | what is wrong | verdict | first failing test | s |", "|---|---|---|---|---|---|"]
    for mutant, verdict, why, secs in rows:
        lines.append(f"| `{mutant.name}` | `{mutant.path}` | {mutant.what} | {verdict} | `{why}` | {secs:.0f} |")
    with open(args.report, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{killed}/{len(rows)} killed; wrote {args.report}")
    if killed != len(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
