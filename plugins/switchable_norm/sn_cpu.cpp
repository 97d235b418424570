// CPU back end of the Switchable Normalization kernels: one pass over each plane for the moments
// (chunks of CHUNK elements: float sums over an L1-resident chunk, Chan-merged in double), an
// O(N*C) combination in double, and one fused pass y = (x - s) * A + B (+ residual, + ReLU).
#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "sn_cpu_impl.h"
#include "sn_kernels.h"
#include "sn_math.h"

namespace {

constexpr int64_t CHUNK = 512;

constexpr int LANES = 16;  // independent accumulators: hides the add latency, 4 SSE / 2 AVX regs

// float16 <-> float32 for a run: F16C instructions where the CPU has them (checked once at
// run time, so the library still loads on CPUs without), else the portable conversion.
#if defined(__x86_64__)
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const uint16_t* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i + 4 <= n; i += 4)
    _mm_storeu_ps(d + i, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) d[i] = sn::half_to_float(s[i]);
}
__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i + 4 <= n; i += 4)
    _mm_storel_epi64(reinterpret_cast<__m128i*>(d + i),
                     _mm_cvtps_ph(_mm_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) d[i] = sn::float_to_half(s[i]);
}
const bool kHasF16C = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
#else
constexpr bool kHasF16C = false;
#endif

void halves_to_floats(const uint16_t* s, float* d, int64_t n) {
#if defined(__x86_64__)
  if (kHasF16C) return half_to_float_f16c(s, d, n);
#endif
  for (int64_t i = 0; i < n; ++i) d[i] = sn::half_to_float(s[i]);
}

void floats_to_halves(const float* s, uint16_t* d, int64_t n) {
#if defined(__x86_64__)
  if (kHasF16C) return float_to_half_f16c(s, d, n);
#endif
  for (int64_t i = 0; i < n; ++i) d[i] = sn::float_to_half(s[i]);
}

// A chunk as floats: the input itself for float32, decoded into scratch for float16.
inline const float* as_float(const float* src, float*, int64_t) { return src; }
inline const float* as_float(const uint16_t* src, float* scratch, int64_t n) {
  halves_to_floats(src, scratch, n);
  return scratch;
}
inline float first_value(const float* x) { return x[0]; }
inline float first_value(const uint16_t* x) { return sn::half_to_float(x[0]); }

// sum of (v[i] - c) and of (v[i] - c)^2 with LANES independent partial sums
inline float lane_sum(const float* v, int64_t n, float c) {
  float acc[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int k = 0; k < LANES; ++k) acc[k] += v[i + k] - c;
  float s = 0.f;
  for (; i < n; ++i) s += v[i] - c;
  for (int k = 0; k < LANES; ++k) s += acc[k];
  return s;
}
inline float lane_sum_sq(const float* v, int64_t n, float c) {
  float acc[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int k = 0; k < LANES; ++k) {
      const float d = v[i + k] - c;
      acc[k] += d * d;
    }
  float s = 0.f;
  for (; i < n; ++i) s += (v[i] - c) * (v[i] - c);
  for (int k = 0; k < LANES; ++k) s += acc[k];
  return s;
}

// Moments of one contiguous run about its first value: per chunk (L1-resident) the mean of the
// deviations, then their centred sum of squares, Chan-merged across chunks in double.
template <typename T>
sn::MomentsD run_moments(const T* x, int64_t len, float shift, float* scratch) {
  sn::MomentsD m{0.0, 0.0, 0.0};
  for (int64_t start = 0; start < len; start += CHUNK) {
    const int64_t n = std::min(CHUNK, len - start);
    const float* v = as_float(x + start, scratch, n);
    const float mean = lane_sum(v, n, shift) / (float)n;  // x - shift is exact near the shift
    const float m2 = lane_sum_sq(v, n, shift + mean);
    m = sn::chan_merge_d(m, mean, m2, (double)n);
  }
  m.mean += shift;  // mean of x in double; m2 is shift-free
  return m;
}

// y = relu?((x - s) * A + B [+ r]) over one contiguous span (r: the fused residual or nullptr).
// One loop per case, with the flags constant, so each vectorizes.
template <bool kRelu>
inline void apply_loop(const float* v, const float* r, float* out, int64_t n, const sn::Affine t) {
  if (r != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = sn::apply(v[i], r[i], t, kRelu);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = sn::apply(v[i], t, kRelu);
  }
}

inline void apply_chunk(const float* v, const float* r, float* out, int64_t n, const sn::Affine& t,
                        bool relu) {
  relu ? apply_loop<true>(v, r, out, n, t) : apply_loop<false>(v, r, out, n, t);
}

void apply_run(const float* x, const float* r, float* y, int64_t len, const sn::Affine& t, bool relu,
               float*, float*) {
  apply_chunk(x, r, y, len, t, relu);
}

