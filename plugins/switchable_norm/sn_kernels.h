/* C API of the Switchable Normalization inference kernels (CPU and CUDA back ends).
 *
 * One algorithm, shared by the ONNX Runtime custom op (CPU), the Python face (sn_deploy.ops) and
 * the TensorRT plugin (CUDA). The maths lives in sn_math.h. */
#ifndef SN_KERNELS_H
#define SN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define SN_API __declspec(dllexport)
#else
#define SN_API __attribute__((visibility("default")))
#endif

typedef struct SnParams {
  int64_t N, C, L;           /* L = prod(spatial); rank-2 (SwitchNorm1d) input: L = 1, rank2 = 1 */
  int32_t rank2;             /* 1: (N, C) input, weights [LN, BN] */
  int32_t using_bn;          /* 1: running_mean/running_var given */
  float mean_w[3], var_w[3]; /* already softmaxed: [IN, LN, BN] / [IN, LN] / [LN, BN] */
  float eps;
  int32_t relu;              /* 1: fused ReLU on the output */
  const float* scale;        /* (C,) gamma */
  const float* bias;         /* (C,) beta */
  const float* running_mean; /* (C,) or NULL when using_bn == 0 */
  const float* running_var;  /* (C,) or NULL when using_bn == 0 */
  const void* residual;      /* NULL, or a fused skip connection: x's shape and dtype, NCHW-contiguous;
                                y = relu?(SN(x) + residual) */
} SnParams;                  /* pointers: host memory for the CPU entry points, device memory for CUDA */

enum { SN_OK = 0, SN_ERR_INVALID_ARGUMENT = 1, SN_ERR_DEGENERATE = 2, SN_ERR_CUDA = 3 };

/* CPU (libsn_cpu.so). num_threads 0 = all hardware threads. NCHW-contiguous x and y. */
SN_API int sn_forward_cpu_f32(const SnParams* p, const float* x, float* y, int num_threads);
SN_API int sn_forward_cpu_f16(const SnParams* p, const uint16_t* x, uint16_t* y, int num_threads);
SN_API const char* sn_error_string(int code);
/* x and y in onnxruntime's blocked NCHWc layout [N][ceil(C/block)][L][block] (float32, block 4, 8
 * or 16; channels past C are padding and come out 0, plus the residual's). p->residual, when set,
 * is in the same layout. */
SN_API int sn_forward_cpu_nchwc_f32(const SnParams* p, int64_t block, const float* x, float* y,
                                    int num_threads);

/* CUDA (libsn_cuda.so and the TensorRT plugin). dtype 0 = fp32, 1 = fp16; cuda_stream is a
 * cudaStream_t. The workspace holds the per-plane moments and per-(n, c) affine terms. */
SN_API size_t sn_cuda_workspace_size(int64_t N, int64_t C, int64_t L);
SN_API int sn_forward_cuda(const SnParams* p, int dtype, const void* x, void* y, void* workspace,
                           void* cuda_stream);

#ifdef __cplusplus
}
#endif
#endif /* SN_KERNELS_H */
