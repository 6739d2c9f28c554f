#include "reference/device_layer.h"

namespace moejit::ref {

namespace {

DeviceBuffer upload_bytes(const void* data, size_t bytes) {
  DeviceBuffer b(bytes);
  if (bytes) CUDA_OK(cudaMemcpy(b.get(), data, bytes, cudaMemcpyHostToDevice));
  return b;
}

}  // namespace

void DeviceLayer::upload_weights(const HostLayer& l) {
  w13 = DeviceBuffer::upload(l.w13);
  w13_scale = DeviceBuffer::upload(l.w13_scale);
  w2 = DeviceBuffer::upload(l.w2);
  w2_scale = DeviceBuffer::upload(l.w2_scale);
  alpha = DeviceBuffer::upload(l.alpha);
  beta = DeviceBuffer::upload(l.beta);
  limit = DeviceBuffer::upload(l.limit);
  for (DeviceBuffer* b : {&w13_tiled, &w13_scale_tiled, &w2_tiled, &w2_scale_tiled}) *b = DeviceBuffer();
  prepare_tiled(l.spec);
}

void DeviceLayer::prepare_tiled(const MoeSpec& spec) {
  if (spec.weight_format != WeightFormat::MxInt4G32Tiled || w13_tiled.bytes() > 0) return;
  MoeSpec all = spec;  // every expert
  all.local_expert_offset = 0;
  all.local_num_experts = 0;
  const TiledWeightBytes sizes = tiled_weight_bytes(all);  // (padded where I % 256 != 0)
  w13_tiled = DeviceBuffer(sizes.w13);
  w13_scale_tiled = DeviceBuffer(sizes.w13_scale);
  w2_tiled = DeviceBuffer(sizes.w2);
  w2_scale_tiled = DeviceBuffer(sizes.w2_scale);
  MoeInputs in;
  in.w13 = w13.get<uint8_t>();
  in.w13_scale = w13_scale.get();
  in.w2 = w2.get<uint8_t>();
  in.w2_scale = w2_scale.get();
  const TiledWeights out{w13_tiled.get<uint8_t>(), w13_scale_tiled.get(), w2_tiled.get<uint8_t>(),
                         w2_scale_tiled.get()};
  auto prepare = [&](const Layer& layer) { layer.prepare_weights(in, out, nullptr); };
  if (all.finalize) prepare(compile_finalized(all));
  else prepare(compile_unfinalized(all));
  CUDA_OK(cudaDeviceSynchronize());
}

void DeviceLayer::upload_inputs(const HostLayer& l) {
  hidden = DeviceBuffer::upload(l.hidden);
  logits = upload_bytes(l.logits_data(), l.logits_bytes());
  bias = upload_bytes(l.bias_data(), l.bias_bytes());
  topk_ids = DeviceBuffer::upload(l.topk_ids);
  topk_weights = DeviceBuffer::upload(l.topk_weights);
}

MoeInputs DeviceLayer::inputs(const MoeSpec& spec) const {
  MoeInputs in;
  const bool pre = spec.routing == RoutingMethod::Precomputed;
  in.hidden_states = hidden.get();
  in.routing_logits = pre ? nullptr : logits.get();
  in.routing_bias = spec.has_routing_bias ? bias.get() : nullptr;
  in.topk_ids = pre ? topk_ids.get<int32_t>() : nullptr;
  in.topk_weights = pre ? topk_weights.get<float>() : nullptr;
  const bool tiled = spec.weight_format == WeightFormat::MxInt4G32Tiled;
  in.w13 = (tiled ? w13_tiled : w13).get<uint8_t>();
  in.w13_scale = (tiled ? w13_scale_tiled : w13_scale).get();
  in.w2 = (tiled ? w2_tiled : w2).get<uint8_t>();
  in.w2_scale = (tiled ? w2_scale_tiled : w2_scale).get();
  in.swiglu_alpha = spec.swiglu_alpha ? alpha.get<float>() : nullptr;
  in.swiglu_beta = spec.swiglu_beta ? beta.get<float>() : nullptr;
  in.swiglu_limit = spec.swiglu_limit ? limit.get<float>() : nullptr;
  return in;
}

MoeInputs DeviceLayer::row_major(MoeInputs in) const {
  in.w13 = w13.get<uint8_t>();
  in.w13_scale = w13_scale.get();
  in.w2 = w2.get<uint8_t>();
  in.w2_scale = w2_scale.get();
  return in;
}

}  // namespace moejit::ref
