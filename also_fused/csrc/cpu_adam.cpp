// One pass over memory for every Adam-style update of also_fused on CPU tensors.
//
// Per tensor i with hyper-parameters (lr, beta1, beta2, eps, wd) and step count t:
//   d = s * g (+ wd * x unless decoupled);  m = lerp(m, d, 1 - beta1);  v = beta2 v + (1 - beta2) d^2
//   x_new = x - lr sqrt(bc2)/bc1 * m / (sqrt(v) + eps)        ("also": docs/algorithm.md sec. 3)
//   x_new = x - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)         ("torch": torch.optim.Adam)
// with bc_k = 1 - beta_k^t (AdamW first scales x by 1 - lr*wd), plus the optional prior advance,
// the optional extrapolation from x_new, the optional copies of x and g, and the step counts
// advanced by one per moment advance (when the state is committed), exactly as
// also_fused.functional.adam_update_reference states them. Each element is read once and written
// once; the arithmetic is float32 in the order of the reference's torch ops, never contracted into
// FMA (the build passes -ffp-contract=off), so every instruction-set variant gives the same bits.
// Moments stored below float32 (bf16, fp16, or 8-bit codes with one float32 scale per 1024
// elements, functional.quantize_moment_) are read into float32, carried through the call and
// rounded (encoded) once when written back, as the reference does.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(_MSC_VER)
#define ALSO_FUSED_INLINE __forceinline
#else
#define ALSO_FUSED_INLINE inline __attribute__((always_inline))
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ALSO_FUSED_X86 1
#endif

namespace {

constexpr int64_t kBlock = 256;      // elements per inner block (held in local arrays when staged)
constexpr int64_t kQuantBlock = 1024;  // elements per scale of 8-bit moments (kernels/layout.QUANT_BLOCK)
constexpr int64_t kChunk = 1 << 15;  // elements per parallel task (a multiple of kQuantBlock)

// how the moments are stored
enum MomentKind : int { kMomentF32 = 0, kMomentBF16 = 1, kMomentF16 = 2, kMomentCodes = 3 };

enum WeightDecay : int { kNoDecay = 0, kCoupled = 1, kDecoupled = 2 };

struct Apply {   // x_new = x (* decay) - step * m / denom at one step count
  float step;    // lr*sqrt(bc2)/bc1 ("also") or lr/bc1 ("torch")
  float bc2_sqrt;
};

struct Flags {
  bool has_prior, has_extrap, amsgrad, commit;
};

// The 8-bit codes of functional.quantize_moment_: per block a power-of-two scale s, per element a float
// of M mantissa bits counting up from o = s / 2^(2^E); (E, M) from kernels/layout.QUANT_M_BITS / QUANT_V_BITS.
struct Code {
  int32_t min_field, offset, shift, half, top;
};

inline Code make_code(double exp_bits, double mant_bits) {
  const int32_t e = static_cast<int32_t>(exp_bits), m = static_cast<int32_t>(mant_bits);
  const int32_t shift = 23 - m;
  return Code{(1 << e) + 1, (1 << e) << 23, shift, 1 << (shift - 1), (1 << (e + m)) - 1};
}

struct Job;
using RangeFn = void (*)(const Job&, const Flags&, int64_t, int64_t);

struct Job {
  const void* src;
  void* dst;
  const void* grad;
  const void* prior;   // nullable
  void* extrap;        // nullable
  void* save_src;      // nullable
  void* save_grad;     // nullable
  void* m;             // the moments as stored (float32, 16-bit or 8-bit codes: mkind)
  void* v;
  void* vmax;          // nullable
  float* m_scale;      // kMomentCodes: one scale per kQuantBlock elements
  float* v_scale;
  Code m_code, v_code;       // the two codes (kernels/layout.QUANT_M_BITS, QUANT_V_BITS)
  int mkind;
  int64_t n;
  float prior_scale, main_scale, extrap_scale;
  float wd, lerp_w, beta2, one_minus_beta2, eps, decay;
  Apply main_apply, extrap_apply;
  bool rounded;   // 16-bit params stored with stochastic rounding (docs/algorithm.md sec. 14)
  uint32_t key_main, key_extrap;  // the rounding streams' keys of x_new (step t) and y (t + 1)
  bool direct;    // the single in-memory loop applies (see run_range)
  bool in_place;  // destinations are the sources
  RangeFn fn;
};

// Loop-invariant coefficients, passed by value into the loops so that no store in a loop can be
// taken for a write to them.
struct Coef {
  float wd, lerp_coef, b2, c2, eps, decay;
  uint32_t lerp_mask;  // all ones: torch.lerp's |w| < 0.5 branch
  explicit Coef(const Job& j)
      : wd(j.wd), b2(j.beta2), c2(j.one_minus_beta2), eps(j.eps), decay(j.decay) {
    const bool small = std::abs(j.lerp_w) < 0.5f;
    lerp_coef = small ? j.lerp_w : j.lerp_w - 1.0f;
    lerp_mask = small ? 0xffffffffu : 0u;
  }
};

// Bitwise select: a where mask is all ones, b where it is zero (keeps the loops free of branches).
ALSO_FUSED_INLINE float blend(uint32_t mask, float a, float b) {
  uint32_t ua, ub;
  std::memcpy(&ua, &a, sizeof(float));
  std::memcpy(&ub, &b, sizeof(float));
  const uint32_t r = (ua & mask) | (ub & ~mask);
  float out;
  std::memcpy(&out, &r, sizeof(float));
  return out;
}

// d = s*g (+ wd*x); m <- lerp(m, d, w); v <- b2 v + c2 d d; vmax <- max(vmax, v) (NaN-propagating
// like torch.maximum). Returns the second moment the denominator uses.
template <bool AMS, int WD>
ALSO_FUSED_INLINE float moments(Coef c, float s, float g, float x, float& m, float& v, float& vm) {
  float d = g * s;
  if constexpr (WD == kCoupled) d = d + c.wd * x;
  // torch.lerp: m + w (d - m) for |w| < 0.5, else d - (d - m)(1 - w) = d + (w - 1)(d - m)
  m = blend(c.lerp_mask, m, d) + c.lerp_coef * (d - m);
  v = v * c.b2 + c.c2 * d * d;
  if constexpr (AMS) {
    const uint32_t take = 0u - static_cast<uint32_t>((v > vm) | (v != v));
    vm = blend(take, v, vm);
    return vm;
  }
  return v;
}

template <bool ALSO, int WD>
ALSO_FUSED_INLINE float step_to(Coef c, const Apply& a, float x, float m, float vv) {
  if constexpr (WD == kDecoupled) x = x * c.decay;
  float denom;
  if constexpr (ALSO) {
    denom = std::sqrt(vv) + c.eps;
  } else {
    denom = std::sqrt(vv) / a.bc2_sqrt + c.eps;
  }
  return x + (-a.step) * m / denom;  // addcdiv's order: x + (value * m) / denom
}

// The prior advance alone: moments from x, in place, no step.
template <bool AMS, int WD>
ALSO_FUSED_INLINE void prior_loop(Coef c, float s, const float* __restrict g, const float* __restrict x,
                                  float* __restrict m, float* __restrict v, float* __restrict vm, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    float mk = m[k], vk = v[k], vmk = AMS ? vm[k] : 0.0f;
    moments<AMS, WD>(c, s, g[k], x[k], mk, vk, vmk);
    m[k] = mk;
    v[k] = vk;
    if constexpr (AMS) vm[k] = vmk;
  }
}

