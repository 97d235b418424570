// Host-side checks of SwitchableNorm_TRT that need neither a GPU nor libnvinfer: the creator's
// field list, plugin creation from fields, rejection of bad fields, build-time queries, and the
// serialization round trip (getFieldsToSerialize -> createPlugin -> same fields), and the
// fused-residual variant (second input) through the same queries.
#include <cstdio>
#include <cstring>
#include <vector>

#include "SwitchableNormPlugin.h"

using namespace nvinfer1;

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

static int failures = 0;
#define CHECK(cond)                                                    \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);    \
      ++failures;                                                      \
    }                                                                  \
  } while (0)

static int32_t fieldInt(PluginFieldCollection const* fc, char const* name) {
  for (int i = 0; i < fc->nbFields; ++i)
    if (std::strcmp(fc->fields[i].name, name) == 0) return *static_cast<int32_t const*>(fc->fields[i].data);
  return -1;
}

static void setDims(DynamicPluginTensorDesc& d, std::vector<int64_t> const& dims) {
  d.desc.format = TensorFormat::kLINEAR;
  d.desc.dims.nbDims = d.max.nbDims = static_cast<int32_t>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) d.desc.dims.d[i] = d.max.d[i] = dims[i];
}

static std::vector<float> fieldFloats(PluginFieldCollection const* fc, char const* name) {
  for (int i = 0; i < fc->nbFields; ++i)
    if (std::strcmp(fc->fields[i].name, name) == 0) {
      auto p = static_cast<float const*>(fc->fields[i].data);
      return std::vector<float>(p, p + fc->fields[i].length);
    }
  return {};
}

