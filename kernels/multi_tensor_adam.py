"""One-launch multi-tensor Adam/AdamW step (Triton) for any number of tensors of one device and dtype.

Per element, with d = grad_scale * grad (negated when maximize) and x the source value:

    also  : d += wd*x; m = b1*m + (1-b1)*d; v = b2*v + (1-b2)*d^2;  x -= lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+eps)
    torch : same moments;                                           x -= lr/(1-b1^t) * m/(sqrt(v)/sqrt(1-b2^t)+eps)

(amsgrad: v in the denominator is replaced by vmax = max(vmax, v); decoupled weight decay: x *= 1-lr*wd
instead of the L2 term). ``adam_step`` takes the update as every path does (``also_fused.update_spec``);
it keeps the device tables (tensor addresses, per-program chunks) in a caller-owned dict, so that a
call whose tensors did not move issues one kernel launch and nothing else.

This module imports torch, triton, its sibling ``launch`` and ``staging``, and the package's contract
modules (``update_spec``, ``storage``, ``error_bits``), which import nothing from the kernels.
"""
from __future__ import annotations

import functools
import math
import operator
from itertools import chain
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._cuda import raw_stream
from ..error_bits import REPORTED
from ..storage import QUANT_BLOCK, QUANT_M_BITS, QUANT_V_BITS, code_constants, dense_like, quant_blocks
from ..rounding import CANONICAL_NAN as _CANONICAL_NAN, CANONICAL_NAN_F16 as _CANONICAL_NAN_F16
from ..rounding import MIX_A as _MIX_A, MIX_B as _MIX_B
from ..update_spec import AdamSpec, AdamTensors, GradScaling, keyword_form
from .launch import Launcher
from .staging import PinnedUploader

__all__ = ["adam_step", "multi_tensor_adam_", "hyper_table", "hyper_rows_float64", "KERNEL_CONFIG", "HYPER_COLS",
           "MAX_LR_ARGS"]

# Columns of the hyper-parameter table, one row per param group (float32; ``hyper_rows_float64`` writes them)
HYPER_COLUMNS = ("lr", "beta1", "beta2", "eps", "weight_decay", "one_minus_beta1", "one_minus_beta2", "log_beta1",
                 "log_beta2", "decay_factor")
HYPER_COLS = len(HYPER_COLUMNS)
(H_LR, H_BETA1, H_BETA2, H_EPS, H_WEIGHT_DECAY, H_ONE_MINUS_BETA1, H_ONE_MINUS_BETA2, H_LOG_BETA1, H_LOG_BETA2,
 H_DECAY_FACTOR) = (tl.constexpr(c) for c in range(HYPER_COLS))
# at most this many hyper rows may take lr and the decay factor as launch arguments (``lr_args``)
MAX_LR_ARGS = 4


def hyper_table(rows: Sequence[Sequence[float]], device: Any = "cpu") -> torch.Tensor:
    """float32 [len(rows), 10] table from (lr, beta1, beta2, eps, weight_decay) rows.

    1 - beta, log(beta) and the decoupled decay factor 1 - lr*wd are computed here in float64:
    rounding beta to float32 first would move 1 - beta2 (and the bias correction) by about 1e-5
    relative for beta2 = 0.999, and 1 - lr*wd in float32 loses most digits of lr*wd.
    """
    return torch.tensor(hyper_rows_float64(rows), dtype=torch.float32, device=device).reshape(len(rows), HYPER_COLS)


def hyper_rows_float64(rows: Sequence[Sequence[float]]) -> List[tuple]:
    """The rows of ``hyper_table`` as Python floats (float64, in the order of HYPER_COLUMNS), before rounding
    to float32."""
    return [(lr, b1, b2, eps, wd, 1.0 - b1, 1.0 - b2, math.log(b1) if b1 > 0 else -math.inf,
             math.log(b2) if b2 > 0 else -math.inf, 1.0 - lr * wd) for lr, b1, b2, eps, wd in rows]

# Columns of the per-tensor metadata table (int64, one 128-byte row per tensor): on the host, and as the
# kernel's constexprs
(_SRC, _DST, _EXP_AVG, _EXP_AVG_SQ, _MAX_EXP_AVG_SQ, _SAVE_SRC, _SAVE_GRAD, _EXTRAP, _STEP, _NUMEL, _HROW, _PRIOR,
 _M_SCALE, _V_SCALE, _SEED) = range(15)
(COL_SRC, COL_DST, COL_EXP_AVG, COL_EXP_AVG_SQ, COL_MAX_EXP_AVG_SQ, COL_SAVE_SRC, COL_SAVE_GRAD, COL_EXTRAP, COL_STEP,
 COL_NUMEL, COL_HYPER_ROW, COL_PRIOR, COL_M_SCALE, COL_V_SCALE, COL_SEED) = (tl.constexpr(c) for c in range(15))
_META_COLS = 16
# columns that may hold the user's parameters, whose storage can change behind the optimizer's back
_PARAM_COLS = (_SRC, _DST, _SAVE_SRC, _EXTRAP)

# (BLOCK elements per loop iteration, iterations per program, num_warps, PVEC: 0 or the max contiguous
# param-dtype elements per access), keyed by the param element size. Chosen by a sweep on an H100
# (docs/performance.md): one 1024-element block per program beat 2 to 32 blocks per program.
KERNEL_CONFIG: Dict[int, tuple] = {4: (1024, 1, 4, 0), 2: (1024, 1, 4, 4)}
# where the moments are stored narrower than float32, keyed by (param, moment) element sizes: with every
# tensor in 2 bytes, 16-byte accesses (PVEC 8); chosen by ``benchmarks/state_precision/bench_state_precision.py --sweep`` on an H200
# (with narrow moments a program covering several blocks keeps more bytes in flight per thread)
# 8-bit moments: a program covers 16 blocks in a software-pipelined loop (PIPELINE_STAGES)
STATE_CONFIG: Dict[Tuple[int, int], tuple] = {
    (2, 2): (1024, 8, 4, 8), (4, 2): (1024, 4, 4, 0), (2, 1): (1024, 16, 4, 8), (4, 1): (1024, 16, 4, 0)}
# stages of the software pipeline over a program's blocks (1: none): the loads of the next blocks go out
# (through shared memory) while a block is computed. The 8-bit codes' decoding and encoding make their
# blocks long enough to compute that, without it, too few loads are in flight (bench_state_precision.py --sweep)
PIPELINE_STAGES: Dict[Tuple[int, int], int] = {(2, 1): 3, (4, 1): 3}