// One advance (moments in place unless !COMMIT) and step from x into x_out; with EXTRAP (float32
// params: x_new needs no rounding) a second advance with s2 from x_new and a second step into y.
// INPLACE: x is read from x_out and x_in is not used, so that every pointer accessed is restrict.
template <bool AMS, bool ALSO, int WD, bool EXTRAP, bool INPLACE, bool COMMIT = true>
ALSO_FUSED_INLINE void step_loop(Coef c, float s, Apply a, float s2, Apply a2, const float* __restrict g,
                                 const float* __restrict x_in, float* __restrict x_out, float* __restrict m,
                                 float* __restrict v, float* __restrict vm, float* __restrict y, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    float mk = m[k], vk = v[k], vmk = AMS ? vm[k] : 0.0f;
    const float gk = g[k];
    const float xk = INPLACE ? x_out[k] : x_in[k];
    float vv = moments<AMS, WD>(c, s, gk, xk, mk, vk, vmk);
    const float x1 = step_to<ALSO, WD>(c, a, xk, mk, vv);
    x_out[k] = x1;
    if constexpr (EXTRAP) {
      vv = moments<AMS, WD>(c, s2, gk, x1, mk, vk, vmk);
      y[k] = step_to<ALSO, WD>(c, a2, x1, mk, vv);
    }
    if constexpr (COMMIT) {
      m[k] = mk;
      v[k] = vk;
      if constexpr (AMS) vm[k] = vmk;
    }
  }
}

template <typename P>
ALSO_FUSED_INLINE void to_float(const P* __restrict in, float* __restrict out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(in[k]);
}

template <typename P>
ALSO_FUSED_INLINE void from_float(const float* __restrict in, P* __restrict out, int64_t n) {
  if constexpr (std::is_same_v<P, float>) {
    std::memcpy(out, in, sizeof(float) * n);
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<P>(in[k]);
  }
}

// Stochastic rounding (docs/algorithm.md sec. 14, rounding.py): the same mixer, bits and rules, on uint32.
ALSO_FUSED_INLINE uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x1B873593u;
  return h ^ (h >> 16);
}

inline uint32_t stream_key(int64_t seed, double t) {
  return mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(static_cast<int64_t>(t))));
}

ALSO_FUSED_INLINE uint32_t rounding_bits(uint32_t key, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  return mix32(mix32(static_cast<uint32_t>(i) ^ key) ^ static_cast<uint32_t>(i >> 32)) & 0xFFFFu;
}

ALSO_FUSED_INLINE uint32_t word_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(float));
  return b;
}

ALSO_FUSED_INLINE float float_of_word(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof(float));
  return x;
}

