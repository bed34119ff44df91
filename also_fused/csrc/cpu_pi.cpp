// The group weights' side of ALSO on CPU tensors, for the fast CPU path (also_fused/cpu_fused.py):
//
//   pi_step:        out = PiUpdate(pi, S) = softmax((log(pi + eps) + c log(pi_reg) + pi_lr S) / ((1 + c) T)),
//                   c = pi_decay * pi_lr, S_j the float32 sum of the losses of group j in sample order (as
//                   functional.scatter_group_losses adds them); z and the softmax in float64, rounded to
//                   float32, as functional.pi_update_from_sums computes them (the normaliser summed in blocks,
//                   the blocks' partials added in order); optionally second_out = PiUpdate(out, S) and the
//                   losses' mean. One call instead of about a dozen torch ops.
//   pi_logits, pi_exp_blocks, pi_scale: the same step in three phases over one slice of pi (a rank's shard),
//                   the collectives between them the caller's.
//   sample_weights: w_i = scale * pi[g_i], the weights of the weighted loss (whose sum against the losses
//                   torch.dot then takes, with its backward in torch's autograd).
//   id_range, loss_range: (min, max) of the ids or the losses in one pass, for the host-side value checks
//                   (NaN for the losses' range when one is NaN, as torch.aminmax propagates it).
//   pi_instruction_set, pi_math: which loops the pi step runs (baseline, avx2, avx512), and for the tests its
//                   float64 log and exp with the loops of one instruction set.
//
// Ids outside [0, n) are ignored (weight 0, no sum): the callers have checked them where asked to.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ALSO_FUSED_X86 1
#endif

namespace {

void check_vector(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous(), name,
              " must be a contiguous 1-D CPU tensor of ", c10::toString(dtype));
}

// The passes below run in parallel over chunks of kChunk entries: every entry is computed from its own inputs and
// every block partial in order within its block, so the results do not depend on the number of threads.
constexpr int64_t kChunk = 1 << 14;

