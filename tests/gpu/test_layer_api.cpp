// GPU tests of the launch API: graph capture, determinism, argument errors, cached layers.
#include <gmock/gmock.h>

#include <cuda.h>

#include <algorithm>
#include <cstdio>
#include <thread>
#include <vector>

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

// fn() throws moejit::Error of kind InvalidArgument whose message contains needle.
template <class Fn>
void expect_error(Fn&& fn, const char* needle) {
  try {
    fn();
    ADD_FAILURE() << "no error for " << needle;
  } catch (const moejit::Error& e) {
    EXPECT_EQ(e.kind(), moejit::ErrorKind::InvalidArgument);
    EXPECT_THAT(e.what(), HasSubstr(needle));
  }
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
  // One launch of `layer` (on the null stream) into a poisoned output, which it returns after
  // checking that no element was left as poison.
  std::vector<uint16_t> run(const moejit::FinalizedLayer& layer) const {
    DeviceBuffer ws(layer.workspace_bytes(T));
    DeviceBuffer out(static_cast<size_t>(T) * spec.hidden * 2);
    out.poison();
    layer.launch(dev.inputs(spec), T, {out.get()}, {ws.get(), ws.bytes()}, nullptr);
    CUDA_OK(cudaDeviceSynchronize());
    auto o = out.download<uint16_t>();
    EXPECT_EQ(std::count(o.begin(), o.end(), uint16_t{0xffff}), 0) << "elements left as poison";
    return o;
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
  const auto d = direct.download<uint16_t>();
  EXPECT_EQ(d, graphed.download<uint16_t>());
  EXPECT_EQ(std::count(d.begin(), d.end(), uint16_t{0xffff}), 0) << "elements left as poison";
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
  const auto got = a.download<uint16_t>();
  EXPECT_EQ(got, b.download<uint16_t>());
  EXPECT_EQ(std::count(got.begin(), got.end(), uint16_t{0xffff}), 0) << "elements left as poison";
}

// Tiled weights that pad H and I (H = I = 160 to 256: a copy of x before the layer's kernels and
// of their output rows after them, moejit.h): launches back to back on one stream without a sync
// between them and replays of a captured graph give the bits of a lone launch, and no byte past
// the caller's rows is written (64 guard bytes); the graph holds launches_per_call kernels; the
// unfinalized layer's rows plus moejit::finalize, queued right behind it, give the same bits.
TEST(GpuLayerApi, PaddedTiledLayerBackToBackAndInAGraph) {
  MOEJIT_REQUIRE_GPU();
  moejit::MoeSpec spec = small_spec();
  spec.hidden = 160;
  spec.intermediate = 160;
  spec.weight_format = moejit::WeightFormat::MxInt4G32Tiled;
  for (const int T : {1, 5, 40}) {
    SCOPED_TRACE("tokens " + std::to_string(T));
    moejit::ref::HostLayer host = moejit::ref::make_weights(spec, 7);
    moejit::ref::make_inputs(host, T, 11);
    moejit::ref::DeviceLayer dev;
    dev.upload_weights(host);
    dev.upload_inputs(host);
    const auto in = dev.inputs(spec);
    const auto layer = moejit::compile_finalized(spec);
    const size_t bytes = static_cast<size_t>(T) * spec.hidden * 2, guard = 64;
    DeviceBuffer ws(layer.workspace_bytes(T));
    std::vector<DeviceBuffer> outs;
    for (int i = 0; i < 5; ++i) outs.emplace_back(bytes + guard);
    for (DeviceBuffer& o : outs) o.poison();
    layer.launch(in, T, {outs[0].get()}, {ws.get(), ws.bytes()}, nullptr);
    CUDA_OK(cudaDeviceSynchronize());
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    for (int i = 1; i <= 2; ++i) layer.launch(in, T, {outs[i].get()}, {ws.get(), ws.bytes()}, stream);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    layer.launch(in, T, {outs[3].get()}, {ws.get(), ws.bytes()}, stream);
    CUDA_OK(cudaStreamEndCapture(stream, &graph));
    size_t nodes = 0;
    CUDA_OK(cudaGraphGetNodes(graph, nullptr, &nodes));
    EXPECT_EQ(nodes, static_cast<size_t>(layer.launches_per_call(T)));
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < 2; ++i) CUDA_OK(cudaGraphLaunch(exec, stream));
    // The unfinalized layer, and its finalize right behind it.
    moejit::MoeSpec uspec = spec;
    uspec.finalize = false;
    const auto ulayer = moejit::compile_unfinalized(uspec);
    const size_t slots = static_cast<size_t>(T) * spec.top_k;
    DeviceBuffer uws(ulayer.workspace_bytes(T)), y(ulayer.unfinalized_rows(T) * spec.hidden * 4 + guard),
        w(slots * 4), e2p(slots * 4);
    y.poison();
    moejit::UnfinalizedOutput u;
    u.gemm2_out = y.get();
    u.expert_weights = w.get<float>();
    u.expanded_to_permuted = e2p.get<int32_t>();
    ulayer.launch(dev.inputs(uspec), T, u, {uws.get(), uws.bytes()}, stream);
    moejit::finalize(ulayer, u, T, {outs[4].get()}, stream);
    CUDA_OK(cudaStreamSynchronize(stream));
    const auto want = outs[0].download<uint8_t>();
    for (size_t i = 0; i < outs.size(); ++i) {
      SCOPED_TRACE("output " + std::to_string(i));
      const auto got = outs[i].download<uint8_t>();
      EXPECT_TRUE(std::equal(want.begin(), want.begin() + bytes, got.begin()));
      EXPECT_EQ(std::count(got.begin() + bytes, got.end(), uint8_t{0xff}), static_cast<long>(guard));
      const auto* e = reinterpret_cast<const uint16_t*>(got.data());
      EXPECT_EQ(std::count(e, e + bytes / 2, uint16_t{0xffff}), 0) << "elements left as poison";
    }
    const auto yb = y.download<uint8_t>();
    EXPECT_EQ(std::count(yb.end() - guard, yb.end(), uint8_t{0xff}), static_cast<long>(guard));
    CUDA_OK(cudaGraphExecDestroy(exec));
    CUDA_OK(cudaGraphDestroy(graph));
    CUDA_OK(cudaStreamDestroy(stream));
  }
}

