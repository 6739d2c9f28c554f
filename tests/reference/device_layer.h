// A HostLayer's tensors on the device, as moejit::MoeInputs. Used by the GPU tests and the CLI.
#pragma once

#include "moejit/moejit.h"
#include "reference/device_buffer.h"
#include "reference/layer_data.h"

namespace moejit::ref {

struct DeviceLayer {
  DeviceBuffer w13, w13_scale, w2, w2_scale, alpha, beta, limit;
  DeviceBuffer hidden, logits, bias, topk_ids, topk_weights;

  void upload_weights(const HostLayer& layer);
  void upload_inputs(const HostLayer& layer);
  // Device pointers of everything the spec needs (null for what it does not).
  MoeInputs inputs(const MoeSpec& spec) const;
};

}  // namespace moejit::ref
