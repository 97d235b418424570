// TensorRT plugin SwitchableNorm_TRT (version "1", namespace ""): a thin IPluginV3 adapter over
// the shared CUDA kernels (../sn_cuda.cu). All maths lives in ../sn_math.h.
#pragma once

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace sn_trt {

constexpr char const* kPluginName = "SwitchableNorm_TRT";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "";

// The plugin's state: exactly the fields the mapping pass (sn_deploy/passes/to_plugin.py) writes.
struct SnFields {
  float epsilon = 1e-5f;
  std::vector<float> mean_weights, var_weights;  // softmaxed, 2 or 3 entries
  int32_t relu = 0;
  int32_t rank2 = 0;
  int32_t residual = 0;  // 1: a second input, X's shape and type, added before the ReLU
  std::vector<float> scale, bias, running_mean, running_var;  // (C,); running stats optional
};

class SwitchableNormPlugin : public nvinfer1::IPluginV3,
                             public nvinfer1::IPluginV3OneCore,
                             public nvinfer1::IPluginV3OneBuild,
                             public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit SwitchableNormPlugin(SnFields fields);
  SwitchableNormPlugin(SwitchableNormPlugin const& other);
  SwitchableNormPlugin& operator=(SwitchableNormPlugin const&) = delete;
  ~SwitchableNormPlugin() override;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                             nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                          nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs,
                          nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                 int32_t nbInputs, int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override { return 1; }
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs,
                          int32_t nbOutputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

 private:
  int32_t expectedInputs() const noexcept { return mFields.residual ? 2 : 1; }
  bool uploadWeights() noexcept;  // device copies of the per-channel vectors, made once
  void releaseWeights() noexcept;

  SnFields mFields;
  float* mDevice = nullptr;  // scale | bias | running_mean | running_var, C floats each
  std::vector<nvinfer1::PluginField> mSerialized;
  nvinfer1::PluginFieldCollection mSerializedCollection{};
};

class SwitchableNormPluginCreator : public nvinfer1::IPluginCreatorV3One {
 public:
  SwitchableNormPluginCreator();
  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }
  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;

 private:
  std::vector<nvinfer1::PluginField> mFieldNames;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

// Parses a field collection into SnFields; returns an empty string or the reason it is invalid.
std::string parseFields(nvinfer1::PluginFieldCollection const* fc, SnFields& out);

}  // namespace sn_trt
