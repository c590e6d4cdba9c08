#include "device/cuda_kernels.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <string>

#include "core/errors.hpp"
#include "device/cuda_no_device.hpp"

namespace gpuswap::cuda_kernels {

// Note [Deterministic kernels]
// The demo proves swapping by comparing a budgeted run's losses and gradients bit for bit with
// an unlimited run, so every kernel must give the same bits every time. No kernel uses atomics
// or a reduction whose order depends on scheduling: each output element belongs to one thread,
// which computes it with a sequential loop, and the launch geometry never changes what a thread
// computes (grid-stride loops only decide which thread does it).
//
// The loops also run in reference_math's order: conv's weight gradient for (c_out, ky, kx, c_in)
// sums its terms over (n, oy, ox) ascending, the input gradient of an element over (oy, ox,
// c_out), and so on, and each element receives old + (its whole contribution) as reference_math
// adds its scratch array (Note [Contribution then add]), a zero contribution included (it turns
// a -0 into +0 on the CPU too). The .cu is compiled with --fmad=false so that `acc += a * b`
// rounds the product and the sum separately, as the CPU does (x86-64 without -mfma never
// contracts). With IEEE division and square root (nvcc's defaults), the kernels made only of
// additions, multiplications, divisions and square roots (conv, fc, pools, relu, add, flatten,
// batchnorm, sgd, softmax's backward) should then agree with reference_math bit for bit;
// softmax's exp and log come from CUDA's math library, whose last bit may differ from glibc's,
// so its probabilities and loss agree within rounding. The tests hold GPU to CPU only within a
// tolerance (tests/tools/gpu_math_test.cpp) and GPU to GPU bit for bit.
//
// The price of sequential reductions is parallelism: a reduction over the batch runs in one
// thread per output element (conv's weight gradient: one thread per weight, summing batch x
// out_h x out_w terms; batchnorm's statistics: one thread per channel). For the small networks
// that have real math that is fast enough; it is not a tuned GEMM.

namespace {

constexpr int block_threads = 256;
// Grid-stride loops take over beyond this many blocks.
constexpr std::size_t max_blocks = 65535;
constexpr double bn_eps = 1e-5;  // reference_math's

// The one place a CUDA status becomes an exception here. Clearing the thread's last error keeps
// a handled failure from resurfacing in an unrelated later cudaGetLastError.
void check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();
  if (cuda_means_no_device(status)) {
    throw_no_cuda_device(what, cudaGetErrorName(status), cudaGetErrorString(status));
  }
  throw_device_error(what, cudaGetErrorName(status), cudaGetErrorString(status));
}

void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

cudaStream_t as_stream(void* native_stream) { return static_cast<cudaStream_t>(native_stream); }

unsigned int blocks_for(std::size_t n) {
  return static_cast<unsigned int>(
      std::min(max_blocks, (n + block_threads - 1) / static_cast<std::size_t>(block_threads)));
}

__device__ std::size_t first_index() {
  return static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ std::size_t grid_stride() {
  return static_cast<std::size_t>(gridDim.x) * blockDim.x;
}

// The output rows oy whose window [oy * stride - pad, + kernel) holds input row iy.
struct window_range {
  int first, last;  // inclusive; empty when first > last
};

__device__ window_range windows_holding(int i, int pad, int kernel, int stride, int out) {
  const int low = i + pad - kernel + 1;  // the window must end after i
  const int first = low <= 0 ? 0 : (low + stride - 1) / stride;
  const int last = min((i + pad) / stride, out - 1);  // ... and start at or before it
  return {first, last};
}

// ---- conv ------------------------------------------------------------------------------------

__global__ void conv_forward_kernel(conv_geometry g, const float* x, const float* w,
                                    const float* b, float* y, std::size_t total) {
  const int cin = g.in_channels, cout = g.out_channels;
  for (std::size_t i = first_index(); i < total; i += grid_stride()) {
    const int co = static_cast<int>(i % cout);
    std::size_t r = i / cout;
    const int ox = static_cast<int>(r % g.out_w);
    r /= g.out_w;
    const int oy = static_cast<int>(r % g.out_h);
    const std::size_t n = r / g.out_h;
    float acc = b != nullptr ? b[co] : 0.0F;
    for (int ky = 0; ky < g.kernel_h; ++ky) {
      const int iy = oy * g.stride - g.pad + ky;
      if (iy < 0 || iy >= g.in_h) continue;
      for (int kx = 0; kx < g.kernel_w; ++kx) {
        const int ix = ox * g.stride - g.pad + kx;
        if (ix < 0 || ix >= g.in_w) continue;
        const float* xp = x + ((n * g.in_h + iy) * g.in_w + ix) * cin;
        const float* wp = w + ((static_cast<std::size_t>(co) * g.kernel_h + ky) * g.kernel_w + kx) * cin;
        for (int ci = 0; ci < cin; ++ci) acc += xp[ci] * wp[ci];
      }
    }
    y[i] = acc;
  }
}

// One thread per input element; its terms in reference_math's order (oy, ox, c_out).
__global__ void conv_backward_input_kernel(conv_geometry g, const float* gy, const float* w,
                                           float* gx, std::size_t total) {
  const int cin = g.in_channels, cout = g.out_channels;
  for (std::size_t i = first_index(); i < total; i += grid_stride()) {
    const int ci = static_cast<int>(i % cin);
    std::size_t r = i / cin;
    const int ix = static_cast<int>(r % g.in_w);
    r /= g.in_w;
    const int iy = static_cast<int>(r % g.in_h);
    const std::size_t n = r / g.in_h;
    const window_range rows = windows_holding(iy, g.pad, g.kernel_h, g.stride, g.out_h);
    const window_range cols = windows_holding(ix, g.pad, g.kernel_w, g.stride, g.out_w);
    float acc = 0.0F;
    for (int oy = rows.first; oy <= rows.last; ++oy) {
      const int ky = iy + g.pad - oy * g.stride;
      for (int ox = cols.first; ox <= cols.last; ++ox) {
        const int kx = ix + g.pad - ox * g.stride;
        const float* gyp = gy + ((n * g.out_h + oy) * g.out_w + ox) * cout;
        const std::size_t tap = (static_cast<std::size_t>(ky) * g.kernel_w + kx) * cin + ci;
        const std::size_t per_co = static_cast<std::size_t>(g.kernel_h) * g.kernel_w * cin;
        for (int co = 0; co < cout; ++co) acc += gyp[co] * w[co * per_co + tap];
      }
    }
    gx[i] += acc;
  }
}

// One thread per weight; its terms over (n, oy, ox) ascending.
__global__ void conv_weight_grad_kernel(conv_geometry g, const float* x, const float* gy,
                                        float* gw, std::size_t total) {
  const int cin = g.in_channels, cout = g.out_channels;
  for (std::size_t i = first_index(); i < total; i += grid_stride()) {
    const int ci = static_cast<int>(i % cin);
    std::size_t r = i / cin;
    const int kx = static_cast<int>(r % g.kernel_w);
    r /= g.kernel_w;
    const int ky = static_cast<int>(r % g.kernel_h);
    const int co = static_cast<int>(r / g.kernel_h);
    float acc = 0.0F;
    for (int n = 0; n < g.batch; ++n) {
      for (int oy = 0; oy < g.out_h; ++oy) {
        const int iy = oy * g.stride - g.pad + ky;
        if (iy < 0 || iy >= g.in_h) continue;
        for (int ox = 0; ox < g.out_w; ++ox) {
          const int ix = ox * g.stride - g.pad + kx;
          if (ix < 0 || ix >= g.in_w) continue;
          const std::size_t yo = ((static_cast<std::size_t>(n) * g.out_h + oy) * g.out_w + ox) * cout;
          const std::size_t xo = ((static_cast<std::size_t>(n) * g.in_h + iy) * g.in_w + ix) * cin;
          acc += gy[yo + co] * x[xo + ci];
        }
      }
    }
    gw[i] += acc;
  }
}

// One thread per output channel (a batch x out_h x out_w sum).
__global__ void channel_sum_kernel(std::size_t positions, int channels, const float* gy,
                                   float* gb) {
  for (std::size_t co = first_index(); co < static_cast<std::size_t>(channels);
       co += grid_stride()) {
    float acc = 0.0F;
    for (std::size_t p = 0; p < positions; ++p) acc += gy[p * channels + co];
    gb[co] += acc;
  }
}

// ---- fc --------------------------------------------------------------------------------------

__global__ void fc_forward_kernel(int in, int out, const float* x, const float* w,
                                  const float* b, float* y, std::size_t total) {
  for (std::size_t i = first_index(); i < total; i += grid_stride()) {
    const std::size_t o = i % out, m = i / out;
    const float* xp = x + m * in;
    const float* wp = w + o * in;
    float acc = b != nullptr ? b[o] : 0.0F;
    for (int k = 0; k < in; ++k) acc += xp[k] * wp[k];
    y[i] = acc;
  }
}

__global__ void fc_backward_input_kernel(int in, int out, const float* gy, const float* w,
                                         float* gx, std::size_t total) {
  for (std::size_t i = first_index(); i < total; i += grid_stride()) {
    const std::size_t k = i % in, m = i / in;
    float acc = 0.0F;
    for (int o = 0; o < out; ++o) acc += gy[m * out + o] * w[static_cast<std::size_t>(o) * in + k];
    gx[i] += acc;
  }
}

__global__ void fc_weight_grad_kernel(std::size_t rows, int in, int out, const float* x,
                                      const float* gy, float* gw, std::size_t total) {
  for (std::size_t i = first_index(); i < total; i += grid_stride()) {
    const std::size_t k = i % in, o = i / in;
    float acc = 0.0F;
    for (std::size_t m = 0; m < rows; ++m) acc += gy[m * out + o] * x[m * in + k];
    gw[i] += acc;
  }
}

// ---- elementwise -----------------------------------------------------------------------------

__global__ void relu_forward_kernel(const float* x, float* y, std::size_t n) {
  for (std::size_t i = first_index(); i < n; i += grid_stride()) y[i] = x[i] > 0.0F ? x[i] : 0.0F;
}

__global__ void relu_backward_kernel(const float* y, const float* gy, float* gx, std::size_t n) {
  for (std::size_t i = first_index(); i < n; i += grid_stride()) {
    gx[i] += y[i] > 0.0F ? gy[i] : 0.0F;
  }
}

constexpr int pack_size = 8;
struct pointer_pack {
  const float* p[pack_size];
  int count;
};

// y = p[0] + p[1] + ... left to right; p[0] may be y itself (a later chunk of a long sum).
__global__ void add_kernel(pointer_pack in, float* y, std::size_t n) {
  for (std::size_t i = first_index(); i < n; i += grid_stride()) {
    float sum = in.p[0][i];
    for (int k = 1; k < in.count; ++k) sum += in.p[k][i];
    y[i] = sum;
  }
}

__global__ void accumulate_kernel(const float* src, float* dst, std::size_t n) {
  for (std::size_t i = first_index(); i < n; i += grid_stride()) dst[i] += src[i];
}

// ---- pooling ---------------------------------------------------------------------------------

struct window {
  int y_begin, y_end, x_begin, x_end;  // clipped to the input
};

__device__ window clipped_window(const pool_geometry& g, int oy, int ox) {
  const int y0 = oy * g.stride - g.pad, x0 = ox * g.stride - g.pad;
  return {max(y0, 0), min(y0 + g.kernel_h, g.in_h), max(x0, 0), min(x0 + g.kernel_w, g.in_w)};
}

// Decomposes an NHWC index over [batch][h][w][c].
struct nhwc {
  std::size_t n;
  int y, x, c;
};

__device__ nhwc split(std::size_t i, int h, int w, int c) {
  nhwc r{};
  r.c = static_cast<int>(i % c);
  i /= c;
  r.x = static_cast<int>(i % w);
  i /= w;
  r.y = static_cast<int>(i % h);
  r.n = i / h;
  return r;
}

__global__ void maxpool_forward_kernel(pool_geometry g, const float* x, float* y,
                                       std::size_t total) {
  const int c = g.channels;
  for (std::size_t i = first_index(); i < total; i += grid_stride()) {
    const nhwc o = split(i, g.out_h, g.out_w, c);
    const window win = clipped_window(g, o.y, o.x);
    const std::size_t image = o.n * g.in_h;
    float best = -INFINITY;
    for (int iy = win.y_begin; iy < win.y_end; ++iy) {
      for (int ix = win.x_begin; ix < win.x_end; ++ix) {
        const float v = x[((image + iy) * g.in_w + ix) * c + o.c];
        if (v > best) best = v;
      }
    }
    y[i] = best;
  }
}

// One thread per input element: the windows holding it, in (oy, ox) order, each finding its
// first maximum again as reference_math does (and as forward did).
__global__ void maxpool_backward_kernel(pool_geometry g, const float* x, const float* gy,
                                        float* gx, std::size_t total) {
  const int c = g.channels;
  for (std::size_t i = first_index(); i < total; i += grid_stride()) {
    const nhwc e = split(i, g.in_h, g.in_w, c);
    const std::size_t image = e.n * g.in_h;
    const window_range rows = windows_holding(e.y, g.pad, g.kernel_h, g.stride, g.out_h);
    const window_range cols = windows_holding(e.x, g.pad, g.kernel_w, g.stride, g.out_w);
    float acc = 0.0F;
    for (int oy = rows.first; oy <= rows.last; ++oy) {
      for (int ox = cols.first; ox <= cols.last; ++ox) {
        const window win = clipped_window(g, oy, ox);
        float best = -INFINITY;
        int arg_y = win.y_begin, arg_x = win.x_begin;
        for (int iy = win.y_begin; iy < win.y_end; ++iy) {
          for (int ix = win.x_begin; ix < win.x_end; ++ix) {
            const float v = x[((image + iy) * g.in_w + ix) * c + e.c];
            if (v > best) {
              best = v;
              arg_y = iy;
              arg_x = ix;
            }
          }
        }
        if (arg_y == e.y && arg_x == e.x) {
          acc += gy[((e.n * g.out_h + oy) * g.out_w + ox) * c + e.c];
        }
      }
    }
    gx[i] += acc;
  }
}

__global__ void avgpool_forward_kernel(pool_geometry g, float scale, const float* x, float* y,
                                       std::size_t total) {
  const int c = g.channels;
  for (std::size_t i = first_index(); i < total; i += grid_stride()) {
    const nhwc o = split(i, g.out_h, g.out_w, c);
    const window win = clipped_window(g, o.y, o.x);
    const std::size_t image = o.n * g.in_h;
    float sum = 0.0F;
    for (int iy = win.y_begin; iy < win.y_end; ++iy) {
      for (int ix = win.x_begin; ix < win.x_end; ++ix) sum += x[((image + iy) * g.in_w + ix) * c + o.c];
    }
    y[i] = sum * scale;
  }
}

__global__ void avgpool_backward_kernel(pool_geometry g, float scale, const float* gy, float* gx,
                                        std::size_t total) {
  const int c = g.channels;
  for (std::size_t i = first_index(); i < total; i += grid_stride()) {
    const nhwc e = split(i, g.in_h, g.in_w, c);
    const window_range rows = windows_holding(e.y, g.pad, g.kernel_h, g.stride, g.out_h);
    const window_range cols = windows_holding(e.x, g.pad, g.kernel_w, g.stride, g.out_w);
    float acc = 0.0F;
    for (int oy = rows.first; oy <= rows.last; ++oy) {
      for (int ox = cols.first; ox <= cols.last; ++ox) {
        acc += gy[((e.n * g.out_h + oy) * g.out_w + ox) * c + e.c] * scale;
      }
    }
    gx[i] += acc;
  }
}

// ---- batchnorm: one block per channel; thread 0 reduces in reference_math's order, then the
// block handles the channel's elements ------------------------------------------------------

__device__ void channel_stats(std::size_t rows, int c, int ch, const float* x, double& mean,
                              double& inv_std) {
  double sum = 0.0;
  for (std::size_t r = 0; r < rows; ++r) sum += static_cast<double>(x[r * c + ch]);
  mean = sum / static_cast<double>(rows);
  double var = 0.0;
  for (std::size_t r = 0; r < rows; ++r) {
    const double d = static_cast<double>(x[r * c + ch]) - mean;
    var += d * d;
  }
  inv_std = 1.0 / sqrt(var / static_cast<double>(rows) + bn_eps);
}

__global__ void batchnorm_forward_kernel(std::size_t rows, int c, const float* x,
                                         const float* params, float* y) {
  __shared__ double mean, inv_std;
  for (int ch = static_cast<int>(blockIdx.x); ch < c; ch += static_cast<int>(gridDim.x)) {
    if (threadIdx.x == 0) channel_stats(rows, c, ch, x, mean, inv_std);
    __syncthreads();
    const double gamma = static_cast<double>(params[ch]);
    const double beta = static_cast<double>(params[c + ch]);
    for (std::size_t r = threadIdx.x; r < rows; r += blockDim.x) {
      const double xhat = (static_cast<double>(x[r * c + ch]) - mean) * inv_std;
      y[r * c + ch] = static_cast<float>(gamma * xhat + beta);
    }
    __syncthreads();  // before thread 0 overwrites the statistics for the next channel
  }
}

__global__ void batchnorm_backward_kernel(std::size_t rows, int c, const float* x,
                                          const float* gy, const float* params, float* gx,
                                          float* gparams) {
  __shared__ double mean, inv_std, dgamma, dbeta;
  for (int ch = static_cast<int>(blockIdx.x); ch < c; ch += static_cast<int>(gridDim.x)) {
    if (threadIdx.x == 0) {
      channel_stats(rows, c, ch, x, mean, inv_std);
      double dg = 0.0, db = 0.0;
      for (std::size_t r = 0; r < rows; ++r) {
        const double g = static_cast<double>(gy[r * c + ch]);
        const double xhat = (static_cast<double>(x[r * c + ch]) - mean) * inv_std;
        db += g;
        dg += g * xhat;
      }
      dgamma = dg;
      dbeta = db;
      if (gparams != nullptr) {
        gparams[ch] += static_cast<float>(dg);
        gparams[c + ch] += static_cast<float>(db);
      }
    }
    __syncthreads();
    if (gx != nullptr) {
      const double md = static_cast<double>(rows);
      const double gamma = static_cast<double>(params[ch]);
      for (std::size_t r = threadIdx.x; r < rows; r += blockDim.x) {
        const double g = static_cast<double>(gy[r * c + ch]);
        const double xhat = (static_cast<double>(x[r * c + ch]) - mean) * inv_std;
        const double dx = gamma * inv_std / md * (md * g - dbeta - xhat * dgamma);
        gx[r * c + ch] += static_cast<float>(dx);
      }
    }
    __syncthreads();
  }
}

// ---- softmax cross-entropy -------------------------------------------------------------------

// The row's maximum (std::max's comparison, so a NaN after the first element is skipped as the
// CPU skips it) and sum of exp(x - max) in float64.
__device__ void row_exp_sum(const float* xp, int c, float& top, double& sum) {
  top = xp[0];
  for (int j = 1; j < c; ++j) top = top < xp[j] ? xp[j] : top;
  sum = 0.0;
  for (int j = 0; j < c; ++j) sum += exp(static_cast<double>(xp[j] - top));
}

__global__ void softmax_forward_kernel(std::size_t rows, int c, const float* logits,
                                       float* probs) {
  for (std::size_t r = first_index(); r < rows; r += grid_stride()) {
    const float* xp = logits + r * c;
    float top = 0.0F;
    double sum = 0.0;
    row_exp_sum(xp, c, top, sum);
    for (int j = 0; j < c; ++j) {
      probs[r * c + j] = static_cast<float>(exp(static_cast<double>(xp[j] - top)) / sum);
    }
  }
}

// One block: its threads find the terms of block_threads rows at a time in parallel, and thread
// 0 adds them in row order, so the float64 total is reference_math's bit for bit (given the same
// terms).
__global__ void softmax_xent_loss_kernel(std::size_t rows, int c, const float* logits,
                                         const int* labels, float* loss) {
  __shared__ double terms[block_threads];
  double total = 0.0;  // meaningful in thread 0
  for (std::size_t base = 0; base < rows; base += block_threads) {
    const std::size_t r = base + threadIdx.x;
    if (r < rows) {
      const int label = labels[r];
      if (label < 0 || label >= c) {
        terms[threadIdx.x] = nan("");
      } else {
        const float* xp = logits + r * c;
        float top = 0.0F;
        double sum = 0.0;
        row_exp_sum(xp, c, top, sum);
        terms[threadIdx.x] = log(sum) - static_cast<double>(xp[label] - top);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const std::size_t left = rows - base;
      const std::size_t here = left < block_threads ? left : block_threads;
      for (std::size_t k = 0; k < here; ++k) total += terms[k];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = static_cast<float>(total / static_cast<double>(rows));
}

__global__ void softmax_xent_backward_kernel(std::size_t rows, int c, float scale,
                                             const float* probs, const int* labels, float* gx) {
  const std::size_t total = rows * c;
  for (std::size_t i = first_index(); i < total; i += grid_stride()) {
    const int j = static_cast<int>(i % c);
    const int label = labels[i / c];
    if (label < 0 || label >= c) {
      gx[i] += nanf("");
      continue;
    }
    const float onehot = j == label ? 1.0F : 0.0F;
    gx[i] += (probs[i] - onehot) * scale;
  }
}

// ---- optimiser -------------------------------------------------------------------------------

__global__ void sgd_kernel(float lr, float* p, const float* g, std::size_t n) {
  for (std::size_t i = first_index(); i < n; i += grid_stride()) p[i] -= lr * g[i];
}

__global__ void sgd_momentum_kernel(float lr, float mu, float* p, const float* g, float* m,
                                    std::size_t n) {
  for (std::size_t i = first_index(); i < n; i += grid_stride()) {
    m[i] = mu * m[i] + g[i];
    p[i] -= lr * m[i];
  }
}

std::size_t conv_weight_elems(const conv_geometry& g) {
  return static_cast<std::size_t>(g.out_channels) * g.kernel_h * g.kernel_w * g.in_channels;
}

}  // namespace

// ---- launchers -------------------------------------------------------------------------------

void conv_forward(const conv_geometry& g, const float* x, const float* params, float* y,
                  void* native_stream) {
  const std::size_t total =
      static_cast<std::size_t>(g.batch) * g.out_h * g.out_w * g.out_channels;
  if (total == 0) return;
  const float* b = g.bias ? params + conv_weight_elems(g) : nullptr;
  conv_forward_kernel<<<blocks_for(total), block_threads, 0, as_stream(native_stream)>>>(
      g, x, params, b, y, total);
  check_launch("conv_forward_kernel");
}

void conv_backward_input(const conv_geometry& g, const float* gy, const float* params, float* gx,
                         void* native_stream) {
  const std::size_t total = static_cast<std::size_t>(g.batch) * g.in_h * g.in_w * g.in_channels;
  if (total == 0) return;
  conv_backward_input_kernel<<<blocks_for(total), block_threads, 0, as_stream(native_stream)>>>(
      g, gy, params, gx, total);
  check_launch("conv_backward_input_kernel");
}

void conv_backward_params(const conv_geometry& g, const float* x, const float* gy,
                          float* gparams, void* native_stream) {
  const std::size_t weights = conv_weight_elems(g);
  if (weights == 0 || g.batch == 0) return;
  conv_weight_grad_kernel<<<blocks_for(weights), block_threads, 0, as_stream(native_stream)>>>(
      g, x, gy, gparams, weights);
  check_launch("conv_weight_grad_kernel");
  if (!g.bias) return;
  const std::size_t positions = static_cast<std::size_t>(g.batch) * g.out_h * g.out_w;
  channel_sum_kernel<<<blocks_for(static_cast<std::size_t>(g.out_channels)), block_threads, 0,
                       as_stream(native_stream)>>>(positions, g.out_channels, gy,
                                                   gparams + weights);
  check_launch("channel_sum_kernel (conv bias gradient)");
}

void fc_forward(std::size_t rows, int inputs, int outputs, bool bias, const float* x,
                const float* params, float* y, void* native_stream) {
  const std::size_t total = rows * static_cast<std::size_t>(outputs);
  if (total == 0) return;
  const float* b = bias ? params + static_cast<std::size_t>(outputs) * inputs : nullptr;
  fc_forward_kernel<<<blocks_for(total), block_threads, 0, as_stream(native_stream)>>>(
      inputs, outputs, x, params, b, y, total);
  check_launch("fc_forward_kernel");
}

void fc_backward_input(std::size_t rows, int inputs, int outputs, const float* gy,
                       const float* params, float* gx, void* native_stream) {
  const std::size_t total = rows * static_cast<std::size_t>(inputs);
  if (total == 0) return;
  fc_backward_input_kernel<<<blocks_for(total), block_threads, 0, as_stream(native_stream)>>>(
      inputs, outputs, gy, params, gx, total);
  check_launch("fc_backward_input_kernel");
}

void fc_backward_params(std::size_t rows, int inputs, int outputs, bool bias, const float* x,
                        const float* gy, float* gparams, void* native_stream) {
  const std::size_t weights = static_cast<std::size_t>(outputs) * inputs;
  if (weights == 0 || rows == 0) return;
  fc_weight_grad_kernel<<<blocks_for(weights), block_threads, 0, as_stream(native_stream)>>>(
      rows, inputs, outputs, x, gy, gparams, weights);
  check_launch("fc_weight_grad_kernel");
  if (!bias) return;
  // The bias gradient is a column sum of gy [rows][outputs], as conv's is.
  channel_sum_kernel<<<blocks_for(static_cast<std::size_t>(outputs)), block_threads, 0,
                       as_stream(native_stream)>>>(rows, outputs, gy, gparams + weights);
  check_launch("channel_sum_kernel (fc bias gradient)");
}

void relu_forward(std::size_t n, const float* x, float* y, void* native_stream) {
  if (n == 0) return;
  relu_forward_kernel<<<blocks_for(n), block_threads, 0, as_stream(native_stream)>>>(x, y, n);
  check_launch("relu_forward_kernel");
}

void relu_backward(std::size_t n, const float* y, const float* gy, float* gx,
                   void* native_stream) {
  if (n == 0) return;
  relu_backward_kernel<<<blocks_for(n), block_threads, 0, as_stream(native_stream)>>>(y, gy, gx,
                                                                                      n);
  check_launch("relu_backward_kernel");
}

void add_forward(std::size_t n, const float* const* inputs, int count, float* y,
                 void* native_stream) {
  if (count < 1) {
    throw_config_error("count", std::to_string(count), "1 or more inputs", "add_forward");
  }
  if (n == 0) return;
  // Chunks of pack_size pointers; every chunk after the first starts from y, so the sum stays
  // left to right.
  int next = 0;
  while (next < count) {
    pointer_pack pack{};
    if (next > 0) pack.p[pack.count++] = y;
    while (pack.count < pack_size && next < count) pack.p[pack.count++] = inputs[next++];
    add_kernel<<<blocks_for(n), block_threads, 0, as_stream(native_stream)>>>(pack, y, n);
    check_launch("add_kernel");
  }
}

void accumulate(std::size_t n, const float* src, float* dst, void* native_stream) {
  if (n == 0) return;
  accumulate_kernel<<<blocks_for(n), block_threads, 0, as_stream(native_stream)>>>(src, dst, n);
  check_launch("accumulate_kernel");
}

void copy(std::size_t n, const float* src, float* dst, void* native_stream) {
  if (n == 0 || src == dst) return;
  check(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice,
                        as_stream(native_stream)),
        "cudaMemcpyAsync (cuda_kernels::copy)");
}

void fill_zero(void* ptr, std::size_t bytes, void* native_stream) {
  if (bytes == 0) return;
  check(cudaMemsetAsync(ptr, 0, bytes, as_stream(native_stream)),
        "cudaMemsetAsync (cuda_kernels::fill_zero)");
}

void maxpool_forward(const pool_geometry& g, const float* x, float* y, void* native_stream) {
  const std::size_t total = static_cast<std::size_t>(g.batch) * g.out_h * g.out_w * g.channels;
  if (total == 0) return;
  maxpool_forward_kernel<<<blocks_for(total), block_threads, 0, as_stream(native_stream)>>>(
      g, x, y, total);
  check_launch("maxpool_forward_kernel");
}

void maxpool_backward(const pool_geometry& g, const float* x, const float* gy, float* gx,
                      void* native_stream) {
  const std::size_t total = static_cast<std::size_t>(g.batch) * g.in_h * g.in_w * g.channels;
  if (total == 0) return;
  maxpool_backward_kernel<<<blocks_for(total), block_threads, 0, as_stream(native_stream)>>>(
      g, x, gy, gx, total);
  check_launch("maxpool_backward_kernel");
}

namespace {
// reference_math's T(1) / T(kernel_h * kernel_w), computed once on the host.
float avg_scale(const pool_geometry& g) {
  return 1.0F / static_cast<float>(g.kernel_h * g.kernel_w);
}
}  // namespace

void avgpool_forward(const pool_geometry& g, const float* x, float* y, void* native_stream) {
  const std::size_t total = static_cast<std::size_t>(g.batch) * g.out_h * g.out_w * g.channels;
  if (total == 0) return;
  avgpool_forward_kernel<<<blocks_for(total), block_threads, 0, as_stream(native_stream)>>>(
      g, avg_scale(g), x, y, total);
  check_launch("avgpool_forward_kernel");
}

void avgpool_backward(const pool_geometry& g, const float* gy, float* gx, void* native_stream) {
  const std::size_t total = static_cast<std::size_t>(g.batch) * g.in_h * g.in_w * g.channels;
  if (total == 0) return;
  avgpool_backward_kernel<<<blocks_for(total), block_threads, 0, as_stream(native_stream)>>>(
      g, avg_scale(g), gy, gx, total);
  check_launch("avgpool_backward_kernel");
}

void batchnorm_forward(std::size_t rows, int channels, const float* x, const float* params,
                       float* y, void* native_stream) {
  if (rows == 0 || channels <= 0) return;
  batchnorm_forward_kernel<<<blocks_for(static_cast<std::size_t>(channels) * block_threads),
                             block_threads, 0, as_stream(native_stream)>>>(rows, channels, x,
                                                                           params, y);
  check_launch("batchnorm_forward_kernel");
}

void batchnorm_backward(std::size_t rows, int channels, const float* x, const float* gy,
                        const float* params, float* gx, float* gparams, void* native_stream) {
  if (rows == 0 || channels <= 0 || (gx == nullptr && gparams == nullptr)) return;
  batchnorm_backward_kernel<<<blocks_for(static_cast<std::size_t>(channels) * block_threads),
                              block_threads, 0, as_stream(native_stream)>>>(
      rows, channels, x, gy, params, gx, gparams);
  check_launch("batchnorm_backward_kernel");
}

void softmax_forward(std::size_t rows, int classes, const float* logits, float* probs,
                     void* native_stream) {
  if (rows == 0 || classes <= 0) return;
  softmax_forward_kernel<<<blocks_for(rows), block_threads, 0, as_stream(native_stream)>>>(
      rows, classes, logits, probs);
  check_launch("softmax_forward_kernel");
}

void softmax_xent_loss(std::size_t rows, int classes, const float* logits, const int* labels,
                       float* loss, void* native_stream) {
  if (rows == 0 || classes <= 0) return;
  softmax_xent_loss_kernel<<<1, block_threads, 0, as_stream(native_stream)>>>(rows, classes,
                                                                             logits, labels, loss);
  check_launch("softmax_xent_loss_kernel");
}

void softmax_xent_backward(std::size_t rows, int classes, const float* probs, const int* labels,
                           float* gx, void* native_stream) {
  const std::size_t total = rows * static_cast<std::size_t>(classes > 0 ? classes : 0);
  if (total == 0) return;
  const float scale = 1.0F / static_cast<float>(rows);  // reference_math's T(1) / T(rows)
  softmax_xent_backward_kernel<<<blocks_for(total), block_threads, 0, as_stream(native_stream)>>>(
      rows, classes, scale, probs, labels, gx);
  check_launch("softmax_xent_backward_kernel");
}

void sgd_update(std::size_t n, float lr, float* params, const float* grads, void* native_stream) {
  if (n == 0) return;
  sgd_kernel<<<blocks_for(n), block_threads, 0, as_stream(native_stream)>>>(lr, params, grads, n);
  check_launch("sgd_kernel");
}

void sgd_momentum_update(std::size_t n, float lr, float mu, float* params, const float* grads,
                         float* momentum, void* native_stream) {
  if (n == 0) return;
  sgd_momentum_kernel<<<blocks_for(n), block_threads, 0, as_stream(native_stream)>>>(
      lr, mu, params, grads, momentum, n);
  check_launch("sgd_momentum_kernel");
}

}  // namespace gpuswap::cuda_kernels
