// The layer's device stages around the experts: the router GEMM, the built-in routing policies with
// one warp per token, and the combine pass (zero experts, a shared expert computed apart).
// Semantics: those of the CPU layer (moe/layer/moe_layer.cc) and of moe/routing.h's route_token;
// only the order of floating-point sums differs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moe/cuda/launch.h"
#include "moe/quant/numeric.h"
#include "moe/routing.h"
#include "moe/tensor.h"

namespace moe::cuda::detail {

// ---- router logits: logits[m, e] = sum_h x[m, h] * w[e, h] (+ bias[e]), fp32 products and sums --

// Decode and small batches: block (e, token block) streams expert row e once for its
// kRouterTokensPerBlock tokens; its 8 warps split H (16-byte loads of the row), then a block
// reduction. The row bytes (E x H fp32) dominate, so the blocks are many and short.
constexpr int kRouterTokensPerBlock = 8;
constexpr Index kRouterRowMaxTokens = 256;  // above: the tiled kernel
template <class T>
__global__ void __launch_bounds__(256) router_logits_rows_kernel(const T* x, Index M, Index H, const float* w,
                                                                 const float* bias, Index E, float* logits) {
  __shared__ float partial[8][kRouterTokensPerBlock];
  grid_dependency_wait();
  allow_dependents_launch();
  const Index e = blockIdx.x, m0 = static_cast<Index>(blockIdx.y) * kRouterTokensPerBlock;
  const int tokens = static_cast<int>(M - m0 < kRouterTokensPerBlock ? M - m0 : kRouterTokensPerBlock);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float acc[kRouterTokensPerBlock];
#pragma unroll
  for (int m = 0; m < kRouterTokensPerBlock; ++m) acc[m] = 0.0f;
  const float* row = w + e * H;
  const T* xs = x + m0 * H;
  const bool vector = H % 4 == 0 && reinterpret_cast<std::uintptr_t>(w) % 16 == 0;
  if (vector) {
#pragma unroll 4
    for (Index h = 4 * static_cast<Index>(threadIdx.x); h < H; h += 4 * 256) {
      const float4 wv = __ldg(reinterpret_cast<const float4*>(row + h));
#pragma unroll
      for (int m = 0; m < kRouterTokensPerBlock; ++m) {
        if (m < tokens) {
          const T* xr = xs + m * H + h;
          acc[m] += to_float(xr[0]) * wv.x + to_float(xr[1]) * wv.y + to_float(xr[2]) * wv.z + to_float(xr[3]) * wv.w;
        }
      }
    }
  } else {
    for (Index h = threadIdx.x; h < H; h += 256) {
      const float wv = __ldg(row + h);
#pragma unroll
      for (int m = 0; m < kRouterTokensPerBlock; ++m) {
        if (m < tokens) acc[m] += to_float(xs[m * H + h]) * wv;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kRouterTokensPerBlock; ++m) {
    float v = acc[m];
    for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
    if (lane == 0) partial[warp][m] = v;
  }
  __syncthreads();
  if (threadIdx.x < tokens) {
    float v = 0.0f;
    for (int q = 0; q < 8; ++q) v += partial[q][threadIdx.x];
    logits[(m0 + threadIdx.x) * E + e] = v + (bias ? bias[e] : 0.0f);
  }
}

// Prefill: 64 tokens x 64 experts per block, K in steps of 16 through shared memory with the next
// step's operands loaded into registers while this one computes, 4 x 4 outputs per thread (a SIMT
// SGEMM: the router is fp32 as in the CPU layer).
constexpr int kRouterTileM = 64, kRouterTileE = 64, kRouterTileK = 16;
template <class T>
__global__ void __launch_bounds__(256) router_logits_tiled_kernel(const T* x, Index M, Index H, const float* w,
                                                                  const float* bias, Index E, float* logits) {
  __shared__ float xs[kRouterTileK][kRouterTileM + 4];
  __shared__ float ws[kRouterTileK][kRouterTileE + 4];
  grid_dependency_wait();
  allow_dependents_launch();
  const Index m0 = static_cast<Index>(blockIdx.x) * kRouterTileM, e0 = static_cast<Index>(blockIdx.y) * kRouterTileE;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // experts tx*4.., tokens ty*4..
  // Each thread loads 4 elements of each operand per K step: row r = threadIdx.x / 4, columns
  // 4 * (threadIdx.x % 4) .. + 3 (16-wide K step: 4 threads per row).
  const int lr = threadIdx.x / 4, lc = 4 * (threadIdx.x % 4);
  float xa[4], wa[4];
  const auto load = [&](Index k0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const Index k = k0 + lc + j;
      xa[j] = m0 + lr < M && k < H ? to_float(x[(m0 + lr) * H + k]) : 0.0f;
      wa[j] = e0 + lr < E && k < H ? w[(e0 + lr) * H + k] : 0.0f;
    }
  };
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  load(0);
  for (Index k0 = 0; k0 < H; k0 += kRouterTileK) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      xs[lc + j][lr] = xa[j];
      ws[lc + j][lr] = wa[j];
    }
    __syncthreads();
    if (k0 + kRouterTileK < H) load(k0 + kRouterTileK);  // in flight during the products below
#pragma unroll
    for (int k = 0; k < kRouterTileK; ++k) {
      const float4 a = *reinterpret_cast<const float4*>(&xs[k][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&ws[k][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const Index m = m0 + ty * 4 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const Index e = e0 + tx * 4 + j;
      if (e < E) logits[m * E + e] = acc[i][j] + (bias ? bias[e] : 0.0f);
    }
  }
}

// Prefill through tensor cores: the fp32 router w is stored as three bf16 pieces (hi = bf16(w),
// mid = bf16(w - hi), lo = bf16(w - hi - mid): together every bit of w's 24-bit significand), so
// x . w = x . hi + x . mid + x . lo with bf16 x has exact products and fp32 sums (a bf16 GEMM of
// N = 3E into fp32 logits, summed per expert by the routing kernel): the fp32 router at bf16
// tensor-core speed. Pieces [3][E][H].
static __global__ void split_router_kernel(const float* w, std::size_t n, bfloat16* pieces) {
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float v = w[i];
    const bfloat16 hi = from_float<bfloat16>(v);
    const float r1 = v - to_float(hi);
    const bfloat16 mid = from_float<bfloat16>(r1);
    const float r2 = r1 - to_float(mid);
    pieces[i] = hi;
    pieces[n + i] = mid;
    pieces[2 * n + i] = from_float<bfloat16>(r2);
  }
}

// ---- routing: one warp per token --------------------------------------------------------------
// The built-in policies of moe/routing.h (ScoredTopK<Softmax|Sigmoid>, GroupedTopK<...>,
// Llama4TopK) with E <= kWarpRouteMaxExperts and at most 32 groups: scores and keys in shared
// memory, group keys one lane per group (in the CPU's order, so they are bit-identical), and top-k
// by k rounds of a warp-wide argmax under ranks_before (larger key, then lower id: the CPU's
// ranking). Weight finishing (renormalize, scale) runs on lane 0 in the CPU's order.
//
// After the k routed slots, `appended` slots name always-selected experts (shared experts run as
// extra experts of the grouped GEMM) with ids appended_first_id + s and weight 1, or
// sigmoid(x . shared_gate) when shared_gate is given (Qwen2-MoE); `gate_out`, when given, receives
// that weight per token instead (a shared expert computed apart).
enum class WarpScoring { kSoftmax, kSigmoid, kRawLlama4 };
constexpr int kWarpRouteMaxExperts = 1024;

// The warp-level fast path of a routing policy: WarpRouteOf<R>::kScoring. A policy without a
// specialization has none (the device layer refuses it at compile time; moe::Kernel's generic
// per-token route_kernel runs any policy). Grouping follows the policy's Arguments.
template <class Routing>
struct WarpRouteOf;
template <>
struct WarpRouteOf<routing::SoftmaxTopK> {
  static constexpr WarpScoring kScoring = WarpScoring::kSoftmax;
};
template <>
struct WarpRouteOf<routing::SigmoidTopK> {
  static constexpr WarpScoring kScoring = WarpScoring::kSigmoid;
};
template <class Scoring>
struct WarpRouteOf<routing::GroupedTopK<Scoring>> {
  static constexpr WarpScoring kScoring = WarpRouteOf<routing::ScoredTopK<Scoring>>::kScoring;
};
template <>
struct WarpRouteOf<routing::Llama4TopK> {
  static constexpr WarpScoring kScoring = WarpScoring::kRawLlama4;
};
template <class Routing>
concept HasWarpRoute = requires { WarpRouteOf<Routing>::kScoring; };
constexpr int kWarpRouteWarps = 4;

struct WarpRouteParams {
  float* logits;        // [M, pieces * E]: logit e = sum over pieces p (in order) of [m, p * E + e];
                        // with pieces, the kernel writes the sums over the first E columns
  int logit_pieces;     // 1, or 3 (split_router_kernel's pieces, before their router bias)
  const float* router_bias;  // [E] or null: added to the summed pieces
  Index M;
  int E;
  int top_k;
  const float* correction_bias;  // [E] or null
  int groups;                     // > 1: grouped top-k
  int topk_group;
  bool renormalize;
  float routed_scaling_factor;
  int appended;                   // always-selected slots after the routed ones
  int appended_first_id;
  const float* shared_gate;       // [H] or null
  Index H;
  std::int32_t* ids;              // [M, top_k + appended]
  float* weights;                 // [M, top_k + appended]
  float* gate_out;                // [M] or null
};

template <WarpScoring kScoring, class T>
__global__ void __launch_bounds__(32 * kWarpRouteWarps) warp_route_kernel(WarpRouteParams p, const T* x) {
  __shared__ float scores_all[kWarpRouteWarps][kWarpRouteMaxExperts];
  __shared__ float keys_all[kWarpRouteWarps][kWarpRouteMaxExperts];
  grid_dependency_wait();
  allow_dependents_launch();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Index m = static_cast<Index>(blockIdx.x) * kWarpRouteWarps + warp;
  if (m >= p.M) return;
  float* scores = scores_all[warp];
  float* keys = keys_all[warp];
  const int E = p.E;
  const float inf = math::infinity();
  if (p.logit_pieces > 1) {  // sum the pieces into the first E columns (this warp's row only)
    float* row = p.logits + m * p.logit_pieces * E;
    for (int i = lane; i < E; i += 32) {
      float v = row[i];
      for (int q = 1; q < p.logit_pieces; ++q) v += row[q * E + i];
      row[i] = v + (p.router_bias ? p.router_bias[i] : 0.0f);
    }
    __syncwarp();
  }
  const float* logits = p.logits + m * p.logit_pieces * E;
  // Scores.
  if constexpr (kScoring == WarpScoring::kSoftmax) {
    float max_v = -inf;
    int pos_inf = 0;
    for (int i = lane; i < E; i += 32) {
      const float v = math::isnan(logits[i]) ? -inf : logits[i];
      max_v = fmaxf(max_v, v);
      pos_inf += v == inf;
    }
    for (int d = 16; d > 0; d /= 2) {
      max_v = fmaxf(max_v, __shfl_xor_sync(0xffffffffu, max_v, d));
      pos_inf += __shfl_xor_sync(0xffffffffu, pos_inf, d);
    }
    if (max_v == inf || max_v == -inf) {
      for (int i = lane; i < E; i += 32) {
        scores[i] = max_v == inf ? (logits[i] == inf ? 1.0f / static_cast<float>(pos_inf) : 0.0f)
                                 : 1.0f / static_cast<float>(E);
      }
    } else {
      float sum = 0.0f;
      for (int i = lane; i < E; i += 32) {
        const float v = math::isnan(logits[i]) ? -inf : logits[i];
        scores[i] = math::exp(v - max_v);
        sum += scores[i];
      }
      for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, d);
      const float inv = 1.0f / sum;
      for (int i = lane; i < E; i += 32) scores[i] *= inv;
    }
  } else if constexpr (kScoring == WarpScoring::kSigmoid) {
    for (int i = lane; i < E; i += 32) scores[i] = routing::safe_sigmoid(logits[i]);
  } else {  // Llama-4: select on the raw logits, weight sigmoid(logit)
    for (int i = lane; i < E; i += 32) scores[i] = logits[i];
  }
  for (int i = lane; i < E; i += 32) keys[i] = p.correction_bias ? scores[i] + p.correction_bias[i] : scores[i];
  __syncwarp();
  // Grouped: keep the topk_group best groups, mask the rest to -inf.
  if (p.groups > 1) {
    const int per_group = E / p.groups;
    float group_key = -inf;
    if (lane < p.groups) {
      const float* k = keys + lane * per_group;
      if (p.correction_bias) {
        float best = -inf, second = -inf;
        for (int i = 0; i < per_group; ++i) {
          if (routing::ranks_before(k[i], 0, best, 0)) {
            second = best;
            best = k[i];
          } else if (routing::ranks_before(k[i], 0, second, 0)) {
            second = k[i];
          }
        }
        group_key = per_group >= 2 ? best + second : best;
      } else {
        float best = -inf;
        for (int i = 0; i < per_group; ++i) best = math::fmax(best, k[i]);
        group_key = best;
      }
    }
    __syncwarp();  // every lane's group-key reads of `keys` before the masking writes below
    bool kept = false;
    bool taken = lane >= p.groups;
    for (int round = 0; round < p.topk_group; ++round) {
      float bk = taken ? -inf : group_key;
      int bi = taken ? INT32_MAX : lane;
      for (int d = 16; d > 0; d /= 2) {
        const float ok = __shfl_xor_sync(0xffffffffu, bk, d);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, d);
        if (routing::ranks_before(ok, oi, bk, bi)) {
          bk = ok;
          bi = oi;
        }
      }
      if (lane == bi) {
        kept = true;
        taken = true;
      }
    }
    const unsigned kept_mask = __ballot_sync(0xffffffffu, kept);
    for (int i = lane; i < E; i += 32) {
      if (!((kept_mask >> (i / per_group)) & 1u)) keys[i] = -inf;
    }
    __syncwarp();
  }
  // Top-k: k rounds of a warp argmax over the keys not yet taken (bit j of `taken`: expert lane + 32 j).
  std::uint32_t taken = 0;
  std::int32_t* ids = p.ids + m * (p.top_k + p.appended);
  float* weights = p.weights + m * (p.top_k + p.appended);
  for (int j = 0; j < p.top_k; ++j) {
    float bk = 0.0f;
    int bi = INT32_MAX;
    for (int i = lane, b = 0; i < E; i += 32, ++b) {
      if ((taken >> b) & 1u) continue;
      if (bi == INT32_MAX || routing::ranks_before(keys[i], i, bk, bi)) {
        bk = keys[i];
        bi = i;
      }
    }
    for (int d = 16; d > 0; d /= 2) {
      const float ok = __shfl_xor_sync(0xffffffffu, bk, d);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, d);
      if (oi != INT32_MAX && (bi == INT32_MAX || routing::ranks_before(ok, oi, bk, bi))) {
        bk = ok;
        bi = oi;
      }
    }
    if (bi % 32 == lane) taken |= 1u << (bi / 32);
    if (lane == 0) ids[j] = bi;
  }
  __syncwarp();
  // Shared expert gate: sigmoid(x . gate) in fp32 (warp dot product).
  float gate = 1.0f;
  if (p.shared_gate) {
    float s = 0.0f;
    for (Index h = lane; h < p.H; h += 32) s += to_float(x[m * p.H + h]) * p.shared_gate[h];
    for (int d = 16; d > 0; d /= 2) s += __shfl_xor_sync(0xffffffffu, s, d);
    gate = 1.0f / (1.0f + math::exp(-s));
  }
  if (lane == 0) {
    for (int j = 0; j < p.top_k; ++j) {
      const float sc = scores[ids[j]];
      weights[j] = kScoring == WarpScoring::kRawLlama4 ? routing::safe_sigmoid(sc) : sc;
    }
    if constexpr (kScoring != WarpScoring::kRawLlama4) {
      routing::finish_weights(weights, p.top_k, p.renormalize, p.routed_scaling_factor);
    }
    for (int s = 0; s < p.appended; ++s) {
      ids[p.top_k + s] = p.appended_first_id + s;
      weights[p.top_k + s] = gate;
    }
    if (p.gate_out) p.gate_out[m] = gate;
  }
}

// ---- combine: out = round(y (+ s) + sum over zero-expert slots of w * x) ------------------------
// Zero ("identity") experts are the ids in [zero_first, zero_last); `s` (a shared expert computed
// apart) may be null. One thread per element; the sums in float, in slot order, rounded once.
template <class T>
__global__ void combine_kernel(const T* y, const T* s, const T* x, const std::int32_t* ids, const float* weights,
                               int ld_slots, int top_k, int zero_first, int zero_last, Index M, Index H, T* out) {
  grid_dependency_wait();
  allow_dependents_launch();
  const Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * H) return;
  const Index m = i / H;
  float v = to_float(y[i]);
  if (s) v += to_float(s[i]);
  if (zero_first < zero_last) {
    const float xv = to_float(x[i]);
    for (int j = 0; j < top_k; ++j) {
      const std::int32_t id = ids[m * ld_slots + j];
      if (id >= zero_first && id < zero_last) v += weights[m * ld_slots + j] * xv;
    }
  }
  out[i] = from_float<T>(v);
}

}  // namespace moe::cuda::detail