int main() {
  int32_t n = 0;
  IPluginCreatorInterface* const* creators = getCreators(n);
  CHECK(n == 1);
  auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
  CHECK(std::strcmp(creator->getPluginName(), "SwitchableNorm_TRT") == 0);
  CHECK(std::strcmp(creator->getPluginVersion(), "1") == 0);
  CHECK(std::strcmp(creator->getPluginNamespace(), "") == 0);
  CHECK(creator->getFieldNames()->nbFields == 10);

  float eps = 1e-3f;
  std::vector<float> mw{0.2f, 0.3f, 0.5f}, vw{0.1f, 0.6f, 0.3f};
  std::vector<float> scale{1.f, 2.f, 3.f}, bias{0.f, 0.5f, -1.f}, rm{0.1f, 0.2f, 0.3f}, rv{1.f, 2.f, 3.f};
  int32_t relu = 1, rank2 = 0;
  std::vector<PluginField> f{
      {"epsilon", &eps, PluginFieldType::kFLOAT32, 1},
      {"mean_weights", mw.data(), PluginFieldType::kFLOAT32, 3},
      {"var_weights", vw.data(), PluginFieldType::kFLOAT32, 3},
      {"relu", &relu, PluginFieldType::kINT32, 1},
      {"rank2", &rank2, PluginFieldType::kINT32, 1},
      {"scale", scale.data(), PluginFieldType::kFLOAT32, 3},
      {"bias", bias.data(), PluginFieldType::kFLOAT32, 3},
      {"running_mean", rm.data(), PluginFieldType::kFLOAT32, 3},
      {"running_var", rv.data(), PluginFieldType::kFLOAT32, 3}};
  PluginFieldCollection fc{static_cast<int32_t>(f.size()), f.data()};
  IPluginV3* plugin = creator->createPlugin("sn1", &fc, TensorRTPhase::kBUILD);
  CHECK(plugin != nullptr);
  if (!plugin) return 1;

  // bad fields are refused (2 weights with running stats)
  PluginField bad[] = {{"mean_weights", mw.data(), PluginFieldType::kFLOAT32, 2},
                       {"var_weights", vw.data(), PluginFieldType::kFLOAT32, 2},
                       {"scale", scale.data(), PluginFieldType::kFLOAT32, 3},
                       {"bias", bias.data(), PluginFieldType::kFLOAT32, 3},
                       {"running_mean", rm.data(), PluginFieldType::kFLOAT32, 3},
                       {"running_var", rv.data(), PluginFieldType::kFLOAT32, 3}};
  PluginFieldCollection badfc{6, bad};
  CHECK(creator->createPlugin("bad", &badfc, TensorRTPhase::kBUILD) == nullptr);

  auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
  auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  CHECK(std::strcmp(core->getPluginName(), "SwitchableNorm_TRT") == 0);
  CHECK(build->getNbOutputs() == 1);
  DataType in = DataType::kHALF, out = DataType::kFLOAT;
  CHECK(build->getOutputDataTypes(&out, 1, &in, 1) == 0 && out == DataType::kHALF);

  DynamicPluginTensorDesc io[2]{};
  for (auto& d : io) {
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.dims.nbDims = 4;
    d.max.nbDims = 4;
    int64_t dims[4] = {8, 3, 56, 56};
    for (int i = 0; i < 4; ++i) d.desc.dims.d[i] = dims[i], d.max.d[i] = dims[i];
  }
  io[0].desc.type = DataType::kFLOAT;
  io[1].desc.type = DataType::kFLOAT;
  CHECK(build->supportsFormatCombination(0, io, 1, 1));
  CHECK(build->supportsFormatCombination(1, io, 1, 1));
  io[1].desc.type = DataType::kHALF;
  CHECK(!build->supportsFormatCombination(1, io, 1, 1));  // output type must follow input
  io[0].desc.type = DataType::kINT8;
  CHECK(!build->supportsFormatCombination(0, io, 1, 1));
  io[0].desc.type = DataType::kFLOAT;
  io[0].desc.format = TensorFormat::kCHW32;
  CHECK(!build->supportsFormatCombination(0, io, 1, 1));
  io[0].desc.format = TensorFormat::kLINEAR;
  CHECK(build->configurePlugin(io, 1, io + 1, 1) == 0);
  CHECK(build->getWorkspaceSize(io, 1, io + 1, 1) > 0);
  io[0].desc.dims.d[1] = 4;
  CHECK(build->configurePlugin(io, 1, io + 1, 1) != 0);  // channel mismatch
  io[0].desc.dims.d[1] = 3;
  io[0].max.d[2] = io[0].max.d[3] = 1;
  CHECK(build->configurePlugin(io, 1, io + 1, 1) != 0);  // every plane one element: refused at build
  io[0].max.d[2] = io[0].max.d[3] = 56;
  CHECK(build->configurePlugin(io, 1, io + 1, 1) == 0);

  // serialization round trip
  PluginFieldCollection const* ser = runtime->getFieldsToSerialize();
  IPluginV3* again = creator->createPlugin("sn1", ser, TensorRTPhase::kRUNTIME);
  CHECK(again != nullptr);
  if (again) {
    auto* rt2 = static_cast<IPluginV3OneRuntime*>(again->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* ser2 = rt2->getFieldsToSerialize();
    CHECK(ser2->nbFields == ser->nbFields);
    for (char const* name : {"epsilon", "mean_weights", "var_weights", "scale", "bias", "running_mean", "running_var"})
      CHECK(fieldFloats(ser2, name) == fieldFloats(ser, name));
    CHECK(fieldFloats(ser2, "scale") == scale);
    CHECK(fieldFloats(ser2, "epsilon") == std::vector<float>{eps});
    delete again;
  }
  CHECK(fieldInt(ser, "residual") == 0);

  // fused residual: fields with residual = 1 make a two-input plugin (X, residual) -> Y
  int32_t residual = 1;
  f.push_back({"residual", &residual, PluginFieldType::kINT32, 1});
  PluginFieldCollection rfc{static_cast<int32_t>(f.size()), f.data()};
  IPluginV3* rplugin = creator->createPlugin("layer1.0.sn3", &rfc, TensorRTPhase::kBUILD);
  CHECK(rplugin != nullptr);
  if (rplugin) {
    auto* rb = static_cast<IPluginV3OneBuild*>(rplugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* rr = static_cast<IPluginV3OneRuntime*>(rplugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    DataType ins[2] = {DataType::kHALF, DataType::kHALF};
    DataType rout = DataType::kFLOAT;
    CHECK(rb->getOutputDataTypes(&rout, 1, ins, 2) == 0 && rout == DataType::kHALF);
    CHECK(rb->getOutputDataTypes(&rout, 1, ins, 1) != 0);  // the residual input is missing
    ins[1] = DataType::kFLOAT;
    CHECK(rb->getOutputDataTypes(&rout, 1, ins, 2) != 0);  // residual type differs from X's

    DynamicPluginTensorDesc rio[3]{};
    for (auto& d : rio) setDims(d, {8, 3, 56, 56}), d.desc.type = DataType::kFLOAT;
    CHECK(rb->supportsFormatCombination(0, rio, 2, 1));
    CHECK(rb->supportsFormatCombination(1, rio, 2, 1));
    CHECK(rb->supportsFormatCombination(2, rio, 2, 1));
    CHECK(!rb->supportsFormatCombination(3, rio, 2, 1));
    CHECK(!rb->supportsFormatCombination(1, rio, 1, 1));  // single-input call on a residual plugin
    rio[1].desc.type = DataType::kHALF;
    CHECK(!rb->supportsFormatCombination(1, rio, 2, 1));  // residual must follow X's type
    rio[1].desc.type = DataType::kFLOAT;
    rio[1].desc.format = TensorFormat::kCHW32;
    CHECK(!rb->supportsFormatCombination(1, rio, 2, 1));
    rio[1].desc.format = TensorFormat::kLINEAR;

    CHECK(rb->configurePlugin(rio, 2, rio + 2, 1) == 0);
    CHECK(rb->configurePlugin(rio, 1, rio + 1, 1) != 0);  // input count must match the field
    CHECK(rb->getWorkspaceSize(rio, 2, rio + 2, 1) == build->getWorkspaceSize(io, 1, io + 1, 1));
    rio[0].desc.dims.d[0] = rio[1].desc.dims.d[0] = -1;  // dynamic batch: still consistent
    CHECK(rb->configurePlugin(rio, 2, rio + 2, 1) == 0);
    rio[1].desc.dims.d[3] = 28;
    CHECK(rb->configurePlugin(rio, 2, rio + 2, 1) != 0);  // a broadcast, not a residual: refused
    rio[1].desc.dims.d[3] = 56;
    rio[1].desc.dims.nbDims = 3;
    CHECK(rb->configurePlugin(rio, 2, rio + 2, 1) != 0);  // rank differs
    rio[1].desc.dims.nbDims = 4;

    // runtime shape checks before any GPU work: a wrong residual shape fails onShapeChange
    PluginTensorDesc rt[3]{};
    for (int i = 0; i < 3; ++i) rt[i] = rio[i].desc, rt[i].dims.d[0] = 8;
    rt[1].dims.d[2] = 55;
    CHECK(rr->onShapeChange(rt, 2, rt + 2, 1) != 0);
    CHECK(rr->onShapeChange(rt, 1, rt + 1, 1) != 0);

    // the field survives serialization; an engine without it deserializes as residual = 0
    PluginFieldCollection const* rser = rr->getFieldsToSerialize();
    CHECK(fieldInt(rser, "residual") == 1);
    IPluginV3* ragain = creator->createPlugin("layer1.0.sn3", rser, TensorRTPhase::kRUNTIME);
    CHECK(ragain != nullptr);
    if (ragain) {
      auto* rr2 = static_cast<IPluginV3OneRuntime*>(ragain->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
      CHECK(fieldInt(rr2->getFieldsToSerialize(), "residual") == 1);
      delete ragain;
    }
    delete rplugin;
  }
  residual = 2;
  CHECK(creator->createPlugin("bad", &rfc, TensorRTPhase::kBUILD) == nullptr);
  f.pop_back();

  IPluginV3* copy = plugin->clone();
  CHECK(copy != nullptr);
  delete copy;
  delete plugin;
  std::printf(failures ? "%d checks FAILED\n" : "all plugin host checks passed\n", failures);
  return failures ? 1 : 0;
}