// A workspace that held another launch's tables and rows gives the bits of a fresh one: the
// chain kernel, with the finalize kernel after it (the default) or with its blocks finalizing the
// slices they complete (chx=1, StreamConfig::chain_finalize), reads no row or count of the launch
// before (H 512, I 256, the overrides of Differential.SmallStreamChain: the chain at 1 and 3
// tokens, gemm2's stages with two x planes and with one).
TEST(GpuLayerApi, ReusedWorkspaceMatchesAFreshOneBitwise) {
  MOEJIT_REQUIRE_GPU();
  for (const char* o : {"stream=1,dyn=1,res=0,ch=1", "stream=1,dyn=1,res=0,ch=1,chpo=1", "stream=1,dyn=1,res=0,ch=1,chx=1",
                        "stream=1,dyn=1,res=0,ch=1,chpo=1,chx=1"}) {
    const ScopedPlanOverride force(o);
    for (const int T : {1, 3}) {
      Fixture f(T);
      f.spec.hidden = 512;
      f.spec.intermediate = 256;
      f.host = moejit::ref::make_weights(f.spec, 7);
      f.dev.upload_weights(f.host);
      const auto layer = moejit::compile_finalized(f.spec);
      DeviceBuffer reused(layer.workspace_bytes(T)), fresh(reused.bytes());
      DeviceBuffer a(static_cast<size_t>(T) * f.spec.hidden * 2), b(a.bytes()), c(a.bytes());
      for (const DeviceBuffer* d : {&reused, &fresh, &a, &b, &c}) d->poison();
      for (int round = 0; round < 3; ++round) {  // inputs of seed 11 + round, then of seed 100
        moejit::ref::make_inputs(f.host, T, 11 + round);
        f.dev.upload_inputs(f.host);
        layer.launch(f.dev.inputs(f.spec), T, {a.get()}, {reused.get(), reused.bytes()}, nullptr);
      }
      moejit::ref::make_inputs(f.host, T, 100);
      f.dev.upload_inputs(f.host);
      const auto in = f.dev.inputs(f.spec);
      layer.launch(in, T, {b.get()}, {reused.get(), reused.bytes()}, nullptr);
      layer.launch(in, T, {c.get()}, {fresh.get(), fresh.bytes()}, nullptr);
      CUDA_OK(cudaDeviceSynchronize());
      const auto got = b.download<uint16_t>(), want = c.download<uint16_t>();
      EXPECT_EQ(got, want) << o << ", " << T << " tokens";
      EXPECT_NE(got, a.download<uint16_t>()) << o << ", " << T << " tokens: the inputs differ";
      EXPECT_EQ(std::count(want.begin(), want.end(), uint16_t{0xffff}), 0) << o << ", " << T << " tokens";
    }
  }
}

