#include "compiler/codegen.h"

#include <fmt/format.h>

#include <cstddef>
#include <map>

namespace moejit::compiler {

struct EmbeddedFile {
  const char* name;
  const char* text;
};
extern const EmbeddedFile kEmbeddedFiles[];
extern const std::size_t kNumEmbeddedFiles;

std::vector<TemplateFile> embedded_templates() {
  std::vector<TemplateFile> out;
  for (std::size_t i = 0; i < kNumEmbeddedFiles; ++i)
    out.push_back({kEmbeddedFiles[i].name, kEmbeddedFiles[i].text});
  return out;
}

namespace {

const char* b(bool v) { return v ? "true" : "false"; }

// A float constant that the CUDA compiler reads back to the same value.
std::string float_literal(double v) {
  std::string s = fmt::format("{:.9g}", static_cast<float>(v));
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s + "f";
}

// The timeline diagnostic (moejit bench --timeline): plan override "tl=0xADDRESS", the device
// address of the buffer the kernels stamp (templates/moejit_common.cuh). "" when off.
std::string timeline_define() {
  // (Its form, 0x and 1-16 hex digits, is checked by parse_plan_override.)
  const std::optional<std::string> tl = plan_override_value("tl");
  return tl ? fmt::format("#define MOEJIT_TIMELINE {}ull\n", *tl) : "";
}

// The translation unit: Cfg constants, then an entry taking the parameter block by value that
// calls the template `function`<Cfg>.
std::string unit(const KernelPlan& k, const MoeSpec& s, const std::string& include,
                 const std::string& cfg_body, const std::string& params,
                 const std::string& function, int threads, int min_blocks = 0) {
  const std::string bounds =
      min_blocks > 0 ? fmt::format("{}, {}", threads, min_blocks) : std::to_string(threads);
  return fmt::format(
      "// moejit generated kernel '{name}' ({stages}); H={h} I={i} E={e} top_k={k}\n"
      "{timeline}"
      "#include \"{include}\"\n\n"
      "namespace {{\n"
      "struct Cfg {{\n"
      "{cfg}"
      "}};\n"
      "}}  // namespace\n\n"
      "extern \"C\" __global__ void __launch_bounds__({bounds})\n"
      "moejit_{name}(const __grid_constant__ moejit_dev::{params} p) {{\n"
      "  moejit_dev::{function}<Cfg>(p);\n"
      "}}\n",
      fmt::arg("name", k.name), fmt::arg("timeline", timeline_define()), fmt::arg("stages", fmt::join(k.stages, "+")),
      fmt::arg("h", s.hidden), fmt::arg("i", s.intermediate), fmt::arg("e", s.num_experts),
      fmt::arg("k", s.top_k), fmt::arg("include", include), fmt::arg("cfg", cfg_body),
      fmt::arg("bounds", bounds), fmt::arg("params", params), fmt::arg("function", function));
}

// Routing constants; warps = routing warps per block.
std::string route_cfg(const MoeSpec& s, int warps, bool block_route = false) {
  return fmt::format(
      "  static constexpr int kExperts = {};\n"
      "  static constexpr int kTopK = {};\n"
      "  static constexpr int kMethod = {};  // moejit_dev::k{}\n"
      "  static constexpr int kNGroup = {};\n"
      "  static constexpr int kTopkGroup = {};\n"
      "  static constexpr float kScale = {};\n"
      "  static constexpr bool kHasBias = {};\n"
      "  static constexpr bool kLogitsBF16 = {};\n"
      "  static constexpr bool kBiasBF16 = {};\n"
      "  static constexpr int kWarpsPerBlock = {};\n"
      "  static constexpr bool kBlockRoute = {};  // one token routed by the whole block\n",
      s.num_experts, s.top_k, static_cast<int>(s.routing), moejit::to_string(s.routing),
      s.n_group, s.topk_group, float_literal(s.routed_scaling_factor), b(s.has_routing_bias),
      b(s.logits_dtype == DType::BF16), b(s.bias_dtype == DType::BF16), warps, b(block_route));
}

// Dispatch constants (kTopK comes from route_cfg when both are present).
std::string dispatch_cfg(const Plan& plan, bool with_top_k, int threads = kDispatchThreads) {
  const MoeSpec& s = plan.spec;
  return (with_top_k ? fmt::format("  static constexpr int kTopK = {};\n", s.top_k) : "") +
         fmt::format(
             "  static constexpr int kLocalOffset = {};\n"
             "  static constexpr int kLocalExperts = {};\n"
             "  static constexpr int kThreads = {};\n"
             "  static constexpr bool kSmallDispatch = {};  // <= 32 slots: warp 0 places them\n",
             s.local_expert_offset, s.local_experts(), threads, b(plan.small_dispatch));
}

KernelSource route_unit(const Plan& plan, const KernelPlan& k) {
  const MoeSpec& s = plan.spec;
  const std::string cfg = route_cfg(s, kRouteWarpsPerBlock);
  const int threads = 32 * kRouteWarpsPerBlock;
  return {k.name, "moejit_" + k.name,
          unit(k, s, "moejit_route.cuh", cfg,
               "RouteParams", "route_kernel", threads),
          threads};
}

KernelSource route_dispatch_unit(const Plan& plan, const KernelPlan& k) {
  const MoeSpec& s = plan.spec;
  const int threads = 32 * plan.route_dispatch_warps;
  bool convert_x = false;  // a chain with fp16 operands (StreamConfig::f16) behind this block
  for (const Bucket& b : plan.buckets) convert_x = convert_x || (b.chain_tokens > 0 && b.c1.f16);
  const std::string cfg = route_cfg(s, plan.route_dispatch_warps, plan.fused_block_route) +
                          dispatch_cfg(plan, false, threads) +
                          fmt::format("  static constexpr bool kConvertX = {};  // block 1 writes x as fp16 (f16 chains)\n"
                                      "  static constexpr int kH = {};\n"
                                      "  static constexpr int kPackedIdSlots = {};  // routed ids packed beside the word (Plan::routed_id_slots)\n",
                                      b(convert_x), s.hidden, plan.routed_id_slots);
  return {k.name, "moejit_" + k.name,
          unit(k, s, "moejit_route_dispatch.cuh", cfg, "RouteDispatchParams",
               "route_dispatch_kernel", threads),
          threads};
}

KernelSource dispatch_unit(const Plan& plan, const KernelPlan& k) {
  const MoeSpec& s = plan.spec;
  const std::string cfg = dispatch_cfg(plan, true);
  return {k.name, "moejit_" + k.name,
          unit(k, s, "moejit_dispatch.cuh", cfg,
               "DispatchParams", "dispatch_kernel",
               kDispatchThreads),
          kDispatchThreads};
}

// SwiGLU options and the gate/up order (both GEMM families).
std::string swiglu_cfg(const MoeSpec& s, bool g1) {
  return fmt::format(
      "  static constexpr bool kGateFirst = {};\n"
      "  static constexpr bool kHasAlpha = {};\n"
      "  static constexpr bool kHasBeta = {};\n"
      "  static constexpr bool kHasLimit = {};\n",
      b(s.gate_up_order == GateUpOrder::GateUp), b(g1 && s.swiglu_alpha), b(g1 && s.swiglu_beta),
      b(g1 && s.swiglu_limit));
}

bool tiled(const MoeSpec& s) { return s.weight_format == WeightFormat::MxInt4G32Tiled; }
std::string tiled_cfg(const MoeSpec& s) {
  return fmt::format("  static constexpr bool kTiledW = {};  // weights in WeightFormat::MxInt4G32Tiled\n",
                     b(tiled(s)));
}

// The Cfg body of a stream GEMM (templates/moejit_stream.cuh) with configuration c.
std::string stream_cfg(const Plan& plan, const Bucket& bk, const StreamConfig& c, bool g1) {
  const MoeSpec& s = plan.spec;
  const int stage_bytes = stream_stage_bytes(c, g1);
  return fmt::format(
          "  static constexpr bool kGemm1 = {};\n"
          "  static constexpr int kN = {};  // output features\n"
          "  static constexpr int kK = {};  // reduction length\n"
          "  static constexpr int kTopK = {};\n"
          "  static constexpr int kLocalOffset = {};\n"
          "  static constexpr int kLocalExperts = {};\n"
          "  static constexpr int kKC = {};  // K per stage; 8-row tiles\n"
          "  static constexpr int kStages = {};\n"
          "  static constexpr int kConsumerWarps = {};\n"
          "  static constexpr int kProducerWarps = {};\n"
          "  static constexpr int kStageBytes = {};\n"
          "  static constexpr unsigned kSuspendNs = {};\n"
          "  static constexpr bool kPackPlanes = {};\n"
          "  static constexpr int kUnitRows = {};  // weight rows per work unit (default path)\n"
          "  static constexpr int kAltRows = {};  // smaller unit sizes compiled too (mask of 16, 32)\n"
          "  static constexpr int kKC16 = {};  // their k_stage (0: not compiled)\n"
          "  static constexpr int kKC32 = {};\n"
          "  static constexpr int kRingBytes = {};  // dynamic shared memory of the ring\n"
          "  static constexpr bool kSplitEpilogue = {};\n"
          "  static constexpr bool kTma = {};  // weights and scales by TMA boxes\n"
          "  static constexpr bool kDynamicUnits = {};  // units after the first from a counter\n"
          "  static constexpr bool kXBoxes = {};  // gemm2: x by 4-row TMA boxes\n"
          "  static constexpr bool kEarlyUnit = {};  // gemm1: first unit planned and copied before the wait\n"
          "  static constexpr bool kEarlyRouted = {};  // ... behind the fused route+dispatch block's word\n"
          "  static constexpr bool kTileReady = {};  // per-tile hand-off from gemm1 to gemm2\n"
          "  static constexpr bool kEarlyFetch = {};  // next unit's id and tables fetched early\n"
          "  static constexpr bool kEvictFirst = {};  // weights and scales with an L2 evict-first policy\n"
          "  static constexpr int kChain = {};  // phase in a chain kernel (0: none)\n"
          "  static constexpr int kSlotBytes = {};  // a chain's ring slot\n"
          "  static constexpr bool kPackedOnly = {};  // gemm2: one x plane, packed units only\n"
          "  static constexpr int kRoutedIds = {};  // gemm1: up to this many routed ids packed beside the fused block's word (0: none)\n"
          "  static constexpr bool kTiledW = {};  // weights in WeightFormat::MxInt4G32Tiled\n"
          "  static constexpr bool kChainFinalize = {};  // a chain's gemm2 finalizes the output at its end\n"
          "  static constexpr bool kF16 = {};  // a chain's fp16 operands (StreamConfig::f16)\n"
          "  static constexpr bool kF16Act = {};  // gemm1: the activation for an fp16 gemm2\n"
          "  static constexpr int kGroupCols = {};  // most valid rows of a tile whose groups go in the MMA's columns (0: none)\n",
          b(g1), g1 ? s.intermediate : s.hidden, g1 ? s.hidden : s.intermediate, s.top_k,
          s.local_expert_offset, s.local_experts(), c.k_stage, c.stages,
          c.consumer_warps, c.producer_warps, stage_bytes, c.suspend_ns, b(c.pack_planes),
          c.unit_rows, c.alt_rows, c.k_stage16, c.k_stage32, c.ring_bytes, b(c.split_epilogue), b(c.tma),
          b(c.tma && c.dynamic_units), b(c.tma && !g1 && c.x_boxes),
          b(g1 && c.early_unit), b(g1 && c.early_unit && bk.fused_route), b(c.tile_ready), b(c.tma && c.dynamic_units && c.early_fetch),
          b(c.tma && c.evict_first), c.chain, c.chain ? c.slot_bytes : stage_bytes,
          b(!g1 && c.packed_only),
          g1 && c.early_unit && bk.fused_route && c.routed_ids && s.num_experts < 0x7fff ? plan.routed_id_slots : 0, b(tiled(s)),
          b(!g1 && c.chain == 2 && c.chain_finalize), b(c.chain != 0 && c.f16), b(g1 && c.chain != 0 && bk.c2.f16),
          c.group_cols) +
         swiglu_cfg(s, g1);
}

KernelSource stream_unit(const Plan& plan, const KernelPlan& k) {
  const MoeSpec& s = plan.spec;
  const Bucket& bk = plan.buckets.at(k.bucket);
  const bool g1 = k.role == KernelRole::Gemm1;
  const StreamConfig& c = g1 ? bk.s1 : bk.s2;
  const std::string cfg = stream_cfg(plan, bk, c, g1);
  KernelSource src{k.name, "moejit_" + k.name,
                   unit(k, s, "moejit_stream.cuh", cfg, "GemmParams", "stream_gemm", c.threads(g1),
                        c.min_blocks),
                   c.threads(g1)};
  src.dynamic_smem = c.ring_bytes + (c.tma ? 1024 : 0);  // TMA: slack to align the ring to 1 KiB
  src.persistent = true;
  return src;
}

// Both stream GEMMs of a bucket in one kernel (stream_chain<Cfg1, Cfg2>), with gemm1's threads.
KernelSource chain_unit(const Plan& plan, const KernelPlan& k) {
  const MoeSpec& s = plan.spec;
  const Bucket& bk = plan.buckets.at(k.bucket);
  const int threads = bk.c1.threads(true);
  const std::string text = fmt::format(
      "// moejit generated kernel '{name}' (gemm1+gemm2); H={h} I={i} E={e} top_k={k}\n"
      "{timeline}"
      "#include \"moejit_stream.cuh\"\n\n"
      "namespace {{\n"
      "struct Cfg1 {{\n"
      "{cfg1}"
      "}};\n"
      "struct Cfg2 {{\n"
      "{cfg2}"
      "}};\n"
      "}}  // namespace\n\n"
      "extern \"C\" __global__ void __launch_bounds__({threads}, {blocks})\n"
      "moejit_{name}(const __grid_constant__ moejit_dev::ChainParams p) {{\n"
      "  moejit_dev::stream_chain<Cfg1, Cfg2>(p);\n"
      "}}\n",
      fmt::arg("name", k.name), fmt::arg("timeline", timeline_define()), fmt::arg("h", s.hidden),
      fmt::arg("i", s.intermediate), fmt::arg("e", s.num_experts), fmt::arg("k", s.top_k),
      fmt::arg("cfg1", stream_cfg(plan, bk, bk.c1, true)), fmt::arg("cfg2", stream_cfg(plan, bk, bk.c2, false)),
      fmt::arg("threads", threads), fmt::arg("blocks", bk.c1.min_blocks));
  KernelSource src{k.name, "moejit_" + k.name, text, threads};
  src.dynamic_smem = bk.c1.ring_bytes + 1024;  // slack to align the ring to 1 KiB
  src.persistent = true;
  return src;
}

KernelSource gemm_unit(const Plan& plan, const KernelPlan& k) {
  const MoeSpec& s = plan.spec;
  const Bucket& bk = plan.buckets.at(k.bucket);
  const bool g1 = k.role == KernelRole::Gemm1;
  if (bk.stream) return stream_unit(plan, k);
  const GemmConfig& c = g1 ? bk.gemm1 : bk.gemm2;
  // The constants both grouped-GEMM templates read.
  const std::string shape = fmt::format(
      "  static constexpr bool kGemm1 = {};\n"
      "  static constexpr int kN = {};  // output features\n"
      "  static constexpr int kK = {};  // reduction length\n"
      "  static constexpr int kTopK = {};\n"
      "  static constexpr int kLocalOffset = {};\n"
      "  static constexpr int kTile = {};  // rows per tile\n",
      b(g1), g1 ? s.intermediate : s.hidden, g1 ? s.hidden : s.intermediate, s.top_k,
      s.local_expert_offset, bk.tile_rows);
  if (c.big) {
    const std::string cfg = fmt::format(
        "  static constexpr int kWarpsF = {};  // warps of kWarpTileRows weight rows\n"
        "  static constexpr int kWarpsR = {};  // warps of 32 rows\n"
        "  static constexpr int kWarpTileRows = {};\n"
        "  static constexpr int kStages = {};\n"
        "  static constexpr bool kTileMajor = {};\n"
        "  static constexpr bool kFuseFinalize = false;\n",
        c.big_wf, c.big_wr, c.big_warp_rows, c.big_stages, b(c.big_tile_major));
    KernelSource src{k.name, "moejit_" + k.name,
                     unit(k, s, "moejit_gemm_big.cuh", shape + cfg + swiglu_cfg(s, g1) + tiled_cfg(s),
                          "GemmParams", "grouped_gemm_big", c.threads(), c.min_blocks),
                     c.threads()};
    src.dynamic_smem = c.big_smem;
    return src;
  }
  const std::string cfg = shape + fmt::format(
      "  static constexpr int kWarpsN = {};\n"
      "  static constexpr int kWarpsK = {};\n"
      "  static constexpr int kChunkGroups = {};\n"
      "  static constexpr bool kDoubleBuffer = {};\n"
      "  static constexpr bool kDirectX = {};\n"
      "  static constexpr bool kFuseFinalize = {};\n",
      c.warps_n, c.warps_k, c.k_chunk_groups, b(c.double_buffer), b(c.direct_x),
      b(!g1 && bk.fused_finalize));
  return {k.name, "moejit_" + k.name,
          unit(k, s, "moejit_gemm.cuh", cfg + swiglu_cfg(s, g1) + tiled_cfg(s),
               "GemmParams", "grouped_gemm", c.threads(), c.min_blocks),
          c.threads()};
}

KernelSource finalize_unit(const Plan& plan, const KernelPlan& k) {
  const MoeSpec& s = plan.spec;
  const std::string cfg = fmt::format(
      "  static constexpr int kHidden = {};\n"
      "  static constexpr int kTopK = {};\n"
      "  static constexpr int kThreads = {};\n"
      "  static constexpr int kLayerHidden = {};  // the layer's H (kHidden: the kernels', padded)\n",
      s.hidden, s.top_k, kFinalizeThreads, plan.layer_spec.hidden);
  return {k.name, "moejit_" + k.name,
          unit(k, s, "moejit_finalize.cuh", cfg,
               "FinalizeParams", "finalize_kernel",
               kFinalizeThreads),
          kFinalizeThreads};
}

KernelSource prepare_unit(const Plan& plan, const KernelPlan& k) {
  return {k.name, "moejit_" + k.name,
          unit(k, plan.spec, "moejit_prepare.cuh", "  static constexpr int kThreads = 256;\n",
               "PrepareParams", "prepare_weights", 256),
          256};
}

KernelSource rows_unit(const Plan& plan, const KernelPlan& k) {
  return {k.name, "moejit_" + k.name,
          unit(k, plan.spec, "moejit_prepare.cuh", "  static constexpr int kThreads = 256;\n",
               "RowsParams", "copy_rows", 256),
          256};
}

KernelSource resident_unit(const Plan& plan, const KernelPlan& k) {
  const MoeSpec& s = plan.spec;
  const ResidentConfig& r = plan.buckets.at(k.bucket).res;
  const std::string cfg =
      route_cfg(s, 1, r.block_route) +
      fmt::format(
          "  static constexpr int kH = {};\n"
          "  static constexpr int kI = {};\n"
          "  static constexpr int kLocalOffset = {};\n"
          "  static constexpr int kLocalExperts = {};\n"
          "  static constexpr int kGrid = {};  // blocks (one per SM), one token\n"
          "  static constexpr int kWarps = {};\n"
          "  static constexpr int kKP1 = {};  // gemm1's K per copy part\n"
          "  static constexpr int kWindow = {};  // gemm1 parts in flight\n"
          "  static constexpr int kU1 = {};  // most gemm1 units (slot, 8 features) per block\n"
          "  static constexpr int kU2 = {};  // most gemm2 units (8 features) per block\n"
          "  static constexpr int kChains1 = {};  // the stream GEMMs' consumer warps\n"
          "  static constexpr int kChains2 = {};\n"
          "  static constexpr bool kPacked2 = {};  // the stream gemm2 packs both planes in one MMA\n"
          "  static constexpr int kSmem = {};  // dynamic shared memory less the alignment slack\n",
          s.hidden, s.intermediate, s.local_expert_offset, s.local_experts(), r.grid, r.warps,
          r.k_part1, r.window, r.units1, r.units2, r.chains1, r.chains2, b(r.packed2), r.smem) +
      swiglu_cfg(s, true) + tiled_cfg(s);
  KernelSource src{k.name, "moejit_" + k.name,
                   unit(k, s, "moejit_resident.cuh", cfg, "ResidentParams", "resident_layer",
                        r.threads(), 1),
                   r.threads()};
  src.dynamic_smem = r.smem + 1024;  // slack to align the layout to 1 KiB
  src.cooperative = true;
  src.grid = r.grid;
  return src;
}

}  // namespace

KernelSource generate(const Plan& plan, const KernelPlan& kernel) {
  switch (kernel.role) {
    case KernelRole::Route: return route_unit(plan, kernel);
    case KernelRole::Dispatch: return dispatch_unit(plan, kernel);
    case KernelRole::RouteDispatch: return route_dispatch_unit(plan, kernel);
    case KernelRole::Gemm1:
    case KernelRole::Gemm2: return gemm_unit(plan, kernel);
    case KernelRole::Finalize: return finalize_unit(plan, kernel);
    case KernelRole::Resident: return resident_unit(plan, kernel);
    case KernelRole::Chain: return chain_unit(plan, kernel);
    case KernelRole::Prepare: return prepare_unit(plan, kernel);
    case KernelRole::Rows: return rows_unit(plan, kernel);
  }
  throw Error(ErrorKind::Internal, "generate: unknown kernel role");
}

std::vector<KernelSource> generate_all(const Plan& plan) {
  std::vector<KernelSource> out;
  // A bucket kernel's code apart from its name: the kernel generated again under one fixed
  // name. It shares an earlier kernel's code only where that text and the launch are equal.
  std::map<std::string, std::vector<size_t>> by_text;
  for (const KernelPlan& k : plan.kernels) {
    KernelSource src = generate(plan, k);
    if (k.bucket >= 0) {  // (the others are one kernel of their role per plan)
      KernelPlan anonymous = k;
      anonymous.name = "kernel";
      std::vector<size_t>& same_text = by_text[generate(plan, anonymous).source];
      for (size_t i : same_text)
        if (same_launch(out[i], src)) {
          src.entry = out[i].entry;
          src.source = out[i].source;
          src.same_as = static_cast<int>(i);
          break;
        }
      if (src.same_as < 0) same_text.push_back(out.size());
    }
    out.push_back(std::move(src));
  }
  return out;
}

}  // namespace moejit::compiler