// float16: each chunk widened to float32 (x and the residual), computed, rounded once on the store.
void apply_run(const uint16_t* x, const uint16_t* r, uint16_t* y, int64_t len, const sn::Affine& t,
               bool relu, float* scratch, float* r_scratch) {
  for (int64_t start = 0; start < len; start += CHUNK) {
    const int64_t n = std::min(CHUNK, len - start);
    const float* rv = r != nullptr ? as_float(r + start, r_scratch, n) : nullptr;
    apply_chunk(as_float(x + start, scratch, n), rv, scratch, n, t, relu);
    floats_to_halves(scratch, y + start, n);
  }
}

int validate(const SnParams* p) {
  if (!p || p->N < 1 || p->C < 1 || p->L < 1 || !p->scale || !p->bias) return SN_ERR_INVALID_ARGUMENT;
  if (p->rank2 && (!p->using_bn || p->L != 1)) return SN_ERR_INVALID_ARGUMENT;
  if (p->using_bn && (!p->running_mean || !p->running_var)) return SN_ERR_INVALID_ARGUMENT;
  if (p->rank2 ? p->C == 1 : p->L == 1) return SN_ERR_DEGENERATE;  // unbiased var of 1 value
  return SN_OK;
}

sn::Mixing mixing(const SnParams* p) {
  if (p->rank2)  // [LN, BN]: the LN statistics take the 'stat' slot
    return sn::Mixing{p->mean_w[0], 0.0, p->mean_w[1], p->var_w[0], 0.0, p->var_w[1], p->eps};
  return sn::Mixing{p->mean_w[0], p->mean_w[1], p->using_bn ? p->mean_w[2] : 0.0,
                    p->var_w[0], p->var_w[1], p->using_bn ? p->var_w[2] : 0.0, p->eps};
}

template <typename T>
void moments_range(sn_cpu::Plan& pl, int64_t begin, int64_t end) {
  std::vector<float> scratch(std::max<int64_t>(CHUNK, pl.rank2 ? pl.p->C : 0));
  const T* x = static_cast<const T*>(pl.x);
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * pl.run_len;
    const float s = first_value(xr);
    const sn::MomentsD m = run_moments(xr, pl.run_len, s, scratch.data());
    pl.shift[r] = s;
    pl.mean[r] = m.mean;
    pl.var[r] = m.m2 / (m.count - 1.0);  // unbiased
  }
}

template <typename T>
void apply_range(sn_cpu::Plan& pl, int64_t begin, int64_t end) {
  const SnParams* p = pl.p;
  const bool relu = p->relu != 0;
  const T* x = static_cast<const T*>(pl.x);
  const T* res = static_cast<const T*>(p->residual);  // nullptr: no fused residual
  T* y = static_cast<T*>(pl.y);
  const int64_t span = std::max<int64_t>(CHUNK, pl.rank2 ? p->C : 0);
  // x and the residual as floats; separate buffers (one span for x, as without a residual: a
  // doubled buffer measured 12-19% slower on the fp16 path here)
  std::vector<float> scratch(span), r_scratch(res ? span : 0);
  float* const xs = scratch.data();
  float* const rs = r_scratch.data();
  for (int64_t r = begin; r < end; ++r) {
    if (!pl.rank2) {
      const int64_t at = r * p->L;
      apply_run(x + at, res ? res + at : nullptr, y + at, p->L, pl.terms[r], relu, xs, rs);
      continue;
    }
    const int64_t C = p->C;  // rank 2: run r is row r, one affine term per element
    const float* v = as_float(x + r * C, xs, C);
    const float* rv = res ? as_float(res + r * C, rs, C) : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const sn::Affine& t = pl.terms[r * C + c];
      const float out = rv ? sn::apply(v[c], rv[c], t, relu) : sn::apply(v[c], t, relu);
      if constexpr (sizeof(T) == 4) {
        y[r * C + c] = out;
      } else {
        y[r * C + c] = sn::float_to_half(out);
      }
    }
  }
}

// NCHWc: the B channels of a group are interleaved, so every loop runs over positions with the
// B lanes innermost (one or two SIMD registers). Chunks of kBlockedChunk positions stay in L1.
constexpr int64_t kBlockedChunk = 64;

template <int B>
void moments_group(const float* x, int64_t L, float* shift, sn::MomentsD* m) {
  for (int b = 0; b < B; ++b) {
    shift[b] = x[b];
    m[b] = sn::MomentsD{0.0, 0.0, 0.0};
  }
  for (int64_t start = 0; start < L; start += kBlockedChunk) {
    const int64_t n = std::min(kBlockedChunk, L - start);
    const float* v = x + start * B;
    float acc[B] = {}, centre[B], acc2[B] = {};
    for (int64_t l = 0; l < n; ++l)
#pragma omp simd
      for (int b = 0; b < B; ++b) acc[b] += v[l * B + b] - shift[b];
    for (int b = 0; b < B; ++b) centre[b] = shift[b] + acc[b] / (float)n;
    for (int64_t l = 0; l < n; ++l)
#pragma omp simd
      for (int b = 0; b < B; ++b) {
        const float d = v[l * B + b] - centre[b];
        acc2[b] += d * d;
      }
    for (int b = 0; b < B; ++b) m[b] = sn::chan_merge_d(m[b], acc[b] / (float)n, acc2[b], (double)n);
  }
}