TEST(GpuLayerApi, SecondRequestReturnsTheCachedLayer) {
  MOEJIT_REQUIRE_GPU();
  const auto a = moejit::compile_finalized(small_spec());
  const auto b = moejit::compile_finalized(small_spec());
  EXPECT_EQ(&a.spec(), &b.spec());  // one shared compiled layer
}

// Threads of an engine asking for layers: several threads asking for one layer at once get the
// same compiled layer; a progress callback may compile another layer (no lock is held while a
// layer builds), but asking for the layer whose compile calls it is an InvalidArgument error
// (waiting for it would wait for the callback's own compile).
TEST(GpuLayerApi, ConcurrentRequestsAndRequestsFromAProgressCallback) {
  MOEJIT_REQUIRE_GPU();
  moejit::MoeSpec a = small_spec();
  a.hidden = 384;  // (specs no other test compiles)
  std::vector<const moejit::MoeSpec*> got(4, nullptr);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < got.size(); ++i)
    threads.emplace_back([&, i] { got[i] = &moejit::compile_finalized(a).spec(); });
  for (auto& t : threads) t.join();
  for (const auto* g : got) EXPECT_EQ(g, got[0]) << "two layers built for one request";

  moejit::MoeSpec b = small_spec(), c = small_spec();
  b.hidden = 640;
  c.intermediate = 224;
  moejit::CompileOptions opt;
  const moejit::MoeSpec* inner = nullptr;
  std::string self_error;
  opt.progress = [&](int done, int, const std::string&) {
    if (done != 1) return;
    inner = &moejit::compile_finalized(c).spec();
    try {
      moejit::compile_finalized(b);
    } catch (const moejit::Error& e) {
      EXPECT_EQ(e.kind(), moejit::ErrorKind::InvalidArgument);
      self_error = e.what();
    }
  };
  const auto layer = moejit::compile_finalized(b, opt);
  EXPECT_EQ(layer.spec().hidden, 640);
  EXPECT_EQ(inner, &moejit::compile_finalized(c).spec());
  EXPECT_THAT(self_error, HasSubstr("still being compiled"));
}

// A layer is loaded in the context current at its compile. A context created after another was
// destroyed may get the same handle value; it gets its own layer, not the dead context's modules
// (those launches failed with CUDA_ERROR_INVALID_HANDLE), and its output is the first one's.
TEST(GpuLayerApi, ContextCreatedAfterADestroyedOneGetsItsOwnLayer) {
  MOEJIT_REQUIRE_GPU();
  using Create = CUresult (*)(CUcontext*, CUctxCreateParams*, unsigned, CUdevice);
  using Destroy = CUresult (*)(CUcontext);
  void* create_fn = nullptr;
  void* destroy_fn = nullptr;
  cudaDriverEntryPointQueryResult q1, q2;
  CUDA_OK(cudaGetDriverEntryPointByVersion("cuCtxCreate", &create_fn, 13000, cudaEnableDefault, &q1));
  CUDA_OK(cudaGetDriverEntryPointByVersion("cuCtxDestroy", &destroy_fn, 12000, cudaEnableDefault, &q2));
  if (q1 != cudaDriverEntryPointSuccess || q2 != cudaDriverEntryPointSuccess)
    GTEST_SKIP() << "this driver has no cuCtxCreate of CUDA 13's signature";
  int device = 0;
  CUDA_OK(cudaGetDevice(&device));
  std::vector<uint16_t> first_out;
  CUcontext first = nullptr;
  for (int round = 0; round < 2; ++round) {
    CUcontext ctx = nullptr;
    ASSERT_EQ(reinterpret_cast<Create>(create_fn)(&ctx, nullptr, 0, device), CUDA_SUCCESS);
    if (round == 0) first = ctx;
    else std::printf("the second context's handle %s the destroyed one's\n", ctx == first ? "is" : "is not");
    {
      Fixture f(3);
      const auto o = f.run(moejit::compile_finalized(f.spec));
      if (round == 0) first_out = o;
      else EXPECT_EQ(o, first_out);
    }
    // The one layer built in this context goes before the context does (round 1 keeps it: the
    // key by context id must hold without the release too).
    if (round == 0) {
      EXPECT_EQ(moejit::release_layers(), 1u);
    }
    ASSERT_EQ(reinterpret_cast<Destroy>(destroy_fn)(ctx), CUDA_SUCCESS);
  }
}

