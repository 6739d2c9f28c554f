// A HostLayer's tensors on the device, as moejit::MoeInputs. Used by the GPU tests and the CLI.
#pragma once

#include "moejit/moejit.h"
#include "reference/device_buffer.h"
#include "reference/layer_data.h"

namespace moejit::ref {

struct DeviceLayer {
  DeviceBuffer w13, w13_scale, w2, w2_scale, alpha, beta, limit;  // row-major (DESIGN.md)
  // For WeightFormat::MxInt4G32Tiled: w13 and w2 as the layer reads them (Layer::prepare_weights).
  DeviceBuffer w13_tiled, w2_tiled;
  DeviceBuffer hidden, logits, bias, topk_ids, topk_weights;

  // Uploads the weights; for a tiled spec (layer.spec) also writes them tiled (prepare_tiled).
  void upload_weights(const HostLayer& layer);
  // For a tiled spec, w13_tiled and w2_tiled from w13 and w2 by the library's
  // Layer::prepare_weights, every expert's (whatever spec's expert-parallel rank); once.
  void prepare_tiled(const MoeSpec& spec);
  void upload_inputs(const HostLayer& layer);
  // Device pointers of everything the spec needs (null for what it does not).
  MoeInputs inputs(const MoeSpec& spec) const;
};

}  // namespace moejit::ref
