// CUDA back end of the Switchable Normalization kernels (shared with the TensorRT plugin).
//
//  1. moments: each (plane, split) block runs Welford over its slice of the plane (deviations from
//     the plane's first value, float32 also for fp16 input; a vector load's 4 or 8 values join as
//     one exact chunk, one division per chunk), merges lanes with warp shuffles and
//     warps through shared memory (Chan), in a fixed order: no atomics, bitwise reproducible.
//  2. combine: one block per sample merges the splits in double, forms IN/LN/BN statistics and the
//     per-(n, c) affine terms (sn_math.h).
//  3. apply: y = (x - s) * A + B (+ fused residual, + ReLU), vectorized (float4 / 8 halves /
//     half2) when the plane and all three pointers allow.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sn_kernels.h"
#include "sn_math.h"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxSplits = 64;
constexpr int64_t kMinSplitLen = 4096;  // elements per block worth a split
constexpr int64_t kTargetBlocks = 1024; // enough to fill an H100 (132 SMs) several times

struct Layout {  // how a problem maps onto runs (planes or rows) and blocks
  int64_t runs, len;
  int splits;
};

inline Layout layout_of(int64_t N, int64_t C, int64_t L, bool rank2) {
  Layout lo{rank2 ? N : N * C, rank2 ? C : L, 1};
  int64_t want = (kTargetBlocks + lo.runs - 1) / lo.runs;
  int64_t by_len = (lo.len + kMinSplitLen - 1) / kMinSplitLen;
  int64_t s = want < by_len ? want : by_len;
  lo.splits = (int)(s < 1 ? 1 : (s > kMaxSplits ? kMaxSplits : s));
  return lo;
}

inline size_t align256(size_t n) { return (n + 255) & ~size_t(255); }

struct Workspace {
  sn::Moments* partials;  // runs * splits
  double* mean;           // runs
  double* var;            // runs
  sn::Affine* terms;      // N * C
};

// Upper bound on runs * splits that only grows with the dimensions: a workspace sized for a
// TensorRT profile's maximum shape then fits every smaller shape (runs * splits itself does not
// grow monotonically: fewer runs get more splits).
inline int64_t max_partials(int64_t runs) {
  const int64_t by_split = runs * kMaxSplits, by_target = runs + kTargetBlocks;
  return by_split < by_target ? by_split : by_target;
}

inline size_t workspace_bytes(int64_t N, int64_t C, const Layout& lo) {
  return align256(sizeof(sn::Moments) * max_partials(lo.runs)) + 2 * align256(sizeof(double) * lo.runs) +
         align256(sizeof(sn::Affine) * N * C);
}

