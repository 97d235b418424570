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
  explicit SnKernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
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
    const size_t n_inputs = ctx.GetInputCount();
    auto per_channel = [&](size_t i) -> const float* {
      if (i >= n_inputs) return nullptr;
      Ort::ConstValue v = ctx.GetInput(i);
      if (!v) return nullptr;
      if (v.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(shape[1]))
        ORT_CXX_API_THROW("SwitchableNorm: per-channel inputs must have C elements", ORT_INVALID_ARGUMENT);
      return v.GetTensorData<float>();
    };
    SnParams p{};
    p.N = shape[0];
    p.C = shape[1];
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
    const int status = sn_cpu::prepare(plan, &p, x.GetTensorRawData(), y.GetTensorMutableRawData(), half);
    if (status != SN_OK)
      ORT_CXX_API_THROW(std::string("SwitchableNorm: ") + sn_error_string(status), ORT_INVALID_ARGUMENT);
    Phase moments{&plan, plan.runs, &sn_cpu::moments};
    Phase combine{&plan, p.N, &sn_cpu::combine};
    Phase apply{&plan, plan.runs, &sn_cpu::apply};
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

std::mutex gMutex;
std::vector<Ort::CustomOpDomain> gDomains;  // must outlive every session that uses them

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  static SnOp<float> op_f32;
  static SnOp<Ort::Float16_t> op_f16;
  try {
    Ort::CustomOpDomain domain{"sn_deploy"};
    domain.Add(&op_f32);
    domain.Add(&op_f16);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(gMutex);
    gDomains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
