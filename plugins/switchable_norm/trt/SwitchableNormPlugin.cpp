// SwitchableNorm_TRT: translates TensorRT calls into calls of the shared kernels (sn_kernels.h).
#include "SwitchableNormPlugin.h"

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <mutex>

#include "sn_kernels.h"

using namespace nvinfer1;

namespace sn_trt {
namespace {

std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder = nullptr;

// TensorRT's logger when the loader handed us a finder (loadLibrary/--dynamicPlugins call
// setLoggerFinder); stderr otherwise (the LD_PRELOAD variant), so an error is never silent.
void logError(std::string const& msg) noexcept {
  try {
    std::string const line = std::string(kPluginName) + ": " + msg;
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
    if (logger) logger->log(ILogger::Severity::kERROR, line.c_str());
    else std::fprintf(stderr, "[E] %s\n", line.c_str());
  } catch (...) {
  }
}

int64_t volumeFrom(Dims const& d, int32_t first) {
  int64_t v = 1;
  for (int32_t i = first; i < d.nbDims; ++i) v *= d.d[i];
  return v;
}

// Equal ranks and dimensions; with ``dynamicOk`` a -1 (not yet known at build time) matches anything.
bool sameShape(Dims const& a, Dims const& b, bool dynamicOk) {
  if (a.nbDims != b.nbDims) return false;
  for (int32_t i = 0; i < a.nbDims; ++i)
    if (a.d[i] != b.d[i] && !(dynamicOk && (a.d[i] == -1 || b.d[i] == -1))) return false;
  return true;
}

PluginField floats(char const* name, std::vector<float> const& v) {
  return PluginField{name, v.empty() ? nullptr : v.data(), PluginFieldType::kFLOAT32,
                     static_cast<int32_t>(v.size())};
}

}  // namespace

// ------------------------------------------------------------------ fields
std::string parseFields(PluginFieldCollection const* fc, SnFields& out) {
  if (fc == nullptr) return "no plugin fields";
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    if (f.name == nullptr || f.data == nullptr) continue;
    std::string const name(f.name);
    auto asFloats = [&](std::vector<float>& dst) -> bool {
      if (f.type == PluginFieldType::kFLOAT32) {
        auto p = static_cast<float const*>(f.data);
        dst.assign(p, p + f.length);
      } else if (f.type == PluginFieldType::kFLOAT64) {
        auto p = static_cast<double const*>(f.data);
        dst.assign(p, p + f.length);
      } else {
        return false;
      }
      return true;
    };
    auto asInt = [&](int32_t& dst) -> bool {
      if (f.type == PluginFieldType::kINT32) dst = *static_cast<int32_t const*>(f.data);
      else if (f.type == PluginFieldType::kINT64) dst = static_cast<int32_t>(*static_cast<int64_t const*>(f.data));
      else return false;
      return true;
    };
    bool ok = true;
    if (name == "epsilon") {
      std::vector<float> e;
      ok = asFloats(e) && e.size() == 1;
      if (ok) out.epsilon = e[0];
    } else if (name == "mean_weights") ok = asFloats(out.mean_weights);
    else if (name == "var_weights") ok = asFloats(out.var_weights);
    else if (name == "scale") ok = asFloats(out.scale);
    else if (name == "bias") ok = asFloats(out.bias);
    else if (name == "running_mean") ok = asFloats(out.running_mean);
    else if (name == "running_var") ok = asFloats(out.running_var);
    else if (name == "relu") ok = asInt(out.relu);
    else if (name == "rank2") ok = asInt(out.rank2);
    else if (name == "residual") ok = asInt(out.residual);
    if (!ok) return "field '" + name + "' has an unexpected type or length";
  }
  size_t const C = out.scale.size();
  bool const usingBn = !out.running_mean.empty();
  size_t const nw = out.mean_weights.size();
  if (C == 0 || out.bias.size() != C) return "scale and bias must be non-empty and of equal length";
  if (usingBn && (out.running_mean.size() != C || out.running_var.size() != C))
    return "running_mean and running_var must have C entries";
  if (!usingBn && !out.running_var.empty()) return "running_var given without running_mean";
  if (nw != out.var_weights.size() || nw != ((out.rank2 || !usingBn) ? 2u : 3u))
    return "mean_weights/var_weights must have 3 entries with running stats (2 without, or for rank-2 input)";
  if (out.rank2 && !usingBn) return "rank-2 (SwitchNorm1d) layers need running statistics";
  if (out.residual != 0 && out.residual != 1) return "residual must be 0 or 1";
  return {};
}

