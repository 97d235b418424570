// ONNX Runtime custom-op library: sn_deploy::SwitchableNorm on the CPU kernel (../sn_cpu.cpp),
// its three phases run on ONNX Runtime's own intra-op thread pool (KernelContext::ParallelFor), so
// the op never competes with the session's threads.
// Load it with SessionOptions.register_custom_ops_library(path) — or Triton's onnxruntime backend
// (model_operations / LD_PRELOAD) — and model.sn.onnx runs natively. Uses only the ORT C API
// function table handed to RegisterCustomOps: no link against libonnxruntime.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <mutex>
#include <string>
#include <vector>

#include "sn_cpu_impl.h"
#include "sn_kernels.h"

namespace {

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
};
template <>
struct Traits<Ort::Float16_t> {
  static constexpr ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
};

struct SnKernel {
  // blocked: the SwitchableNormNchwc flavour (onnxruntime's NCHWc layout, attributes channels and
  // block); see sn_deploy/passes/nchwc.py, which places it between NCHWc convolutions.
  explicit SnKernel(const OrtKernelInfo* info, bool blocked = false) : blocked(blocked) {
    Ort::ConstKernelInfo ki(info);
    if (blocked) {
      channels = ki.GetAttribute<int64_t>("channels");
      block = ki.GetAttribute<int64_t>("block");
      if (channels < 1 || (block != 4 && block != 8 && block != 16))
        ORT_CXX_API_THROW("SwitchableNormNchwc: needs channels >= 1 and block 4, 8 or 16",
                          ORT_INVALID_ARGUMENT);
    }
    epsilon = optional<float>(ki, "epsilon", 1e-5f);
    relu = optional<int64_t>(ki, "relu", 0);
    mean_w = ki.GetAttributes<float>("mean_weights");
    var_w = ki.GetAttributes<float>("var_weights");
    if (mean_w.size() != var_w.size() || mean_w.size() < 2 || mean_w.size() > 3)
      ORT_CXX_API_THROW("SwitchableNorm: mean_weights/var_weights need 2 or 3 equal-length entries",
                        ORT_INVALID_ARGUMENT);
  }

  template <typename A>
  static A optional(Ort::ConstKernelInfo& ki, const char* name, A fallback) {
    try {
      return ki.GetAttribute<A>(name);
    } catch (const Ort::Exception&) {
      return fallback;
    }
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Ort::ConstValue x = ctx.GetInput(0);
    auto info = x.GetTensorTypeAndShapeInfo();
    std::vector<int64_t> shape = info.GetShape();
    if (shape.size() < 2) ORT_CXX_API_THROW("SwitchableNorm: input must be (N, C, ...)", ORT_INVALID_ARGUMENT);
    const int64_t C = blocked ? channels : shape[1];
    if (blocked && (shape.size() < 3 || shape[1] != (C + block - 1) / block * block))
      ORT_CXX_API_THROW("SwitchableNormNchwc: input is not an NCHWc tensor of 'channels' channels",
                        ORT_INVALID_ARGUMENT);
    const size_t n_inputs = ctx.GetInputCount();
    auto per_channel = [&](size_t i) -> const float* {
      if (i >= n_inputs) return nullptr;
      Ort::ConstValue v = ctx.GetInput(i);
      if (!v) return nullptr;
      if (v.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(C))
        ORT_CXX_API_THROW("SwitchableNorm: per-channel inputs must have C elements", ORT_INVALID_ARGUMENT);
      return v.GetTensorData<float>();
    };
    SnParams p{};
    p.N = shape[0];
    p.C = C;
    p.L = 1;
    for (size_t i = 2; i < shape.size(); ++i) p.L *= shape[i];
    p.rank2 = shape.size() == 2;
    p.scale = per_channel(1);
    p.bias = per_channel(2);
    p.running_mean = per_channel(3);
    p.running_var = per_channel(4);
    p.using_bn = p.running_mean != nullptr;
    p.residual = residual(ctx, n_inputs, info.GetElementType(), shape);
    for (size_t i = 0; i < mean_w.size(); ++i) {
      p.mean_w[i] = mean_w[i];
      p.var_w[i] = var_w[i];
    }
    p.eps = epsilon;
    p.relu = static_cast<int32_t>(relu);
    Ort::UnownedValue y = ctx.GetOutput(0, shape);
    if (p.N * p.C * p.L == 0) return;
    const bool half = info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    sn_cpu::Plan plan;
    const int status =
        blocked ? sn_cpu::prepare_blocked(plan, &p, block, x.GetTensorRawData(), y.GetTensorMutableRawData())
                : sn_cpu::prepare(plan, &p, x.GetTensorRawData(), y.GetTensorMutableRawData(), half);
    if (status != SN_OK)
      ORT_CXX_API_THROW(std::string("SwitchableNorm: ") + sn_error_string(status), ORT_INVALID_ARGUMENT);
    const int64_t units = blocked ? plan.groups : plan.runs;
    Phase moments{&plan, units, blocked ? &sn_cpu::moments_blocked : &sn_cpu::moments};
    Phase combine{&plan, p.N, &sn_cpu::combine};
    Phase apply{&plan, units, blocked ? &sn_cpu::apply_blocked : &sn_cpu::apply};
    for (Phase* phase : {&moments, &combine, &apply}) phase->run(ctx);
  }

