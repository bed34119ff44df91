// The group weights' side of ALSO on CPU tensors, for the fast CPU path (also_fused/cpu_fused.py):
//
//   pi_step:        out = PiUpdate(pi, S) = softmax((log(pi + eps) + c log(pi_reg) + pi_lr S) / ((1 + c) T)),
//                   c = pi_decay * pi_lr, S_j the float32 sum of the losses of group j in sample order (as
//                   functional.scatter_group_losses adds them); z and the softmax in float64, rounded to
//                   float32, as functional.pi_update_from_sums computes them; optionally second_out =
//                   PiUpdate(out, S) and the losses' mean. One call instead of about a dozen torch ops.
//   sample_weights: w_i = scale * pi[g_i], the weights of the weighted loss (whose sum against the losses
//                   torch.dot then takes, with its backward in torch's autograd).
//   id_range, loss_range: (min, max) of the ids or the losses in one pass, for the host-side value checks
//                   (NaN for the losses' range when one is NaN, as torch.aminmax propagates it).
//
// Ids outside [0, n) are ignored (weight 0, no sum): the callers have checked them where asked to.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

void check_vector(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous(), name,
              " must be a contiguous 1-D CPU tensor of ", c10::toString(dtype));
}

// dst = softmax(z) for z_j = (log(src_j + eps) + c reg_j + pi_lr S_j) / ((1 + c) T), reg = nullptr: no term
void pi_update(const float* src, const float* reg, const std::vector<float>& sums, int64_t n, double pi_lr,
               double c, double temperature, double eps, float* dst) {
  std::vector<double> z(n);
  const double divisor = (1.0 + c) * temperature;
  double z_max = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    double x = std::log(static_cast<double>(src[j]) + eps);
    if (reg != nullptr) x = x + c * static_cast<double>(reg[j]);
    x = (x + pi_lr * static_cast<double>(sums[j])) / divisor;
    z[j] = x;
    z_max = std::max(z_max, x);
  }
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    z[j] = std::exp(z[j] - z_max);
    total += z[j];
  }
  const double inverse = 1.0 / total;
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(z[j] * inverse);
}

}  // namespace

void pi_step(const at::Tensor& pi, const c10::optional<at::Tensor>& log_pi_reg, const at::Tensor& group_ids,
             const at::Tensor& losses, const at::Tensor& out, const c10::optional<at::Tensor>& second_out,
             const c10::optional<at::Tensor>& mean_out, double pi_lr, double pi_decay, double temperature,
             double eps) {
  check_vector(pi, at::kFloat, "pi");
  check_vector(group_ids, at::kLong, "group_ids");
  check_vector(losses, at::kFloat, "losses");
  check_vector(out, at::kFloat, "out");
  const int64_t n = pi.numel();
  const int64_t batch = group_ids.numel();
  TORCH_CHECK(losses.numel() == batch && out.numel() == n, "pi_step: mismatched sizes");
  const float* reg = nullptr;
  if (log_pi_reg.has_value()) {
    check_vector(*log_pi_reg, at::kFloat, "log_pi_reg");
    TORCH_CHECK(log_pi_reg->numel() == n, "pi_step: log_pi_reg must be shaped like pi");
    reg = log_pi_reg->data_ptr<float>();
  }
  const int64_t* ids = group_ids.data_ptr<int64_t>();
  const float* l = losses.data_ptr<float>();
  std::vector<float> sums(n, 0.0f);
  double loss_total = 0.0;
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t g = ids[i];
    if (g >= 0 && g < n) sums[g] += l[i];
    loss_total += l[i];
  }
  if (mean_out.has_value()) {
    TORCH_CHECK(mean_out->device().is_cpu() && mean_out->scalar_type() == at::kFloat && mean_out->numel() == 1,
                "mean_out must be a one-element float32 CPU tensor");
    *mean_out->data_ptr<float>() = static_cast<float>(loss_total / static_cast<double>(batch));
  }
  const double c = pi_decay * pi_lr;
  float* first = out.data_ptr<float>();
  pi_update(pi.data_ptr<float>(), reg, sums, n, pi_lr, c, temperature, eps, first);
  if (second_out.has_value()) {
    check_vector(*second_out, at::kFloat, "second_out");
    TORCH_CHECK(second_out->numel() == n, "pi_step: second_out must be shaped like pi");
    pi_update(first, reg, sums, n, pi_lr, c, temperature, eps, second_out->data_ptr<float>());
  }
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