// float64 log and exp without a libm call per entry, so that the loops over pi vectorise: both are within one
// float64 ulp of libm's (tests/test_cpu_fused.py checks them against Python's math module), far below the float32
// rounding of the step's result. They use only IEEE adds, multiplies, divides and integer ops on the bits (no
// FMA: the build turns contraction off), so every instruction-set variant gives the same bits.
namespace f64 {

inline __attribute__((always_inline)) uint64_t bits_of(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

inline __attribute__((always_inline)) double double_of(uint64_t b) {
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

constexpr double kLn2Hi = 6.93147180369123816490e-01;  // ln 2 in two parts, k * kLn2Hi exact for |k| < 2^11
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kLog2e = 1.44269504088896338700e+00;
constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52: x + kRound - kRound rounds x to an integer
constexpr double kTwo52 = 4503599627370496.0;
constexpr double kMinNormal = 2.2250738585072014e-308;

// sum_i c_i x^(N-1-i) by Horner's rule, the coefficients from the highest power down
template <int N>
inline __attribute__((always_inline)) double horner(const double (&c)[N], double x) {
  double p = c[0];
#pragma GCC unroll 16
  for (int i = 1; i < N; ++i) p = p * x + c[i];
  return p;
}

// 1 / k! for k = 13 down to 0: exp(r) to degree 13
constexpr double kExpTaylor[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                 1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,     1.0 / 720.0,
                                 1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,        0.5,
                                 1.0,                1.0};
// 2 / (2k + 1) for k = 11 down to 1: the series of 2 atanh(s) / s - 2 in z = s^2, over z
constexpr double kAtanhSeries[] = {2.0 / 23.0, 2.0 / 21.0, 2.0 / 19.0, 2.0 / 17.0, 2.0 / 15.0, 2.0 / 13.0,
                                   2.0 / 11.0, 2.0 / 9.0,  2.0 / 7.0,  2.0 / 5.0,  2.0 / 3.0};

// exp(d) for d <= 0: d = k ln 2 + r, |r| <= ln 2 / 2, exp(r) by its Taylor polynomial of degree 13 (the
// remainder below 2^-60), times 2^k as two normal powers of two (one rounding down to the subnormal range).
// Below -745.5 (and -inf) 0; NaN stays NaN.
inline __attribute__((always_inline)) double exp_nonpositive(double d) {
  const double x = d >= -745.5 ? d : -745.5;
  const double t = x * kLog2e + kRound;
  const double kd = t - kRound;
  const int64_t k = static_cast<int64_t>(bits_of(t) - bits_of(kRound));
  const double r = (x - kd * kLn2Hi) - kd * kLn2Lo;
  const double p = horner(kExpTaylor, r);
  const int64_t k1 = k / 2;
  const int64_t k2 = k - k1;
  const double scale1 = double_of(static_cast<uint64_t>(k1 + 1023) << 52);
  const double scale2 = double_of(static_cast<uint64_t>(k2 + 1023) << 52);
  const double e = p * scale1 * scale2;
  return d != d ? d : (d >= -745.5 ? e : 0.0);
}

// log(x): x = m 2^e with m in [0.707, 1.414), f = m - 1 (exact), s = f / (2 + f), log m = 2 atanh(s)
// = f - f^2 / 2 + s (f^2 / 2 + R), R = sum_k 2 s^2k / (2k + 1) to k = 11 (the remainder below 2^-60 relative):
// the exact f leads and the rest corrects it. 0 gives -inf, +inf itself, below 0 or NaN NaN.
inline __attribute__((always_inline)) double log_of(double x) {
  const bool tiny = x < kMinNormal;
  const double xs = tiny ? x * 18014398509481984.0 : x;  // subnormals scaled by 2^54 first
  const uint64_t b = bits_of(xs) + (0x3ff0000000000000ULL - 0x3fe6a09e00000000ULL);
  const double e = double_of((b >> 52) | 0x4330000000000000ULL) - kTwo52 - 1023.0 - (tiny ? 54.0 : 0.0);
  const double f = double_of((b & 0x000fffffffffffffULL) + 0x3fe6a09e00000000ULL) - 1.0;
  const double s = f / (2.0 + f);
  const double z = s * s;
  const double r = horner(kAtanhSeries, z) * z;
  const double half_f2 = 0.5 * f * f;
  const double value = e * kLn2Hi - ((half_f2 - (s * (half_f2 + r) + e * kLn2Lo)) - f);
  const bool regular = x > 0.0 && x <= std::numeric_limits<double>::max();
  return regular ? value : (x > 0.0 ? x : (x == 0.0 ? -std::numeric_limits<double>::infinity()
                                                    : std::numeric_limits<double>::quiet_NaN()));
}

}  // namespace f64

// The loops over one chunk, compiled for the baseline instruction set and, on x86-64, for AVX2 and AVX-512 (the
// widest the CPU has is picked at run time): z_j = (log(src_j + eps) + c reg_j + pi_lr S_j) / divisor, each
// product and sum rounded once; z_j <- exp(z_j - z_max); and, for the tests, log and exp over an array.
inline __attribute__((always_inline)) void logits_body(const float* src, const float* reg, const float* sums,
                                                       int64_t begin, int64_t end, double pi_lr, double c,
                                                       double divisor, double eps, double* z) {
  for (int64_t j = begin; j < end; ++j) {
    double x = f64::log_of(static_cast<double>(src[j]) + eps);
    if (reg != nullptr) x = x + c * static_cast<double>(reg[j]);
    if (sums != nullptr) x = x + pi_lr * static_cast<double>(sums[j]);
    z[j] = x / divisor;
  }
}

// max_j z_j over [begin, end) in eight lanes (NaN entries do not count): the order of a max does not change it
inline __attribute__((always_inline)) double max_body(const double* z, int64_t begin, int64_t end) {
  constexpr int kLanes = 8;
  double lanes[kLanes];
  for (int k = 0; k < kLanes; ++k) lanes[k] = -std::numeric_limits<double>::infinity();
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] = z[j + k] > lanes[k] ? z[j + k] : lanes[k];
  }
  double m = -std::numeric_limits<double>::infinity();
  for (int k = 0; k < kLanes; ++k) m = lanes[k] > m ? lanes[k] : m;
  for (; j < end; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

struct PiLoops {
  const char* name;
  void (*logits)(const float*, const float*, const float*, int64_t, int64_t, double, double, double, double, double*);
  double (*max)(const double*, int64_t, int64_t);
  void (*exp)(double*, int64_t, int64_t, double);
  void (*log_array)(double*, int64_t);
};

#define ALSO_FUSED_PI_LOOPS(ATTRIBUTE, SUFFIX)                                                                 \
  ATTRIBUTE void logits_##SUFFIX(const float* src, const float* reg, const float* sums, int64_t begin,          \
                                 int64_t end, double pi_lr, double c, double divisor, double eps, double* z) { \
    logits_body(src, reg, sums, begin, end, pi_lr, c, divisor, eps, z);                                         \
  }                                                                                                             \
  ATTRIBUTE double max_##SUFFIX(const double* z, int64_t begin, int64_t end) {                                 \
    return max_body(z, begin, end);                                                                             \
  }                                                                                                             \
  ATTRIBUTE void exp_##SUFFIX(double* z, int64_t begin, int64_t end, double z_max) {                            \
    for (int64_t j = begin; j < end; ++j) z[j] = f64::exp_nonpositive(z[j] - z_max);                          \
  }                                                                                                             \
  ATTRIBUTE void log_array_##SUFFIX(double* x, int64_t n) {                                                    \
    for (int64_t j = 0; j < n; ++j) x[j] = f64::log_of(x[j]);                                                  \
  }                                                                                                             \
  const PiLoops kLoops_##SUFFIX = {#SUFFIX, &logits_##SUFFIX, &max_##SUFFIX, &exp_##SUFFIX, &log_array_##SUFFIX};