// ------------------------------------------------------------------ plugin
SwitchableNormPlugin::SwitchableNormPlugin(SnFields fields) : mFields(std::move(fields)) {}

SwitchableNormPlugin::SwitchableNormPlugin(SwitchableNormPlugin const& other)
    : IPluginV3(other), IPluginV3OneCore(other), IPluginV3OneBuild(other), IPluginV3OneRuntime(other),
      mFields(other.mFields) {}

SwitchableNormPlugin::~SwitchableNormPlugin() { releaseWeights(); }

IPluginCapability* SwitchableNormPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
  }
  return nullptr;
}

IPluginV3* SwitchableNormPlugin::clone() noexcept {
  try {
    return new SwitchableNormPlugin(*this);
  } catch (...) {
    return nullptr;
  }
}

int32_t SwitchableNormPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                              DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
  if (nbInputs != expectedInputs() || nbOutputs != 1) {
    logError("expected " + std::to_string(expectedInputs()) + " input(s) (the residual field)");
    return -1;
  }
  Dims const& d = in[0].desc.dims;
  if (mFields.residual && !sameShape(d, in[1].desc.dims, true)) {
    logError("the residual input's shape differs from the input's");
    return -1;
  }
  if (d.nbDims < 2 || (mFields.rank2 != 0) != (d.nbDims == 2)) {
    logError("input rank does not match the plugin's rank2 field");
    return -1;
  }
  if (d.d[1] != -1 && d.d[1] != static_cast<int64_t>(mFields.scale.size())) {
    logError("input channels differ from the length of scale");
    return -1;
  }
  // Fail the build, not every enqueue, when no shape of the profile is computable: the unbiased
  // variance needs two elements per plane (IN) or two channels (rank-2 LN).
  Dims const& mx = in[0].max;
  bool const degenerate = mFields.rank2 ? mFields.scale.size() == 1 : (mx.nbDims > 2 && volumeFrom(mx, 2) == 1);
  if (degenerate) {
    logError(mFields.rank2 ? "one channel: the layer-norm variance of a (N, 1) input is undefined"
                           : "spatial size 1 in every profile shape: the instance variance is undefined");
    return -1;
  }
  return 0;
}

int32_t SwitchableNormPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs,
                                                 DataType const* inputTypes, int32_t nbInputs) const noexcept {
  if (nbInputs != expectedInputs() || nbOutputs != 1) return -1;
  if (mFields.residual && inputTypes[1] != inputTypes[0]) return -1;
  outputTypes[0] = inputTypes[0];
  return 0;
}

int32_t SwitchableNormPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*,
                                              int32_t, DimsExprs* outputs, int32_t nbOutputs,
                                              IExprBuilder&) noexcept {
  if (nbInputs != expectedInputs() || nbOutputs != 1) return -1;
  outputs[0] = inputs[0];
  return 0;
}

bool SwitchableNormPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut,
                                                     int32_t nbInputs, int32_t nbOutputs) noexcept {
  // positions: X, [residual], Y; the residual and Y follow X's type, all linear (NCHW)
  if (nbInputs != expectedInputs() || nbOutputs != 1 || pos < 0 || pos > nbInputs) return false;
  PluginTensorDesc const& d = inOut[pos].desc;
  bool const linear = d.format == TensorFormat::kLINEAR;
  if (pos == 0) return linear && (d.type == DataType::kFLOAT || d.type == DataType::kHALF);
  return linear && d.type == inOut[0].desc.type;
}