def kernel_config(param_size: int, moment_size: int) -> tuple:
    """(BLOCK, iterations, num_warps, PVEC) of a launch over params and moments of these element sizes."""
    return STATE_CONFIG.get((param_size, moment_size), KERNEL_CONFIG[param_size])


def pipeline_stages(param_size: int, moment_size: int) -> int:
    """Software-pipeline stages of the loop over a program's blocks (1: a plain loop)."""
    return PIPELINE_STAGES.get((param_size, moment_size), 1)

_REPORTED = tl.constexpr(REPORTED)
MIX_A, MIX_B, CANONICAL_NAN = tl.constexpr(_MIX_A), tl.constexpr(_MIX_B), tl.constexpr(_CANONICAL_NAN)
CANONICAL_NAN_F16 = tl.constexpr(_CANONICAL_NAN_F16)
# the 8-bit codes' constants (storage.code_constants): smallest scale field, zero offset, shift,
# rounding half, largest code; m's then v's
M_MIN_FIELD, M_OFFSET, M_SHIFT, M_HALF, M_TOP = (tl.constexpr(c) for c in code_constants(QUANT_M_BITS))
V_MIN_FIELD, V_OFFSET, V_SHIFT, V_HALF, V_TOP = (tl.constexpr(c) for c in code_constants(QUANT_V_BITS))
_SIGN_BIT = tl.constexpr(-(2 ** 31))

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _one_minus_pow(log_beta, t, INTERPRET: tl.constexpr):
    # 1 - beta**t computed as -expm1(t*log(beta)): no cancellation when beta**t is close to 1.
    if INTERPRET:
        lg = t * log_beta
        u = tl.exp(lg)
        lu = tl.log(tl.maximum(u, 1e-30))
        lu = tl.where(lu == 0.0, 1.0, lu)
        em1 = tl.where(u == 1.0, lg, (u - 1.0) * lg / lu)  # Kahan's expm1
        em1 = tl.where(u < 0.5, u - 1.0, em1)
        res = -em1
    else:
        res = -libdevice.expm1(t * log_beta)
    return res


@triton.jit
def _step_scalars(lr, log_b1, log_b2, t, EPS_TORCH: tl.constexpr, INTERPRET: tl.constexpr):
    bc1 = _one_minus_pow(log_b1, t, INTERPRET)
    bc2 = _one_minus_pow(log_b2, t, INTERPRET)
    if EPS_TORCH:
        step_size = tl.div_rn(lr, bc1)
        sqrt_bc2 = tl.sqrt_rn(bc2)
    else:
        step_size = lr * tl.sqrt_rn(bc2) / bc1
        sqrt_bc2 = bc2 * 0.0 + 1.0  # unused in this mode
    return step_size, sqrt_bc2, _reciprocal(sqrt_bc2, INTERPRET)


@triton.jit
def _reciprocal(b, INTERPRET: tl.constexpr):
    # the reciprocal that div.rn's fast path refines from the approximate one, for _sqrt_div
    if INTERPRET:
        return 1.0 / b
    y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [b], dtype=tl.float32, is_pure=True, pack=1)
    return tl.fma(y, tl.fma(y, -b, 1.0), y)