inline Workspace carve(void* base, int64_t N, int64_t C, const Layout& lo) {
  char* p = static_cast<char*>(base);
  Workspace w;
  w.partials = reinterpret_cast<sn::Moments*>(p);
  p += align256(sizeof(sn::Moments) * max_partials(lo.runs));
  w.mean = reinterpret_cast<double*>(p);
  p += align256(sizeof(double) * lo.runs);
  w.var = reinterpret_cast<double*>(p);
  p += align256(sizeof(double) * lo.runs);
  w.terms = reinterpret_cast<sn::Affine*>(p);
  (void)N;
  (void)C;
  return w;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ sn::Moments shfl_down(const sn::Moments& m, int delta) {
  return sn::Moments{__shfl_down_sync(0xffffffffu, m.mean, delta),
                     __shfl_down_sync(0xffffffffu, m.m2, delta),
                     __shfl_down_sync(0xffffffffu, m.count, delta)};
}

__device__ sn::Moments block_merge(sn::Moments m) {
  __shared__ sn::Moments warp_result[kThreads / 32];
  for (int d = 16; d > 0; d >>= 1) m = sn::chan_merge(m, shfl_down(m, d));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_result[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kThreads / 32 ? warp_result[lane] : sn::moments_empty();
    for (int d = 16; d > 0; d >>= 1) m = sn::chan_merge(m, shfl_down(m, d));
  }
  return m;  // valid in thread 0
}

template <typename T>
__global__ void __launch_bounds__(kThreads) moments_kernel(const T* __restrict__ x, Layout lo,
                                                           sn::Moments* __restrict__ partials) {
  const int64_t run = blockIdx.x / lo.splits;
  const int split = blockIdx.x % lo.splits;
  const T* xr = x + run * lo.len;
  const float shift = to_float(xr[0]);
  const int64_t chunk = ((lo.len + lo.splits - 1) / lo.splits + 7) & ~int64_t(7);  // 8-aligned splits
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < lo.len ? begin + chunk : lo.len;
  sn::Moments m = sn::moments_empty();
  if constexpr (sizeof(T) == 4) {
    if ((lo.len & 3) == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0) {  // float4 path
      const float4* v = reinterpret_cast<const float4*>(xr + begin);
      const int64_t n4 = (end > begin ? end - begin : 0) >> 2;
      for (int64_t i = threadIdx.x; i < n4; i += kThreads) {
        const float4 q = v[i];
        const float d[4] = {q.x - shift, q.y - shift, q.z - shift, q.w - shift};
        sn::welford_add_chunk(m, d);
      }
    } else {
      for (int64_t i = begin + threadIdx.x; i < end; i += kThreads)
        sn::welford_add(m, to_float(xr[i]) - shift);
    }
  } else {
    if ((lo.len & 7) == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0) {  // 8 halves per load
      const uint4* v = reinterpret_cast<const uint4*>(xr + begin);
      const int64_t n8 = (end > begin ? end - begin : 0) >> 3;
      for (int64_t i = threadIdx.x; i < n8; i += kThreads) {
        const uint4 q = v[i];
        const __half2* h = reinterpret_cast<const __half2*>(&q);
        float d[8];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float2 f = __half22float2(h[k]);
          d[2 * k] = f.x - shift;
          d[2 * k + 1] = f.y - shift;
        }
        sn::welford_add_chunk(m, d);
      }
    } else if ((lo.len & 1) == 0 && (reinterpret_cast<uintptr_t>(x) & 3) == 0) {  // half2 path
      const __half2* v = reinterpret_cast<const __half2*>(xr + begin);
      const int64_t n2 = (end > begin ? end - begin : 0) >> 1;
      for (int64_t i = threadIdx.x; i < n2; i += kThreads) {
        const float2 q = __half22float2(v[i]);
        const float d[2] = {q.x - shift, q.y - shift};
        sn::welford_add_chunk(m, d);
      }
    } else {
      for (int64_t i = begin + threadIdx.x; i < end; i += kThreads)
        sn::welford_add(m, to_float(xr[i]) - shift);
    }
  }
  m = block_merge(m);
  if (threadIdx.x == 0) partials[blockIdx.x] = m;
}

template <typename T>
__device__ double block_sum(double v, double* smem) {  // fixed-order tree: reproducible
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  const double total = smem[0];
  __syncthreads();
  return total;
}

// One block per sample: merge splits (double), LN moments, affine terms per (n, c).
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const T* __restrict__ x, SnParams p,
                                                           Layout lo, Workspace w) {
  __shared__ double smem[kThreads];
  const int64_t n = blockIdx.x;
  const bool rank2 = p.rank2 != 0;
  sn::Mixing mx;
  if (rank2) {
    mx = sn::Mixing{p.mean_w[0], 0.0, p.mean_w[1], p.var_w[0], 0.0, p.var_w[1], p.eps};
  } else {
    mx = sn::Mixing{p.mean_w[0], p.mean_w[1], p.using_bn ? p.mean_w[2] : 0.0,
                    p.var_w[0], p.var_w[1], p.using_bn ? p.var_w[2] : 0.0, p.eps};
  }
  const int64_t first = rank2 ? n : n * p.C, count = rank2 ? 1 : p.C;
  double local_mean = 0.0;
  for (int64_t r = first + threadIdx.x; r < first + count; r += kThreads) {
    sn::MomentsD m{0.0, 0.0, 0.0};
    for (int s = 0; s < lo.splits; ++s) {
      const sn::Moments q = w.partials[r * lo.splits + s];
      m = sn::chan_merge_d(m, q.mean, q.m2, q.count);
    }
    const double shift = to_float(x[r * lo.len]);
    w.mean[r] = shift + m.mean;
    w.var[r] = m.m2 / (m.count - 1.0);
    local_mean += w.mean[r];
  }
  double mean_ln = 0.0, var_ln = 0.0;
  if (!rank2) {
    mean_ln = block_sum<T>(local_mean, smem) / (double)count;
    double local_var = 0.0, local_spread = 0.0;
    for (int64_t r = first + threadIdx.x; r < first + count; r += kThreads) {
      const double d = w.mean[r] - mean_ln;
      local_var += w.var[r];
      local_spread += d * d;
    }
    const double sv = block_sum<T>(local_var, smem);
    const double ss = block_sum<T>(local_spread, smem);
    var_ln = (sv + ss) / (double)count;
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < p.C; c += kThreads) {
    const int64_t r = rank2 ? n : n * p.C + c;
    const double shift = to_float(x[r * lo.len]);
    w.terms[n * p.C + c] = sn::affine_terms(
        shift, w.mean[r], w.var[r], mean_ln, var_ln, p.using_bn ? p.running_mean[c] : 0.0,
        p.using_bn ? p.running_var[c] : 0.0, p.scale[c], p.bias[c], mx);
  }
}