// release_layers() drops the current context's layers: the next request builds the layer again
// (another compiled layer, then cached as before), a second release finds nothing, and a Layer
// object held across the release still launches, with the same bits as the new build.
TEST(GpuLayerApi, ReleasedLayersAreBuiltAgainAndHeldOnesStillRun) {
  MOEJIT_REQUIRE_GPU();
  Fixture f(3);
  const auto held = moejit::compile_finalized(f.spec);
  EXPECT_GE(moejit::release_layers(), 1u);
  EXPECT_EQ(moejit::release_layers(), 0u) << "the first release left a layer behind";
  const auto rebuilt = moejit::compile_finalized(f.spec);
  EXPECT_NE(&held.spec(), &rebuilt.spec()) << "the released layer was served again";
  EXPECT_EQ(&rebuilt.spec(), &moejit::compile_finalized(f.spec).spec());
  EXPECT_EQ(f.run(held), f.run(rebuilt));
}

TEST(GpuLayerApi, LaunchRejectsBadArguments) {
  MOEJIT_REQUIRE_GPU();
  Fixture f(5);
  const auto layer = moejit::compile_finalized(f.spec);
  DeviceBuffer ws(layer.workspace_bytes(f.T));
  DeviceBuffer out(static_cast<size_t>(f.T) * f.spec.hidden * 2);
  auto in = f.dev.inputs(f.spec);
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

// The unfinalized layer and moejit::finalize: 16-byte alignment of the rows the layer writes and
// finalize reads and of its output (a misaligned pointer is an argument error, not a kernel fault that leaves the
// context unusable), a negative token count named as such, and a launch of 0 tokens, which runs
// no kernel but leaves expert_offsets all 0.
TEST(GpuLayerApi, UnfinalizedArgumentsAndZeroTokens) {
  MOEJIT_REQUIRE_GPU();
  Fixture f(5);
  f.spec.finalize = false;
  const auto layer = moejit::compile_unfinalized(f.spec);
  const size_t H = f.spec.hidden, slots = static_cast<size_t>(f.T) * f.spec.top_k;
  const int L = f.spec.local_experts();
  DeviceBuffer ws(layer.workspace_bytes(f.T));
  DeviceBuffer y(layer.unfinalized_rows(f.T) * H * 4 + 16), w(slots * 4), e2p(slots * 4),
      offsets((L + 1) * 4), out(f.T * H * 2 + 16);
  moejit::UnfinalizedOutput u;
  u.gemm2_out = y.get();
  u.expert_weights = w.get<float>();
  u.expanded_to_permuted = e2p.get<int32_t>();
  u.expert_offsets = offsets.get<int32_t>();
  const auto in = f.dev.inputs(f.spec);
  layer.launch(in, f.T, u, {ws.get(), ws.bytes()}, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto written = offsets.download<int32_t>();
  EXPECT_EQ(written[0], 0);
  EXPECT_GE(written[L], static_cast<int32_t>(slots));  // every slot local, rows padded to tiles

  moejit::UnfinalizedOutput shifted = u;
  shifted.gemm2_out = y.get<char>() + 4;
  expect_error([&] { moejit::finalize(layer, shifted, f.T, {out.get()}, nullptr); },
               "gemm2_out is not 16-byte aligned");
  expect_error([&] { layer.launch(in, f.T, shifted, {ws.get(), ws.bytes()}, nullptr); },
               "gemm2_out is not 16-byte aligned");
  expect_error([&] { moejit::finalize(layer, u, f.T, {out.get<char>() + 2}, nullptr); },
               "output.output is not 16-byte aligned");
  expect_error([&] { moejit::finalize(layer, u, -1, {out.get()}, nullptr); }, "num_tokens = -1");
  // finalize takes the bounds of a launch (its kernel indexes slots in int32).
  expect_error([&] { moejit::finalize(layer, u, (1 << 26) + 1, {out.get()}, nullptr); },
               "num_tokens = 67108865 is too large for one launch (num_tokens * top_k = 268435460");
  expect_error([&] { layer.launches_per_call(-1); }, "num_tokens = -1 is negative");
  moejit::finalize(layer, u, f.T, {out.get()}, nullptr);
  CUDA_OK(cudaDeviceSynchronize());  // the context is still usable

  CUDA_OK(cudaMemset(offsets.get(), 0xff, offsets.bytes()));
  layer.launch(in, 0, u, {ws.get(), ws.bytes()}, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto cleared = offsets.download<int32_t>();
  EXPECT_EQ(std::count(cleared.begin(), cleared.end(), 0), L + 1);
}

// A layer whose largest bucket fuses the finalize into the older family's gemm2 (8-row tiles:
// many experts, top-2) counts that kernel's blocks per token and feature block in int32 words;
// token counts whose words would not fit are refused before anything is sized or launched.
TEST(GpuLayerApi, FusedFinalizeCountersBoundTheTokens) {
  MOEJIT_REQUIRE_GPU();
  moejit::MoeSpec s = small_spec();
  s.hidden = 4096;
  s.intermediate = 1024;
  s.num_experts = 1024;
  s.top_k = 2;
  const auto layer = moejit::compile_finalized(s);
  EXPECT_GT(layer.workspace_bytes(1 << 20), size_t{1} << 20);
  expect_error([&] { layer.workspace_bytes(1 << 25); }, "its fused finalize counts num_tokens * ");
}

// Layer::prepare_weights against the layout moejit.h describes, computed here byte by byte
// (blocks of 32 rows for w13 and its scales, 64 for w2 and its scales; [chunk][row][chunk bytes
// of a row], the weights' 16-byte units at u ^ (row % 8); w13's words with k = 2m of the word at
// nibble m and k = 2m + 1 at nibble m + 4), with expert parallelism (only the local experts'
// bytes written). For an intermediate size of 160 also the padding to 256 (tiled_weight_bytes):
// each expert's gate and up rows 160-255 zero, w2's rows 128 bytes of which the last 48 zero,
// its scale rows 16 bytes of which the last 6 zero (source rows of 10 bytes: not 16-byte
// aligned); for a hidden size of 96 too, w13's rows and w2's rows 96-255 likewise. Then its
// argument errors.
void check_prepared_layout(int hidden, int intermediate) {
  SCOPED_TRACE("hidden " + std::to_string(hidden) + ", intermediate " + std::to_string(intermediate));
  moejit::MoeSpec spec = small_spec();
  spec.hidden = hidden;
  spec.intermediate = intermediate;
  spec.weight_format = moejit::WeightFormat::MxInt4G32Tiled;
  spec.local_expert_offset = 3;
  spec.local_num_experts = 5;
  const moejit::ref::HostLayer host = moejit::ref::make_weights(spec, 9);
  moejit::ref::DeviceLayer dev;
  dev.upload_weights(host);  // (a tiled spec: also prepares, which this test repeats by hand)
  const auto layer = moejit::compile_finalized(spec);
  moejit::MoeInputs in = dev.row_major(dev.inputs(spec));
  const moejit::TiledWeightBytes sizes = moejit::tiled_weight_bytes(spec);
  const long long E = spec.num_experts, H = spec.hidden, I = spec.intermediate;
  const long long IP = (I + 255) / 256 * 256, HP = (H + 255) / 256 * 256;
  ASSERT_EQ(sizes.intermediate, IP);
  ASSERT_EQ(sizes.hidden, HP);
  DeviceBuffer o13(sizes.w13), s13(sizes.w13_scale), o2(sizes.w2), s2(sizes.w2_scale);
  for (DeviceBuffer* b : {&o13, &s13, &o2, &s2}) b->poison();
  const moejit::TiledWeights out{o13.get<uint8_t>(), s13.get(), o2.get<uint8_t>(), s2.get()};
  layer.prepare_weights(in, out, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  struct Tensor {
    const char* name;
    std::vector<uint8_t> want, got;  // row-major source, tiled output
    long long rows, row_bytes;       // per expert, of the output
    long long src_rows, src_row_bytes, seg_rows, src_seg_rows;
    long long block, chunk_bytes;
    bool pair_order;
  };
  // Byte `b` of source row `row` as the tiled layout holds it: w13's weights in pair order.
  auto want_byte = [](const Tensor& t, long long row, long long b) -> uint8_t {
    const uint8_t* word = t.want.data() + row * t.src_row_bytes + (b & ~3LL);
    if (!t.pair_order) return word[b & 3];
    uint32_t w = 0, r = 0;
    for (int i = 0; i < 4; ++i) w |= static_cast<uint32_t>(word[i]) << (8 * i);
    for (int m = 0; m < 4; ++m)  // k = 2m: low nibble of byte m; k = 2m + 1: its high nibble
      r |= ((w >> (8 * m)) & 0xfu) << (4 * m) | ((w >> (8 * m + 4)) & 0xfu) << (16 + 4 * m);
    return static_cast<uint8_t>(r >> (8 * (b & 3)));
  };
  auto bytes_of = [](const auto& v) {
    const auto* p = reinterpret_cast<const uint8_t*>(v.data());
    return std::vector<uint8_t>(p, p + v.size() * sizeof(v[0]));
  };
  Tensor tensors[4] = {
      {"w13", bytes_of(host.w13), o13.download<uint8_t>(), 2 * IP, HP / 2, 2 * I, H / 2, IP, I, 32, 128, true},
      {"w13_scale", bytes_of(host.w13_scale), s13.download<uint8_t>(), 2 * IP, HP / 16, 2 * I, H / 16, IP, I,
       32, 16, false},
      {"w2", bytes_of(host.w2), o2.download<uint8_t>(), HP, IP / 2, H, I / 2, HP, H, 64, 128, false},
      {"w2_scale", bytes_of(host.w2_scale), s2.download<uint8_t>(), HP, IP / 16, H, I / 16, HP, H, 64, 16,
       false}};
  for (const Tensor& t : tensors) {
    SCOPED_TRACE(t.name);
    ASSERT_EQ(t.want.size(), static_cast<size_t>(E * t.src_rows * t.src_row_bytes));
    ASSERT_EQ(t.got.size(), static_cast<size_t>(E * t.rows * t.row_bytes));
    size_t wrong = 0, untouched_wrong = 0, padding = 0;
    for (long long e = 0; e < E; ++e) {
      const bool local = e >= spec.local_expert_offset && e < spec.local_expert_offset + spec.local_num_experts;
      for (long long row = e * t.rows; row < (e + 1) * t.rows; ++row) {
        const long long seg = row / t.seg_rows, j = row % t.seg_rows;
        for (long long b = 0; b < t.row_bytes; ++b) {
          const long long blk = row / t.block, r = row % t.block;
          const long long chunk = b / t.chunk_bytes, in_chunk = b % t.chunk_bytes;
          const long long unit = in_chunk / 16, swz = t.chunk_bytes == 128 ? (unit ^ (r % 8)) : unit;
          const long long at = blk * t.block * t.row_bytes + chunk * t.block * t.chunk_bytes +
                               r * t.chunk_bytes + swz * 16 + in_chunk % 16;
          const bool pad = j >= t.src_seg_rows || b >= t.src_row_bytes;
          const uint8_t want = pad ? 0 : want_byte(t, seg * t.src_seg_rows + j, b);
          padding += local && pad;
          if (local) wrong += t.got[static_cast<size_t>(at)] != want;
          else untouched_wrong += t.got[static_cast<size_t>(at)] != 0xff;  // poison: 0xff bytes
        }
      }
    }
    EXPECT_EQ(wrong, 0u);
    EXPECT_EQ(untouched_wrong, 0u);
    EXPECT_EQ(padding > 0, IP != I || HP != H);
  }
  moejit::TiledWeights bad = out;
  bad.w2_scale = nullptr;
  expect_error([&] { layer.prepare_weights(in, bad, nullptr); }, "w2_scale or its output is null");
  bad = out;
  bad.w13 = o13.get<uint8_t>() + 1;
  expect_error([&] { layer.prepare_weights(in, bad, nullptr); }, "w13 or its output is not 16-byte aligned");
  bad = out;
  bad.w2 = const_cast<uint8_t*>(in.w2);
  expect_error([&] { layer.prepare_weights(in, bad, nullptr); }, "overlaps the input w2");
  bad = out;
  bad.w2 = o13.get<uint8_t>();  // (w2's local bytes lie inside w13's output)
  expect_error([&] { layer.prepare_weights(in, bad, nullptr); }, "outputs for w13 and w2 overlap");
  moejit::MoeSpec row_major = spec;
  row_major.weight_format = moejit::WeightFormat::MxInt4G32;
  expect_error([&] { moejit::compile_finalized(row_major).prepare_weights(in, out, nullptr); },
               "weight_format = MxInt4G32 reads the weights as they are");
  CUDA_OK(cudaDeviceSynchronize());
}

TEST(GpuLayerApi, PrepareWeightsWritesTheTiledLayoutAndRejectsBadArguments) {
  MOEJIT_REQUIRE_GPU();
  check_prepared_layout(256, 256);
  check_prepared_layout(256, 160);
  check_prepared_layout(96, 160);
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