@triton.jit
def _to_storage(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    # float32 -> DTYPE rounded to nearest even. Triton's CPU interpreter truncates float32 -> bfloat16, so
    # there the rounding is done on the bits first (the cast of the rounded value is then exact).
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _mix32(h):
    # rounding.mix32 on uint32 (products wrap modulo 2^32 as the reference's masked int64 ones do)
    h = h ^ (h >> 16)
    h = h * MIX_A
    h = h ^ (h >> 15)
    h = h * MIX_B
    return h ^ (h >> 16)


@triton.jit
def _stream_key(seed, t):
    # rounding.stream_key of a tensor's seed (uint32) and a float32 step count
    return _mix32(seed ^ _mix32(t.to(tl.uint32)))


@triton.jit
def _stochastic_bf16(x, key, index):
    # rounding.stochastic_round_bf16: 16 random bits of (key, element index) added to x's bits, the upper half kept
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    noise = _mix32(_mix32(lo ^ key) ^ hi) & 0xFFFF
    # the upper half of the sum is the bfloat16 pattern itself (no conversion, which could flush subnormals);
    # NaN becomes the canonical 0x7FC0, as torch converts it
    upper = ((x.to(tl.uint32, bitcast=True) + noise) >> 16).to(tl.uint16)
    upper = tl.where(x != x, CANONICAL_NAN, upper).to(tl.uint16)
    return upper.to(tl.bfloat16, bitcast=True)


@triton.jit
def _stochastic_f16(x, key, index):
    # rounding.stochastic_round_fp16: |x| between float16 neighbours lo and lo + ulp, away from zero when 16
    # random bits plus the first 16 bits of (|x| - lo) / ulp reach 2^16; every float32 step exact
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    noise = (_mix32(_mix32(lo ^ key) ^ hi) & 0xFFFF).to(tl.int32)
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    magnitude = bits & 0x7FFFFFFF
    exponent = (magnitude >> 23).to(tl.int32)
    special = exponent == 255  # inf and NaN
    k = tl.maximum(exponent, 113)  # float32's exponent field of 2^-14, float16's smallest normal
    inverse_ulp = ((264 - k) << 23).to(tl.float32, bitcast=True)
    ulp = ((k - 10) << 23).to(tl.float32, bitcast=True)
    q = tl.where(special, 0.0, magnitude.to(tl.float32, bitcast=True) * inverse_ulp)
    q_low = tl.floor(q)
    fraction = tl.floor((q - q_low) * 65536.0).to(tl.int32)
    rounded = (q_low + ((noise + fraction) >= 65536).to(tl.float32)) * ulp
    signed = (rounded.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    out = tl.where(special, x, signed).to(tl.float16).to(tl.uint16, bitcast=True)
    out = tl.where(x != x, CANONICAL_NAN_F16, out).to(tl.uint16)
    return out.to(tl.float16, bitcast=True)


@triton.jit
def _stochastic_round(x, key, index, DTYPE: tl.constexpr):
    if DTYPE == tl.float16:
        out = _stochastic_f16(x, key, index)
    else:
        out = _stochastic_bf16(x, key, index)
    return out


SQRT_FAST_MIN = tl.constexpr(2.0 ** -101)  # the smallest float32 for which tl.sqrt_rn takes its fast path


@triton.jit
def _sqrt_rn_fast(x):
    # tl.sqrt_rn's fast path, bitwise, for SQRT_FAST_MIN <= x <= float32's max: an approximate reciprocal
    # root and one Newton step with fma
    y = libdevice.rsqrt(x)
    s = x * y
    return tl.fma(tl.fma(-s, s, x), y * 0.5, s)


@triton.jit
def _sqrt_rn_positive(x):
    # tl.sqrt_rn's bits for 0 < x < inf without its per-element branch to a slow path: below SQRT_FAST_MIN
    # the fast path on x * 2^64, scaled back by 2^-32 (exact powers of 2, as the slow path scales)
    small = x < SQRT_FAST_MIN
    r = _sqrt_rn_fast(tl.where(small, x * 18446744073709551616.0, x))
    return tl.where(small, r * 2.3283064365386963e-10, r)


@triton.jit
def _sqrt_rn(x, INTERPRET: tl.constexpr):
    # tl.sqrt_rn for x >= 0 (inf and NaN too), bitwise: 0, inf and NaN (quietened) as the slow path returns
    # them. Checked against tl.sqrt_rn on every non-negative float32 (tests/test_kernel_multi_tensor_adam.py).
    # The interpreter's reciprocal root is not the GPU's: there tl.sqrt_rn itself.
    if INTERPRET:
        return tl.sqrt_rn(x)
    r = _sqrt_rn_positive(x)
    return tl.where(x == 0.0, x, tl.where((x != x) | (x == float("inf")), x + 1.0, r))


@triton.jit
def _sqrt_div(x, b, y, INTERPRET: tl.constexpr):
    # tl.div_rn(tl.sqrt_rn(x), b) for x >= 0 (inf and NaN too) and a per-program divisor b in [2^-27, 1]
    # with y = _reciprocal(b): div.rn's fast path (quotient, remainder, correction) without its
    # per-element range check and slow-path branch, which a root (2^-75 < root < 2^64) over such a b
    # never takes; 0 and inf pass through as both divisions return them, NaN as a NaN. Checked against
    # tl.div_rn(tl.sqrt_rn(x), b) on every non-negative float32 (tests/test_kernel_multi_tensor_adam.py).
    if INTERPRET:
        return tl.div_rn(tl.sqrt_rn(x), b)
    r = _sqrt_rn_positive(x)
    q = tl.fma(r, y, 0.0)
    q = tl.fma(y, tl.fma(q, -b, r), q)
    # 0 < x < inf, on the bits (x >= 0 or NaN here)
    return tl.where((x.to(tl.uint32, bitcast=True) - 1) < 0x7F7FFFFF, q, x)


@triton.jit
def _as_float(bits):
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dequantize(q_ptr, scale_ptr, offs, mask, SIGNED: tl.constexpr):
    # 8-bit codes -> float32, as functional.dequantize_moment: |x| = float(bits(o) + c << SHIFT) - o with
    # bits(o) = bits(s) - OFFSET for the block's power-of-two scale s; m's sign from code bit 7
    offset = M_OFFSET if SIGNED else V_OFFSET
    shift = M_SHIFT if SIGNED else V_SHIFT
    o_bits = tl.load(scale_ptr).to(tl.int32, bitcast=True) - offset
    q = tl.load(q_ptr + offs, mask=mask).to(tl.int32)  # int8 m codes sign-extend: bit 31 is the sign bit
    if SIGNED:
        mag = _as_float(((q & 0x7F) << shift) + o_bits) - _as_float(o_bits)
        x = _as_float(mag.to(tl.int32, bitcast=True) | (q & _SIGN_BIT))
    else:
        x = _as_float((q << shift) + o_bits) - _as_float(o_bits)
    return x


@triton.jit
def _store_codes(x, ax, a, q_ptr, scale_ptr, offs, mask, SIGNED: tl.constexpr):
    # float32 -> 8-bit codes given the block's max |x| = a, and the scale, as functional.quantize_moment_
    min_field = M_MIN_FIELD if SIGNED else V_MIN_FIELD
    offset = M_OFFSET if SIGNED else V_OFFSET
    half = M_HALF if SIGNED else V_HALF
    shift = M_SHIFT if SIGNED else V_SHIFT
    top = M_TOP if SIGNED else V_TOP
    field = tl.minimum(tl.maximum((a.to(tl.int32, bitcast=True) >> 23) + 1, min_field), 254)
    o_bits = (field << 23) - offset
    c = tl.minimum(((ax + _as_float(o_bits)).to(tl.int32, bitcast=True) + (half - o_bits)) >> shift, top)
    if SIGNED:
        c = c | ((x.to(tl.int32, bitcast=True) >> 24) & 0x80)
        tl.store(q_ptr + offs, c.to(tl.int8), mask=mask)
    else:
        tl.store(q_ptr + offs, c.to(tl.uint8), mask=mask)
    tl.store(scale_ptr, _as_float(field << 23))


@triton.jit
def _quantize_store(m, v, m_ptr, v_ptr, m_scale_ptr, v_scale_ptr, offs, mask, MASKED: tl.constexpr):
    # both moments of one block: the two block maxima come from one reduction (one round through
    # shared memory instead of two)
    am = tl.abs(m)
    av = tl.abs(v)
    if MASKED:
        am = tl.where(mask, am, 0.0)
        av = tl.where(mask, av, 0.0)
    a_m, a_v = tl.split(tl.max(tl.join(am, av), axis=0))
    _store_codes(m, am, a_m, m_ptr, m_scale_ptr, offs, mask, True)
    _store_codes(v, av, a_v, v_ptr, v_scale_ptr, offs, mask, False)


@triton.jit
def _moments(x, d, m, v, vmax, b1, b2, omb1, omb2, wd, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr):
    if not DECOUPLED:
        d = d + wd * x
    # m <- lerp(m, d, 1 - b1), evaluated as torch.lerp does (the branch is the same for every element)
    if omb1 < 0.5:
        m = m + omb1 * (d - m)
    else:
        m = d - (d - m) * (1.0 - omb1)
    v = b2 * v + omb2 * (d * d)
    if AMSGRAD:
        vmax = tl.maximum(vmax, v)
    return m, v, vmax


@triton.jit
def _adam_math(x, d, m, v, vmax, lr, b1, b2, omb1, omb2, eps, wd, step_size, sqrt_bc2, recip_bc2,
               EPS_TORCH: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, INTERPRET: tl.constexpr):
    m, v, vmax = _moments(x, d, m, v, vmax, b1, b2, omb1, omb2, wd, DECOUPLED, AMSGRAD)
    if DECOUPLED:
        x = x * wd  # under DECOUPLED the caller passes the decay factor 1 - lr*wd as wd
    if AMSGRAD:
        vd = vmax
    else:
        vd = v
    # correctly rounded sqrt and division, in torch's order of operations, for parity with torch.optim
    if EPS_TORCH:
        denom = _sqrt_div(vd, sqrt_bc2, recip_bc2, INTERPRET) + eps
    else:
        denom = _sqrt_rn(vd, INTERPRET) + eps
    x = x - step_size * tl.div_rn(m, denom)
    return x, m, v, vmax


@triton.jit
def _adam_block(ptrs, off, block_index, end, scalars, MASKED: tl.constexpr, FLAGS: tl.constexpr):
    # The block of ``BLOCK`` elements at ``off`` of a chunk (``block_index``: its 8-bit scale within the chunk),
    # masked at ``end`` when MASKED. ptrs, scalars and FLAGS as the kernel packs them.
    src, dst, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, save_src, save_grad, extrap, prior, m_scale, v_scale = ptrs
    src, dst, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, save_src, save_grad, extrap, prior = (
        src + off, dst + off, grad + off, exp_avg + off, exp_avg_sq + off, max_exp_avg_sq + off, save_src + off,
        save_grad + off, extrap + off, prior + off)
    m_scale = m_scale + block_index
    v_scale = v_scale + block_index
    (gscale_a, gscale_b, gscale_p, lr, b1, b2, omb1, omb2, eps, wd, ss_a, ib_a, rb_a, ss_b, ib_b, rb_b, key_a,
     key_b) = scalars
    PDTYPE: tl.constexpr = FLAGS[0]
    MDTYPE: tl.constexpr = FLAGS[1]
    BLOCK: tl.constexpr = FLAGS[2]
    PVEC: tl.constexpr = FLAGS[3]
    MVEC: tl.constexpr = FLAGS[4]
    INTERPRET: tl.constexpr = FLAGS[5]
    EPS_TORCH: tl.constexpr = FLAGS[6]
    DECOUPLED: tl.constexpr = FLAGS[7]
    AMSGRAD: tl.constexpr = FLAGS[8]
    SAVE_SRC: tl.constexpr = FLAGS[9]
    SAVE_GRAD: tl.constexpr = FLAGS[10]
    EXTRAP: tl.constexpr = FLAGS[11]
    PRIOR: tl.constexpr = FLAGS[12]
    COMMIT: tl.constexpr = FLAGS[13]
    QUANT: tl.constexpr = FLAGS[14]
    SR: tl.constexpr = FLAGS[15]
    if MASKED:
        rem = (end - off).to(tl.int32)
    else:
        rem = BLOCK
    offs = tl.arange(0, BLOCK)
    if PVEC > 0:
        # Narrower param-dtype accesses keep every tensor in one register layout (no shared-memory shuffle
        # between the 16-byte bf16 and the 16-byte fp32 layouts).
        poffs = tl.max_contiguous(tl.arange(0, BLOCK), PVEC)
    else:
        poffs = offs
    if MVEC > 0:  # moments stored in 2 bytes: the same narrower accesses
        moffs = tl.max_contiguous(tl.arange(0, BLOCK), MVEC)
    else:
        moffs = offs
    if MASKED:
        mask = offs < rem
    else:
        mask = None
    x_raw = tl.load(src + poffs, mask=mask)
    g_raw = tl.load(grad + poffs, mask=mask)
    # the moments are read into float32 and rounded once when stored (MDTYPE below float32)
    if QUANT:  # 8-bit codes with one scale per block (this block)
        m = _dequantize(exp_avg, m_scale, moffs, mask, True)
        v = _dequantize(exp_avg_sq, v_scale, moffs, mask, False)
    else:
        m = tl.load(exp_avg + moffs, mask=mask).to(tl.float32)
        v = tl.load(exp_avg_sq + moffs, mask=mask).to(tl.float32)
    if AMSGRAD:
        vmax = tl.load(max_exp_avg_sq + moffs, mask=mask).to(tl.float32)
    else:
        vmax = v
    if PRIOR:
        # the moments first advance with the previous gradient (read before save_grad may overwrite it)
        p_raw = tl.load(prior + poffs, mask=mask)
        m, v, vmax = _moments(x_raw.to(tl.float32), p_raw.to(tl.float32) * gscale_p, m, v, vmax, b1, b2, omb1, omb2, wd,
                              DECOUPLED, AMSGRAD)
    if SAVE_SRC:
        tl.store(save_src + poffs, x_raw, mask=mask)
    if SAVE_GRAD:
        tl.store(save_grad + poffs, g_raw, mask=mask)
    g = g_raw.to(tl.float32)
    x, m, v, vmax = _adam_math(x_raw.to(tl.float32), g * gscale_a, m, v, vmax, lr, b1, b2, omb1, omb2, eps, wd, ss_a, ib_a, rb_a,
                               EPS_TORCH, DECOUPLED, AMSGRAD, INTERPRET)
    if SR:  # 16-bit params rounded stochastically (the element's index within its tensor picks its bits)
        x_out = _stochastic_round(x, key_a, off + poffs, PDTYPE)
    else:
        x_out = _to_storage(x, PDTYPE, INTERPRET)
    tl.store(dst + poffs, x_out, mask=mask)
    if EXTRAP:
        # The second step starts from the stored first iterate, as two separate calls would.
        y, m, v, vmax = _adam_math(x_out.to(tl.float32), g * gscale_b, m, v, vmax, lr, b1, b2, omb1, omb2, eps, wd, ss_b, ib_b, rb_b,
                                   EPS_TORCH, DECOUPLED, AMSGRAD, INTERPRET)
        if SR:
            tl.store(extrap + poffs, _stochastic_round(y, key_b, off + poffs, PDTYPE), mask=mask)
        else:
            tl.store(extrap + poffs, _to_storage(y, PDTYPE, INTERPRET), mask=mask)
    if COMMIT and QUANT:
        _quantize_store(m, v, exp_avg, exp_avg_sq, m_scale, v_scale, moffs, mask, MASKED)
    elif COMMIT:
        tl.store(exp_avg + moffs, _to_storage(m, MDTYPE, INTERPRET), mask=mask)
        tl.store(exp_avg_sq + moffs, _to_storage(v, MDTYPE, INTERPRET), mask=mask)
        if AMSGRAD:
            tl.store(max_exp_avg_sq + moffs, _to_storage(vmax, MDTYPE, INTERPRET), mask=mask)


@triton.jit
def _param_ptr(row, col: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    p = tl.load(row + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _pick(row, a0, a1, a2, a3, N: tl.constexpr):
    # the argument of hyper row ``row`` among the first N (rows are 0..N-1 when N > 0)
    v = a0
    if N > 1:
        v = tl.where(row == 1, a1, v)
    if N > 2:
        v = tl.where(row == 2, a2, v)
    if N > 3:
        v = tl.where(row == 3, a3, v)
    return v


@triton.jit
def _multi_tensor_adam_kernel(
    chunks_ptr, meta_ptr, grads_ptr, hyper_ptr, error_ptr, tickets_ptr, grad_scale, extrap_scale, prior_scale,
    lr0, lr1, lr2, lr3, df0, df1, df2, df3, report_ptr, scale_ptr, found_inf_ptr, N_LR_ARGS: tl.constexpr,
    PDTYPE: tl.constexpr, MDTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, PVEC: tl.constexpr,
    MVEC: tl.constexpr, META_COLS: tl.constexpr,
    EPS_TORCH: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    SAVE_SRC: tl.constexpr, SAVE_GRAD: tl.constexpr, EXTRAP: tl.constexpr,
    PRIOR: tl.constexpr, COMMIT: tl.constexpr, QUANT: tl.constexpr, HYPER_COLS: tl.constexpr,
    ALIGNED: tl.constexpr, INTERPRET: tl.constexpr, REPORT: tl.constexpr, STAGES: tl.constexpr, AMP: tl.constexpr,
    SR: tl.constexpr,
):
    # One program = one chunk (up to CHUNK elements) of one tensor; the chunk table packs
    # (tensor index << 32) | chunk index within that tensor.
    packed = tl.load(chunks_ptr + tl.program_id(0))
    tid = packed >> 32
    start = (packed & 0xFFFFFFFF) * CHUNK
    row = meta_ptr + tid * META_COLS

    src = _param_ptr(row, COL_SRC, PDTYPE, ALIGNED)
    dst = _param_ptr(row, COL_DST, PDTYPE, ALIGNED)
    if QUANT:
        exp_avg = _param_ptr(row, COL_EXP_AVG, tl.int8, ALIGNED)
        exp_avg_sq = _param_ptr(row, COL_EXP_AVG_SQ, tl.uint8, ALIGNED)
        # one scale per BLOCK (= the quantisation block) of the tensor
        m_scale = tl.load(row + COL_M_SCALE).to(tl.pointer_type(tl.float32)) + start // BLOCK
        v_scale = tl.load(row + COL_V_SCALE).to(tl.pointer_type(tl.float32)) + start // BLOCK
    else:
        exp_avg = _param_ptr(row, COL_EXP_AVG, MDTYPE, ALIGNED)
        exp_avg_sq = _param_ptr(row, COL_EXP_AVG_SQ, MDTYPE, ALIGNED)
        m_scale = tl.load(row + COL_STEP).to(tl.pointer_type(tl.float32))  # not read
        v_scale = m_scale
    grad = tl.load(grads_ptr + tid).to(tl.pointer_type(PDTYPE))
    if ALIGNED:
        grad = tl.multiple_of(grad, 16)
    max_exp_avg_sq = exp_avg_sq
    save_src = src
    save_grad = grad
    extrap = dst
    if AMSGRAD:
        max_exp_avg_sq = _param_ptr(row, COL_MAX_EXP_AVG_SQ, MDTYPE, ALIGNED)
    if SAVE_SRC:
        save_src = _param_ptr(row, COL_SAVE_SRC, PDTYPE, ALIGNED)
    if SAVE_GRAD:
        save_grad = _param_ptr(row, COL_SAVE_GRAD, PDTYPE, ALIGNED)
    if EXTRAP:
        extrap = _param_ptr(row, COL_EXTRAP, PDTYPE, ALIGNED)
    prior = grad
    if PRIOR:
        prior = _param_ptr(row, COL_PRIOR, PDTYPE, ALIGNED)
    step_ptr = tl.load(row + COL_STEP).to(tl.pointer_type(tl.float32))
    t_before = tl.load(step_ptr)
    numel = tl.load(row + COL_NUMEL)
    hrow = tl.load(row + COL_HYPER_ROW)
    hyper = hyper_ptr + hrow * HYPER_COLS
    # lr and the decoupled decay factor change every step under a schedule: with few param groups they
    # come as launch arguments, so the table only changes when the betas, eps or weight decay do
    if N_LR_ARGS > 0:
        lr = _pick(hrow, lr0, lr1, lr2, lr3, N_LR_ARGS)
    else:
        lr = tl.load(hyper + H_LR)
    b1 = tl.load(hyper + H_BETA1)
    b2 = tl.load(hyper + H_BETA2)
    eps = tl.load(hyper + H_EPS)
    wd = tl.load(hyper + H_WEIGHT_DECAY)
    omb1 = tl.load(hyper + H_ONE_MINUS_BETA1)
    omb2 = tl.load(hyper + H_ONE_MINUS_BETA2)
    log_b1 = tl.load(hyper + H_LOG_BETA1)
    log_b2 = tl.load(hyper + H_LOG_BETA2)
    if DECOUPLED:  # 1 - lr*wd, computed in float64 on the host
        if N_LR_ARGS > 0:
            wd = _pick(hrow, df0, df1, df2, df3, N_LR_ARGS)
        else:
            wd = tl.load(hyper + H_DECAY_FACTOR)

    gscale_a = grad_scale
    gscale_b = extrap_scale
    gscale_p = prior_scale
    if AMP:  # GradScaler's scale: 1/scale folded into the scales of this step's gradient (update_spec.GradScaling)
        inverse = tl.div_rn(1.0, tl.load(scale_ptr))
        gscale_a = gscale_a * inverse
        gscale_b = gscale_b * inverse
    if MAXIMIZE:
        gscale_a = -gscale_a
        gscale_b = -gscale_b
        gscale_p = -gscale_p
    # t of the last moment advance of this call: one per update, plus the prior's and the extrapolation's
    t = t_before + (1 + PRIOR + EXTRAP)
    if EXTRAP:
        ss_a, ib_a, rb_a = _step_scalars(lr, log_b1, log_b2, t - 1.0, EPS_TORCH, INTERPRET)
        ss_b, ib_b, rb_b = _step_scalars(lr, log_b1, log_b2, t, EPS_TORCH, INTERPRET)
    else:
        ss_a, ib_a, rb_a = _step_scalars(lr, log_b1, log_b2, t, EPS_TORCH, INTERPRET)
        ss_b = ss_a
        ib_b = ib_a
        rb_b = rb_a
    key_a = 0
    key_b = 0
    if SR:  # the stream keys of this call's stores: x1 at its own step count, y at the next
        seed = tl.load(row + COL_SEED).to(tl.uint32)
        key_a = _stream_key(seed, t - EXTRAP)
        key_b = _stream_key(seed, t)

    end = tl.minimum(start + CHUNK, numel)
    # A set error word (bad input found on the device) turns the update into a restore: the
    # destination takes the source where they differ, nothing else is written.
    word = tl.load(error_ptr)
    if REPORT:  # the step's report to the host (pinned memory; _input_errors.py), by one program
        if tl.program_id(0) == 0:
            tl.store(report_ptr, word | _REPORTED)
    rejected = word != 0
    if AMP:  # GradScaler found inf or NaN in the gradients: the step is skipped the same way
        rejected = rejected | (tl.load(found_inf_ptr) != 0.0)
    if rejected:
        if tl.load(row + COL_SRC) != tl.load(row + COL_DST):  # source and destination addresses differ
            for i in range(0, CHUNK // BLOCK):
                offs = start + i * BLOCK + tl.arange(0, BLOCK)
                tl.store(dst + offs, tl.load(src + offs, mask=offs < end), mask=offs < end)
    else:
        # what every block of the chunk reads: its tensors' pointers, the step's scalars, the variant
        ptrs = (src, dst, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, save_src, save_grad, extrap, prior, m_scale,
                v_scale)
        scalars = (gscale_a, gscale_b, gscale_p, lr, b1, b2, omb1, omb2, eps, wd, ss_a, ib_a, rb_a, ss_b, ib_b, rb_b,
                   key_a, key_b)
        FLAGS: tl.constexpr = (PDTYPE, MDTYPE, BLOCK, PVEC, MVEC, INTERPRET, EPS_TORCH, DECOUPLED, AMSGRAD, SAVE_SRC,
                               SAVE_GRAD, EXTRAP, PRIOR, COMMIT, QUANT, SR)
        if STAGES > 1 and not INTERPRET:
            # the full blocks in a software-pipelined loop (their loads issued stages ahead), then the tail
            n_full = (end - start) // BLOCK
            for i in tl.range(0, n_full, num_stages=STAGES):
                _adam_block(ptrs, start + i * BLOCK, i, end, scalars, False, FLAGS)
            off = start + n_full * BLOCK
            if off < end:
                _adam_block(ptrs, off, n_full, end, scalars, True, FLAGS)
        else:
            # Full blocks without a mask (a mask built from a run-time length blocks 16-byte accesses), then the tail.
            for i in range(0, CHUNK // BLOCK):
                off = start + i * BLOCK
                if off + BLOCK <= end:
                    _adam_block(ptrs, off, i, end, scalars, False, FLAGS)
                elif off < end:
                    _adam_block(ptrs, off, i, end, scalars, True, FLAGS)
        if COMMIT:
            # The step count moves once every program of this tensor has read it: the program that
            # draws the last ticket writes it and resets the ticket for the next launch.
            n_chunks = tl.maximum(tl.cdiv(numel, CHUNK), 1)
            last = n_chunks == 1
            if not last:
                last = tl.atomic_add(tickets_ptr + tid, 1) == n_chunks - 1
            if last:
                tl.store(step_ptr, t)
                if n_chunks > 1:
                    tl.atomic_xchg(tickets_ptr + tid, 0)


_data_ptr = torch.Tensor.data_ptr


def _or_all(ptrs: Sequence[int]) -> int:
    return functools.reduce(operator.or_, ptrs, 0)


def _build_tables(lists: Dict[int, Sequence[torch.Tensor]], sources: Sequence[torch.Tensor],
                  hyper_rows: Sequence[int], chunk: int, device: torch.device, seeds: Optional[Sequence[int]] = None):
    n = len(sources)
    meta = torch.zeros(n, _META_COLS, dtype=torch.int64)
    for col, lst in lists.items():
        meta[:, col] = torch.tensor([t.data_ptr() for t in lst], dtype=torch.int64)
    if seeds is not None:
        meta[:, _SEED] = torch.tensor(list(seeds), dtype=torch.int64)
    numels = [t.numel() for t in sources]
    meta[:, _NUMEL] = torch.tensor(numels, dtype=torch.int64)
    meta[:, _HROW] = torch.tensor(list(hyper_rows), dtype=torch.int64)
    # an empty tensor still gets one program: it advances the step count
    counts = torch.tensor([max(1, (ne + chunk - 1) // chunk) for ne in numels], dtype=torch.int64)
    total = int(counts.sum())
    tid = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    within = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(first, counts)
    chunks = (tid << 32) | within
    if device.type == "cuda":
        meta, chunks = meta.pin_memory(), chunks.pin_memory()
    tickets = torch.zeros(n, dtype=torch.int32, device=device)
    return meta.to(device, non_blocking=True), chunks.to(device, non_blocking=True), total, tickets



def adam_step(tensors: AdamTensors, grads: Sequence[torch.Tensor], hyper: torch.Tensor, spec: AdamSpec, *,
              cache: Optional[Dict[str, Any]] = None, static_lists: bool = False,
              error_word: Optional[torch.Tensor] = None, lr_args: Optional[Sequence[Tuple[float, float]]] = None,
              report_out: Optional[torch.Tensor] = None, scaling: Optional[GradScaling] = None) -> None:
    """The update ``functional.adam_step`` states, for every tensor in one kernel launch.

    Hyper-parameters come from row ``hyper_rows[i]`` of ``hyper = hyper_table(rows)`` (a device tensor);
    ``steps[i]`` are 0-d float32 device tensors, which the kernel advances itself when ``commit_state``
    (so a step needs no separate launch for them). ``error_word`` (0-d int32 on the device): where it
    is non-zero the call changes nothing but copying each source to its destination when they differ (a
    rejected step leaves the params at x). ``lr_args``: (lr, 1 - lr*weight_decay) of hyper rows 0..k-1
    (k <= MAX_LR_ARGS, every ``hyper_rows`` entry below k), rounded to float32 like the table and used
    instead of its lr and decay-factor columns, so that an lr schedule changes launch arguments, not the
    table. ``report_out`` (0-d int32, pinned host memory on a GPU): receives ``error_word | REPORTED``,
    the step's report to the host (``also_fused._input_errors``). ``cache`` (a dict kept by the caller)
    holds the device tables between calls. With ``static_lists`` the caller promises that when it passes
    the very same ``tensors`` lists again, the optimizer-owned tensors in them (moments, steps,
    prior/saved gradients) have not moved; only the param-like lists and the grads are then re-read,
    which keeps the host cost of a step low for hundreds of tensors. ``scaling``: GradScaler's scale and
    found_inf, read by the kernel on the device (no host sync).
    """
    sources = tensors.sources
    n = len(sources)
    if n == 0:
        return
    tensors.check(spec)
    if scaling is not None:
        scaling.check(tensors)
    n_lr = 0 if lr_args is None else len(lr_args)
    if n_lr > MAX_LR_ARGS:
        raise ValueError(f"lr_args takes at most {MAX_LR_ARGS} rows, got {n_lr}")
    quant = tensors.quantized
    hyper_rows = tensors.hyper_rows
    # stochastic rounding applies to 16-bit params (the seeds go into the tensor table)
    stochastic = spec.stochastic_rounding and sources[0].dtype in (torch.bfloat16, torch.float16)
    seeds = tensors.rounding_seeds if stochastic else None
    optional = {_MAX_EXP_AVG_SQ: tensors.max_exp_avg_sqs, _SAVE_SRC: tensors.save_sources_to,
                _SAVE_GRAD: tensors.save_grads_to, _EXTRAP: tensors.extrapolate_to, _PRIOR: tensors.prior_grads,
                _M_SCALE: tensors.exp_avg_scales, _V_SCALE: tensors.exp_avg_sq_scales}
    lists: Dict[int, Sequence[torch.Tensor]] = {_SRC: sources, _DST: tensors.destinations, _EXP_AVG: tensors.exp_avgs,
                                                _EXP_AVG_SQ: tensors.exp_avg_sqs, _STEP: tensors.steps}
    lists.update({col: lst for col, lst in optional.items() if lst is not None})
    device = sources[0].device
    dtype = sources[0].dtype

    if cache is None:
        cache = {}
    if static_lists:
        # the list objects stay referenced by the cache, so their ids cannot be reused by new lists; a
        # list passed in two roles (sources and destinations of an in-place update) is read once
        owned = tuple(map(id, chain(lists.values(), (hyper_rows, tensors.rounding_seeds))))
        param_lists = {id(lists[c]): lists[c] for c in _PARAM_COLS if c in lists}
        moving = tuple(map(_data_ptr, chain.from_iterable(param_lists.values())))
        key = ("static", n, dtype, device, owned, moving, hyper.data_ptr())
    else:
        key = (n, dtype, device, tuple(lists), tuple(map(_data_ptr, chain.from_iterable(lists.values()))),
               tuple(hyper_rows), hyper.data_ptr(), None if seeds is None else tuple(seeds))
    if cache.get("key") != key:
        _check_call(lists, grads, sources, tensors.destinations, hyper, hyper_rows, device, dtype)
        moment_size = tensors.exp_avgs[0].dtype.itemsize
        block, iters, num_warps, pvec = kernel_config(dtype.itemsize, moment_size)
        stages = pipeline_stages(dtype.itemsize, moment_size)
        chunk = block * iters
        if quant and block != QUANT_BLOCK:
            raise ValueError(f"8-bit moments need {QUANT_BLOCK}-element blocks, this configuration has {block}")
        meta, chunks, total, tickets = _build_tables(lists, sources, hyper_rows, chunk, device, seeds)
        ptrs = tuple(map(_data_ptr, chain.from_iterable(lists.values())))
        cache.clear()
        cache.update(key=key, meta=meta, chunks=chunks, total=total, tickets=tickets,
                     aligned=(_or_all(ptrs) & 15) == 0, grad_ptrs=None, grad_table=None, grad_aligned=False,
                     lists=(list(lists.values()), hyper_rows, tensors.rounding_seeds), launchers={}, prepared={}, max_row=max(hyper_rows),
                     config=(block, chunk, num_warps, pvec), stages=stages, uploads=PinnedUploader(), stream=None,
                     zero_word=None, one=None)
    if n_lr and cache["max_row"] >= n_lr:
        raise ValueError(f"lr_args has {n_lr} rows but a tensor uses hyper row {cache['max_row']}")

    grad_ptrs = tuple(map(_data_ptr, grads))
    if grad_ptrs != cache["grad_ptrs"]:
        if len(grad_ptrs) != n:
            raise ValueError("all tensor lists and hyper_rows must have the same length")
        stream = raw_stream(device)
        if cache["grad_table"] is None or stream != cache["stream"]:
            # rewritten in place below: ordered after the kernels that read it only on one stream
            cache["grad_table"] = torch.empty(n, dtype=torch.int64, device=device)
            cache["stream"] = stream
        cache["uploads"].upload(grad_ptrs, cache["grad_table"])
        cache["grad_ptrs"] = grad_ptrs
        cache["grad_aligned"] = (_or_all(grad_ptrs) & 15) == 0

    # what selects the compiled variant (the lists present are fixed while the tables are)
    flags = (spec.eps_mode, spec.decoupled_weight_decay, spec.maximize, spec.commit_state, n_lr,
             cache["aligned"] and cache["grad_aligned"], quant, report_out is not None, scaling is not None,
             stochastic)
    launcher = cache["launchers"].get(flags)
    if launcher is None:
        launcher = cache["launchers"][flags] = _launcher(spec, tensors, n_lr, flags[5], flags[7], flags[8], flags[9],
                                                         dtype, cache["config"], cache["stages"], device)
    if n_lr:
        lrs = [float(a[0]) for a in lr_args] + [0.0] * (MAX_LR_ARGS - n_lr)
        decays = [float(a[1]) for a in lr_args] + [1.0] * (MAX_LR_ARGS - n_lr)
    else:
        lrs, decays = _NO_LR_ARGS
    if error_word is None:  # a word no kernel sets, kept with the tables
        if cache["zero_word"] is None:
            cache["zero_word"] = torch.zeros((), dtype=torch.int32, device=device)
        error_word = cache["zero_word"]
    if cache["one"] is None:  # the scale of gradients that are not scaled, kept with the tables
        cache["one"] = torch.ones((), dtype=torch.float32, device=device)
    grad_scale, found_inf = cache["one"], cache["one"]
    if scaling is not None:
        # on the scaler's device, which params on several GPUs do not all share: copied (device to device)
        grad_scale = cache["one"] if scaling.scale is None else scaling.scale.to(device, non_blocking=True)
        found_inf = scaling.found_inf.to(device, non_blocking=True)
    scales = (float(spec.grad_scale), float(spec.extrapolation_scale), float(spec.prior_scale))
    args = (cache["chunks"], cache["meta"], cache["grad_table"], hyper, error_word, cache["tickets"], *scales, *lrs,
            *decays, error_word if report_out is None else report_out, grad_scale, found_inf)
    varying = _VARYING[n_lr]
    prepared = cache["prepared"].get((flags, scales))
    if prepared is None or not prepared(cache["total"], *[args[i] for i in varying]):
        launcher(cache["total"], device, *args)
        if len(cache["prepared"]) >= 16:  # scales that change every call: keep a few
            cache["prepared"].clear()
        cache["prepared"][(flags, scales)] = launcher.prepare(device, args, varying)


# the keyword form of earlier releases (see update_spec.keyword_form)
multi_tensor_adam_ = keyword_form(adam_step)


def _launcher(spec: AdamSpec, tensors: AdamTensors, n_lr: int, aligned: bool, report: bool, amp: bool,
              stochastic: bool, dtype: torch.dtype, config: tuple, stages: int, device: torch.device) -> Launcher:
    """The kernel's launcher for one variant: the spec's flags and the tensors' kinds as constexprs."""
    block, chunk, num_warps, pvec = config
    quant = tensors.quantized
    moment_dtype = tensors.exp_avgs[0].dtype
    return Launcher(_multi_tensor_adam_kernel, dict(
        N_LR_ARGS=n_lr, PDTYPE=_TL_DTYPES[dtype], MDTYPE=tl.int8 if quant else _TL_DTYPES[moment_dtype], BLOCK=block,
        CHUNK=chunk, PVEC=pvec, MVEC=(pvec or 4) if moment_dtype.itemsize < 4 else 0, META_COLS=_META_COLS, QUANT=quant,
        EPS_TORCH=spec.eps_mode == "torch", DECOUPLED=bool(spec.decoupled_weight_decay),
        AMSGRAD=tensors.max_exp_avg_sqs is not None, MAXIMIZE=bool(spec.maximize),
        SAVE_SRC=tensors.save_sources_to is not None, SAVE_GRAD=tensors.save_grads_to is not None,
        EXTRAP=tensors.extrapolate_to is not None, PRIOR=tensors.prior_grads is not None,
        COMMIT=bool(spec.commit_state), HYPER_COLS=HYPER_COLS, ALIGNED=aligned, INTERPRET=device.type != "cuda",
        REPORT=report, STAGES=stages, AMP=amp, SR=stochastic),
        # torch.optim rounds every elementwise op; without contraction the drop-ins follow it closely
        dict(num_warps=num_warps, enable_fp_fusion=spec.eps_mode != "torch"))


_NO_LR_ARGS = ([0.0] * MAX_LR_ARGS, [1.0] * MAX_LR_ARGS)
# per number of lr arguments, the launch arguments that may change while the cache's tables stay: the grad
# table (reallocated on another stream), the error word, the lr arguments in use, the report slot and
# GradScaler's tensors
_RUNTIME_ARGS = _multi_tensor_adam_kernel.arg_names[:_multi_tensor_adam_kernel.arg_names.index("N_LR_ARGS")]
_VARYING = [tuple(_RUNTIME_ARGS.index(name) for name in ("grads_ptr", "error_ptr", *(f"lr{i}" for i in range(n)),
                                                             *(f"df{i}" for i in range(n)), "report_ptr",
                                                             "scale_ptr", "found_inf_ptr"))
            for n in range(MAX_LR_ARGS + 1)]


def _check_call(lists: Dict[int, Sequence[torch.Tensor]], grads: Sequence[torch.Tensor],
                sources: Sequence[torch.Tensor], destinations: Sequence[torch.Tensor], hyper: torch.Tensor,
                hyper_rows: Sequence[int], device: torch.device, dtype: torch.dtype) -> None:
    """Refuse lists the kernel cannot run over (checked when the device tables are built)."""
    n = len(sources)
    lengths = {len(lst) for lst in lists.values()} | {len(grads), len(hyper_rows)}
    if lengths != {n}:
        raise ValueError("all tensor lists and hyper_rows must have the same length")
    if dtype not in _TL_DTYPES:
        raise TypeError(f"unsupported parameter dtype {dtype}")
    if (hyper.dtype != torch.float32 or hyper.device != device or not hyper.is_contiguous()
            or hyper.dim() != 2 or hyper.shape[1] != HYPER_COLS):
        raise ValueError(f"hyper must be a contiguous float32 [rows, {HYPER_COLS}] tensor on the parameters' "
                         f"device (see hyper_table)")
    for lst in lists.values():
        for t in lst:
            if t.device != device:
                raise ValueError("all tensors must be on one device")
    for t in chain(sources, destinations, grads, *(lists.get(c, ()) for c in (_SAVE_SRC, _SAVE_GRAD, _EXTRAP, _PRIOR))):
        if t.dtype != dtype:
            raise ValueError("parameter-like tensors must share one dtype")
    if _M_SCALE in lists:
        for col, code in ((_EXP_AVG, torch.int8), (_EXP_AVG_SQ, torch.uint8)):
            if any(t.dtype != code for t in lists[col]):
                raise ValueError("8-bit moments are int8 (exp_avg) and uint8 (exp_avg_sq) codes")
        for col in (_M_SCALE, _V_SCALE):
            for t, src in zip(lists[col], sources):
                if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != quant_blocks(src.numel()):
                    raise ValueError(f"each 8-bit moment needs a contiguous float32 scale per {QUANT_BLOCK} elements")
        return _check_layouts(lists, grads, sources)
    moment_dtype = lists[_EXP_AVG][0].dtype
    if moment_dtype not in _TL_DTYPES:
        raise TypeError(f"unsupported moment dtype {moment_dtype}")
    for t in chain(*(lists.get(c, ()) for c in (_EXP_AVG, _EXP_AVG_SQ, _MAX_EXP_AVG_SQ))):
        if t.dtype != moment_dtype:
            raise ValueError("the moments must share one dtype")
    _check_layouts(lists, grads, sources)


def _check_layouts(lists: Dict[int, Sequence[torch.Tensor]], grads: Sequence[torch.Tensor],
                   sources: Sequence[torch.Tensor]) -> None:
    for col, lst in chain(lists.items(), ((None, grads),)):
        if col in (_STEP, _M_SCALE, _V_SCALE):
            continue
        for t, src in zip(lst, sources):
            if not dense_like(t, src):
                raise ValueError("every tensor must be dense in the layout of its source (contiguous, or "
                                 "channels_last with the same strides): the update runs over flat storage")
