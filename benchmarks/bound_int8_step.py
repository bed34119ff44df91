"""What binds the 8-bit AdamW step: its time with exact arithmetic against upper bounds with less of it.

``python3 benchmarks/bound_int8_step.py VARIANT`` (one variant per process: the kernel is compiled with
the variant's helpers). ``exact``: the product. ``rn_codes``: the codes' roots by ``tl.sqrt_rn`` (its
branch to a slow path per element) instead of the branch-free fast path; ``rn_all``: Adam's own root
too, i.e. the kernel before the branch-free roots (both give the product's bits). ``codes``: the
codes' roots approximate; ``all``: Adam's root and division approximate too (other bits than the
product: upper bounds, timing only). Params: 48 tensors of 2048 x 8192 and
48 of 2048 x 2048 (1.0e9 float32 elements), CUDA-event median of 20 steps, the copy bandwidth of a
float32 copy of the same size measured in the same process. Prints one JSON line.
"""
import json
import sys

import torch
import triton
import triton.language as tl

import also_fused
from also_fused.kernels import multi_tensor_adam as M

variant = sys.argv[1] if len(sys.argv) > 1 else "exact"
if variant not in ("exact", "rn_codes", "rn_all", "codes", "all"):
    raise SystemExit("variant must be exact, rn_codes, rn_all, codes or all")

if variant in ("rn_codes", "rn_all"):
    @triton.jit
    def _code_root(r, INTERPRET: tl.constexpr):
        return tl.sqrt_rn(r)
    M._code_root = _code_root
if variant == "rn_all":
    @triton.jit
    def _sqrt_rn(x, INTERPRET: tl.constexpr):
        return tl.sqrt_rn(x)
    M._sqrt_rn = _sqrt_rn

if variant in ("codes", "all"):
    # multi_tensor_adam._store_codes with tl.sqrt (approximate) in place of its correctly rounded roots
    @triton.jit
    def _store_codes(x, ax, a, q_ptr, scale_ptr, offs, mask, SIGNED: tl.constexpr, INTERPRET: tl.constexpr):
        normal = a >= M.MIN_NORMAL
        inv = tl.where(normal, tl.div_rn(1.0, tl.where(normal, a, 1.0)), 0.0)
        r = ax * inv
        if SIGNED:
            q = M._round_to_int(tl.minimum(tl.sqrt(r) * 127.0, 127.0))
            tl.store(q_ptr + offs, tl.where(x < 0.0, -q, q).to(tl.int8), mask=mask)
        else:
            q = M._round_to_int(tl.minimum(tl.sqrt(tl.sqrt(r)) * 255.0, 255.0))
            tl.store(q_ptr + offs, q.to(tl.uint8), mask=mask)
        tl.store(scale_ptr, tl.where(normal, a, 0.0))
    M._store_codes = _store_codes
if variant == "all":
    # multi_tensor_adam._adam_math for AdamW (eps after the bias correction) with approximate sqrt and division
    @triton.jit
    def _adam_math(x, d, m, v, vmax, lr, b1, b2, omb1, omb2, eps, wd, step_size, sqrt_bc2,
                   EPS_TORCH: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                   INTERPRET: tl.constexpr):
        m, v, vmax = M._moments(x, d, m, v, vmax, b1, b2, omb1, omb2, wd, DECOUPLED, AMSGRAD)
        if DECOUPLED:
            x = x * wd
        vd = v
        denom = tl.sqrt(vd) / sqrt_bc2 + eps
        x = x - step_size * (m / denom)
        return x, m, v, vmax
    M._adam_math = _adam_math

torch.manual_seed(0)
shapes = [(2048, 8192)] * 48 + [(2048, 2048)] * 48
params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
n = sum(p.numel() for p in params)
opt = also_fused.AdamW(params, lr=1e-4, state_precision="int8")
for _ in range(3):
    opt.step()
big = torch.randn(n, device="cuda")
dst = torch.empty_like(big)


def timed(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


copy_ms = timed(lambda: dst.copy_(big))
step_ms = timed(opt.step)
copy_bw = 2 * 4 * n / copy_ms / 1e9
step_bytes = n * 16 + (n // 1024) * 16
print(json.dumps(dict(variant=variant, n=n, step_ms=step_ms, copy_TBps=copy_bw,
                      pct_copy=step_bytes / step_ms / 1e9 / copy_bw * 100, device=torch.cuda.get_device_name(),
                      torch=torch.__version__, triton=triton.__version__)))
