// moejit: JIT-compiled fused MXINT4 Mixture-of-Experts layers for NVIDIA GPUs.
//
// One header is the whole public API. A caller describes a layer with a MoeSpec, asks for a
// compiled layer (compile_finalized / compile_unfinalized), and launches it on its own stream
// with its own workspace. launch() never allocates and never synchronises the host, so it can be
// captured in a CUDA graph.
//
// Threads and contexts. Every function may be called from any thread. compile_* builds a layer
// once per process for each spec, options and CUDA context: the context current on the calling
// thread or, where none is, device 0's primary context, which it then makes current. A thread
// that asks for a layer another thread is building waits for it (and gets its error, if the
// build fails); requests for other layers go on meanwhile. A layer's kernels are loaded in that
// context: launch it on streams of that context (with the null stream, from a thread where that
// context is current). A layer holds no per-launch state and may be launched from several
// threads at once, but a workspace holds one launch's tables and counters until that launch
// completes in stream order: launches that can run at the same time (on two streams) need a
// workspace each. Layers stay built until the process exits; release_layers() drops a
// context's before that context is destroyed or reset.
//
// Tensor formats (row-major, device memory; see DESIGN.md):
//   hidden_states  [T, H]        bf16
//   routing_logits [T, E]        fp32 or bf16 (spec.logits_dtype)
//   routing_bias   [E]           fp32 or bf16 (spec.bias_dtype), optional
//   w13            [E, 2I, H/2]  uint8, two signed int4 per byte, low nibble = even k
//   w13_scale      [E, 2I, H/32] bf16
//   w2             [E, H, I/2]   uint8
//   w2_scale       [E, H, I/32]  bf16
//   output         [T, H]        bf16
// Weights are indexed by global expert id; with expert parallelism only the rows of experts in
// [local_expert_offset, local_expert_offset + local_num_experts) are read.
//
// WeightFormat::MxInt4G32Tiled keeps the same values and scales but stores them in the order the
// decode kernels copy them (Layer::prepare_weights writes it from the layout above): the rows of
// w13 and w13_scale in blocks of 32 (gate and up rows form separate blocks), those of w2 and
// w2_scale in blocks of 64, each block of weights as [K / 256 chunks][rows][128 bytes] with the
// 16-byte unit u of a row's 128 bytes stored at u ^ (row % 8), each block of scales as
// [K / 256 chunks][rows][8 scales]. In w13 (not w2) each 32-bit word, k = 8t .. 8t + 7 (nibble i
// at bits 4i in the row-major layout), holds its nibbles in pair order: k = 8t + 2m at bits 4m and
// k = 8t + 2m + 1 at bits 16 + 4m, m = 0..3 (since commit f05dd81: tiled weights written by an
// earlier version must be prepared again). The tiled format pads H and I to H' and I', each
// rounded up to a multiple of 256 (tiled_weight_bytes): each expert's w13 has I' gate and I' up
// rows of H' / 2 bytes, w2 H' rows of I' / 2 bytes; the rows and bytes past the layer's (gate and
// up rows I .. I' - 1, w2's rows H .. H' - 1, each row's bytes past H / 2 or I / 2) and their
// scales are zero. The layer then runs the kernels of H' and I' (the padded features are exactly
// zero), the decode kernels that need multiples of 256, at the cost of reading the padding; a
// padded H also copies x to rows of H' before them and their output rows back after them (two
// more launches).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

// CUstream and cudaStream_t are the same opaque pointer type.
struct CUstream_st;