size_t SwitchableNormPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t,
                                              DynamicPluginTensorDesc const*, int32_t) const noexcept {
  Dims const& mx = inputs[0].max;  // the kernels' workspace only grows with the dimensions
  int64_t const N = mx.d[0], C = mx.d[1];
  int64_t const L = mFields.rank2 ? 1 : volumeFrom(mx, 2);
  return sn_cuda_workspace_size(N, C, L);
}

bool SwitchableNormPlugin::uploadWeights() noexcept {
  if (mDevice != nullptr) return true;
  try {
    std::vector<float> host;
    for (auto const* v : {&mFields.scale, &mFields.bias, &mFields.running_mean, &mFields.running_var})
      host.insert(host.end(), v->begin(), v->end());
    if (cudaMalloc(reinterpret_cast<void**>(&mDevice), host.size() * sizeof(float)) != cudaSuccess) {
      mDevice = nullptr;
      return false;
    }
    if (cudaMemcpy(mDevice, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess) {
      releaseWeights();  // never leave a half-initialised copy that a later call would trust
      return false;
    }
    return true;
  } catch (...) {
    return false;
  }
}

void SwitchableNormPlugin::releaseWeights() noexcept {
  if (mDevice != nullptr) cudaFree(mDevice);
  mDevice = nullptr;
}

int32_t SwitchableNormPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*,
                                            int32_t nbOutputs) noexcept {
  if (nbInputs != expectedInputs() || nbOutputs != 1) return -1;
  if (mFields.residual && !sameShape(in[0].dims, in[1].dims, false)) {
    logError("the residual input's shape differs from the input's");
    return -1;
  }
  if (in[0].dims.d[1] != static_cast<int64_t>(mFields.scale.size())) {
    logError("input channels differ from the length of scale");
    return -1;
  }
  if (!uploadWeights()) {
    logError("cannot copy the per-channel weights to the GPU");
    return -1;
  }
  return 0;
}

int32_t SwitchableNormPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*,
                                      void const* const* inputs, void* const* outputs, void* workspace,
                                      cudaStream_t stream) noexcept {
  Dims const& d = inputDesc[0].dims;
  if (volumeFrom(d, 0) == 0) return 0;  // empty batch: nothing to write
  if (!uploadWeights()) {  // normally done already in onShapeChange
    logError("cannot copy the per-channel weights to the GPU");
    return -1;
  }
  size_t const C = mFields.scale.size();
  bool const usingBn = !mFields.running_mean.empty();
  SnParams p{};
  p.N = d.d[0];
  p.C = d.d[1];
  p.L = mFields.rank2 ? 1 : volumeFrom(d, 2);
  p.rank2 = mFields.rank2;
  p.using_bn = usingBn ? 1 : 0;
  for (size_t i = 0; i < mFields.mean_weights.size() && i < 3; ++i) {
    p.mean_w[i] = mFields.mean_weights[i];
    p.var_w[i] = mFields.var_weights[i];
  }
  p.eps = mFields.epsilon;
  p.relu = mFields.relu;
  p.scale = mDevice;
  p.bias = mDevice + C;
  p.running_mean = usingBn ? mDevice + 2 * C : nullptr;
  p.running_var = usingBn ? mDevice + 3 * C : nullptr;
  p.residual = mFields.residual ? inputs[1] : nullptr;
  int const dtype = inputDesc[0].type == DataType::kHALF ? 1 : 0;
  int const status = sn_forward_cuda(&p, dtype, inputs[0], outputs[0], workspace, stream);
  if (status != SN_OK) {
    std::string shape;
    for (int32_t i = 0; i < d.nbDims; ++i) shape += (i ? "x" : "") + std::to_string(d.d[i]);
    logError("enqueue on input " + shape + ": " + sn_error_string(status));
    return -1;
  }
  return 0;
}