// Elements base .. base + n - 1 of a tensor (its storage order) rounded stochastically: bfloat16 keeps the
// upper half of bits(x) + u; float16 rounds |x| away from its lower float16 neighbour when u plus the first
// 16 bits of the fraction between the neighbours reaches 2^16 (every float step exact). NaN: 0x7FC0 / 0x7E00.
inline void from_float_rounded(const float* in, c10::BFloat16* out, uint32_t key, int64_t base, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t b = word_of(in[k]);
    const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
    const uint16_t upper = nan ? 0x7FC0 : static_cast<uint16_t>((b + rounding_bits(key, base + k)) >> 16);
    out[k] = c10::BFloat16(upper, c10::BFloat16::from_bits());
  }
}

inline void from_float_rounded(const float* in, c10::Half* out, uint32_t key, int64_t base, int64_t n) {
  // on the bits (the same result as rounding.py's exact float steps), without branches: the float16 grid's
  // unit is 2^13 float32 patterns from 2^-14 up, and 2^-24 below
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t b = word_of(in[k]), sign = (b >> 16) & 0x8000u, magnitude = b & 0x7FFFFFFFu;
    const uint32_t exponent = magnitude >> 23, u = rounding_bits(key, base + k);
    // 2^-14 and up: 13 bits dropped, a carry of the sum runs into the exponent; 2^16 and up (field 143) is inf
    const uint32_t r = (magnitude & ~0x1FFFu) + (u + ((magnitude & 0x1FFFu) << 3) >= 65536u ? 0x2000u : 0u);
    const uint32_t field = r >> 23;
    const uint32_t normal = field >= 143 ? 0x7C00u : ((field - 112) << 10) | ((r >> 13) & 0x3FFu);
    // below 2^-14 (float32 fields 1..112): units of 2^-24, the significand shifted right by 126 - field
    const uint32_t clamped = exponent < 1 ? 1 : (exponent > 112 ? 112 : exponent);
    const uint32_t shift = 126 - clamped;  // 14 .. 125; the significand has 24 bits
    const uint32_t sig = (magnitude & 0x7FFFFFu) | 0x800000u, right = shift < 31 ? shift : 31;
    const uint32_t rest = sig & ((1u << right) - 1u);
    const uint32_t down = shift >= 16 ? (shift - 16 < 31 ? shift - 16 : 31) : 0, up = shift < 16 ? 16 - shift : 0;
    const uint32_t small = (sig >> right) + (u + ((rest >> down) << up) >= 65536u ? 1u : 0u);
    const uint32_t h = exponent >= 113 ? normal : (exponent == 0 ? 0u : small);
    out[k] = c10::Half(static_cast<uint16_t>(magnitude > 0x7F800000u ? 0x7E00u : (h | sign)), c10::Half::from_bits());
  }
}

template <typename P>
ALSO_FUSED_INLINE void store_param(const Job& j, const float* in, P* out, uint32_t key, int64_t off, int64_t n) {
  if constexpr (std::is_same_v<P, float>) {
    from_float(in, out, n);
  } else {
    if (j.rounded) {
      from_float_rounded(in, out, key, off, n);
    } else {
      from_float(in, out, n);
    }
  }
}