namespace moejit {

using Stream = CUstream_st*;

// ---------------------------------------------------------------------------------------------
// Errors: one exception type with a kind.
enum class ErrorKind { InvalidSpec, InvalidArgument, Compile, Cuda, Cache, Internal };

const char* to_string(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message);
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

// ---------------------------------------------------------------------------------------------
// The layer description.
// Signed int4, one bf16 scale per 32 consecutive k. MxInt4G32: w13 / w2 row-major as in the
// table above; MxInt4G32Tiled: the same values in tiles (see the top; H and I padded to multiples
// of 256).
enum class WeightFormat { MxInt4G32, MxInt4G32Tiled };
enum class DType { BF16, FP32 };
enum class GateUpOrder { GateUp, UpGate };  // GateUp: rows [0, I) of w13 are gate (HF/vLLM)

// Exact formulas in DESIGN.md, "Routing methods". Ties go to the lower expert index; NaN ranks
// above every number (as torch.topk does).
enum class RoutingMethod {
  Default,           // softmax over all experts, top-k, no renormalisation
  Renormalize,       // top-k on raw logits, softmax over the k
  DeepSeekV3,        // sigmoid, biased grouped selection, weights renormalised x scale
  Llama4,            // top-1 on logits, weight = sigmoid(logit)
  RenormalizeNaive,  // softmax, top-k, divide by their sum
  TopK,              // top-k on raw logits, weights are the raw logits
  SigmoidRenorm,     // sigmoid, top-k, divide by (sum + 1e-20)
  Sigmoid,           // sigmoid, top-k
  TopKSigmoid,       // top-k on logits, then sigmoid
  Precomputed,       // caller supplies topk_ids [T, k] int32 and topk_weights [T, k] fp32
};

const char* to_string(WeightFormat v);
const char* to_string(DType v);
const char* to_string(GateUpOrder v);
const char* to_string(RoutingMethod v);

struct MoeSpec {
  int hidden = 0;        // H, multiple of 32
  int intermediate = 0;  // I, multiple of 32
  int num_experts = 0;   // E, global expert count
  int top_k = 0;         // k <= E
  WeightFormat weight_format = WeightFormat::MxInt4G32;
  DType activation_dtype = DType::BF16;
  GateUpOrder gate_up_order = GateUpOrder::GateUp;

  RoutingMethod routing = RoutingMethod::Renormalize;
  DType logits_dtype = DType::FP32;
  int n_group = 1;                      // DeepSeekV3 only
  int topk_group = 1;                   // DeepSeekV3 only
  double routed_scaling_factor = 1.0;   // DeepSeekV3 only (1 otherwise); a normal float
  bool has_routing_bias = false;        // DeepSeekV3 only
  DType bias_dtype = DType::FP32;

  // SwiGLU: gate * sigmoid(alpha * gate) * (up + beta), gate <= limit, |up| <= limit.
  // Each enabled flag makes launch() read a per-local-expert fp32 array.
  bool swiglu_alpha = false;
  bool swiglu_beta = false;
  bool swiglu_limit = false;

  // Expert parallelism: this GPU holds experts [offset, offset + local_num_experts).
  // local_num_experts = 0 means all experts.
  int local_expert_offset = 0;
  int local_num_experts = 0;

  bool finalize = true;

