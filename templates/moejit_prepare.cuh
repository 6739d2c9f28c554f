// Layer::prepare_weights: a row-major MXINT4 weight or scale tensor (DESIGN.md) rewritten in
// WeightFormat::MxInt4G32Tiled (moejit.h): rows in blocks of PrepareParams::block, each block as
// [K / 256 chunks][block rows][chunk bytes of a row] (weights: 128 bytes, the 16-byte unit u of a
// row's chunk stored at u ^ (row % 8); scales: 16 bytes, 8 bf16). That is the shared-memory image
// of the decode kernels' boxes, so a box of a whole block is one contiguous run
// (moejit_stream.cuh, weight_box). One thread per 16-byte unit of the output, in output order:
// stores are contiguous, loads gather whole 128-byte lines (weights) or 16-byte pieces (scales;
// 2-byte ones where a scale row is not whole 16 bytes). The padding of tiled H and I
// (rows and bytes past the layer's: PrepareParams) is written as zeros.
// With PrepareParams::pair_order (w13's weights) each 32-bit word's eight nibbles, k = 8t ..
// 8t + 7, are also reordered: k = 8t + 2m to nibble m, k = 8t + 2m + 1 to nibble m + 4 (m = 0..3),
// so that the decode kernels' one-lop3 nibble pairs (m, m + 4) are consecutive k, which they
// multiply by x as it lies in memory (moejit_stream.cuh).
#pragma once

#include "moejit_common.cuh"

namespace moejit_dev {

// A row-major word (nibble i: k = 8t + i) in pair order (nibble i / 2, or 4 + i / 2 for odd i).
__device__ __forceinline__ uint32_t pair_order_word(uint32_t w) {
  uint32_t r = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int to = (i & 1) ? 4 + (i >> 1) : (i >> 1);
    r |= ((w >> (4 * i)) & 0xfu) << (4 * to);
  }
  return r;
}

template <class Cfg>
__device__ void prepare_weights(const PrepareParams& p) {
  const long long row_units = p.row_bytes / 16;  // 16-byte units per row
  const int cu = p.chunk_units;                  // per row and chunk: 8 (weights) or 1 (scales)
  const long long block_units = row_units * p.block;
  const long long units = p.rows * row_units;
  uint4* dst = reinterpret_cast<uint4*>(p.dst);
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < units;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long blk = i / block_units;
    const long long in_block = i - blk * block_units;
    const long long chunk = in_block / (static_cast<long long>(cu) * p.block);
    const int r = static_cast<int>((in_block / cu) % p.block);
    const int slot = static_cast<int>(in_block % cu);
    const long long row = blk * p.block + r;
    // The unit's bytes of the output row are these of the row-major row (before the padding).
    const long long off = (chunk * cu + (cu == 8 ? slot ^ (r & 7) : slot)) * 16;
    const long long seg = row / p.seg_rows;
    const long long j = row - seg * p.seg_rows;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (j < p.src_seg_rows && off < p.src_row_bytes) {
      const uint8_t* s = p.src + (seg * p.src_seg_rows + j) * p.src_row_bytes + off;
      if (p.src_row_bytes % 16 == 0) {
        v = *reinterpret_cast<const uint4*>(s);  // (then off + 16 <= src_row_bytes)
      } else {  // scale rows of K / 32 bf16 (2-byte aligned): by bf16, zeros past the row
        uint32_t w[4] = {0u, 0u, 0u, 0u};
        for (int b = 0; b < 16 && off + b < p.src_row_bytes; b += 2)
          w[b >> 2] |= static_cast<uint32_t>(*reinterpret_cast<const unsigned short*>(s + b)) << (8 * (b & 3));
        v = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
    if (p.pair_order) {
      v.x = pair_order_word(v.x);
      v.y = pair_order_word(v.y);
      v.z = pair_order_word(v.z);
      v.w = pair_order_word(v.w);
    }
    dst[i] = v;
  }
}

// RowsParams (moejit_params.h): one thread per 16-byte unit of the output, in output order. It
// may start while its predecessor runs (PDL): it reads nothing before that one has completed.
template <class Cfg>
__device__ void copy_rows(const RowsParams& p) {
  pdl_wait();
  const long long units = p.dst_row_bytes / 16;
  const long long total = p.rows * units;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = i / units, off = (i - row * units) * 16;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (off < p.src_row_bytes) v = *reinterpret_cast<const uint4*>(p.src + row * p.src_row_bytes + off);
    reinterpret_cast<uint4*>(p.dst)[i] = v;
  }
}

}  // namespace moejit_dev
