// The maths of Switchable Normalization inference, shared by the CPU kernel, the CUDA kernel and
// the TensorRT plugin. Nothing here touches memory layout or threads.
//
// Accuracy design (inputs whose mean is 1000x their spread must stay exact to ~1e-7):
//  * Each plane is shifted by one of its own values s (its first element): x - s is exact when x
//    and s are within a factor 2 (Sterbenz), so the moments of the small deviations keep every
//    digit the float32 mean itself would lose. Moments are (mean of x - s, M2, count), built with
//    Welford/Chan merging, accumulated in float32 (also for float16 input: never a raw fp16 x^2).
//  * The per-(n, c) combination (IN/LN/BN mixing, the affine terms) runs in double: it is O(N*C).
//  * The output is y = (x - s) * A + B with B = beta - (mean - s) * A, so no large term cancels;
//    a fused residual r is added before the optional ReLU.
#ifndef SN_MATH_H
#define SN_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define SN_HD __host__ __device__ __forceinline__
#else
#define SN_HD static inline
#endif

namespace sn {

// Moments of deviations from a shift: mean (of x - shift), sum of squared deviations, count.
struct Moments {
  float mean;
  float m2;
  float count;
};

SN_HD Moments moments_empty() { return Moments{0.f, 0.f, 0.f}; }

// Welford update with one deviation d = x - shift.
SN_HD void welford_add(Moments& m, float d) {
  m.count += 1.f;
  const float delta = d - m.mean;
  m.mean += delta / m.count;
  m.m2 += delta * (d - m.mean);
}

// Chan et al. parallel merge of two moment sets over the same shift.
SN_HD Moments chan_merge(const Moments& a, const Moments& b) {
  if (a.count == 0.f) return b;
  if (b.count == 0.f) return a;
  const float n = a.count + b.count;
  const float delta = b.mean - a.mean;
  const float wb = b.count / n;
  return Moments{a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb, n};
}

// Add K deviations at once: their exact two-pass moments in registers, then one Chan merge.
// One division per K values instead of one per value (the vectorized GPU loops are otherwise
// division-bound on fp16 data); as robust as Welford, since no sum of squares is ever cancelled.
template <int K>
SN_HD void welford_add_chunk(Moments& m, const float (&d)[K]) {
  float s = 0.f;
  for (int k = 0; k < K; ++k) s += d[k];
  const float mc = s * (1.f / K);
  float m2 = 0.f;
  for (int k = 0; k < K; ++k) m2 += (d[k] - mc) * (d[k] - mc);
  m = chan_merge(m, Moments{mc, m2, float(K)});
}

// Double-precision variant for merging many chunk moments on the host.
struct MomentsD {
  double mean;
  double m2;
  double count;
};

SN_HD MomentsD chan_merge_d(const MomentsD& a, double b_mean, double b_m2, double b_count) {
  if (b_count == 0.0) return a;
  if (a.count == 0.0) return MomentsD{b_mean, b_m2, b_count};
  const double n = a.count + b_count;
  const double delta = b_mean - a.mean;
  const double wb = b_count / n;
  return MomentsD{a.mean + delta * wb, a.m2 + b_m2 + delta * delta * a.count * wb, n};
}

// The mixing of one layer: softmaxed weights (branch order as in sn_kernels.h) and constants.
struct Mixing {
  double w_stat, w_ln, w_bn;  // mean weights: [IN or -, LN, BN]
  double v_stat, v_ln, v_bn;  // variance weights
  double eps;
};

// Per-(n, c) affine terms of y = (x - shift) * a + b for one channel, given the channel's moments
// (mean_in = shift + mean_off, unbiased var_in), the sample's LN moments and the BN terms.
struct Affine {
  float shift, a, b;
};

SN_HD Affine affine_terms(double shift, double mean_in, double var_in, double mean_ln,
                          double var_ln, double bn_mean, double bn_var, double gamma, double beta,
                          const Mixing& mx) {
  const double mean = mx.w_stat * mean_in + mx.w_ln * mean_ln + mx.w_bn * bn_mean;
  const double var = mx.v_stat * var_in + mx.v_ln * var_ln + mx.v_bn * bn_var;
  const double a = gamma / sqrt(var + mx.eps);
  return Affine{(float)shift, (float)a, (float)(beta - (mean - shift) * a)};
}

// ReLU written as a compare-and-select: it vectorizes (fmaxf does not, without fast-math) and
// passes NaN through, as the ReLU op of an unfused graph does.
SN_HD float relu_of(float y) { return y < 0.f ? 0.f : y; }

SN_HD float apply(float x, const Affine& t, bool relu) {
  const float y = (x - t.shift) * t.a + t.b;
  return relu ? relu_of(y) : y;
}

// The same with a fused residual r (a ResNet block's skip connection): relu?(SN(x) + r). The sum is
// taken in float32 also for fp16 tensors, so it is rounded once, when y is stored.
SN_HD float apply(float x, float r, const Affine& t, bool relu) {
  const float y = (x - t.shift) * t.a + t.b + r;
  return relu ? relu_of(y) : y;
}

// IEEE binary16 <-> float for host code (CUDA uses __half intrinsics).
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static inline uint16_t float_to_half(float f) {  // round to nearest even
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return sign | (absx > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (absx >= 0x477ff000u) return sign | 0x7c00u;  // overflow to inf
  if (absx < 0x38800000u) {                        // subnormal or zero
    if (absx < 0x33000000u) return sign;
    const uint32_t mant = (absx & 0x7fffffu) | 0x800000u;
    const int shift = 113 - (int)(absx >> 23) + 13;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return sign | (uint16_t)h;
  }
  uint32_t h = ((absx - 0x38000000u) >> 13);
  const uint32_t rem = absx & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | (uint16_t)h;
}

}  // namespace sn

#endif  // SN_MATH_H
