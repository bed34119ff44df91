"""What the many-groups pi step's one-program finishes and other parts cost: variants of kernels/group_pi.py.

Each variant is the product's source with one change, loaded as a module of its own; the pi step
(``pi_update_checked`` with kept launches, one update or two) is captured in a CUDA graph per variant and the
graphs are replayed interleaved (blocks of --iters replays between CUDA events, --rounds rounds), then
torch.profiler gives each variant's time per kernel. Variants:

* ``product``: the source as it is;
* ``no_finish``: the last program of the sample, stats and write launches skips its work (the normalisers, the
  report); other values, timing only: what those finishes cost;
* ``source:<path>``: the module from another file (``git show REV:kernels/group_pi.py``): old against new;
* ``scan<N>``: the finishes scan the batch's records N at a time (the product: ``_SCAN``);
* ``warps<N>``: the sample programs in N warps (the product: ``_SAMPLE_WARPS``);
* ``range_warps<N>``, ``programs<N>``, ``block<N>``, ``stages<N>``: the launches over pi's ranges (stats and
  write) in N warps, N programs per SM, tiles of N entries, N pipeline stages (the product: ``_RANGE_WARPS``,
  ``_PROGRAMS_PER_SM``, ``_BLOCK_GPU``, ``_LOOP_STAGES``); warps, programs and tiles change how the range sums
  are split and reduced, so the bits may differ where 1 / Z rounds the other way (stages leave them);
* ``wide_range_terms``: the range sums' terms through ``_wide_exp`` (a branch below e^-80, three float64
  products), as before ``_range_term``;
* ``fresh_sums``: no range sums carried from one step to the next (``_carried_sums`` always false): every step
  launches the stats kernel, as before the carried sums;
* ``maxnreg<N>``: the range launches (stats and write) compiled with at most N registers a thread (the product
  lets the compiler choose: 80 for the carrying write, which leaves room for 3 programs of 8 warps per SM);
* ``a+b``: variant a with variant b applied on top (``maxnreg64+programs3``);
* ``fast_log``: the logits' log(pi + eps) (``_logit``: the range launches, the sample programs, the patches)
  through libdevice's fast_logf (one approximate base-2 log) instead of tl.log: what the per-entry log costs;
  other values (``max_rel_diff`` says how far from the product's).

The kernel times are profiled after every replay is timed (torch.profiler leaves CUPTI attached to the process,
and what runs after a profile runs slower); each variant's eager call, with its tensors, is kept until then.
Prints one JSON line per (size, updates, variant), whether its pi (after three steps from the same start, the
first reading pi, the later ones taking carried sums where the variant does) equals the product's bitwise, and
the largest relative difference from the product's.
Run: ``python3 benchmarks/explore/explore_pi_finish.py --out benchmarks/results/pi_finish_<gpu>.json`` (CUDA).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import statistics
import sys

import torch

from also_fused.kernels import group_pi

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(BENCH, "pi"))
sys.path.insert(0, BENCH)
from bench_pi_stream import kernel_times  # noqa: E402
from bench_sample_tile import captured_step, replay_interleaved  # noqa: E402
from results_io import source_digest  # noqa: E402

HP = dict(pi_lr=1e-3, pi_decay=1e-2, temperature=1.0, eps=1.1920929e-07, log_pi_reg=None)
FINISH = "if ticket == tl.num_programs(0) - 1:"
RANGE_TERM = "    return tl.exp(d).to(tl.float64)\n"
LOGIT_LOG = ("def _logit(p, r, sj, a, c, lr, eps, HAS_REG: tl.constexpr, DENSE_S: tl.constexpr):\n"
             "    x = tl.log(p + eps)\n")
RANGE_LAUNCH_END = "STAGES=lay.stages)"  # the stats and write launches' last argument
CARRIED = "    return carried is not None and carried[0] is lay and carried[1] == pi._version\n"


def variant_source(name: str, source: str) -> tuple[str, dict]:
    """The variant's source and the module constants it sets; ``a+b`` applies a, then b."""
    if "+" in name:
        constants: dict = {}
        for part in name.split("+"):
            source, more = variant_source(part, source)
            constants.update(more)
        return source, constants
    if name == "no_finish":
        assert source.count(FINISH) >= 2
        return source.replace(FINISH, "if ticket == tl.num_programs(0) + 1:"), {}  # never true
    if name.startswith("source:"):  # another source of the module as a whole (an earlier commit's, to compare)
        with open(name[7:]) as f:
            return f.read(), {}
    if name.startswith("maxnreg"):
        assert source.count(RANGE_LAUNCH_END) == 2
        return source.replace(RANGE_LAUNCH_END, RANGE_LAUNCH_END[:-1] + f", maxnreg={int(name[7:])})"), {}
    if name == "wide_range_terms":
        assert source.count(RANGE_TERM) == 1
        return source.replace(RANGE_TERM, "    return _wide_exp(d)\n"), {}
    if name == "fast_log":
        assert source.count(LOGIT_LOG) == 1
        fast = LOGIT_LOG.replace("tl.log(p + eps)", "libdevice.fast_logf(p + eps)")
        text = source.replace(LOGIT_LOG, fast)
        return text.replace("import triton.language as tl\n",
                            "import triton.language as tl\nfrom triton.language.extra import libdevice\n", 1), {}
    if name == "fresh_sums":
        assert source.count(CARRIED) == 1
        return source.replace(CARRIED, "    return False\n"), {}
    if name.startswith("scan"):
        return source, {"_SCAN": int(name[4:])}
    if name.startswith("warps"):
        return source, {"_SAMPLE_WARPS": int(name[5:])}
    for prefix, constant in (("range_warps", "_RANGE_WARPS"), ("programs", "_PROGRAMS_PER_SM"),
                             ("block", "_BLOCK_GPU"), ("stages", "_LOOP_STAGES")):
        if name.startswith(prefix):
            return source, {constant: int(name[len(prefix):])}
    assert name == "product", name
    return source, {}


