// A HostLayer's tensors on the device, as moejit::MoeInputs. Used by the GPU tests and the CLI.
#pragma once

#include "moejit/moejit.h"
#include "reference/device_buffer.h"
#include "reference/layer_data.h"

namespace moejit::ref {

struct DeviceLayer {
  DeviceBuffer w13, w13_scale, w2, w2_scale, alpha, beta, limit;  // row-major (DESIGN.md)
  // For WeightFormat::MxInt4G32Tiled: the weights as the layer reads them (Layer::prepare_weights).
  DeviceBuffer w13_tiled, w13_scale_tiled, w2_tiled, w2_scale_tiled;
  DeviceBuffer hidden, logits, bias, topk_ids, topk_weights;

  // Uploads the weights; for a tiled spec (layer.spec) also writes them tiled (prepare_tiled).
  void upload_weights(const HostLayer& layer);
  // For a tiled spec, the *_tiled buffers from the row-major ones by the library's
  // Layer::prepare_weights, every expert's (whatever spec's expert-parallel rank); once.
  void prepare_tiled(const MoeSpec& spec);
  void upload_inputs(const HostLayer& layer);
  // Device pointers of everything the spec needs (null for what it does not); the weights in the
  // spec's format.
  MoeInputs inputs(const MoeSpec& spec) const;
  // `in` with the row-major weights (what the GPU reference reads).
  MoeInputs row_major(MoeInputs in) const;
};

}  // namespace moejit::ref