  int local_experts() const { return local_num_experts == 0 ? num_experts : local_num_experts; }
  // Throws Error(InvalidSpec) naming the field, the value and the rule.
  void validate() const;
  bool operator==(const MoeSpec& other) const;
  bool operator!=(const MoeSpec& other) const { return !(*this == other); }
};

// Named presets (kimi-k2, kimi-k2-tp4, kimi-k2-tp8, qwen3-30b-a3b, deepseek-v3, seed-test).
std::vector<std::string> preset_names();
MoeSpec preset(std::string_view name);  // throws InvalidArgument for an unknown name

// The sizes of the four tensors of WeightFormat::MxInt4G32Tiled for every expert of `spec`
// (E = spec.num_experts; the buffers are indexed by global expert id, as the row-major ones):
// [E, 2I', H'/2], [E, 2I', H'/32] bf16, [E, H', I'/2], [E, H', I'/32] bf16 with H' = hidden and
// I' = intermediate, spec.hidden and spec.intermediate rounded up to multiples of 256 (the top of
// this header). Any weight format: the sizes prepare_weights would write if the spec were tiled.
struct TiledWeightBytes {
  int hidden = 0;        // H'
  int intermediate = 0;  // I'
  size_t w13 = 0, w13_scale = 0, w2 = 0, w2_scale = 0;
};
TiledWeightBytes tiled_weight_bytes(const MoeSpec& spec);  // throws InvalidSpec if it is invalid

// The IR text form of a spec's module (round-trips through parse_spec_text).
std::string spec_to_ir_text(const MoeSpec& spec);
MoeSpec parse_spec_text(std::string_view text);  // throws InvalidSpec with line:column

// ---------------------------------------------------------------------------------------------
// Launch arguments. All pointers are device pointers.
struct MoeInputs {
  const void* hidden_states = nullptr;   // [T, H] bf16
  const void* routing_logits = nullptr;  // [T, E], not read for Precomputed
  const void* routing_bias = nullptr;    // [E], required iff spec.has_routing_bias
  const int32_t* topk_ids = nullptr;     // [T, k] global expert ids, Precomputed only
  const float* topk_weights = nullptr;   // [T, k], Precomputed only
  const uint8_t* w13 = nullptr;          // [E, 2I, H/2] (tiled: tiled_weight_bytes' sizes)
  const void* w13_scale = nullptr;       // [E, 2I, H/32] bf16
  const uint8_t* w2 = nullptr;           // [E, H, I/2]
  const void* w2_scale = nullptr;        // [E, H, I/32] bf16
  const float* swiglu_alpha = nullptr;   // [local experts], iff spec.swiglu_alpha
  const float* swiglu_beta = nullptr;    // [local experts], iff spec.swiglu_beta
  const float* swiglu_limit = nullptr;   // [local experts], iff spec.swiglu_limit
};

// Layer::prepare_weights's outputs: the four weight tensors in WeightFormat::MxInt4G32Tiled,
// of tiled_weight_bytes(spec)'s sizes (H' = H and I' = I where they are multiples of 256).
struct TiledWeights {
  uint8_t* w13 = nullptr;    // [E, 2I', H'/2] bytes
  void* w13_scale = nullptr;  // [E, 2I', H'/32] bf16
  uint8_t* w2 = nullptr;     // [E, H', I'/2] bytes
  void* w2_scale = nullptr;   // [E, H', I'/32] bf16
};

// out[t] = sum_j w[t, j] * y[t, j]; this rank's partial sum under expert parallelism.
struct FinalizedOutput {
  void* output = nullptr;          // [T, H] bf16
  int32_t* topk_ids = nullptr;     // optional [T, k]: the routing's global expert ids
  float* topk_weights = nullptr;   // optional [T, k]: their weights
};

// The layer's result before the weighted sum: rows grouped by local expert, each expert's rows
// padded to the kernel's tile. Padding rows are written with zeros; rows past
// expert_offsets[local experts] are not written. gemm2_out is fp32 (the kernels' accumulators,
// unrounded), so unfinalized + finalize() equals the finalized layer bit for bit.
struct UnfinalizedOutput {
  void* gemm2_out = nullptr;                // [unfinalized_rows(T), H] fp32, 16-byte aligned
  float* expert_weights = nullptr;          // [T, k] routing weights
  int32_t* expanded_to_permuted = nullptr;  // [T * k], index t*k + j; -1 for non-local experts
  int32_t* expert_offsets = nullptr;        // optional [local experts + 1] first row of each
                                            // expert (all 0 after a launch of 0 tokens)
  int32_t* topk_ids = nullptr;              // optional [T, k]: the routing's global expert ids
};

struct Workspace {
  void* ptr = nullptr;  // device memory, 256-byte aligned
  size_t bytes = 0;
};

struct CompileOptions {
  std::string arch;     // "sm_90a", "sm_80", ...; empty = the current device's exact arch
  int max_tokens = 0;   // compile token buckets up to this count; 0 = every bucket (>= 0)
  int jobs = 0;         // parallel NVRTC compiles; 0 = one per hardware thread
  // Called after each distinct kernel is ready (compiled or found in a cache), from any thread:
  // `total` counts the plan's kernels of their own code (KernelReport::same_as), `kernel` is
  // the name of the kernel whose code it is. A request answered by a layer already built, or by
  // another thread's build of it, calls it for no kernel (and gets that build's result, or its
  // error). An exception it throws fails the compile (compile_* rethrows it) and it is not
  // called again. It may compile other layers; asking it for a layer still being built throws
  // InvalidArgument.
  std::function<void(int done, int total, const std::string& kernel)> progress;
};

class LayerImpl;

// Shared by both layer kinds.
class Layer {
 public:
  const MoeSpec& spec() const;
  const std::string& arch() const;
  size_t workspace_bytes(int num_tokens) const;
  // Kernel launches one launch() makes for this token count.
  int launches_per_call(int num_tokens) const;
  // Largest token count this layer was compiled for (max_tokens), or 0 for no limit.
  int max_tokens() const;
  // Rows each expert's group is padded to for this token count (the planner's tile).
  int tile_rows(int num_tokens) const;
  // Writes the row-major weights and scales of `in` (w13, w13_scale, w2, w2_scale; DESIGN.md)
  // in spec().weight_format = MxInt4G32Tiled (the tiles described at the top of this header;
  // throws InvalidArgument for MxInt4G32, whose weights are read as they are). One kernel per
  // tensor on `stream`, asynchronous. Pointers are indexed by global expert id as in MoeInputs;
  // only the local experts' bytes are read and written. The outputs have tiled_weight_bytes'
  // sizes (the inputs' where H and I are multiples of 256; else padded, the padding written as
  // zeros) and must not overlap them. Launch the layer with `out`'s four pointers in MoeInputs.
  void prepare_weights(const MoeInputs& in, const TiledWeights& out, Stream stream) const;