  // The optional 6th input, a fused skip connection: X's type and exactly X's shape (no broadcast).
  static const void* residual(Ort::KernelContext& ctx, size_t n_inputs, ONNXTensorElementDataType type,
                              const std::vector<int64_t>& shape) {
    if (n_inputs <= 5) return nullptr;
    Ort::ConstValue r = ctx.GetInput(5);
    if (!r) return nullptr;
    auto info = r.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != type || info.GetShape() != shape)
      ORT_CXX_API_THROW("SwitchableNorm: residual must have the type and shape of X", ORT_INVALID_ARGUMENT);
    return r.GetTensorRawData();
  }

  // One phase split into blocks of whole runs (or samples) for ORT's thread pool.
  struct Phase {
    sn_cpu::Plan* plan;
    int64_t total;
    void (*fn)(sn_cpu::Plan&, int64_t, int64_t);
    int64_t blocks = 0;

    static void call(void* self, size_t i) {
      auto* ph = static_cast<Phase*>(self);
      ph->fn(*ph->plan, ph->total * (int64_t)i / ph->blocks, ph->total * ((int64_t)i + 1) / ph->blocks);
    }
    void run(Ort::KernelContext& ctx) {
      const int64_t work = plan->runs * plan->run_len;
      blocks = std::min<int64_t>(total, work < 32768 ? 1 : 64);  // small tensors: no hand-off
      if (blocks <= 1) {
        blocks = 1;
        call(this, 0);
      } else {
        ctx.ParallelFor(&Phase::call, static_cast<size_t>(blocks), 0, this);
      }
    }
  };

  bool blocked;
  int64_t channels = 0, block = 0;
  float epsilon;
  int64_t relu;
  std::vector<float> mean_w, var_w;
};

template <typename T>
struct SnOp : Ort::CustomOpBase<SnOp<T>, SnKernel> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new SnKernel(info); }
  const char* GetName() const { return "SwitchableNorm"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }  // X, scale, bias, running_mean, running_var, residual
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 || i == 5 ? Traits<T>::type : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return Traits<T>::type; }
};

// SwitchableNorm on onnxruntime's NCHWc layout (float32): same inputs, plus attributes channels
// (the real C) and block; X, the residual and Y are NCHWc tensors (N, C padded to the block, ...).
struct SnNchwcOp : Ort::CustomOpBase<SnNchwcOp, SnKernel> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new SnKernel(info, true); }
  const char* GetName() const { return "SwitchableNormNchwc"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

std::mutex gMutex;
std::vector<Ort::CustomOpDomain> gDomains;  // must outlive every session that uses them

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  static SnOp<float> op_f32;
  static SnOp<Ort::Float16_t> op_f16;
  static SnNchwcOp op_nchwc;
  try {
    Ort::CustomOpDomain domain{"sn_deploy"};
    domain.Add(&op_f32);
    domain.Add(&op_f16);
    domain.Add(&op_nchwc);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(gMutex);
    gDomains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