ALSO_FUSED_PI_LOOPS(, baseline)
#ifdef ALSO_FUSED_X86
ALSO_FUSED_PI_LOOPS(__attribute__((target("avx2"))), avx2)
ALSO_FUSED_PI_LOOPS(__attribute__((target("avx512f,avx512dq"))), avx512)
#endif
#undef ALSO_FUSED_PI_LOOPS

// the loops of an instruction set by name ("baseline", "avx2", "avx512"); nullptr where this CPU lacks it
const PiLoops* pi_loops_named(const std::string& name) {
  if (name == "baseline") return &kLoops_baseline;
#ifdef ALSO_FUSED_X86
  if (name == "avx2" && __builtin_cpu_supports("avx2")) return &kLoops_avx2;
  if (name == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) {
    return &kLoops_avx512;
  }
#endif
  return nullptr;
}

const PiLoops& pi_loops() {
  static const PiLoops* best = [] {
    for (const char* name : {"avx512", "avx2"}) {
      if (const PiLoops* loops = pi_loops_named(name)) return loops;
    }
    return &kLoops_baseline;
  }();
  return *best;
}

// z_j = (log(src_j + eps) + c reg_j + pi_lr S_j) / ((1 + c) T) in float64 (reg = nullptr: no term, sums =
// nullptr: S = 0); returns max_j z_j (-inf for n = 0; NaN entries do not count)
double logits(const float* src, const float* reg, const float* sums, int64_t n, double pi_lr, double c,
              double divisor, double eps, double* z) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> chunk_max(chunks, -std::numeric_limits<double>::infinity());
  const PiLoops& loops = pi_loops();
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const int64_t begin = k * kChunk, stop = std::min(n, (k + 1) * kChunk);
      loops.logits(src, reg, sums, begin, stop, pi_lr, c, divisor, eps, z);
      chunk_max[k] = loops.max(z, begin, stop);
    }
  });
  double z_max = -std::numeric_limits<double>::infinity();
  for (const double m : chunk_max) z_max = std::max(z_max, m);
  return z_max;
}