ALSO_FUSED_INLINE int32_t bits_of(float x) {
  int32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

ALSO_FUSED_INLINE float float_of(int32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// 8-bit codes of one block -> float32: |x| = float(bits(o) + c << (23 - M)) - o, m's sign from code bit 7.
ALSO_FUSED_INLINE void decode_block(const int8_t* __restrict qm, const uint8_t* __restrict qv, float sm, float sv,
                                    const Code& cm, const Code& cv, float* __restrict m, float* __restrict v,
                                    int64_t n) {
  const int32_t om = bits_of(sm) - cm.offset, ov = bits_of(sv) - cv.offset;
  const float fm = float_of(om), fv = float_of(ov);
  for (int64_t k = 0; k < n; ++k) {
    const int32_t q = qm[k];  // sign-extended: bit 31 is the code's sign bit
    const float mag = float_of(((q & 0x7F) << cm.shift) + om) - fm;
    m[k] = float_of(bits_of(mag) | (q & INT32_MIN));
    v[k] = float_of((static_cast<int32_t>(qv[k]) << cv.shift) + ov) - fv;
  }
}

// float32 -> 8-bit codes of one block; returns its scale s (the smallest power of two above max |x|, within
// the code's range): c = min((bits(|x| + o) - bits(o) + half) >> shift, top).
template <bool SIGNED>
ALSO_FUSED_INLINE float encode_block(const float* __restrict x, void* __restrict codes, const Code& code,
                                     int64_t n) {
  float a = 0.0f;
  for (int64_t k = 0; k < n; ++k) a = std::max(a, std::abs(x[k]));
  const int32_t field = std::clamp((bits_of(a) >> 23) + 1, code.min_field, int32_t{254});
  const int32_t ob = (field << 23) - code.offset;
  const float o = float_of(ob);
  for (int64_t k = 0; k < n; ++k) {
    int32_t c = std::min((bits_of(std::abs(x[k]) + o) - ob + code.half) >> code.shift, code.top);
    if constexpr (SIGNED) {
      c |= (bits_of(x[k]) >> 24) & 0x80;
      static_cast<int8_t*>(codes)[k] = static_cast<int8_t>(static_cast<uint8_t>(c));
    } else {
      static_cast<uint8_t*>(codes)[k] = static_cast<uint8_t>(c);
    }
  }
  return float_of(field << 23);
}

template <typename M>
ALSO_FUSED_INLINE void load_moment(const void* raw, int64_t off, float* out, int64_t n) {
  to_float(static_cast<const M*>(raw) + off, out, n);
}

// The staged path's moments: stored -> float32 arrays, and back (rounded to nearest or encoded).
ALSO_FUSED_INLINE void load_moments(const Job& j, bool ams, int64_t off, int64_t n, float* m, float* v, float* vm) {
  switch (j.mkind) {
    case kMomentBF16:
      load_moment<c10::BFloat16>(j.m, off, m, n);
      load_moment<c10::BFloat16>(j.v, off, v, n);
      if (ams) load_moment<c10::BFloat16>(j.vmax, off, vm, n);
      return;
    case kMomentF16:
      load_moment<c10::Half>(j.m, off, m, n);
      load_moment<c10::Half>(j.v, off, v, n);
      if (ams) load_moment<c10::Half>(j.vmax, off, vm, n);
      return;
    case kMomentCodes:
      decode_block(static_cast<const int8_t*>(j.m) + off, static_cast<const uint8_t*>(j.v) + off,
                   j.m_scale[off / kQuantBlock], j.v_scale[off / kQuantBlock], j.m_code, j.v_code, m, v, n);
      return;
    default:
      load_moment<float>(j.m, off, m, n);
      load_moment<float>(j.v, off, v, n);
      if (ams) load_moment<float>(j.vmax, off, vm, n);
  }
}

ALSO_FUSED_INLINE void store_moments(const Job& j, bool ams, int64_t off, int64_t n, const float* m, const float* v,
                                     const float* vm) {
  switch (j.mkind) {
    case kMomentBF16:
      from_float(m, static_cast<c10::BFloat16*>(j.m) + off, n);
      from_float(v, static_cast<c10::BFloat16*>(j.v) + off, n);
      if (ams) from_float(vm, static_cast<c10::BFloat16*>(j.vmax) + off, n);
      return;
    case kMomentF16:
      from_float(m, static_cast<c10::Half*>(j.m) + off, n);
      from_float(v, static_cast<c10::Half*>(j.v) + off, n);
      if (ams) from_float(vm, static_cast<c10::Half*>(j.vmax) + off, n);
      return;
    case kMomentCodes:
      j.m_scale[off / kQuantBlock] = encode_block<true>(m, static_cast<int8_t*>(j.m) + off, j.m_code, n);
      j.v_scale[off / kQuantBlock] = encode_block<false>(v, static_cast<uint8_t*>(j.v) + off, j.v_code, n);
      return;
    default:
      from_float(m, static_cast<float*>(j.m) + off, n);
      from_float(v, static_cast<float*>(j.v) + off, n);
      if (ams) from_float(vm, static_cast<float*>(j.vmax) + off, n);
  }
}

// Elements [begin, end) of one tensor, kBlock at a time. The direct path (float32 params,
// destinations equal to or apart from the sources, extrapolation targets apart from both) updates
// the tensors' memory in place in one loop. The staged path reads the inputs (16-bit
// ones converted) and the moments into local arrays, computes there, and only then stores: it
// takes any aliasing (e.g. the extrapolation target being the source, on the first optimistic
// step). Either way x is copied to save_src before anything is written, and g to save_grad after
// everything is read (save_grads_to may be prior_grads).
template <typename P, bool AMS, bool ALSO, int WD>
ALSO_FUSED_INLINE void run_range(const Job& j, const Flags& f, int64_t begin, int64_t end) {
  constexpr bool kF32 = std::is_same_v<P, float>;
  // 8-bit moments: one quantisation block at a time (tasks start on block boundaries)
  alignas(64) float xb[kQuantBlock], gb[kQuantBlock], pb[kQuantBlock], mb[kQuantBlock], vb[kQuantBlock],
      vmb[kQuantBlock], ob[kQuantBlock], yb[kQuantBlock];
  const Coef c(j);
  const int64_t block = j.mkind == kMomentCodes ? kQuantBlock : kBlock;
  for (int64_t off = begin; off < end; off += block) {
    const int64_t n = std::min(block, end - off);
    const P* src = static_cast<const P*>(j.src) + off;
    const P* grad = static_cast<const P*>(j.grad) + off;
    if (j.save_src != nullptr) std::memcpy(static_cast<P*>(j.save_src) + off, src, sizeof(P) * n);
    if constexpr (kF32) {
      if (j.direct) {
        float* m = static_cast<float*>(j.m) + off;
        float* v = static_cast<float*>(j.v) + off;
        float* vm = AMS ? static_cast<float*>(j.vmax) + off : nullptr;
        float* dst = static_cast<float*>(j.dst) + off;
        float* y = f.has_extrap ? static_cast<float*>(j.extrap) + off : nullptr;
        if (f.has_prior) prior_loop<AMS, WD>(c, j.prior_scale, static_cast<const float*>(j.prior) + off, src, m, v, vm, n);
        if (!f.commit) {  // a single update whose moments are not kept (neither prior nor extrapolation)
          if (j.in_place) {
            step_loop<AMS, ALSO, WD, false, true, false>(c, j.main_scale, j.main_apply, 0.0f, j.main_apply, grad,
                                                         nullptr, dst, m, v, vm, nullptr, n);
          } else {
            step_loop<AMS, ALSO, WD, false, false, false>(c, j.main_scale, j.main_apply, 0.0f, j.main_apply, grad,
                                                          src, dst, m, v, vm, nullptr, n);
          }
        } else if (f.has_extrap) {
          if (j.in_place) {
            step_loop<AMS, ALSO, WD, true, true>(c, j.main_scale, j.main_apply, j.extrap_scale, j.extrap_apply, grad,
                                                 nullptr, dst, m, v, vm, y, n);
          } else {
            step_loop<AMS, ALSO, WD, true, false>(c, j.main_scale, j.main_apply, j.extrap_scale, j.extrap_apply, grad,
                                                  src, dst, m, v, vm, y, n);
          }
        } else if (j.in_place) {
          step_loop<AMS, ALSO, WD, false, true>(c, j.main_scale, j.main_apply, 0.0f, j.main_apply, grad, nullptr, dst,
                                                m, v, vm, nullptr, n);
        } else {
          step_loop<AMS, ALSO, WD, false, false>(c, j.main_scale, j.main_apply, 0.0f, j.main_apply, grad, src, dst, m,
                                                 v, vm, nullptr, n);
        }
        if (j.save_grad != nullptr) std::memcpy(static_cast<P*>(j.save_grad) + off, grad, sizeof(P) * n);
        continue;
      }
    }
    const float* x;
    const float* g;
    if constexpr (kF32) {
      x = src;
      g = grad;
    } else {
      to_float(src, xb, n);
      to_float(grad, gb, n);
      x = xb;
      g = gb;
    }
    load_moments(j, AMS, off, n, mb, vb, vmb);
    if (f.has_prior) {
      const P* prior = static_cast<const P*>(j.prior) + off;
      const float* pg;
      if constexpr (kF32) {
        pg = prior;
      } else {
        to_float(prior, pb, n);
        pg = pb;
      }
      prior_loop<AMS, WD>(c, j.prior_scale, pg, x, mb, vb, vmb, n);
    }
    if (kF32 && f.has_extrap) {
      step_loop<AMS, ALSO, WD, true, false>(c, j.main_scale, j.main_apply, j.extrap_scale, j.extrap_apply, g, x, ob,
                                            mb, vb, vmb, yb, n);
      from_float(ob, static_cast<P*>(j.dst) + off, n);
    } else {
      step_loop<AMS, ALSO, WD, false, false>(c, j.main_scale, j.main_apply, 0.0f, j.main_apply, g, x, ob, mb, vb, vmb,
                                             nullptr, n);
      store_param(j, ob, static_cast<P*>(j.dst) + off, j.key_main, off, n);
      if (f.has_extrap) {
        // the extrapolation starts from x_new as stored, i.e. rounded to the param dtype
        to_float(static_cast<const P*>(j.dst) + off, xb, n);
        step_loop<AMS, ALSO, WD, false, false>(c, j.extrap_scale, j.extrap_apply, 0.0f, j.extrap_apply, g, xb, yb, mb,
                                               vb, vmb, nullptr, n);
      }
    }
    if (f.has_extrap) store_param(j, yb, static_cast<P*>(j.extrap) + off, j.key_extrap, off, n);
    if (f.commit) store_moments(j, AMS, off, n, mb, vb, vmb);
    if (j.save_grad != nullptr) std::memcpy(static_cast<P*>(j.save_grad) + off, grad, sizeof(P) * n);
  }
}

template <typename P, bool AMS, bool ALSO, int WD>
void range_baseline(const Job& j, const Flags& f, int64_t begin, int64_t end) {
  run_range<P, AMS, ALSO, WD>(j, f, begin, end);
}

#ifdef ALSO_FUSED_X86
template <typename P, bool AMS, bool ALSO, int WD>
__attribute__((target("avx2"))) void range_avx2(const Job& j, const Flags& f, int64_t begin, int64_t end) {
  run_range<P, AMS, ALSO, WD>(j, f, begin, end);
}
#endif

bool has_avx2() {
#ifdef ALSO_FUSED_X86
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
#else
  return false;
#endif
}

template <typename P, bool AMS, bool ALSO, int WD>
RangeFn pick_isa() {
#ifdef ALSO_FUSED_X86
  if (has_avx2()) return &range_avx2<P, AMS, ALSO, WD>;
#endif
  return &range_baseline<P, AMS, ALSO, WD>;
}

template <typename P, bool AMS, bool ALSO>
RangeFn pick_wd(int wd) {
  switch (wd) {
    case kNoDecay:
      return pick_isa<P, AMS, ALSO, kNoDecay>();
    case kCoupled:
      return pick_isa<P, AMS, ALSO, kCoupled>();
    default:
      return pick_isa<P, AMS, ALSO, kDecoupled>();
  }
}

template <typename P>
RangeFn pick(bool amsgrad, bool eps_also, int wd) {
  if (amsgrad) return eps_also ? pick_wd<P, true, true>(wd) : pick_wd<P, true, false>(wd);
  return eps_also ? pick_wd<P, false, true>(wd) : pick_wd<P, false, false>(wd);
}

RangeFn pick_for(at::ScalarType dtype, bool amsgrad, bool eps_also, int wd) {
  switch (dtype) {
    case at::kFloat:
      return pick<float>(amsgrad, eps_also, wd);
    case at::kBFloat16:
      return pick<c10::BFloat16>(amsgrad, eps_also, wd);
    default:
      return pick<c10::Half>(amsgrad, eps_also, wd);
  }
}

struct Task {
  int64_t job, begin, end;
};

void run_all(const std::vector<Job>& jobs, const Flags& f) {
  std::vector<Task> tasks;
  int64_t total = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(jobs.size()); ++i) {
    for (int64_t b = 0; b < jobs[i].n; b += kChunk) tasks.push_back(Task{i, b, std::min(b + kChunk, jobs[i].n)});
    total += jobs[i].n;
  }
  auto body = [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const Job& j = jobs[tasks[t].job];
      j.fn(j, f, tasks[t].begin, tasks[t].end);
    }
  };
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  if (n_tasks == 0) return;
  if (total < 2 * kChunk) {
    body(0, n_tasks);  // too small to pay for waking the thread pool
  } else {
    at::parallel_for(0, n_tasks, 1, body);
  }
}