 protected:
  explicit Layer(std::shared_ptr<const LayerImpl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const LayerImpl> impl_;
  friend void finalize(const class UnfinalizedLayer&, const UnfinalizedOutput&, int,
                       const FinalizedOutput&, Stream);
};

class FinalizedLayer : public Layer {
 public:
  void launch(const MoeInputs& in, int num_tokens, const FinalizedOutput& out, Workspace ws,
              Stream stream) const;

 private:
  using Layer::Layer;
  friend FinalizedLayer compile_finalized(const MoeSpec&, const CompileOptions&);
};

class UnfinalizedLayer : public Layer {
 public:
  // Rows the caller must allocate for UnfinalizedOutput::gemm2_out.
  size_t unfinalized_rows(int num_tokens) const;
  void launch(const MoeInputs& in, int num_tokens, const UnfinalizedOutput& out, Workspace ws,
              Stream stream) const;

 private:
  using Layer::Layer;
  friend UnfinalizedLayer compile_unfinalized(const MoeSpec&, const CompileOptions&);
};

// Returns a compiled layer; a second request for an equal spec and options compiles nothing.
// compile_finalized needs spec.finalize == true, compile_unfinalized spec.finalize == false.
FinalizedLayer compile_finalized(const MoeSpec& spec, const CompileOptions& options = {});
UnfinalizedLayer compile_unfinalized(const MoeSpec& spec, const CompileOptions& options = {});

// Drops the layers compile_* has built for the context current on the calling thread and returns
// how many it dropped (0 where no context is current or no driver is loaded; layers still being
// built stay). compile_* keeps each layer until the process exits otherwise, also after its
// context is destroyed: call this before destroying or resetting a context when the process goes
// on. A Layer object still held keeps its kernels loaded until it is destroyed; launch it only
// while its context lives. The next compile_* in the context builds the layer again (from the
// kernel caches).
size_t release_layers();

// Completes an unfinalized result: out[t] = sum_j expert_weights[t, j] * gemm2_out[perm[t*k+j]].
// gemm2_out and output must be 16-byte aligned; num_tokens has launch()'s bounds.
void finalize(const UnfinalizedLayer& layer, const UnfinalizedOutput& in, int num_tokens,
              const FinalizedOutput& out, Stream stream);

// ---------------------------------------------------------------------------------------------
// Inspection (no GPU needed): what the JIT generates for a spec.
enum class DumpKind { Ir, Plan, Cuda, Ptx };
// tokens > 0 keeps only the kernels a launch with that many tokens uses. The arch defaults to
// the current device's, else sm_90a.
std::string dump(const MoeSpec& spec, DumpKind kind, const std::string& arch = "", int tokens = 0);

// Compiles every kernel of the spec's plan to CUBIN (through the cache) and reports resources.
struct KernelReport {
  std::string name;       // plan kernel name, e.g. "gemm1_b0"
  std::string arch;
  size_t cubin_bytes = 0;
  int registers = 0;
  int spill_store_bytes = 0;
  int spill_load_bytes = 0;
  int stack_bytes = 0;
  double compile_ms = 0;  // 0 when served from a cache
  // The kernel whose code this one shares (the same code in several token buckets; compiled
  // once, its figures repeated here with compile_ms 0); empty for a kernel of its own code.
  std::string same_as;
};
std::vector<KernelReport> compile_report(const MoeSpec& spec, const CompileOptions& options);

// Device queries through the lazily opened driver (no GPU: has_gpu() is false, with a reason; a
// driver older than NVRTC's major release, e.g. below CUDA 13.0 for NVRTC 13.x, counts as none,
// and the reason names both versions).
bool has_gpu(std::string* why_not = nullptr);
std::string device_arch();  // exact arch of the current device, e.g. "sm_90a"
std::string device_name();

const char* version();

}  // namespace moejit