// z <- exp(z - z_max); partials[b] = the sum of block b of `block` entries, added in order
void exp_blocks(double* z, int64_t n, double z_max, int64_t block, double* partials) {
  const int64_t blocks = (n + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, kChunk / block);
  const auto body = pi_loops().exp;
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * block, stop = std::min(n, (b + 1) * block);
      body(z, begin, stop, z_max);
      double partial = 0.0;
      for (int64_t j = begin; j < stop; ++j) partial += z[j];
      partials[b] = partial;
    }
  });
}

void scale_into(const double* e, int64_t n, double inverse, float* dst) {
  at::parallel_for(0, n, kChunk, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) dst[j] = static_cast<float>(e[j] * inverse);
  });
}

// dst = softmax(z): the blocked normaliser of functional.pi_update_from_sums (block partials added in order);
// z: n float64 of scratch
void pi_update(const float* src, const float* reg, const float* sums, int64_t n, double pi_lr, double c,
               double temperature, double eps, int64_t block, double* z, float* dst) {
  const double z_max = logits(src, reg, sums, n, pi_lr, c, (1.0 + c) * temperature, eps, z);
  std::vector<double> partials((n + block - 1) / block);
  exp_blocks(z, n, z_max, block, partials.data());
  double total = 0.0;
  for (const double partial : partials) total += partial;
  scale_into(z, n, 1.0 / total, dst);
}

void check_batch(const at::Tensor& group_ids, const at::Tensor& losses) {
  check_vector(group_ids, at::kLong, "group_ids");
  check_vector(losses, at::kFloat, "losses");
  TORCH_CHECK(losses.numel() == group_ids.numel(), "pi_step: mismatched sizes");
}

// S_j: the float32 sum of the losses of group j in sample order, added into sums (zero on entry); ids outside
// [0, n) add nothing
void add_group_sums(const at::Tensor& group_ids, const at::Tensor& losses, int64_t n, float* sums) {
  const int64_t* ids = group_ids.data_ptr<int64_t>();
  const float* l = losses.data_ptr<float>();
  for (int64_t i = 0; i < group_ids.numel(); ++i) {
    const int64_t g = ids[i];
    if (g >= 0 && g < n) sums[g] += l[i];
  }
}

std::vector<float> group_sums(const at::Tensor& group_ids, const at::Tensor& losses, int64_t n) {
  check_batch(group_ids, losses);
  std::vector<float> sums(n, 0.0f);
  add_group_sums(group_ids, losses, n, sums.data());
  return sums;
}

// Kept scratch of the caller's: the group sums of a batch written into a zero vector and zeroed again on the way
// out (only the batch's entries: O(batch), not O(n)), also when the step throws.
class BatchSums {
 public:
  BatchSums(const at::Tensor& group_ids, const at::Tensor& losses, int64_t n, float* sums)
      : ids_(group_ids.data_ptr<int64_t>()), batch_(group_ids.numel()), n_(n), sums_(sums) {
    add_group_sums(group_ids, losses, n, sums);
  }
  ~BatchSums() {
    for (int64_t i = 0; i < batch_; ++i) {
      const int64_t g = ids_[i];
      if (g >= 0 && g < n_) sums_[g] = 0.0f;
    }
  }
  BatchSums(const BatchSums&) = delete;
  BatchSums& operator=(const BatchSums&) = delete;

 private:
  const int64_t* ids_;
  int64_t batch_, n_;
  float* sums_;
};

const float* optional_vector(const c10::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return nullptr;
  check_vector(*t, at::kFloat, name);
  TORCH_CHECK(t->numel() == n, name, " must be shaped like pi");
  return t->data_ptr<float>();
}

}  // namespace

