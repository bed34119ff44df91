"""pytest-benchmark suite of one CPU optimizer step: also_fused beside torch's fused CPU Adam/AdamW.

Run with ``make bench-cpu`` (or ``pytest benchmarks/cpu/test_bench_cpu.py --benchmark-group-by=param:size``).
Sizes sweep the total parameter count in 30 weight + 30 bias tensors; every implementation sees
the same random non-zero params and gradients. pytest-benchmark times one implementation after
the other; the ratio of each median to torch fused Adam (AdamW rows: AdamW) of the same size is
stored in the JSON (``extra_info``) and printed at the end. ``bench_cpu.py`` times them
interleaved, which is what the README's ratios come from. The JSON that pytest-benchmark writes
with ``--benchmark-json`` lands next to the other results (benchmarks/results/cpu_pytest_benchmark.json).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import also_fused

SIZES = {"1M": 180, "4.7M": 395, "19M": 790}  # square-ish weights: 30 * (w*w + w) params
N_GROUPS, BATCH = 10, 256
MEDIANS: dict[tuple[str, str], float] = {}


def make(width: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(30):
        params.append(torch.nn.Parameter(torch.randn(width, width, generator=gen) * 0.02))
        params.append(torch.nn.Parameter(torch.randn(width, generator=gen) * 0.02))
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def step_fn(impl: str, params):
    ids = torch.randint(0, N_GROUPS, (BATCH,), generator=torch.Generator().manual_seed(1))
    losses = torch.rand(BATCH, generator=torch.Generator().manual_seed(2)) + 0.5
    torch_impls = {
        "torch Adam fused": lambda: torch.optim.Adam(params, weight_decay=1e-3, fused=True),
        "torch AdamW fused": lambda: torch.optim.AdamW(params, weight_decay=1e-3, fused=True),
        "torch Adam single-tensor": lambda: torch.optim.Adam(params, weight_decay=1e-3, foreach=False),
        "torch Adam foreach": lambda: torch.optim.Adam(params, weight_decay=1e-3, foreach=True),
        "also_fused Adam": lambda: also_fused.Adam(params, weight_decay=1e-3),
        "also_fused AdamW": lambda: also_fused.AdamW(params, weight_decay=1e-3),
    }
    if impl in torch_impls:
        return torch_impls[impl]().step
    mode, api = impl.split()[-2:]
    opt = also_fused.ALSO(params, N_GROUPS, batch_size=BATCH, mode=mode)
    if api == "closure":
        return lambda: opt.step(lambda pi, scale: (losses, None), ids)

    def loop():
        opt.weighted_loss(losses, ids)
        return opt.step()
    return loop


# the baselines first: the ratios of the later rows of a size divide by their medians
IMPLS = ["torch Adam fused", "torch AdamW fused", "torch Adam single-tensor", "torch Adam foreach",
         "also_fused Adam", "also_fused AdamW", "ALSO descent-ascent loop", "ALSO descent-ascent closure",
         "ALSO optimistic loop", "ALSO optimistic closure"]


def baseline(impl: str) -> str:
    return "torch AdamW fused" if "AdamW" in impl else "torch Adam fused"


@pytest.fixture(scope="module", autouse=True)
def ratio_table(request):
    """After the module: the medians and their ratios to torch fused, as a table on the terminal."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not MEDIANS:
        return
    lines = ["", "median ms (x torch fused Adam; AdamW rows x torch fused AdamW), run one after the other:",
             "| step | " + " | ".join(SIZES) + " |", "|---" * (len(SIZES) + 1) + "|"]
    for impl in IMPLS:
        cells = []
        for size in SIZES:
            ms, base = MEDIANS.get((impl, size)), MEDIANS.get((baseline(impl), size))
            cells.append("-" if ms is None or base is None else f"{ms:.2f} ({ms / base:.2f})")
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        for line in lines:
            reporter.write_line(line)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", list(SIZES))
def test_step(benchmark, impl, size):
    params = make(SIZES[size])
    step = step_fn(impl, params)
    step()  # warm-up: lazy state allocation
    benchmark.group = f"{size} params"
    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)
    assert all(torch.isfinite(p).all() for p in params)
    median_ms = 1e3 * benchmark.stats.stats.median
    MEDIANS[(impl, size)] = median_ms
    base = MEDIANS.get((baseline(impl), size))
    if base is not None:
        benchmark.extra_info["ratio_vs_torch_fused"] = median_ms / base
