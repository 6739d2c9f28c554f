// GPU tests of the launch API: graph capture, determinism, argument errors, cached layers.
#include <gmock/gmock.h>

#include "gpu_env.h"
#include "reference/device_layer.h"
#include "reference/layer_data.h"

namespace {

using moejit::ref::DeviceBuffer;
using ::testing::HasSubstr;

moejit::MoeSpec small_spec() {
  moejit::MoeSpec s;
  s.hidden = 256;
  s.intermediate = 160;
  s.num_experts = 16;
  s.top_k = 4;
  s.routing = moejit::RoutingMethod::Renormalize;
  return s;
}

struct Fixture {
  moejit::MoeSpec spec = small_spec();
  moejit::ref::HostLayer host;
  moejit::ref::DeviceLayer dev;
  int T;
  explicit Fixture(int tokens) : T(tokens) {
    host = moejit::ref::make_weights(spec, 7);
    moejit::ref::make_inputs(host, T, 11);
    dev.upload_weights(host);
    dev.upload_inputs(host);
  }
};

TEST(GpuLayerApi, GraphReplayMatchesDirectLaunchBitwise) {
  MOEJIT_REQUIRE_GPU();
  Fixture f(37);
  const auto layer = moejit::compile_finalized(f.spec);
  DeviceBuffer ws(layer.workspace_bytes(f.T));
  DeviceBuffer direct(static_cast<size_t>(f.T) * f.spec.hidden * 2);
  DeviceBuffer graphed(direct.bytes());
  direct.poison();
  graphed.poison();
  const auto in = f.dev.inputs(f.spec);
  layer.launch(in, f.T, {direct.get()}, {ws.get(), ws.bytes()}, nullptr);
  CUDA_OK(cudaDeviceSynchronize());

  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  layer.launch(in, f.T, {graphed.get()}, {ws.get(), ws.bytes()}, stream);
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < 3; ++i) CUDA_OK(cudaGraphLaunch(exec, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  EXPECT_EQ(direct.download<uint16_t>(), graphed.download<uint16_t>());
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
  CUDA_OK(cudaStreamDestroy(stream));
}

TEST(GpuLayerApi, RepeatedLaunchesAreDeterministic) {
  MOEJIT_REQUIRE_GPU();
  Fixture f(300);
  const auto layer = moejit::compile_finalized(f.spec);
  DeviceBuffer ws(layer.workspace_bytes(f.T));
  DeviceBuffer a(static_cast<size_t>(f.T) * f.spec.hidden * 2), b(a.bytes());
  a.poison();
  b.poison();
  const auto in = f.dev.inputs(f.spec);
  layer.launch(in, f.T, {a.get()}, {ws.get(), ws.bytes()}, nullptr);
  layer.launch(in, f.T, {b.get()}, {ws.get(), ws.bytes()}, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(a.download<uint16_t>(), b.download<uint16_t>());
}

TEST(GpuLayerApi, SecondRequestReturnsTheCachedLayer) {
  MOEJIT_REQUIRE_GPU();
  const auto a = moejit::compile_finalized(small_spec());
  const auto b = moejit::compile_finalized(small_spec());
  EXPECT_EQ(&a.spec(), &b.spec());  // one shared compiled layer
}

TEST(GpuLayerApi, LaunchRejectsBadArguments) {
  MOEJIT_REQUIRE_GPU();
  Fixture f(5);
  const auto layer = moejit::compile_finalized(f.spec);
  DeviceBuffer ws(layer.workspace_bytes(f.T));
  DeviceBuffer out(static_cast<size_t>(f.T) * f.spec.hidden * 2);
  auto in = f.dev.inputs(f.spec);
  auto expect_error = [&](auto&& fn, const char* needle) {
    try {
      fn();
      ADD_FAILURE() << "no error for " << needle;
    } catch (const moejit::Error& e) {
      EXPECT_EQ(e.kind(), moejit::ErrorKind::InvalidArgument);
      EXPECT_THAT(e.what(), HasSubstr(needle));
    }
  };
  expect_error([&] { layer.launch(in, f.T, {out.get()}, {ws.get(), ws.bytes() - 1}, nullptr); },
               "workspace.bytes");
  expect_error([&] { layer.launch(in, -1, {out.get()}, {ws.get(), ws.bytes()}, nullptr); },
               "num_tokens = -1");
  auto no_hidden = in;
  no_hidden.hidden_states = nullptr;
  expect_error([&] { layer.launch(no_hidden, f.T, {out.get()}, {ws.get(), ws.bytes()}, nullptr); },
               "hidden_states");
  auto with_bias = in;
  with_bias.routing_bias = in.w13;
  expect_error([&] { layer.launch(with_bias, f.T, {out.get()}, {ws.get(), ws.bytes()}, nullptr); },
               "routing_bias");
  // Zero tokens: nothing to do, no error.
  EXPECT_NO_THROW(layer.launch(in, 0, {out.get()}, {ws.get(), ws.bytes()}, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
}

TEST(GpuLayerApi, WrongLayerKindIsAnError) {
  MOEJIT_REQUIRE_GPU();
  auto spec = small_spec();
  spec.finalize = false;
  EXPECT_THROW(moejit::compile_finalized(spec), moejit::Error);
  spec.finalize = true;
  EXPECT_THROW(moejit::compile_unfinalized(spec), moejit::Error);
}

}  // namespace