void pi_step(const at::Tensor& pi, const c10::optional<at::Tensor>& log_pi_reg, const at::Tensor& group_ids,
             const at::Tensor& losses, const at::Tensor& out, const c10::optional<at::Tensor>& second_out,
             const c10::optional<at::Tensor>& mean_out, double pi_lr, double pi_decay, double temperature,
             double eps, int64_t block, const c10::optional<at::Tensor>& z_scratch,
             const c10::optional<at::Tensor>& sums_scratch) {
  check_vector(pi, at::kFloat, "pi");
  check_vector(out, at::kFloat, "out");
  check_batch(group_ids, losses);
  TORCH_CHECK(block > 0, "pi_step: block must be positive");
  const int64_t n = pi.numel();
  const int64_t batch = group_ids.numel();
  TORCH_CHECK(out.numel() == n, "pi_step: mismatched sizes");
  const float* reg = optional_vector(log_pi_reg, n, "log_pi_reg");
  if (second_out.has_value()) {
    check_vector(*second_out, at::kFloat, "second_out");
    TORCH_CHECK(second_out->numel() == n, "pi_step: second_out must be shaped like pi");
  }
  if (mean_out.has_value()) {
    TORCH_CHECK(mean_out->device().is_cpu() && mean_out->scalar_type() == at::kFloat && mean_out->numel() == 1,
                "mean_out must be a one-element float32 CPU tensor");
  }
  // scratch kept by the caller (z: n float64; sums: n float32, all zero, left so) or allocated here
  std::unique_ptr<double[]> own_z;
  double* z = nullptr;
  if (z_scratch.has_value()) {
    check_vector(*z_scratch, at::kDouble, "z_scratch");
    TORCH_CHECK(z_scratch->numel() == n, "pi_step: z_scratch must hold one float64 per group");
    z = z_scratch->data_ptr<double>();
  } else {
    own_z.reset(new double[n]);  // every entry written by logits
    z = own_z.get();
  }
  std::vector<float> own_sums;
  float* sums = nullptr;
  if (sums_scratch.has_value()) {
    check_vector(*sums_scratch, at::kFloat, "sums_scratch");
    TORCH_CHECK(sums_scratch->numel() == n, "pi_step: sums_scratch must hold one float32 per group");
    sums = sums_scratch->data_ptr<float>();
  } else {
    own_sums.assign(n, 0.0f);
    sums = own_sums.data();
  }
  const BatchSums batch_sums(group_ids, losses, n, sums);
  if (mean_out.has_value()) {
    const float* l = losses.data_ptr<float>();
    double loss_total = 0.0;
    for (int64_t i = 0; i < batch; ++i) loss_total += l[i];
    *mean_out->data_ptr<float>() = static_cast<float>(loss_total / static_cast<double>(batch));
  }
  const double c = pi_decay * pi_lr;
  float* first = out.data_ptr<float>();
  pi_update(pi.data_ptr<float>(), reg, sums, n, pi_lr, c, temperature, eps, block, z, first);
  if (second_out.has_value()) {
    pi_update(first, reg, sums, n, pi_lr, c, temperature, eps, block, z, second_out->data_ptr<float>());
  }
}

// The pi step in three phases, for a rank that owns a slice of pi made of whole blocks (the collectives between
// them are the caller's): pi_logits, then pi_exp_blocks with the max over every rank, then pi_scale with
// 1 / (the partials of every rank added in block order). The phases of one slice compute what pi_step does.
double pi_logits(const at::Tensor& pi, const c10::optional<at::Tensor>& log_pi_reg,
                 const c10::optional<at::Tensor>& group_ids, const c10::optional<at::Tensor>& losses,
                 const c10::optional<at::Tensor>& sums, const at::Tensor& z_out, double pi_lr, double pi_decay,
                 double temperature, double eps) {
  check_vector(pi, at::kFloat, "pi");
  check_vector(z_out, at::kDouble, "z_out");
  const int64_t n = pi.numel();
  TORCH_CHECK(z_out.numel() == n, "pi_logits: z_out must be shaped like pi");
  const float* reg = optional_vector(log_pi_reg, n, "log_pi_reg");
  std::vector<float> batch_sums;
  const float* s = optional_vector(sums, n, "sums");
  if (group_ids.has_value()) {
    TORCH_CHECK(losses.has_value() && s == nullptr, "pi_logits: give group_ids with losses, or sums");
    batch_sums = group_sums(*group_ids, *losses, n);
    s = batch_sums.data();
  }
  const double c = pi_decay * pi_lr;
  return logits(pi.data_ptr<float>(), reg, s, n, pi_lr, c, (1.0 + c) * temperature, eps, z_out.data_ptr<double>());
}