def load_variant(name: str, source: str, written: list):
    """The variant as a module beside group_pi (so that its relative imports resolve); its file is appended to
    ``written`` (removed when the run ends)."""
    text, constants = variant_source(name, source)
    if name == "product":
        return group_pi
    module_name = "_explore_" + re.sub(r"\W", "_", name)
    path = os.path.join(os.path.dirname(group_pi.__file__), module_name + ".py")
    with open(path, "w") as f:
        f.write(text)
    written.append(path)
    module = importlib.import_module(f"{group_pi.__package__}.{module_name}")
    for key, value in constants.items():
        setattr(module, key, value)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6,1e7")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--variants", default="product,fresh_sums,no_finish,scan1024,scan512,warps4,wide_range_terms")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with open(group_pi.__file__) as f:
        source = f.read()
    written: list = []
    try:
        modules = {name: load_variant(name, source, written) for name in args.variants.split(",")}
        run(modules, args)
    finally:
        for path in written:
            os.remove(path)


def run(modules: dict, args) -> None:
    rows, profiled = [], []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        gen = torch.Generator("cuda").manual_seed(n)
        pi0 = torch.rand(n, device="cuda", generator=gen) + 0.5
        pi0 /= pi0.sum()
        ids = torch.randint(0, n, (args.batch,), device="cuda", generator=gen)
        ids[100:110] = ids[5]  # a group with 11 samples: the order of its loss sum shows in the bits
        losses = torch.rand(args.batch, device="cuda", generator=gen) * 3
        for second in (False, True):
            steps, results = {}, {}
            for name, module in modules.items():
                steps[name] = captured_step(pi0, ids, losses, second, module)
                pi, mid = _step_outputs(module, pi0, ids, losses, second)
                results[name] = torch.cat([pi, mid]) if second else pi
            times = replay_interleaved({name: graph for name, (graph, _) in steps.items()}, args.iters, args.rounds)
            for name, (_, call) in steps.items():
                row = dict(n_groups=n, second=second, variant=name, step_us=statistics.median(times[name]),
                           step_us_min=min(times[name]), step_us_max=max(times[name]),
                           same_bits_as_product=bool(torch.equal(results[name], results["product"])),
                           max_rel_diff=float(((results[name].double() - results["product"].double()).abs()
                                               / results["product"].double()).max()))
                rows.append(row)
                profiled.append((row, call))
                print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}),
                      flush=True)
            del steps, results
    # the profiles after every replay: torch.profiler leaves CUPTI attached to the process, and what runs after a
    # profile runs slower (docs/performance.md)
    for row, call in profiled:
        kernels = kernel_times(call, args.iters)
        row["kernel_us_per_step"] = {k: v for k, v in kernels.items() if k.startswith("_pi")}
        print(json.dumps(dict(n_groups=row["n_groups"], second=row["second"], variant=row["variant"],
                              kernel_us_per_step={k: float(f"{v:.4g}") for k, v in row["kernel_us_per_step"].items()})),
              flush=True)
    record = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                  torch=torch.__version__, source=source_digest(), batch=args.batch, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


def _step_outputs(module, pi0: torch.Tensor, ids: torch.Tensor, losses: torch.Tensor, second: bool, steps: int = 3):
    """``steps`` pi steps of the variant from pi0 (its own cache and workspace; the batch's losses scaled by 1, 1/2,
    1/3, ...): pi and pi_mid."""
    pi, mid, cache, workspace = pi0.clone(), torch.empty_like(pi0), {}, {}
    for t in range(steps):
        module.pi_update_checked(pi, ids, losses / (t + 1), out=pi, second_out=mid if second else None, cache=cache,
                                 workspace=workspace, **HP)
    return pi, mid


if __name__ == "__main__":
    main()
