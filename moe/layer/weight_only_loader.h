// Weight-only checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized) read into the layout of
// moe/quant/weight_only.h. Each stored format is documented beside its reader in
// weight_only_loader.cc; the loader unpacks one Linear at a time into IntLinear (codes, scales,
// zero points and the group of every K element), then packs an expert's slice of this rank.
//
// Act-order (GPTQ desc_act, compressed-tensors actorder "group") is exact: K is sorted by group
// (stable), so every group is again a run of group_size elements; w13 keeps that order beside its
// codes (w13_k_order), and w2's order is folded into the order of the intermediate (w13's rows and
// w2's columns permuted alike). A tensor-parallel slice whose columns do not form whole groups, in
// either order, is refused with the reason.
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "moe/io/safetensors.h"
#include "moe/layer/quantization_config.h"
#include "moe/status.h"

namespace moe::layer {

// One quantized Linear [n, k] (y = x W^T), unpacked.
struct IntLinear {
  Index n = 0, k = 0;
  Index group = 0;                  // K elements per group (k for per channel)
  std::vector<std::uint8_t> codes;  // [n, k] unsigned codes
  std::vector<float> scales;        // [n, groups]
  std::vector<std::uint8_t> zeros;  // [n, groups] unsigned zero points; empty: the scheme's default
  std::vector<std::int32_t> g_idx;  // [k] the group of each K element; empty: k / group
  Index groups() const { return (k + group - 1) / group; }
  Index group_of(Index c) const { return g_idx.empty() ? c / group : g_idx[static_cast<std::size_t>(c)]; }
};

// Reads the Linear `name` ("...experts.3.gate_proj") of n x k weights in the format `q` names
// (QuantMethod::kWeightOnly). Every tensor it opens is added to `used`. Errors name the tensor and
// the expected and actual dtype or shape.
Status read_int_linear(const io::Checkpoint& ckpt, const QuantizationConfig& q, const std::string& name, Index n,
                       Index k, std::set<std::string>* used, IntLinear* out);

// One expert's slice [i0, i0 + m) of the intermediate in the scheme's layout, at its place in the
// layer's buffers: w13 [2m, H / pack] ([gate; up]), w2 [H, m / pack], their scales [2m, groups(H)]
// and [H, groups(m)], zero points likewise (when `z13`/`z2` are given) and w13's K order [H];
// the codes two's complement where `signed_codes` says so.
// `group_size` is the scheme's (0: per channel). *ordered says whether the K order is not the
// identity. Errors name `what` (the expert) and why the slice cannot be represented.
struct WeightOnlyExpertOut {
  std::uint8_t *w13, *w2;
  float *s13, *s2;
  std::uint8_t *z13, *z2;  // null: no zero points
  std::int32_t* k_order;   // [H]
  bool signed_codes;       // store the codes two's complement (quant.signed_codes; no zero points)
};
Status pack_weight_only_expert(const IntLinear& gate, const IntLinear& up, const IntLinear& down, Index i0, Index m,
                               int bits, Index group_size, const std::string& what, const WeightOnlyExpertOut& out,
                               bool* ordered);

}  // namespace moe::layer