IPluginV3* SwitchableNormPlugin::attachToContext(IPluginResourceContext*) noexcept { return clone(); }

PluginFieldCollection const* SwitchableNormPlugin::getFieldsToSerialize() noexcept {
  mSerialized.clear();
  mSerialized.push_back(PluginField{"epsilon", &mFields.epsilon, PluginFieldType::kFLOAT32, 1});
  mSerialized.push_back(floats("mean_weights", mFields.mean_weights));
  mSerialized.push_back(floats("var_weights", mFields.var_weights));
  mSerialized.push_back(PluginField{"relu", &mFields.relu, PluginFieldType::kINT32, 1});
  mSerialized.push_back(PluginField{"rank2", &mFields.rank2, PluginFieldType::kINT32, 1});
  mSerialized.push_back(PluginField{"residual", &mFields.residual, PluginFieldType::kINT32, 1});
  mSerialized.push_back(floats("scale", mFields.scale));
  mSerialized.push_back(floats("bias", mFields.bias));
  if (!mFields.running_mean.empty()) {
    mSerialized.push_back(floats("running_mean", mFields.running_mean));
    mSerialized.push_back(floats("running_var", mFields.running_var));
  }
  mSerializedCollection.nbFields = static_cast<int32_t>(mSerialized.size());
  mSerializedCollection.fields = mSerialized.data();
  return &mSerializedCollection;
}

// ------------------------------------------------------------------ creator
SwitchableNormPluginCreator::SwitchableNormPluginCreator() {
  mFieldNames = {
      PluginField{"epsilon", nullptr, PluginFieldType::kFLOAT32, 1},
      PluginField{"mean_weights", nullptr, PluginFieldType::kFLOAT32, 0},
      PluginField{"var_weights", nullptr, PluginFieldType::kFLOAT32, 0},
      PluginField{"relu", nullptr, PluginFieldType::kINT32, 1},
      PluginField{"rank2", nullptr, PluginFieldType::kINT32, 1},
      PluginField{"residual", nullptr, PluginFieldType::kINT32, 1},
      PluginField{"scale", nullptr, PluginFieldType::kFLOAT32, 0},
      PluginField{"bias", nullptr, PluginFieldType::kFLOAT32, 0},
      PluginField{"running_mean", nullptr, PluginFieldType::kFLOAT32, 0},
      PluginField{"running_var", nullptr, PluginFieldType::kFLOAT32, 0},
  };
  mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
  mFieldCollection.fields = mFieldNames.data();
}

IPluginV3* SwitchableNormPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc,
                                                     TensorRTPhase) noexcept {
  try {
    SnFields fields;
    std::string const problem = parseFields(fc, fields);
    if (!problem.empty()) {
      logError(std::string(name ? name : "?") + ": " + problem);
      return nullptr;
    }
    return new SwitchableNormPlugin(std::move(fields));
  } catch (...) {
    return nullptr;
  }
}

}  // namespace sn_trt

// ------------------------------------------------------------------ library entry points
// trtexec --dynamicPlugins / IPluginRegistry::loadLibrary call these two.
extern "C" {

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  std::lock_guard<std::mutex> lock(sn_trt::gLoggerMutex);
  sn_trt::gLoggerFinder = finder;
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static sn_trt::SwitchableNormPluginCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}

}  // extern "C"

#ifdef SN_TRT_STATIC_REGISTRATION
// libsn_trt_plugin_preload.so: registers at load time, for LD_PRELOAD and Triton's
// `--backend-config=tensorrt,plugins=...` (dlopen). Not for loadLibrary, which registers the
// creators returned by getCreators itself.
using SwitchableNormPluginCreator = sn_trt::SwitchableNormPluginCreator;
REGISTER_TENSORRT_PLUGIN(SwitchableNormPluginCreator);
#endif
