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
  in.w13 = w13.get<uint8_t>();
  in.w13_scale = w13_scale.get();
  in.w2 = w2.get<uint8_t>();
  in.w2_scale = w2_scale.get();
  in.swiglu_alpha = spec.swiglu_alpha ? alpha.get<float>() : nullptr;
  in.swiglu_beta = spec.swiglu_beta ? beta.get<float>() : nullptr;
  in.swiglu_limit = spec.swiglu_limit ? limit.get<float>() : nullptr;
  return in;
}

}  // namespace moejit::ref