// y = relu?((x - s) * A + B [+ r]); r (the fused residual) may be nullptr.
template <typename T>
__global__ void __launch_bounds__(kThreads) apply_planes_kernel(const T* __restrict__ x,
                                                                const T* __restrict__ res,
                                                                T* __restrict__ y, Layout lo,
                                                                const sn::Affine* __restrict__ terms,
                                                                int relu) {
  const int64_t run = blockIdx.x / lo.splits;
  const int split = blockIdx.x % lo.splits;
  const sn::Affine t = terms[run];
  const int64_t chunk = ((lo.len + lo.splits - 1) / lo.splits + 7) & ~int64_t(7);  // 8-aligned splits
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < lo.len ? begin + chunk : lo.len;
  const T* xr = x + run * lo.len;
  const T* rr = res != nullptr ? res + run * lo.len : nullptr;
  T* yr = y + run * lo.len;
  const uintptr_t addresses = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y) |
                              reinterpret_cast<uintptr_t>(res);
  if constexpr (sizeof(T) == 4) {
    if ((lo.len & 3) == 0 && (addresses & 15) == 0) {
      const float4* v = reinterpret_cast<const float4*>(xr + begin);
      const float4* rv = rr != nullptr ? reinterpret_cast<const float4*>(rr + begin) : nullptr;
      float4* o = reinterpret_cast<float4*>(yr + begin);
      const int64_t n4 = (end > begin ? end - begin : 0) >> 2;
      for (int64_t i = threadIdx.x; i < n4; i += kThreads) {
        float4 q = v[i];
        if (rr != nullptr) {
          const float4 r = rv[i];
          q.x = sn::apply(q.x, r.x, t, relu);
          q.y = sn::apply(q.y, r.y, t, relu);
          q.z = sn::apply(q.z, r.z, t, relu);
          q.w = sn::apply(q.w, r.w, t, relu);
        } else {
          q.x = sn::apply(q.x, t, relu);
          q.y = sn::apply(q.y, t, relu);
          q.z = sn::apply(q.z, t, relu);
          q.w = sn::apply(q.w, t, relu);
        }
        o[i] = q;
      }
      return;
    }
  } else {
    if ((lo.len & 7) == 0 && (addresses & 15) == 0) {  // 8 halves per 16-byte load and store
      const uint4* v = reinterpret_cast<const uint4*>(xr + begin);
      const uint4* rv = rr != nullptr ? reinterpret_cast<const uint4*>(rr + begin) : nullptr;
      uint4* o = reinterpret_cast<uint4*>(yr + begin);
      const int64_t n8 = (end > begin ? end - begin : 0) >> 3;
      for (int64_t i = threadIdx.x; i < n8; i += kThreads) {
        uint4 q = v[i];
        __half2* h = reinterpret_cast<__half2*>(&q);
        if (rr != nullptr) {
          uint4 rq = rv[i];
          const __half2* r = reinterpret_cast<const __half2*>(&rq);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float2 f = __half22float2(h[k]), g = __half22float2(r[k]);
            h[k] = __floats2half2_rn(sn::apply(f.x, g.x, t, relu), sn::apply(f.y, g.y, t, relu));
          }
        } else {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float2 f = __half22float2(h[k]);
            h[k] = __floats2half2_rn(sn::apply(f.x, t, relu), sn::apply(f.y, t, relu));
          }
        }
        o[i] = q;
      }
      return;
    }
    if ((lo.len & 1) == 0 && (addresses & 3) == 0) {
      const __half2* v = reinterpret_cast<const __half2*>(xr + begin);
      const __half2* rv = rr != nullptr ? reinterpret_cast<const __half2*>(rr + begin) : nullptr;
      __half2* o = reinterpret_cast<__half2*>(yr + begin);
      const int64_t n2 = (end > begin ? end - begin : 0) >> 1;
      for (int64_t i = threadIdx.x; i < n2; i += kThreads) {
        const float2 q = __half22float2(v[i]);
        if (rr != nullptr) {
          const float2 r = __half22float2(rv[i]);
          o[i] = __floats2half2_rn(sn::apply(q.x, r.x, t, relu), sn::apply(q.y, r.y, t, relu));
        } else {
          o[i] = __floats2half2_rn(sn::apply(q.x, t, relu), sn::apply(q.y, t, relu));
        }
      }
      return;
    }
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const float v = to_float(xr[i]);
    yr[i] = from_float<T>(rr != nullptr ? sn::apply(v, to_float(rr[i]), t, relu) : sn::apply(v, t, relu));
  }
}