// A CPU tensor of ``dtype`` that covers its storage densely in the same element order as ``like``
// (both contiguous, or equal strides in a dense layout such as channels_last): the update then runs
// over the flat storage of all of them together.
bool usable(const at::Tensor& t, at::ScalarType dtype, const at::Tensor& like) {
  if (!t.defined() || !t.device().is_cpu() || t.layout() != at::kStrided || t.scalar_type() != dtype ||
      t.sizes() != like.sizes() || t.is_conj() || t.is_neg()) {
    return false;
  }
  return (t.is_contiguous() && like.is_contiguous()) ||
         (t.strides() == like.strides() && t.is_non_overlapping_and_dense());
}

template <typename T>
bool list_ok(const std::vector<T>& list, size_t n) { return list.empty() || list.size() == n; }

struct Span {
  uintptr_t lo, hi;
};

Span span(const at::Tensor& t) {
  const auto lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return Span{lo, lo + static_cast<uintptr_t>(t.numel()) * t.element_size()};
}

bool apart(Span a, Span b) { return a.hi <= b.lo || b.hi <= a.lo; }

// Whether the single in-memory loop may run: no array it writes overlaps another array it
// touches (the destination may be the source itself).
bool direct_ok(const std::vector<Span>& written, const std::vector<Span>& read) {
  for (size_t a = 0; a < written.size(); ++a) {
    for (size_t b = a + 1; b < written.size(); ++b) {
      if (!apart(written[a], written[b])) return false;
    }
    for (const Span& r : read) {
      if (!apart(written[a], r)) return false;
    }
  }
  return true;
}

}  // namespace

