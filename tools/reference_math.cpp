#include "tools/reference_math.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include <fmt/format.h>

#include "core/errors.hpp"
#include "tools/layer_math_checks.hpp"

namespace gpuswap {

// Note [Contribution then add]
// Backward computes a call's whole contribution to each gradient in a zeroed scratch array and
// only then adds it into the caller's array, element by element. Accumulating in place would
// be as deterministic, but the bits would then depend on the order in which the consumers of a
// tensor run their backward; with contribution-then-add a tensor read by two layers gets
// (old + a) + b == (old + b) + a exactly (float addition is commutative), so a runner may order
// those two backward calls either way and still match the reference bit for bit. Elementwise
// kinds (relu, add, flatten, softmax) give each element one contribution and add it directly.

namespace {

constexpr double bn_eps = 1e-5;

template <typename T>
void add_into(T* dst, const std::vector<T>& contribution) {
  if (dst == nullptr) return;
  for (std::size_t i = 0; i < contribution.size(); ++i) dst[i] += contribution[i];
}

std::size_t conv_weight_elems(const layer_spec& l) {
  return static_cast<std::size_t>(l.out_channels) * l.kernel_h * l.kernel_w * l.in_channels;
}

// ---- conv (NHWC, weights [C_out][k][k][C_in]) ----

template <typename T>
void conv_forward(const layer_spec& l, int batch, const T* x, const T* params, T* y) {
  const int kh = l.kernel_h, kw = l.kernel_w, cin = l.in_channels, cout = l.out_channels;
  const T* w = params;
  const T* b = l.bias ? params + conv_weight_elems(l) : nullptr;
  for (int n = 0; n < batch; ++n) {
    for (int oy = 0; oy < l.out_h; ++oy) {
      for (int ox = 0; ox < l.out_w; ++ox) {
        T* yp = y + ((static_cast<std::size_t>(n) * l.out_h + oy) * l.out_w + ox) * cout;
        for (int co = 0; co < cout; ++co) {
          T acc = b != nullptr ? b[co] : T(0);
          for (int ky = 0; ky < kh; ++ky) {
            const int iy = oy * l.stride - l.pad + ky;
            if (iy < 0 || iy >= l.in_h) continue;
            for (int kx = 0; kx < kw; ++kx) {
              const int ix = ox * l.stride - l.pad + kx;
              if (ix < 0 || ix >= l.in_w) continue;
              const T* xp = x + ((static_cast<std::size_t>(n) * l.in_h + iy) * l.in_w + ix) * cin;
              const T* wp = w + ((static_cast<std::size_t>(co) * kh + ky) * kw + kx) * cin;
              for (int ci = 0; ci < cin; ++ci) acc += xp[ci] * wp[ci];
            }
          }
          yp[co] = acc;
        }
      }
    }
  }
}

template <typename T>
void conv_backward(const layer_spec& l, int batch, const T* x, const T* gy, const T* params,
                   T* gx_out, T* gparams_out) {
  const int kh = l.kernel_h, kw = l.kernel_w, cin = l.in_channels, cout = l.out_channels;
  const T* w = params;
  std::vector<T> gx(gx_out != nullptr ? static_cast<std::size_t>(batch) * l.in_elems_per_sample
                                      : 0);
  std::vector<T> gp(gparams_out != nullptr ? l.param_elems : 0);
  T* gw = gp.empty() ? nullptr : gp.data();
  T* gb = gp.empty() || !l.bias ? nullptr : gp.data() + conv_weight_elems(l);
  for (int n = 0; n < batch; ++n) {
    for (int oy = 0; oy < l.out_h; ++oy) {
      for (int ox = 0; ox < l.out_w; ++ox) {
        const T* gyp = gy + ((static_cast<std::size_t>(n) * l.out_h + oy) * l.out_w + ox) * cout;
        for (int co = 0; co < cout; ++co) {
          const T g = gyp[co];
          if (gb != nullptr) gb[co] += g;
          for (int ky = 0; ky < kh; ++ky) {
            const int iy = oy * l.stride - l.pad + ky;
            if (iy < 0 || iy >= l.in_h) continue;
            for (int kx = 0; kx < kw; ++kx) {
              const int ix = ox * l.stride - l.pad + kx;
              if (ix < 0 || ix >= l.in_w) continue;
              const std::size_t xo =
                  ((static_cast<std::size_t>(n) * l.in_h + iy) * l.in_w + ix) * cin;
              const std::size_t wo = ((static_cast<std::size_t>(co) * kh + ky) * kw + kx) * cin;
              if (gw != nullptr) {
                for (int ci = 0; ci < cin; ++ci) gw[wo + ci] += g * x[xo + ci];
              }
              if (!gx.empty()) {
                for (int ci = 0; ci < cin; ++ci) gx[xo + ci] += g * w[wo + ci];
              }
            }
          }
        }
      }
    }
  }
  add_into(gx_out, gx);
  add_into(gparams_out, gp);
}

// ---- fc (weights [outputs][inputs]) ----

template <typename T>
void fc_forward(const layer_spec& l, int batch, const T* x, const T* params, T* y) {
  const std::size_t in = static_cast<std::size_t>(l.in_channels);
  const std::size_t out = static_cast<std::size_t>(l.out_channels);
  const std::size_t rows = static_cast<std::size_t>(batch) * l.rows;
  const T* b = l.bias ? params + out * in : nullptr;
  for (std::size_t m = 0; m < rows; ++m) {
    const T* xp = x + m * in;
    for (std::size_t o = 0; o < out; ++o) {
      const T* wp = params + o * in;
      T acc = b != nullptr ? b[o] : T(0);
      for (std::size_t i = 0; i < in; ++i) acc += xp[i] * wp[i];
      y[m * out + o] = acc;
    }
  }
}

template <typename T>
void fc_backward(const layer_spec& l, int batch, const T* x, const T* gy, const T* params,
                 T* gx_out, T* gparams_out) {
  const std::size_t in = static_cast<std::size_t>(l.in_channels);
  const std::size_t out = static_cast<std::size_t>(l.out_channels);
  const std::size_t rows = static_cast<std::size_t>(batch) * l.rows;
  std::vector<T> gx(gx_out != nullptr ? rows * in : 0);
  std::vector<T> gp(gparams_out != nullptr ? l.param_elems : 0);
  T* gb = gp.empty() || !l.bias ? nullptr : gp.data() + out * in;
  for (std::size_t m = 0; m < rows; ++m) {
    const T* xp = x + m * in;
    for (std::size_t o = 0; o < out; ++o) {
      const T g = gy[m * out + o];
      if (gb != nullptr) gb[o] += g;
      if (!gp.empty()) {
        T* gwp = gp.data() + o * in;
        for (std::size_t i = 0; i < in; ++i) gwp[i] += g * xp[i];
      }
      if (!gx.empty()) {
        const T* wp = params + o * in;
        T* gxp = gx.data() + m * in;
        for (std::size_t i = 0; i < in; ++i) gxp[i] += g * wp[i];
      }
    }
  }
  add_into(gx_out, gx);
  add_into(gparams_out, gp);
}

// ---- pooling (NHWC; windows clipped to the input, avg divides by the full window) ----

template <typename T, typename Visit>
void for_each_window(const layer_spec& l, int batch, Visit&& visit) {
  const int c = l.in_channels;
  for (int n = 0; n < batch; ++n) {
    for (int oy = 0; oy < l.out_h; ++oy) {
      for (int ox = 0; ox < l.out_w; ++ox) {
        const std::size_t yo = ((static_cast<std::size_t>(n) * l.out_h + oy) * l.out_w + ox) * c;
        const int y0 = oy * l.stride - l.pad, x0 = ox * l.stride - l.pad;
        const int y_begin = std::max(y0, 0), y_end = std::min(y0 + l.kernel_h, l.in_h);
        const int x_begin = std::max(x0, 0), x_end = std::min(x0 + l.kernel_w, l.in_w);
        const std::size_t image = static_cast<std::size_t>(n) * l.in_h;
        visit(yo, image, y_begin, y_end, x_begin, x_end);
      }
    }
  }
}

template <typename T>
void maxpool_forward(const layer_spec& l, int batch, const T* x, T* y) {
  const int c = l.in_channels;
  for_each_window<T>(l, batch, [&](std::size_t yo, std::size_t image, int yb, int ye, int xb,
                                   int xe) {
    for (int ch = 0; ch < c; ++ch) {
      T best = -std::numeric_limits<T>::infinity();
      for (int iy = yb; iy < ye; ++iy) {
        for (int ix = xb; ix < xe; ++ix) {
          const T v = x[((image + iy) * l.in_w + ix) * c + ch];
          if (v > best) best = v;
        }
      }
      y[yo + ch] = best;
    }
  });
}

template <typename T>
void maxpool_backward(const layer_spec& l, int batch, const T* x, const T* gy, T* gx_out) {
  if (gx_out == nullptr) return;
  const int c = l.in_channels;
  std::vector<T> gx(static_cast<std::size_t>(batch) * l.in_elems_per_sample);
  for_each_window<T>(l, batch, [&](std::size_t yo, std::size_t image, int yb, int ye, int xb,
                                   int xe) {
    for (int ch = 0; ch < c; ++ch) {
      // The same scan as forward: the first maximum in the window takes the gradient.
      T best = -std::numeric_limits<T>::infinity();
      std::size_t arg = ((image + yb) * l.in_w + xb) * c + ch;
      for (int iy = yb; iy < ye; ++iy) {
        for (int ix = xb; ix < xe; ++ix) {
          const std::size_t xi = ((image + iy) * l.in_w + ix) * c + ch;
          if (x[xi] > best) {
            best = x[xi];
            arg = xi;
          }
        }
      }
      gx[arg] += gy[yo + ch];
    }
  });
  add_into(gx_out, gx);
}

template <typename T>
void avgpool_forward(const layer_spec& l, int batch, const T* x, T* y) {
  const int c = l.in_channels;
  const T scale = T(1) / static_cast<T>(l.kernel_h * l.kernel_w);
  for_each_window<T>(l, batch, [&](std::size_t yo, std::size_t image, int yb, int ye, int xb,
                                   int xe) {
    for (int ch = 0; ch < c; ++ch) {
      T sum = 0;
      for (int iy = yb; iy < ye; ++iy) {
        for (int ix = xb; ix < xe; ++ix) sum += x[((image + iy) * l.in_w + ix) * c + ch];
      }
      y[yo + ch] = sum * scale;
    }
  });
}

template <typename T>
void avgpool_backward(const layer_spec& l, int batch, const T* gy, T* gx_out) {
  if (gx_out == nullptr) return;
  const int c = l.in_channels;
  const T scale = T(1) / static_cast<T>(l.kernel_h * l.kernel_w);
  std::vector<T> gx(static_cast<std::size_t>(batch) * l.in_elems_per_sample);
  for_each_window<T>(l, batch, [&](std::size_t yo, std::size_t image, int yb, int ye, int xb,
                                   int xe) {
    for (int ch = 0; ch < c; ++ch) {
      const T g = gy[yo + ch] * scale;
      for (int iy = yb; iy < ye; ++iy) {
        for (int ix = xb; ix < xe; ++ix) gx[((image + iy) * l.in_w + ix) * c + ch] += g;
      }
    }
  });
  add_into(gx_out, gx);
}

// ---- batchnorm (training mode, statistics over everything but the last dimension) ----

struct channel_stats {
  std::vector<double> mean, inv_std;
};

template <typename T>
channel_stats batch_stats(const layer_spec& l, int batch, const T* x) {
  const std::size_t c = static_cast<std::size_t>(l.in_channels);
  const std::size_t m = static_cast<std::size_t>(batch) * l.rows;
  channel_stats s{std::vector<double>(c, 0.0), std::vector<double>(c, 0.0)};
  for (std::size_t r = 0; r < m; ++r) {
    for (std::size_t ch = 0; ch < c; ++ch) s.mean[ch] += static_cast<double>(x[r * c + ch]);
  }
  for (auto& v : s.mean) v /= static_cast<double>(m);
  std::vector<double> var(c, 0.0);
  for (std::size_t r = 0; r < m; ++r) {
    for (std::size_t ch = 0; ch < c; ++ch) {
      const double d = static_cast<double>(x[r * c + ch]) - s.mean[ch];
      var[ch] += d * d;
    }
  }
  for (std::size_t ch = 0; ch < c; ++ch) {
    s.inv_std[ch] = 1.0 / std::sqrt(var[ch] / static_cast<double>(m) + bn_eps);
  }
  return s;
}

template <typename T>
void batchnorm_forward(const layer_spec& l, int batch, const T* x, const T* params, T* y) {
  const std::size_t c = static_cast<std::size_t>(l.in_channels);
  const std::size_t m = static_cast<std::size_t>(batch) * l.rows;
  const channel_stats s = batch_stats(l, batch, x);
  const T* gamma = params;
  const T* beta = params + c;
  for (std::size_t r = 0; r < m; ++r) {
    for (std::size_t ch = 0; ch < c; ++ch) {
      const double xhat = (static_cast<double>(x[r * c + ch]) - s.mean[ch]) * s.inv_std[ch];
      y[r * c + ch] = static_cast<T>(static_cast<double>(gamma[ch]) * xhat +
                                     static_cast<double>(beta[ch]));
    }
  }
}

template <typename T>
void batchnorm_backward(const layer_spec& l, int batch, const T* x, const T* gy, const T* params,
                        T* gx_out, T* gparams_out) {
  const std::size_t c = static_cast<std::size_t>(l.in_channels);
  const std::size_t m = static_cast<std::size_t>(batch) * l.rows;
  const channel_stats s = batch_stats(l, batch, x);
  std::vector<double> dgamma(c, 0.0), dbeta(c, 0.0);
  for (std::size_t r = 0; r < m; ++r) {
    for (std::size_t ch = 0; ch < c; ++ch) {
      const double g = static_cast<double>(gy[r * c + ch]);
      const double xhat = (static_cast<double>(x[r * c + ch]) - s.mean[ch]) * s.inv_std[ch];
      dbeta[ch] += g;
      dgamma[ch] += g * xhat;
    }
  }
  if (gparams_out != nullptr) {
    for (std::size_t ch = 0; ch < c; ++ch) {
      gparams_out[ch] += static_cast<T>(dgamma[ch]);
      gparams_out[c + ch] += static_cast<T>(dbeta[ch]);
    }
  }
  if (gx_out == nullptr) return;
  // dx = gamma * inv_std / M * (M * g - sum(g) - xhat * sum(g * xhat)); one contribution per
  // element, so it is added directly.
  const double md = static_cast<double>(m);
  for (std::size_t r = 0; r < m; ++r) {
    for (std::size_t ch = 0; ch < c; ++ch) {
      const double g = static_cast<double>(gy[r * c + ch]);
      const double xhat = (static_cast<double>(x[r * c + ch]) - s.mean[ch]) * s.inv_std[ch];
      const double dx = static_cast<double>(params[ch]) * s.inv_std[ch] / md *
                        (md * g - dbeta[ch] - xhat * dgamma[ch]);
      gx_out[r * c + ch] += static_cast<T>(dx);
    }
  }
}

// ---- softmax cross-entropy over the last dimension ----

template <typename T>
double softmax_rows(const layer_spec& l, int batch, const T* logits, const int* labels, T* probs) {
  const std::size_t c = static_cast<std::size_t>(l.in_channels);
  const std::size_t rows = static_cast<std::size_t>(batch) * l.rows;
  double loss = 0;
  for (std::size_t r = 0; r < rows; ++r) {
    const T* xp = logits + r * c;
    T top = xp[0];
    for (std::size_t j = 1; j < c; ++j) top = std::max(top, xp[j]);
    double sum = 0;
    for (std::size_t j = 0; j < c; ++j) sum += std::exp(static_cast<double>(xp[j] - top));
    for (std::size_t j = 0; j < c; ++j) {
      probs[r * c + j] = static_cast<T>(std::exp(static_cast<double>(xp[j] - top)) / sum);
    }
    if (labels != nullptr) {
      const int label = labels[r];
      if (label < 0 || static_cast<std::size_t>(label) >= c) {
        throw_config_error("label", fmt::format("{}", label),
                           fmt::format("a class from 0 to {}", c - 1),
                           fmt::format("layer {}, row {}", l.name, r));
      }
      loss += std::log(sum) - static_cast<double>(xp[label] - top);
    }
  }
  return loss / static_cast<double>(rows);
}

template <typename T>
void softmax_backward_impl(const layer_spec& l, int batch, const T* probs, const int* labels,
                           T* gx) {
  if (gx == nullptr) return;
  const std::size_t c = static_cast<std::size_t>(l.in_channels);
  const std::size_t rows = static_cast<std::size_t>(batch) * l.rows;
  const T scale = T(1) / static_cast<T>(rows);
  for (std::size_t r = 0; r < rows; ++r) {
    const int label = labels[r];
    if (label < 0 || static_cast<std::size_t>(label) >= c) {
      throw_config_error("label", fmt::format("{}", label),
                         fmt::format("a class from 0 to {}", c - 1),
                         fmt::format("layer {}, row {}", l.name, r));
    }
    for (std::size_t j = 0; j < c; ++j) {
      const T onehot = j == static_cast<std::size_t>(label) ? T(1) : T(0);
      gx[r * c + j] += (probs[r * c + j] - onehot) * scale;
    }
  }
}

// ---- dispatch ----

template <typename T>
void forward_impl(const layer_spec& l, int batch, std::span<const T* const> in, const T* params,
                  T* y) {
  check_layer_batch(l, batch);
  if (in.size() != l.inputs.size()) {
    throw_no_layer_math(l, fmt::format("given {} inputs, expects {}", in.size(), l.inputs.size()));
  }
  const std::size_t n_in = static_cast<std::size_t>(batch) * l.in_elems_per_sample;
  const T* x = in[0];
  switch (l.op) {
    case layer_kind::conv: conv_forward(l, batch, x, params, y); return;
    case layer_kind::fc: fc_forward(l, batch, x, params, y); return;
    case layer_kind::relu:
      for (std::size_t i = 0; i < n_in; ++i) y[i] = x[i] > T(0) ? x[i] : T(0);
      return;
    case layer_kind::maxpool: maxpool_forward(l, batch, x, y); return;
    case layer_kind::avgpool: avgpool_forward(l, batch, x, y); return;
    case layer_kind::add:
      for (std::size_t i = 0; i < n_in; ++i) {
        T sum = in[0][i];
        for (std::size_t k = 1; k < in.size(); ++k) sum += in[k][i];
        y[i] = sum;
      }
      return;
    case layer_kind::batchnorm: batchnorm_forward(l, batch, x, params, y); return;
    case layer_kind::flatten: std::copy(x, x + n_in, y); return;
    case layer_kind::softmax_xent: softmax_rows<T>(l, batch, x, nullptr, y); return;
    case layer_kind::transformer:
    case layer_kind::embedding:
    case layer_kind::layernorm: break;
  }
  throw_no_layer_math(l, "this kind is cost-model only (no reference math)");
}

template <typename T>
void backward_impl(const layer_spec& l, int batch, std::span<const T* const> in, const T* y,
                   const T* gy, const T* params, std::span<T* const> gin, T* gparams) {
  check_layer_batch(l, batch);
  if (in.size() != l.inputs.size() || gin.size() != l.inputs.size()) {
    throw_no_layer_math(l, fmt::format("given {} inputs and {} input gradients, expects {}", in.size(),
                           gin.size(), l.inputs.size()));
  }
  const std::size_t n_in = static_cast<std::size_t>(batch) * l.in_elems_per_sample;
  const T* x = in[0];
  T* gx = gin[0];
  switch (l.op) {
    case layer_kind::conv: conv_backward(l, batch, x, gy, params, gx, gparams); return;
    case layer_kind::fc: fc_backward(l, batch, x, gy, params, gx, gparams); return;
    case layer_kind::relu:
      if (gx != nullptr) {
        for (std::size_t i = 0; i < n_in; ++i) gx[i] += y[i] > T(0) ? gy[i] : T(0);
      }
      return;
    case layer_kind::maxpool: maxpool_backward(l, batch, x, gy, gx); return;
    case layer_kind::avgpool: avgpool_backward(l, batch, gy, gx); return;
    case layer_kind::add:
      for (T* g : gin) {
        if (g == nullptr) continue;
        for (std::size_t i = 0; i < n_in; ++i) g[i] += gy[i];
      }
      return;
    case layer_kind::batchnorm:
      batchnorm_backward(l, batch, x, gy, params, gx, gparams);
      return;
    case layer_kind::flatten:
      if (gx != nullptr) {
        for (std::size_t i = 0; i < n_in; ++i) gx[i] += gy[i];
      }
      return;
    case layer_kind::softmax_xent:
      throw_no_layer_math(l, "the loss's backward needs the labels: use softmax_xent_backward");
    case layer_kind::transformer:
    case layer_kind::embedding:
    case layer_kind::layernorm: break;
  }
  throw_no_layer_math(l, "this kind is cost-model only (no reference math)");
}

// splitmix64: small, fast, and the same numbers on every platform (unlike the std
// distributions, whose algorithms are left to the library).
struct rng64 {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [-1, 1).
  double symmetric() { return static_cast<double>(next() >> 11) * 0x1p-52 - 1.0; }
};

std::uint64_t mix(std::uint64_t a, std::uint64_t b) {
  rng64 r{a ^ (b * 0xd1b54a32d192ed03ULL)};
  return r.next();
}

}  // namespace

void layer_forward(const layer_spec& layer, int batch, std::span<const float* const> inputs,
                   const float* params, float* out) {
  forward_impl<float>(layer, batch, inputs, params, out);
}

void layer_forward(const layer_spec& layer, int batch, std::span<const double* const> inputs,
                   const double* params, double* out) {
  forward_impl<double>(layer, batch, inputs, params, out);
}

void layer_backward(const layer_spec& layer, int batch, std::span<const float* const> inputs,
                    const float* out, const float* grad_out, const float* params,
                    std::span<float* const> grad_inputs, float* grad_params) {
  backward_impl<float>(layer, batch, inputs, out, grad_out, params, grad_inputs, grad_params);
}

void layer_backward(const layer_spec& layer, int batch, std::span<const double* const> inputs,
                    const double* out, const double* grad_out, const double* params,
                    std::span<double* const> grad_inputs, double* grad_params) {
  backward_impl<double>(layer, batch, inputs, out, grad_out, params, grad_inputs, grad_params);
}

float softmax_xent_forward(const layer_spec& layer, int batch, const float* logits,
                           const int* labels, float* probs) {
  check_loss_layer(layer);
  check_layer_batch(layer, batch);
  return static_cast<float>(softmax_rows<float>(layer, batch, logits, labels, probs));
}

double softmax_xent_forward(const layer_spec& layer, int batch, const double* logits,
                            const int* labels, double* probs) {
  check_loss_layer(layer);
  check_layer_batch(layer, batch);
  return softmax_rows<double>(layer, batch, logits, labels, probs);
}

void softmax_xent_backward(const layer_spec& layer, int batch, const float* probs,
                           const int* labels, float* grad_logits) {
  check_loss_layer(layer);
  softmax_backward_impl<float>(layer, batch, probs, labels, grad_logits);
}

void softmax_xent_backward(const layer_spec& layer, int batch, const double* probs,
                           const int* labels, double* grad_logits) {
  check_loss_layer(layer);
  softmax_backward_impl<double>(layer, batch, probs, labels, grad_logits);
}

void init_params(const layer_spec& layer, float* params, std::uint64_t seed) {
  rng64 rng{mix(seed, static_cast<std::uint64_t>(layer.index) + 1)};
  const auto fill = [&](float* p, std::size_t n, double bound) {
    for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<float>(rng.symmetric() * bound);
  };
  switch (layer.op) {
    case layer_kind::conv:
    case layer_kind::fc: {
      const std::size_t biases = layer.bias ? static_cast<std::size_t>(layer.out_channels) : 0;
      const double fan_in = static_cast<double>(layer.param_elems - biases) / layer.out_channels;
      fill(params, layer.param_elems - biases, std::sqrt(6.0 / fan_in));
      fill(params + layer.param_elems - biases, biases, 1.0 / std::sqrt(fan_in));
      return;
    }
    case layer_kind::batchnorm:
    case layer_kind::layernorm: {
      const std::size_t c = layer.param_elems / 2;
      std::fill(params, params + c, 1.0F);
      std::fill(params + c, params + 2 * c, 0.0F);
      return;
    }
    case layer_kind::embedding:
    case layer_kind::transformer: fill(params, layer.param_elems, 0.02); return;
    case layer_kind::relu:
    case layer_kind::maxpool:
    case layer_kind::avgpool:
    case layer_kind::add:
    case layer_kind::flatten:
    case layer_kind::softmax_xent: return;
  }
}

void make_batch(const model_spec& model, int batch, std::uint64_t seed, float* inputs,
                int* labels) {
  const std::size_t elems = model.input_elems_per_sample();
  const std::size_t per_sample_labels = model.labels_per_sample();
  const int loss = model.loss_layer();
  const int classes = loss < 0 ? 1 : model.layers[static_cast<std::size_t>(loss)].in_channels;
  int vocab = 0;
  for (int c : model.consumers(-1)) {
    if (model.layers[static_cast<std::size_t>(c)].op == layer_kind::embedding) {
      vocab = model.layers[static_cast<std::size_t>(c)].vocab;
    }
  }
  rng64 rng{mix(seed, 0x5eed)};
  // The class patterns depend on the model's shape only, not on the seed, so that every batch
  // poses the same task.
  constexpr std::uint64_t pattern_salt = 0x7a77e2f0c1a55e5ULL;
  for (int n = 0; n < batch; ++n) {
    const std::size_t first_label = static_cast<std::size_t>(n) * per_sample_labels;
    for (std::size_t k = 0; k < per_sample_labels; ++k) {
      const int label = static_cast<int>(rng.next() % static_cast<std::uint64_t>(classes));
      if (labels != nullptr) labels[first_label + k] = label;
    }
    const int cls = per_sample_labels > 0 && labels != nullptr ? labels[first_label] : 0;
    float* x = inputs + static_cast<std::size_t>(n) * elems;
    if (vocab > 0) {
      for (std::size_t i = 0; i < elems; ++i) {
        x[i] = static_cast<float>(rng.next() % static_cast<std::uint64_t>(vocab));
      }
      continue;
    }
    rng64 pattern{mix(pattern_salt, static_cast<std::uint64_t>(cls))};
    for (std::size_t i = 0; i < elems; ++i) {
      x[i] = static_cast<float>(0.8 * pattern.symmetric() + 0.5 * rng.symmetric());
    }
  }
}

void sgd_update(float* params, const float* grads, std::size_t n, float lr) {
  for (std::size_t i = 0; i < n; ++i) params[i] -= lr * grads[i];
}

void sgd_momentum_update(float* params, const float* grads, float* momentum, std::size_t n,
                         float lr, float mu) {
  for (std::size_t i = 0; i < n; ++i) {
    momentum[i] = mu * momentum[i] + grads[i];
    params[i] -= lr * momentum[i];
  }
}

std::vector<std::vector<float>> init_model_params(const model_spec& model, std::uint64_t seed) {
  std::vector<std::vector<float>> params(model.layers.size());
  for (const auto& l : model.layers) {
    auto& p = params[static_cast<std::size_t>(l.index)];
    p.resize(l.param_elems);
    init_params(l, p.data(), seed);
  }
  return params;
}

float reference_train_step(const model_spec& model, int batch,
                           const std::vector<std::vector<float>>& params, const float* inputs,
                           const int* labels, std::vector<std::vector<float>>& grads) {
  const int loss_index = model.loss_layer();
  if (loss_index < 0) {
    throw_config_error("model", model.name, "a model ending in softmax_xent",
                       "reference_train_step needs a loss");
  }
  const std::size_t n_layers = model.layers.size();
  std::vector<std::vector<float>> outs(n_layers), grad_outs(n_layers);
  grads.resize(n_layers);
  for (const auto& l : model.layers) {
    const auto i = static_cast<std::size_t>(l.index);
    outs[i].assign(static_cast<std::size_t>(batch) * l.out_elems_per_sample, 0.0F);
    grad_outs[i].assign(outs[i].size(), 0.0F);
    grads[i].assign(l.param_elems, 0.0F);
  }
  const auto tensor = [&](int producer) -> const float* {
    return producer < 0 ? inputs : outs[static_cast<std::size_t>(producer)].data();
  };
  const auto param_ptr = [&](std::size_t i) -> const float* {
    return params[i].empty() ? nullptr : params[i].data();
  };

  float loss = 0;
  std::vector<const float*> in_ptrs;
  for (const auto& l : model.layers) {
    const auto i = static_cast<std::size_t>(l.index);
    in_ptrs.clear();
    for (int p : l.inputs) in_ptrs.push_back(tensor(p));
    if (l.op == layer_kind::softmax_xent) {
      loss = softmax_xent_forward(l, batch, in_ptrs[0], labels, outs[i].data());
    } else {
      layer_forward(l, batch, in_ptrs, param_ptr(i), outs[i].data());
    }
  }
  std::vector<float*> gin_ptrs;
  for (auto it = model.layers.rbegin(); it != model.layers.rend(); ++it) {
    const auto& l = *it;
    const auto i = static_cast<std::size_t>(l.index);
    in_ptrs.clear();
    gin_ptrs.clear();
    for (int p : l.inputs) {
      in_ptrs.push_back(tensor(p));
      gin_ptrs.push_back(p < 0 ? nullptr : grad_outs[static_cast<std::size_t>(p)].data());
    }
    if (l.op == layer_kind::softmax_xent) {
      softmax_xent_backward(l, batch, outs[i].data(), labels, gin_ptrs[0]);
    } else {
      layer_backward(l, batch, in_ptrs, outs[i].data(), grad_outs[i].data(), param_ptr(i),
                     gin_ptrs, grads[i].empty() ? nullptr : grads[i].data());
    }
  }
  return loss;
}

}  // namespace gpuswap
