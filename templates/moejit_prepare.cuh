// Layer::prepare_weights: a row-major MXINT4 weight tensor (w13 or w2, DESIGN.md) rewritten in
// WeightFormat::MxInt4G32Tiled (moejit.h): rows in blocks of PrepareParams::block, each block as
// [K / 256 chunks][block rows][128 bytes], the 16-byte unit u of a row's 128 bytes at u ^ (row % 8).
// That is the shared-memory image of the decode kernels' weight boxes, so a box of a whole block
// is one contiguous run (moejit_stream.cuh, weight_box). One thread per 16-byte unit of the
// output, in output order: stores are contiguous, and 8 threads read one 128-byte line of a row.
#pragma once

#include "moejit_common.cuh"

namespace moejit_dev {

template <class Cfg>
__device__ void prepare_weights(const PrepareParams& p) {
  const long long row_units = p.row_bytes / 16;  // 16-byte units per row
  const long long block_units = row_units * p.block;
  const long long units = p.rows * row_units;
  const uint4* src = reinterpret_cast<const uint4*>(p.src);
  uint4* dst = reinterpret_cast<uint4*>(p.dst);
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < units;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long blk = i / block_units;
    const long long in_block = i - blk * block_units;
    const long long chunk = in_block / (8 * p.block);
    const int r = static_cast<int>((in_block / 8) % p.block);
    const int slot = static_cast<int>(in_block % 8);
    const long long row = blk * p.block + r;
    dst[i] = src[row * row_units + chunk * 8 + (slot ^ (r & 7))];
  }
}

}  // namespace moejit_dev