// Returns false, having changed nothing, when the inputs are outside what this kernel handles
// (the caller then runs the reference); true when the update is done. Empty lists stand for None.
bool adam_update(const std::vector<at::Tensor>& sources, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                 const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& steps,
                 const std::vector<at::Tensor>& destinations, const std::vector<std::vector<double>>& hyper,
                 const std::vector<int64_t>& hyper_rows, bool eps_also, bool decoupled, bool maximize,
                 double grad_scale, const std::vector<at::Tensor>& save_sources_to,
                 const std::vector<at::Tensor>& save_grads_to, const std::vector<at::Tensor>& extrapolate_to,
                 double extrapolation_scale, const std::vector<at::Tensor>& prior_grads, double prior_scale,
                 bool commit_state, const std::vector<at::Tensor>& exp_avg_scales,
                 const std::vector<at::Tensor>& exp_avg_sq_scales, const std::vector<double>& quant_constants,
                 const std::vector<int64_t>& rounding_seeds) {
  const size_t count = sources.size();
  if (count == 0) return true;
  if (grads.size() != count || exp_avgs.size() != count || exp_avg_sqs.size() != count ||
      steps.size() != count || destinations.size() != count || hyper_rows.size() != count ||
      !list_ok(max_exp_avg_sqs, count) || !list_ok(save_sources_to, count) || !list_ok(save_grads_to, count) ||
      !list_ok(extrapolate_to, count) || !list_ok(prior_grads, count) || !list_ok(exp_avg_scales, count) ||
      exp_avg_scales.size() != exp_avg_sq_scales.size() || !list_ok(rounding_seeds, count)) {
    return false;
  }
  const bool codes = !exp_avg_scales.empty();
  if (codes && (!max_exp_avg_sqs.empty() || quant_constants.size() != 4)) return false;
  const at::ScalarType mdt = codes ? at::kChar : exp_avgs[0].scalar_type();
  const int mkind = codes ? kMomentCodes
                          : (mdt == at::kFloat ? kMomentF32
                                               : (mdt == at::kBFloat16 ? kMomentBF16
                                                                       : (mdt == at::kHalf ? kMomentF16 : -1)));
  if (mkind < 0) return false;
  const Flags flags{!prior_grads.empty(), !extrapolate_to.empty(), !max_exp_avg_sqs.empty(), commit_state};
  if (!commit_state && (flags.has_prior || flags.has_extrap)) return false;
  const at::ScalarType pdt = sources[0].scalar_type();
  if (pdt != at::kFloat && pdt != at::kBFloat16 && pdt != at::kHalf) return false;
  const int n_adv = 1 + (flags.has_prior ? 1 : 0) + (flags.has_extrap ? 1 : 0);
  const double sign = maximize ? -1.0 : 1.0;

  std::vector<Job> jobs;
  jobs.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& x = sources[i];
    const int64_t n = x.numel();
    if (!usable(x, pdt, x) || !usable(grads[i], pdt, x) || !usable(destinations[i], pdt, x) ||
        !usable(exp_avgs[i], mdt, x) || !usable(exp_avg_sqs[i], codes ? at::kByte : mdt, x) ||
        (flags.amsgrad && !usable(max_exp_avg_sqs[i], mdt, x)) ||
        (flags.has_prior && !usable(prior_grads[i], pdt, x)) ||
        (flags.has_extrap && !usable(extrapolate_to[i], pdt, x)) ||
        (!save_sources_to.empty() && !usable(save_sources_to[i], pdt, x)) ||
        (!save_grads_to.empty() && !usable(save_grads_to[i], pdt, x))) {
      return false;
    }
    if (codes) {
      const int64_t blocks = (n + kQuantBlock - 1) / kQuantBlock;
      for (const at::Tensor* sc : {&exp_avg_scales[i], &exp_avg_sq_scales[i]}) {
        if (!sc->defined() || !sc->device().is_cpu() || sc->scalar_type() != at::kFloat || !sc->is_contiguous() ||
            sc->numel() != blocks) {
          return false;
        }
      }
    }
    const at::Tensor& st = steps[i];
    if (!st.defined() || !st.device().is_cpu() || st.numel() != 1 ||
        (st.scalar_type() != at::kFloat && st.scalar_type() != at::kDouble)) {
      return false;
    }
    const int64_t row = hyper_rows[i];
    if (row < 0 || row >= static_cast<int64_t>(hyper.size()) || hyper[row].size() != 5) return false;
    const double lr = hyper[row][0], beta1 = hyper[row][1], beta2 = hyper[row][2], eps = hyper[row][3],
                 wd = hyper[row][4];
    // steps[i] is the count before the call: the first advance has t = steps[i] + 1
    const double t_before = st.scalar_type() == at::kFloat ? static_cast<double>(*st.const_data_ptr<float>())
                                                            : *st.const_data_ptr<double>();
    const double t_main = t_before + 1 + (flags.has_prior ? 1 : 0);
    auto make_apply = [&](double t) {
      const double bc1 = 1.0 - std::pow(beta1, t), bc2 = 1.0 - std::pow(beta2, t);
      const double step = eps_also ? lr * std::sqrt(bc2) / bc1 : lr / bc1;
      return Apply{static_cast<float>(step), static_cast<float>(std::sqrt(bc2))};
    };

    Job j{};
    j.src = sources[i].const_data_ptr();
    j.dst = destinations[i].data_ptr();
    j.grad = grads[i].const_data_ptr();
    j.prior = flags.has_prior ? prior_grads[i].const_data_ptr() : nullptr;
    j.extrap = flags.has_extrap ? extrapolate_to[i].data_ptr() : nullptr;
    j.save_src = save_sources_to.empty() ? nullptr : save_sources_to[i].data_ptr();
    j.save_grad = save_grads_to.empty() ? nullptr : save_grads_to[i].data_ptr();
    j.mkind = mkind;
    j.m = exp_avgs[i].data_ptr();
    j.v = exp_avg_sqs[i].data_ptr();
    j.vmax = flags.amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    if (codes) {
      j.m_scale = exp_avg_scales[i].data_ptr<float>();
      j.v_scale = exp_avg_sq_scales[i].data_ptr<float>();
      j.m_code = make_code(quant_constants[0], quant_constants[1]);
      j.v_code = make_code(quant_constants[2], quant_constants[3]);
    }
    j.n = n;
    j.prior_scale = static_cast<float>(sign * prior_scale);
    j.main_scale = static_cast<float>(sign * grad_scale);
    j.extrap_scale = static_cast<float>(sign * extrapolation_scale);
    j.wd = static_cast<float>(wd);
    j.lerp_w = static_cast<float>(1.0 - beta1);
    j.beta2 = static_cast<float>(beta2);
    j.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    j.eps = static_cast<float>(eps);
    j.decay = static_cast<float>(1.0 - lr * wd);
    j.main_apply = make_apply(t_main);
    j.extrap_apply = make_apply(t_main + 1);
    j.rounded = !rounding_seeds.empty() && pdt != at::kFloat;
    if (j.rounded) {
      j.key_main = stream_key(rounding_seeds[i], t_main);
      j.key_extrap = stream_key(rounding_seeds[i], t_main + 1);
    }
    j.in_place = j.src == j.dst;
    j.direct = false;
    if (pdt == at::kFloat && mkind == kMomentF32) {
      std::vector<Span> written{span(destinations[i]), span(exp_avgs[i]), span(exp_avg_sqs[i])};
      std::vector<Span> read{span(grads[i])};
      if (!j.in_place) read.push_back(span(sources[i]));
      if (flags.amsgrad) written.push_back(span(max_exp_avg_sqs[i]));
      if (flags.has_extrap) written.push_back(span(extrapolate_to[i]));
      if (flags.has_prior) read.push_back(span(prior_grads[i]));
      j.direct = direct_ok(written, read);
    }
    const int wd_mode = wd == 0.0 ? kNoDecay : (decoupled ? kDecoupled : kCoupled);
    j.fn = pick_for(pdt, flags.amsgrad, eps_also, wd_mode);
    jobs.push_back(j);
  }

  {
    pybind11::gil_scoped_release no_gil;
    run_all(jobs, flags);
  }
  if (commit_state) {
    for (const at::Tensor& st : steps) {
      if (st.scalar_type() == at::kFloat) {
        *st.data_ptr<float>() += static_cast<float>(n_adv);
      } else {
        *st.data_ptr<double>() += n_adv;
      }
    }
  }
  return true;
}

