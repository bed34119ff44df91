"""Where the 8-bit AdamW step's time goes: one kernel variant per process (argv[1]), GPT-2 1.3B shapes.

Prints one JSON line: median step ms (CUDA events, 25 steps after 8) and % of the copy bandwidth measured
in the same process. A variant name joins any of: ``bf16`` (bf16 params, else fp32), ``maxnreg<N>`` (a
register cap per thread), ``no_prologue`` (no bias-correction math per program), ``no_div`` (m * denom
instead of the correctly rounded m / denom), ``no_reduce`` (the stored scales instead of the block maxima),
``b<BLOCK>w<warps>`` (another block and quantisation block size), ``iters<K>`` and ``pipe<S>`` (K blocks
per program in an S-stage software-pipelined loop; ``product`` = the kernel's own configuration). The
no_* variants compute other values: upper bounds on what that part costs, timing only.
Run: ``python3 benchmarks/explore/explore_int8_step.py <variant> >> benchmarks/results/int8_step_variants_<gpu>.jsonl``
(CUDA). results/int8_step_variants_h200.jsonl holds the runs that chose PIPELINE_STAGES (2026-12-01): all before
the pipelined loop was the product's (then: one block per program, ``pipe`` from a copy of the kernel).
"""
import json, sys, os, statistics, re
import torch, triton, triton.language as tl
BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/
sys.path.insert(0, os.path.join(BENCH, "theta"))  # bench_theta.py
sys.path.insert(0, os.path.join(BENCH, "state_precision"))  # bench_state_precision.py
import also_fused
from also_fused.kernels import multi_tensor_adam as M
from also_fused.kernels import launch as L
from bench_theta import gpt2_shapes
from bench_state_precision import time_step, copy_bandwidth

variant = sys.argv[1]
pdt = torch.bfloat16 if "bf16" in variant else torch.float32
if "maxnreg" in variant:
    regs = int(re.match(r"\d+", variant.split("maxnreg")[1]).group(0))
    orig = L.Launcher.__init__
    def init(self, kernel, constexprs, options):
        options = dict(options, maxnreg=regs)
        orig(self, kernel, constexprs, options)
    L.Launcher.__init__ = init
    M.Launcher = L.Launcher
if "no_prologue" in variant:
    @triton.jit
    def _one_minus_pow(log_beta, t, INTERPRET: tl.constexpr):
        return t * 0.0 + 0.5
    M._one_minus_pow = _one_minus_pow
if variant.startswith("no_reduce"):
    @triton.jit
    def _quantize_store(m, v, m_ptr, v_ptr, m_scale_ptr, v_scale_ptr, offs, mask, MASKED: tl.constexpr):
        M._store_codes(m, tl.abs(m), tl.load(m_scale_ptr), m_ptr, m_scale_ptr, offs, mask, True)
        M._store_codes(v, tl.abs(v), tl.load(v_scale_ptr), v_ptr, v_scale_ptr, offs, mask, False)
    M._quantize_store = _quantize_store
if "no_div" in variant:
    @triton.jit
    def _adam_math(x, d, m, v, vmax, lr, b1, b2, omb1, omb2, eps, wd, step_size, sqrt_bc2, recip_bc2,
                   EPS_TORCH: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, INTERPRET: tl.constexpr):
        m, v, vmax = M._moments(x, d, m, v, vmax, b1, b2, omb1, omb2, wd, DECOUPLED, AMSGRAD)
        x = x * wd
        denom = M._sqrt_div(v, sqrt_bc2, recip_bc2, INTERPRET) + eps
        x = x - step_size * (m * denom)
        return x, m, v, vmax
    M._adam_math = _adam_math
import re
blk = re.search(r"b(\d+)w(\d)", variant)
if blk:
    from also_fused import storage as LY
    from also_fused import functional as F
    b, w = int(blk.group(1)), int(blk.group(2))
    LY.QUANT_BLOCK = F.QUANT_BLOCK = M.QUANT_BLOCK = b
    M.STATE_CONFIG[(pdt.itemsize, 1)] = (b, 1, w, 0 if pdt == torch.float32 else 8)
if "iters" in variant:
    k = int(re.match(r"\d+", variant.split("iters")[1]).group(0))
    M.STATE_CONFIG[(pdt.itemsize, 1)] = (1024, k, 4, 0 if pdt == torch.float32 else 8)
    M.PIPELINE_STAGES[(pdt.itemsize, 1)] = int(re.search(r"pipe(\d)", variant).group(1)) if "pipe" in variant else 1

shapes = gpt2_shapes(2048, 24)
gen = torch.Generator(device="cuda").manual_seed(0)
n = sum(torch.Size(s).numel() for s in shapes)
grad_sets = [[torch.randn(s, device="cuda", dtype=pdt, generator=gen) * 1e-2 for s in shapes] for _ in range(2)]
params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=pdt, generator=gen)) for s in shapes]
opt = also_fused.AdamW(params, lr=1e-4, state_precision="int8")
ms = time_step(opt, params, grad_sets, 8, 25)
bw = copy_bandwidth()
moved = (3 * pdt.itemsize + 4 + 16 / 1024) * n
print(json.dumps(dict(variant=variant, ms=ms, pct_copy=100 * moved / (ms * 1e-3) / bw, copy_tbs=bw / 1e12)))