template <int B>
void moments_groups(sn_cpu::Plan& pl, int64_t begin, int64_t end) {
  const SnParams* p = pl.p;
  const int64_t cb = (p->C + B - 1) / B;
  const float* x = static_cast<const float*>(pl.x);
  for (int64_t g = begin; g < end; ++g) {
    const int64_t n = g / cb, c0 = (g % cb) * B;
    float shift[B];
    sn::MomentsD m[B];
    moments_group<B>(x + g * p->L * B, p->L, shift, m);
    for (int b = 0; b < B && c0 + b < p->C; ++b) {
      const int64_t r = n * p->C + c0 + b;
      pl.shift[r] = shift[b];
      pl.mean[r] = shift[b] + m[b].mean;
      pl.var[r] = m[b].m2 / (m[b].count - 1.0);  // unbiased
    }
  }
}

template <int B, bool kRelu, bool kResidual>
void apply_group(const float* x, const float* r, float* y, int64_t L, const float* sh,
                 const float* a, const float* bb) {
  for (int64_t l = 0; l < L; ++l) {
    const int64_t o = l * B;
#pragma omp simd
    for (int b = 0; b < B; ++b) {
      const sn::Affine t{sh[b], a[b], bb[b]};
      y[o + b] = kResidual ? sn::apply(x[o + b], r[o + b], t, kRelu) : sn::apply(x[o + b], t, kRelu);
    }
  }
}

template <int B>
void apply_groups(sn_cpu::Plan& pl, int64_t begin, int64_t end) {
  const SnParams* p = pl.p;
  const int64_t cb = (p->C + B - 1) / B, span = p->L * B;
  const float* x = static_cast<const float*>(pl.x);
  const float* res = static_cast<const float*>(p->residual);
  float* y = static_cast<float*>(pl.y);
  const bool relu = p->relu != 0;
  for (int64_t g = begin; g < end; ++g) {
    const int64_t n = g / cb, c0 = (g % cb) * B;
    float sh[B] = {}, a[B] = {}, bb[B] = {};  // padding lanes: y = 0 (+ the residual's 0)
    for (int b = 0; b < B && c0 + b < p->C; ++b) {
      const sn::Affine& t = pl.terms[n * p->C + c0 + b];
      sh[b] = t.shift;
      a[b] = t.a;
      bb[b] = t.b;
    }
    const float* xg = x + g * span;
    const float* rg = res ? res + g * span : nullptr;
    float* yg = y + g * span;
    if (rg)
      relu ? apply_group<B, true, true>(xg, rg, yg, p->L, sh, a, bb)
           : apply_group<B, false, true>(xg, rg, yg, p->L, sh, a, bb);
    else
      relu ? apply_group<B, true, false>(xg, rg, yg, p->L, sh, a, bb)
           : apply_group<B, false, false>(xg, rg, yg, p->L, sh, a, bb);
  }
}

}  // namespace