std::string instruction_set() { return has_avx2() ? "avx2" : "baseline"; }

// cpu_pi.cpp
void pi_step(const at::Tensor& pi, const c10::optional<at::Tensor>& log_pi_reg, const at::Tensor& group_ids,
             const at::Tensor& losses, const at::Tensor& out, const c10::optional<at::Tensor>& second_out,
             const c10::optional<at::Tensor>& mean_out, double pi_lr, double pi_decay, double temperature,
             double eps, int64_t block, const c10::optional<at::Tensor>& z_scratch,
             const c10::optional<at::Tensor>& sums_scratch);
double pi_logits(const at::Tensor& pi, const c10::optional<at::Tensor>& log_pi_reg,
                 const c10::optional<at::Tensor>& group_ids, const c10::optional<at::Tensor>& losses,
                 const c10::optional<at::Tensor>& sums, const at::Tensor& z_out, double pi_lr, double pi_decay,
                 double temperature, double eps);
at::Tensor pi_exp_blocks(const at::Tensor& z, double z_max, int64_t block);
void pi_scale(const at::Tensor& e, double inverse, const at::Tensor& out);
std::string pi_instruction_set();
at::Tensor pi_math(const at::Tensor& x, const std::string& fn, const std::string& instruction_set);
at::Tensor sample_weights(const at::Tensor& pi, const at::Tensor& group_ids, double scale);
std::tuple<int64_t, int64_t> id_range(const at::Tensor& group_ids);
std::tuple<double, double> loss_range(const at::Tensor& losses);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Single-pass Adam-style updates of also_fused on CPU tensors, and the group weights' step";
  m.def("adam_update", &adam_update, "One Adam-style update of many CPU tensors in one pass over memory");
  // the update takes rounding_seeds (stochastic rounding of 16-bit params) in builds that have this
  m.attr("stochastic_rounding") = true;
  m.def("instruction_set", &instruction_set, "The vector instruction set the update runs with");
  m.def("pi_step", &pi_step, "PiUpdate of the group weights from a batch's ids and losses (cpu_pi.cpp)");
  // pi_step takes the caller's kept scratch (z_scratch, sums_scratch) in builds that have this
  m.attr("pi_step_scratch") = true;
  m.def("pi_logits", &pi_logits, "The pi step's float64 logits over a slice of pi and their max (cpu_pi.cpp)");
  m.def("pi_exp_blocks", &pi_exp_blocks, "exp(z - max) in place and the sums of its blocks (cpu_pi.cpp)");
  m.def("pi_scale", &pi_scale, "out = float32(e * inverse), the pi step's result (cpu_pi.cpp)");
  m.def("pi_instruction_set", &pi_instruction_set, "The vector instruction set the pi step's loops run with");
  m.def("pi_math", &pi_math, "For the tests: the pi step's float64 log or exp of a vector, one instruction set's loops");
  m.def("sample_weights", &sample_weights, "The weighted loss's per-sample weights scale * pi[ids] (cpu_pi.cpp)");
  m.def("id_range", &id_range, "(min, max) of int64 group ids (cpu_pi.cpp)");
  m.def("loss_range", &loss_range, "(min, max) of float32 losses, NaN if one is NaN (cpu_pi.cpp)");
}