at::Tensor pi_exp_blocks(const at::Tensor& z, double z_max, int64_t block) {
  check_vector(z, at::kDouble, "z");
  TORCH_CHECK(block > 0, "pi_exp_blocks: block must be positive");
  const int64_t n = z.numel();
  at::Tensor partials = at::empty({(n + block - 1) / block}, z.options());
  exp_blocks(z.data_ptr<double>(), n, z_max, block, partials.data_ptr<double>());
  return partials;
}

void pi_scale(const at::Tensor& e, double inverse, const at::Tensor& out) {
  check_vector(e, at::kDouble, "e");
  check_vector(out, at::kFloat, "out");
  TORCH_CHECK(out.numel() == e.numel(), "pi_scale: out must be shaped like e");
  scale_into(e.data_ptr<double>(), e.numel(), inverse, out.data_ptr<float>());
}

std::string pi_instruction_set() { return pi_loops().name; }

// For the tests: log(x) or exp(x) (x <= 0) of a float64 vector, as the pi step's loops compute them, with the loops
// of one instruction set; an error where this CPU lacks it.
at::Tensor pi_math(const at::Tensor& x, const std::string& fn, const std::string& instruction_set) {
  check_vector(x, at::kDouble, "x");
  const PiLoops* loops = pi_loops_named(instruction_set);
  TORCH_CHECK(loops != nullptr, "pi_math: no ", instruction_set, " loops on this CPU");
  TORCH_CHECK(fn == "log" || fn == "exp", "pi_math: fn must be log or exp");
  at::Tensor out = x.clone();
  if (fn == "log") {
    loops->log_array(out.data_ptr<double>(), out.numel());
  } else {
    loops->exp(out.data_ptr<double>(), 0, out.numel(), 0.0);
  }
  return out;
}

at::Tensor sample_weights(const at::Tensor& pi, const at::Tensor& group_ids, double scale) {
  check_vector(pi, at::kFloat, "pi");
  check_vector(group_ids, at::kLong, "group_ids");
  const int64_t n = pi.numel();
  const int64_t batch = group_ids.numel();
  at::Tensor weights = at::empty({batch}, pi.options());
  const float* p = pi.data_ptr<float>();
  const int64_t* ids = group_ids.data_ptr<int64_t>();
  float* w = weights.data_ptr<float>();
  const float s = static_cast<float>(scale);
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t g = ids[i];
    w[i] = (g >= 0 && g < n) ? s * p[g] : 0.0f;
  }
  return weights;
}

namespace {

// (min, max) of n > 0 values; for floating types NaN for both when one is NaN (as torch.aminmax)
template <typename T>
std::tuple<T, T> extremes(const T* v, int64_t n) {
  T lo = v[0], hi = v[0];
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_floating_point_v<T>) nan = nan || std::isnan(v[i]);
    lo = std::min(lo, v[i]);
    hi = std::max(hi, v[i]);
  }
  if (nan) return {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::quiet_NaN()};
  return {lo, hi};
}

}  // namespace

std::tuple<int64_t, int64_t> id_range(const at::Tensor& group_ids) {
  check_vector(group_ids, at::kLong, "group_ids");
  TORCH_CHECK(group_ids.numel() > 0, "id_range: group_ids is empty");
  return extremes(group_ids.data_ptr<int64_t>(), group_ids.numel());
}

std::tuple<double, double> loss_range(const at::Tensor& losses) {
  check_vector(losses, at::kFloat, "losses");
  TORCH_CHECK(losses.numel() > 0, "loss_range: losses is empty");
  const auto [lo, hi] = extremes(losses.data_ptr<float>(), losses.numel());
  return {static_cast<double>(lo), static_cast<double>(hi)};
}