template <typename T>
__global__ void apply_rows_kernel(const T* __restrict__ x, const T* __restrict__ res,
                                  T* __restrict__ y, int64_t total,
                                  const sn::Affine* __restrict__ terms, int relu) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float v = to_float(x[i]);
    y[i] = from_float<T>(res != nullptr ? sn::apply(v, to_float(res[i]), terms[i], relu)
                                        : sn::apply(v, terms[i], relu));
  }
}

int check(const SnParams* p) {
  if (!p || p->N < 1 || p->C < 1 || p->L < 1 || !p->scale || !p->bias) return SN_ERR_INVALID_ARGUMENT;
  if (p->rank2 && (!p->using_bn || p->L != 1)) return SN_ERR_INVALID_ARGUMENT;
  if (p->using_bn && (!p->running_mean || !p->running_var)) return SN_ERR_INVALID_ARGUMENT;
  if (p->rank2 ? p->C == 1 : p->L == 1) return SN_ERR_DEGENERATE;
  return SN_OK;
}

template <typename T>
int run(const SnParams* p, const void* xv, void* yv, void* workspace, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  const T* res = static_cast<const T*>(p->residual);
  T* y = static_cast<T*>(yv);
  const bool rank2 = p->rank2 != 0;
  const Layout lo = layout_of(p->N, p->C, p->L, rank2);
  const Workspace w = carve(workspace, p->N, p->C, lo);
  const unsigned blocks = (unsigned)(lo.runs * lo.splits);
  moments_kernel<T><<<blocks, kThreads, 0, stream>>>(x, lo, w.partials);
  combine_kernel<T><<<(unsigned)p->N, kThreads, 0, stream>>>(x, *p, lo, w);
  if (rank2) {
    const int64_t total = p->N * p->C;
    const unsigned grid = (unsigned)((total + kThreads - 1) / kThreads < 65535 ? (total + kThreads - 1) / kThreads : 65535);
    apply_rows_kernel<T><<<grid, kThreads, 0, stream>>>(x, res, y, total, w.terms, p->relu);
  } else {
    apply_planes_kernel<T><<<blocks, kThreads, 0, stream>>>(x, res, y, lo, w.terms, p->relu);
  }
  return cudaGetLastError() == cudaSuccess ? SN_OK : SN_ERR_CUDA;
}

}  // namespace

extern "C" {

size_t sn_cuda_workspace_size(int64_t N, int64_t C, int64_t L) {
  // L == 1 is the rank-2 layout (spatial size 1 is refused at launch)
  return workspace_bytes(N, C, layout_of(N, C, L, L == 1));
}

int sn_forward_cuda(const SnParams* p, int dtype, const void* x, void* y, void* workspace,
                    void* cuda_stream) {
  if (const int err = check(p)) return err;
  if (!x || !y || !workspace || (dtype != 0 && dtype != 1)) return SN_ERR_INVALID_ARGUMENT;
  cudaStream_t stream = static_cast<cudaStream_t>(cuda_stream);
  return dtype == 0 ? run<float>(p, x, y, workspace, stream) : run<__half>(p, x, y, workspace, stream);
}

}  // extern "C"