namespace sn_cpu {

int prepare_blocked(Plan& pl, const SnParams* p, int64_t block, const void* x, void* y) {
  if (block != 4 && block != 8 && block != 16) return SN_ERR_INVALID_ARGUMENT;
  if (p && p->rank2) return SN_ERR_INVALID_ARGUMENT;  // NCHWc tensors have spatial axes
  if (const int err = prepare(pl, p, x, y, false)) return err;
  pl.block = block;
  pl.groups = p->N * ((p->C + block - 1) / block);
  return SN_OK;
}

// block is 4, 8 or 16 (checked by prepare_blocked): one instantiation each
void moments_blocked(Plan& pl, int64_t begin, int64_t end) {
  switch (pl.block) {
    case 4: return moments_groups<4>(pl, begin, end);
    case 8: return moments_groups<8>(pl, begin, end);
    default: return moments_groups<16>(pl, begin, end);
  }
}

void apply_blocked(Plan& pl, int64_t begin, int64_t end) {
  switch (pl.block) {
    case 4: return apply_groups<4>(pl, begin, end);
    case 8: return apply_groups<8>(pl, begin, end);
    default: return apply_groups<16>(pl, begin, end);
  }
}

int prepare(Plan& pl, const SnParams* p, const void* x, void* y, bool half) {
  if (const int err = validate(p)) return err;
  if (!x || !y) return SN_ERR_INVALID_ARGUMENT;
  pl.p = p;
  pl.x = x;
  pl.y = y;
  pl.half = half;
  pl.rank2 = p->rank2 != 0;
  pl.runs = pl.rank2 ? p->N : p->N * p->C;
  pl.run_len = pl.rank2 ? p->C : p->L;
  pl.mean.assign(pl.runs, 0.0);
  pl.var.assign(pl.runs, 0.0);
  pl.shift.assign(pl.runs, 0.f);
  pl.terms.assign(p->N * p->C, sn::Affine{0.f, 0.f, 0.f});
  pl.mx = mixing(p);
  return SN_OK;
}

void moments(Plan& pl, int64_t begin, int64_t end) {
  pl.half ? moments_range<uint16_t>(pl, begin, end) : moments_range<float>(pl, begin, end);
}

void combine(Plan& pl, int64_t begin, int64_t end) {
  const SnParams* p = pl.p;
  const int64_t C = p->C;
  for (int64_t n = begin; n < end; ++n) {
    if (pl.rank2) {  // per-row LN moments; BN from running stats
      for (int64_t c = 0; c < C; ++c)
        pl.terms[n * C + c] = sn::affine_terms(pl.shift[n], pl.mean[n], pl.var[n], 0.0, 0.0,
                                               p->running_mean[c], p->running_var[c], p->scale[c],
                                               p->bias[c], pl.mx);
      continue;
    }
    double mean_ln = 0.0, var_mean = 0.0, spread = 0.0;
    for (int64_t c = 0; c < C; ++c) mean_ln += pl.mean[n * C + c];
    mean_ln /= (double)C;
    for (int64_t c = 0; c < C; ++c) {
      const double d = pl.mean[n * C + c] - mean_ln;
      var_mean += pl.var[n * C + c];
      spread += d * d;
    }
    const double var_ln = (var_mean + spread) / (double)C;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = n * C + c;
      pl.terms[i] = sn::affine_terms(pl.shift[i], pl.mean[i], pl.var[i], mean_ln, var_ln,
                                     p->using_bn ? p->running_mean[c] : 0.0,
                                     p->using_bn ? p->running_var[c] : 0.0, p->scale[c], p->bias[c],
                                     pl.mx);
    }
  }
}

void apply(Plan& pl, int64_t begin, int64_t end) {
  pl.half ? apply_range<uint16_t>(pl, begin, end) : apply_range<float>(pl, begin, end);
}

}  // namespace sn_cpu

namespace {

// The library's own driver: the three phases over an OpenMP team, barriers between them. Moments
// and apply run over `units` (planes, or NCHWc channel groups), combine over samples.
using PhaseFn = void (*)(sn_cpu::Plan&, int64_t, int64_t);

int drive(sn_cpu::Plan& pl, int64_t units, PhaseFn moments, PhaseFn apply, int num_threads) {
  const SnParams* p = pl.p;
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  const bool par = p->N * p->C * p->L >= 32768;  // below this, thread start-up costs more
#pragma omp parallel num_threads(threads) if (par)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    moments(pl, units * t / nt, units * (t + 1) / nt);
#pragma omp barrier
    sn_cpu::combine(pl, p->N * t / nt, p->N * (t + 1) / nt);
#pragma omp barrier
    apply(pl, units * t / nt, units * (t + 1) / nt);
  }
#else
  (void)num_threads;
  moments(pl, 0, units);
  sn_cpu::combine(pl, 0, p->N);
  apply(pl, 0, units);
#endif
  return SN_OK;
}

int forward(const SnParams* p, const void* x, void* y, bool half, int num_threads) {
  sn_cpu::Plan pl;
  if (const int err = sn_cpu::prepare(pl, p, x, y, half)) return err;
  return drive(pl, pl.runs, &sn_cpu::moments, &sn_cpu::apply, num_threads);
}

int forward_blocked(const SnParams* p, int64_t block, const float* x, float* y, int num_threads) {
  sn_cpu::Plan pl;
  if (const int err = sn_cpu::prepare_blocked(pl, p, block, x, y)) return err;
  return drive(pl, pl.groups, &sn_cpu::moments_blocked, &sn_cpu::apply_blocked, num_threads);
}

}  // namespace

extern "C" {

int sn_forward_cpu_nchwc_f32(const SnParams* p, int64_t block, const float* x, float* y,
                             int num_threads) {
  return forward_blocked(p, block, x, y, num_threads);
}

int sn_forward_cpu_f32(const SnParams* p, const float* x, float* y, int num_threads) {
  return forward(p, x, y, false, num_threads);
}

int sn_forward_cpu_f16(const SnParams* p, const uint16_t* x, uint16_t* y, int num_threads) {
  return forward(p, x, y, true, num_threads);
}

}  // extern "C"
